"""What every adapter shares: one Embedder, the query task, and the model's output options."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from nvembed_sdk.embedder import DEFAULT_TASK
from nvembed_sdk.errors import InputError, fmt

T = TypeVar("T")


def open_embedder(path: str | Path, **load_options: Any) -> tuple[Any, Any]:
    """``Embedder.load(path, **load_options)`` and the artifact's :class:`~nvembed_sdk.output.OutputSpec`."""
    from nvembed_sdk.embedder import Embedder
    from nvembed_sdk.output import OutputSpec

    embedder = Embedder.load(path, **load_options)
    return embedder, OutputSpec.read(embedder.text.directory)


class TextEncoder:
    """Queries and documents through one Embedder, with a declared ``truncate_dim`` applied.

    Args:
        path: any artifact :meth:`Embedder.load` reads.
        task: the query task (``Instruct: {task}\\nQuery: ``). Defaults to the SDK's default task.
        batch_size: texts per forward pass. Defaults to 32.
        truncate_dim: a width the model declares (``embedding_output.json``). Defaults to None.
        **load_options: ``backend``, ``device`` and backend options for :meth:`Embedder.load`.
    """

    def __init__(self, path: str | Path, task: str = DEFAULT_TASK, batch_size: int = 32,
                 truncate_dim: int | None = None, **load_options: Any) -> None:
        from nvembed_sdk.output import truncate

        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(fmt("batch_size", batch_size, "an int >= 1"))
        self.embedder, self.spec = open_embedder(path, **load_options)
        self.task = task
        self.batch_size = batch_size
        self.truncate_dim = truncate_dim
        truncate(np.zeros((1, self.embedder.dim), np.float32), truncate_dim, self.spec)  # fail at construction

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._finish(self.embedder.embed_queries(list(texts), task=self.task, batch_size=self.batch_size))

    def documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._finish(self.embedder.embed_documents(list(texts), batch_size=self.batch_size))

    def _finish(self, emb: np.ndarray) -> np.ndarray:
        from nvembed_sdk.output import truncate

        return truncate(emb, self.truncate_dim, self.spec)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking embed call off the event loop (backends release the GIL while they compute)."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def lazy_getattr(module: str, names: Sequence[str], package: str, build: Callable[[], None],
                 built: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds the adapter classes on first use.

    The classes subclass the framework's own types, so ``package`` is imported (through
    ``require``, with the install hint) only when one of ``names`` is first asked for.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            if not built:
                from nvembed_sdk._optional import require

                require(package)
                build()
            return built[name]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__

"""LangChain (``langchain-core``) ``Embeddings`` over any NV-Embed artifact: ``NVEmbedEmbeddings``.

    from nvembed_sdk.integrations.langchain import NVEmbedEmbeddings
    emb = NVEmbedEmbeddings("models/nvembed-debian-small", task="Given a question, retrieve ...")
    emb.embed_query("how do I parse options?"); emb.embed_documents(["...", "..."])

Queries get ``Instruct: {task}\\nQuery: `` (masked out of pooling), documents no instruction,
exactly as :meth:`Embedder.embed_queries` / :meth:`Embedder.embed_documents`; lists are embedded
in length-sorted batches of ``batch_size``. The async forms run the same call in a worker thread.
"""

from __future__ import annotations

from typing import Any

from nvembed_sdk.integrations._shared import TextEncoder, in_thread, lazy_getattr

_BUILT: dict[str, type] = {}
__all__ = ["NVEmbedEmbeddings"]  # noqa: F822 - built on first use by __getattr__


def _build() -> None:
    from langchain_core.embeddings import Embeddings

    class NVEmbedEmbeddings(Embeddings):
        """LangChain embeddings backed by :class:`nvembed_sdk.Embedder`.

        Args:
            path: checkpoint dir, bundle dir, ``model.onnx`` or ``engine.plan``.
            task: query task. Defaults to the SDK's default task.
            batch_size: texts per forward pass. Defaults to 32.
            truncate_dim: a width the model declares. Defaults to None (full width).
            **load_options: ``backend``, ``device`` and backend options for :meth:`Embedder.load`.
        """

        def __init__(self, path: Any, **kwargs: Any) -> None:
            self.encoder = TextEncoder(path, **kwargs)

        @property
        def embedder(self) -> Any:
            return self.encoder.embedder

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return self.encoder.documents(texts).tolist()

        def embed_query(self, text: str) -> list[float]:
            return self.encoder.queries([text])[0].tolist()

        async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
            return await in_thread(self.embed_documents, texts)

        async def aembed_query(self, text: str) -> list[float]:
            return await in_thread(self.embed_query, text)

    NVEmbedEmbeddings.__module__ = __name__
    _BUILT["NVEmbedEmbeddings"] = NVEmbedEmbeddings


__getattr__ = lazy_getattr(__name__, __all__, "langchain_core", _build, _BUILT)

"""LlamaIndex (``llama-index-core``) ``BaseEmbedding`` over any NV-Embed artifact: ``NVEmbedEmbedding``.

    from nvembed_sdk.integrations.llamaindex import NVEmbedEmbedding
    Settings.embed_model = NVEmbedEmbedding("models/nvembed-debian-small")

Query embeddings use ``Instruct: {task}\\nQuery: `` (masked out of pooling), text embeddings none.
``get_text_embedding_batch`` hands ``embed_batch_size`` texts at a time to one
:meth:`Embedder.embed_documents` call (length-sorted batches of ``batch_size`` inside), not one
text at a time. Async forms run the same calls in a worker thread.
"""

from __future__ import annotations

from typing import Any

from nvembed_sdk.integrations._shared import TextEncoder, in_thread, lazy_getattr

_BUILT: dict[str, type] = {}
__all__ = ["NVEmbedEmbedding"]  # noqa: F822 - built on first use by __getattr__


def _build() -> None:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from pydantic import PrivateAttr

    class NVEmbedEmbedding(BaseEmbedding):
        """LlamaIndex embeddings backed by :class:`nvembed_sdk.Embedder`.

        Args:
            path: checkpoint dir, bundle dir, ``model.onnx`` or ``engine.plan``.
            task: query task. Defaults to the SDK's default task.
            batch_size: texts per forward pass. Defaults to 32.
            embed_batch_size: texts LlamaIndex hands over per call. Defaults to 256.
            truncate_dim: a width the model declares. Defaults to None (full width).
            **load_options: ``backend``, ``device`` and backend options for :meth:`Embedder.load`.
        """

        _encoder: Any = PrivateAttr()

        def __init__(self, path: Any, task: str | None = None, batch_size: int = 32, embed_batch_size: int = 256,
                     truncate_dim: int | None = None, **load_options: Any) -> None:
            super().__init__(model_name=str(path), embed_batch_size=embed_batch_size)
            kwargs = {"task": task} if task else {}
            self._encoder = TextEncoder(path, batch_size=batch_size, truncate_dim=truncate_dim, **kwargs, **load_options)

        @classmethod
        def class_name(cls) -> str:
            return "NVEmbedEmbedding"

        @property
        def embedder(self) -> Any:
            return self._encoder.embedder

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._encoder.queries([query])[0].tolist()

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._encoder.documents([text])[0].tolist()

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._encoder.documents(texts).tolist()

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return await in_thread(self._get_query_embedding, query)

        async def _aget_text_embedding(self, text: str) -> list[float]:
            return await in_thread(self._get_text_embedding, text)

        async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return await in_thread(self._get_text_embeddings, texts)

    NVEmbedEmbedding.__module__ = __name__
    _BUILT["NVEmbedEmbedding"] = NVEmbedEmbedding


__getattr__ = lazy_getattr(__name__, __all__, "llama_index.core", _build, _BUILT)

"""The OpenAI / NIM embeddings wire format: request model, input rules, response, error envelope.

OpenAI: ``input`` (str | list[str] | list[int] | list[list[int]]), ``model``, ``encoding_format``
(``float`` | ``base64`` = little-endian float32 bytes), ``dimensions``, ``user``.
NIM: ``input_type`` (``query`` | ``passage``), ``truncate`` (``NONE`` | ``START`` | ``END``) and the
``-query`` / ``-passage`` model-name suffix. SDK extension: ``instruction`` (the full prefix) or
``task`` (builds ``"Instruct: {task}\\nQuery: "``) for queries.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

try:  # optional: ~5x faster JSON for float vectors
    import orjson
except ImportError:  # pragma: no cover - orjson is in the serve extra
    orjson = None  # type: ignore[assignment]

import json

TRUNCATE = ("NONE", "START", "END")


class APIError(Exception):
    """An error answered in OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` body (unknown fields are ignored, as OpenAI clients add their own)."""

    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="a text, a list of texts, token ids, or a list of token-id lists")
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    user: StrictStr | None = None
    input_type: Literal["query", "passage"] | None = None
    truncate: Literal["NONE", "START", "END"] = "NONE"
    instruction: StrictStr | None = None
    task: StrictStr | None = None

    @field_validator("truncate", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("input_type", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v


@dataclass
class Inputs:
    """A request's inputs, normalised: texts or token-id rows (never both)."""

    texts: list[str] | None
    ids: list[list[int]] | None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.ids)  # type: ignore[arg-type]


def parse_inputs(value: str | list, max_inputs: int, vocab_size: int) -> Inputs:
    """Split the OpenAI ``input`` union into texts or id rows and check the limits.

    Raises:
        APIError: 400 for an empty list, too many inputs, an empty id row or an id outside the vocabulary.
    """
    if isinstance(value, str):
        return Inputs([value], None)
    if not value:
        raise APIError(400, "input | got an empty list. Note: send at least one text", param="input")
    if len(value) > max_inputs:
        raise APIError(400, f"input | got {len(value)} inputs. Note: at most {max_inputs} per request "
                            "(--max-inputs); split the request", param="input", code="too_many_inputs")
    first = value[0]
    if isinstance(first, str):
        return Inputs(list(value), None)
    rows = [value] if isinstance(first, int) else list(value)
    for i, row in enumerate(rows):
        if not row:
            raise APIError(400, f"input[{i}] | got an empty token list. Note: token ids include BOS and EOS",
                           param="input")
        lo, hi = min(row), max(row)
        if lo < 0 or hi >= vocab_size:
            raise APIError(400, f"input[{i}] | got token id {lo if lo < 0 else hi}. Note: ids must lie in "
                                f"[0, {vocab_size})", param="input")
    return Inputs(None, rows)


def split_model_name(name: str | None, served: str) -> tuple[str, str | None]:
    """``"m-query"`` -> ``("m", "query")`` (NIM style); other names -> ``(name, None)``."""
    if name:
        for suffix in ("query", "passage"):
            if name.endswith("-" + suffix) and name[: -len(suffix) - 1] == served:
                return served, suffix
    return name or served, None


def truncate_ids(ids: list[int], pool_start: int, limit: int, mode: str, index: int) -> list[int]:
    """Apply NIM's ``truncate`` to one row of model input ids (BOS ... EOS).

    ``END`` keeps the first ``limit`` ids (``Embedder``'s own rule). ``START`` keeps BOS and the
    instruction span (the first ``max(pool_start, 1)`` ids: they carry the pool rule) and the last
    ids of the text. ``NONE`` refuses an over-long row.

    Raises:
        APIError: 400 naming the index and the length when ``mode`` is ``NONE``.
    """
    n = len(ids)
    if n <= limit:
        return ids
    if mode == "END":
        return ids[:limit]
    if mode == "START":
        head = max(pool_start, 1)
        return ids[:head] + ids[n - (limit - head):]
    raise APIError(400, f"input[{index}] | got {n} tokens. Note: the model takes at most {limit}; shorten it or "
                        "send truncate END or START", param="input", code="input_too_long")


def encode_vector(vec: np.ndarray, encoding: str) -> list[float] | str | np.ndarray:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return vec


def embedding_response(vectors: np.ndarray, encoding: str, model: str, prompt_tokens: int) -> bytes:
    """The OpenAI ``list`` object, serialised (float vectors straight from NumPy with orjson)."""
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding)}
            for i, v in enumerate(vectors)]
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": int(prompt_tokens), "total_tokens": int(prompt_tokens)}}
    return dumps(body)


def dumps(obj: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(type(o).__name__)

    return json.dumps(obj, default=default).encode()


def truncate_dims(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Keep the first ``dims`` components and re-normalise (Matryoshka). (N, D) -> (N, dims)."""
    out = np.ascontiguousarray(vectors[:, :dims])
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out

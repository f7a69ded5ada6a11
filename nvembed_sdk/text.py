"""The one text pipeline every backend, the trainer and export calibration use.

Text = instruction + text + EOS (the literal ``"</s>"``, as the released ``encode()`` appends
it), tokenised with the checkpoint's own ``tokenizer.json`` (BOS added by its post-processor),
truncated to ``max_length`` keeping the first tokens, right-padded with pad = EOS.

Pool mask (reference/NV-Embed-v2.md §4.2): the attention mask with positions
``0 .. L-1`` zeroed, where ``L = len(tokenize(instruction))`` counted *without* special tokens.
The off-by-one of not counting BOS is cancelled by the stray ``▁`` token of the instruction's
trailing space; when the text starts with a digit, CJK, a newline or a space, that ``▁`` stays a
separate token and *is* pooled. Copied on purpose, not "fixed".
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nvembed_sdk.errors import ArtifactError, InputError, fmt

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Batch:
    """Model inputs, all int64 (B, T) NumPy arrays."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pool_mask: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pool_mask": self.pool_mask}

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def check_texts(texts: object) -> list[str]:
    """Validate user input: a str or a sequence of str."""
    if isinstance(texts, str):
        return [texts]
    # A mapping iterates its keys and bytes its ints: both were embedded as something else.
    if isinstance(texts, Mapping | bytes | bytearray) or (not isinstance(texts, Sequence)
                                                          and not hasattr(texts, "__iter__")):
        raise InputError(fmt("texts", type(texts).__name__, "a str or a list of str"))
    out = list(texts)  # type: ignore[call-overload]
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise InputError(fmt(f"texts[{i}]", f"{type(t).__name__} {t!r:.40}", "every item must be a str"))
        check_utf8(t, f"texts[{i}]")
    return out


def check_utf8(text: str, where: str) -> None:
    """Refuse a str that has no UTF-8 form (a lone surrogate, e.g. from undecodable argv bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(fmt(where, f"{text[max(0, exc.start - 20):exc.end + 20]!r} (a lone surrogate "
                             f"{text[exc.start]!r} at character {exc.start})",
                             "valid Unicode text; decode your input as UTF-8 first")) from None


def check_pool_spans(ids: Sequence[Sequence[int]], start: int, instruction: str) -> None:
    """Refuse rows whose pool span ``[start, len)`` is empty.

    When the instruction's last word merges with the text (``"Instruct: especiall"`` + ``"y"``),
    the combined row can be no longer than the instruction tokenised alone, so the pool mask is
    all zero. The released code then divides by zero (reference/NV-Embed-v2.md §3.3: plain
    division, no epsilon) and returns NaN; an error naming the instruction is returned instead.
    """
    empty = [i for i, row in enumerate(ids) if len(row) <= start]
    if empty:
        raise InputError(fmt(f"instruction {instruction!r:.80}",
                             f"nothing left to pool for texts {empty[:10]}{' ...' if len(empty) > 10 else ''} "
                             f"(its last word merges with the text)",
                             "end the instruction with a space or punctuation, e.g. 'Instruct: {task}\\nQuery: '"))


class TextPipeline:
    """Tokenizer + NV-Embed text rules.

    Args:
        tokenizer_path: a ``tokenizer.json`` file or a directory holding one.
        max_length: default truncation length (tokens, BOS and EOS included). Defaults to 4096.
        mask_instruction: zero the instruction span in the pool mask. Defaults to True.
    """

    def __init__(self, tokenizer_path: str | Path, max_length: int = 4096, mask_instruction: bool = True) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_path)
        directory = path if path.is_dir() else path.parent
        file = directory / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ArtifactError(fmt("tokenizer", f"no tokenizer.json in {directory}",
                                    "the checkpoint's own tokenizer.json (never fetched from a hub)"))
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
            raise ArtifactError(fmt(str(file), f"unreadable tokenizer ({exc})", "a tokenizers JSON file")) from exc
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.directory = directory
        cfg = _read_json(directory / "tokenizer_config.json")
        self.eos_token = _token_str(cfg.get("eos_token")) or "</s>"
        pad = _token_str(cfg.get("pad_token")) or self.eos_token
        self.eos_id = self._id(self.eos_token)
        self.pad_id = self._id(pad)
        self.max_length = int(max_length)
        self.mask_instruction = mask_instruction

    def _id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ArtifactError(fmt("tokenizer", f"no id for {token!r}", "EOS/pad tokens in the vocabulary"))
        return int(tid)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    @functools.lru_cache(maxsize=256)  # noqa: B019 - a pipeline lives as long as its model
    def instruction_length(self, instruction: str) -> int:
        """``L``: tokens of the instruction tokenised alone, no special tokens (0 if empty)."""
        if not instruction or not self.mask_instruction:
            return 0
        return len(self.tokenizer.encode(instruction, add_special_tokens=False).ids)

    def tokenize(self, texts: Sequence[str], instruction: str = "", max_length: int | None = None) -> list[list[int]]:
        """Token ids of ``instruction + text + EOS`` per text, truncated (not padded)."""
        max_length = int(max_length or self.max_length)
        L = self.instruction_length(instruction)
        if max_length <= L:
            raise InputError(fmt("max_length", max_length,
                                 f"must exceed the instruction's {L} tokens, or nothing is left to pool"))
        if not texts:
            return []
        encs = self.tokenizer.encode_batch([instruction + t + self.eos_token for t in texts])
        # Keeping the first max_length tokens equals transformers' truncation with a BOS-only
        # template (BOS kept, an over-long text loses its EOS, as in the release).
        ids = [e.ids[:max_length] for e in encs]
        check_pool_spans(ids, L, instruction)
        return ids

    def collate(self, ids: Sequence[Sequence[int]], pool_starts: Sequence[int] | int = 0) -> Batch:
        """Right-pad to the longest row and build the masks.

        Args:
            ids: token ids per row.
            pool_starts: ``L`` per row (or one for all): positions ``0..L-1`` leave the pool.
        """
        B = len(ids)
        T = max((len(r) for r in ids), default=0)
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        attention = np.zeros((B, T), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            attention[i, : len(row)] = 1
        pool = attention.copy()
        starts = [pool_starts] * B if isinstance(pool_starts, int) else list(pool_starts)
        for i, s in enumerate(starts):
            pool[i, :s] = 0
        return Batch(input_ids, attention, pool)

    def __call__(self, texts: Sequence[str], instruction: str = "", max_length: int | None = None) -> Batch:
        """Tokenise and collate in one call (one instruction for the whole batch)."""
        ids = self.tokenize(texts, instruction, max_length)
        return self.collate(ids, self.instruction_length(instruction))

    def save(self, directory: str | Path) -> None:
        """Copy the tokenizer files next to an artifact."""
        import shutil

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            src = self.directory / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(fmt(str(path), f"invalid JSON ({exc})", "a tokenizer_config.json")) from exc
    return data if isinstance(data, dict) else {}


def _token_str(value: object) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None

"""Train a small Mistral-style tokenizer (byte-fallback BPE, ``<unk> <s> </s>``, metaspace).

Layout of the result mirrors Mistral's ``tokenizer.json``: ids 0..2 are ``<unk> <s> </s>``,
ids 3..258 the byte-fallback tokens ``<0x00>..<0xFF>``, then the learned pieces; the
post-processor prepends ``<s>`` and adds no EOS (the text pipeline appends ``</s>`` itself).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path, min_frequency: int = 2) -> Path:
    """Train and write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``.

    Args:
        texts: training text (an iterator is fine).
        vocab_size: total vocabulary including the 3 specials and 256 byte tokens.
        output_dir: directory to write to (created).
        min_frequency: minimum pair count for a merge. Defaults to 2.

    Returns:
        Path of ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_fixed = len(SPECIALS) + len(BYTE_TOKENS)
    if vocab_size <= n_fixed + 16:
        raise ValueError(f"vocab_size | got {vocab_size}. Note: must exceed {n_fixed + 16}")
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS),
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        show_progress=False,
        limit_alphabet=1000,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    data = json.loads(tok.to_str())
    # Insert the byte tokens at ids 3..258, as in Mistral's vocabulary, and shift the rest.
    vocab: dict[str, int] = data["model"]["vocab"]
    learned = sorted((i, t) for t, i in vocab.items() if t not in SPECIALS and t not in BYTE_TOKENS)
    new_vocab = {t: i for i, t in enumerate(SPECIALS + BYTE_TOKENS)}
    for _, t in learned:
        new_vocab.setdefault(t, len(new_vocab))
    data["model"]["vocab"] = new_vocab
    for added in data.get("added_tokens", []):
        added["id"] = new_vocab[added["content"]]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True),
                                     decoders.ByteFallback(), decoders.Fuse()])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "</s>", "unk_token": "<unk>", "padding_side": "right",
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "LlamaTokenizer",
        "clean_up_tokenization_spaces": False, "legacy": True,
    }, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n",
        encoding="utf-8")
    return out / "tokenizer.json"

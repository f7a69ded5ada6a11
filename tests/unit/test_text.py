from __future__ import annotations

import numpy as np
import pytest

from nvembed_sdk.embedder import query_instruction
from nvembed_sdk.errors import InputError
from nvembed_sdk.text import TextPipeline, check_texts

README_INSTRUCTION = query_instruction("Given a question, retrieve passages that answer the question")


@pytest.fixture(scope="module")
def ref_pipe(reference_dir):
    return TextPipeline(reference_dir, max_length=4096)


def _pooled_tokens(pipe, batch, row=0):
    ids = batch.input_ids[row][batch.pool_mask[row].astype(bool)]
    return [pipe.tokenizer.id_to_token(int(i)) for i in ids]


def test_readme_instruction_masks_18_positions(ref_pipe):
    assert ref_pipe.instruction_length(README_INSTRUCTION) == 18
    b = ref_pipe(["are judo throws allowed in wrestling?"], instruction=README_INSTRUCTION)
    assert b.pool_mask[0, :18].sum() == 0 and b.pool_mask[0, 18] == 1
    toks = _pooled_tokens(ref_pipe, b)
    assert toks[0] == "▁are" and toks[-1] == "</s>"  # <s> + 17 instruction tokens masked


@pytest.mark.parametrize("query,first", [("123 main street", "▁"), ("東京タワー", "▁"), (" leading space", "▁"), ("\nnewline", "▁")])
def test_quirk_separate_space_token_is_pooled(ref_pipe, query, first):
    b = ref_pipe([query], instruction=README_INSTRUCTION)
    assert _pooled_tokens(ref_pipe, b)[0] == first


def test_instruction_without_trailing_space_pools_its_last_token(ref_pipe):
    ins = "Instruct: Given a question, retrieve passages that answer the question\nQuery:"
    b = ref_pipe(["are judo throws allowed"], instruction=ins)
    assert _pooled_tokens(ref_pipe, b)[0] == ":"


def test_passages_pool_bos_to_eos(ref_pipe):
    b = ref_pipe(["hello world", "a much longer passage about wrestling rules"])
    toks = _pooled_tokens(ref_pipe, b, row=0)
    assert toks[0] == "<s>" and toks[-1] == "</s>"
    # right padding with pad = EOS, attention 0 on pads
    assert b.input_ids[0, -1] == ref_pipe.eos_id == 2 and b.attention_mask[0, -1] == 0
    assert (b.pool_mask <= b.attention_mask).all() and b.input_ids.dtype == np.int64


def test_truncation_keeps_first_tokens_and_loses_eos(ref_pipe):
    b = ref_pipe(["word " * 50], max_length=10)
    assert b.input_ids.shape == (1, 10) and b.input_ids[0, 0] == 1 and b.input_ids[0, -1] != 2


def test_max_length_must_exceed_instruction(ref_pipe):
    with pytest.raises(InputError, match="instruction"):
        ref_pipe(["x"], instruction=README_INSTRUCTION, max_length=18)


def test_tiny_tokenizer_pipeline(tiny_tokenizer_dir):
    pipe = TextPipeline(tiny_tokenizer_dir, max_length=32)
    b = pipe(["package number 7", "tools"], instruction="Instruct: find\nQuery: ")
    L = pipe.instruction_length("Instruct: find\nQuery: ")
    assert L > 0 and (b.pool_mask[:, :L] == 0).all() and b.pool_mask.sum(1).min() > 0
    assert b.input_ids[:, 0].tolist() == [1, 1]


def test_check_texts():
    assert check_texts("a") == ["a"]
    assert check_texts(("a", "b")) == ["a", "b"]
    with pytest.raises(InputError, match=r"texts\[1\]"):
        check_texts(["a", 3])
    with pytest.raises(InputError):
        check_texts(5)

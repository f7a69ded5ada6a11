"""The sentence-transformers files written beside checkpoints and bundles, and the MTEB instruction rule
(no integration package needed)."""

from __future__ import annotations

import json

from nvembed_sdk.embedder import DEFAULT_TASK, query_instruction
from nvembed_sdk.integrations.mteb import instruction_for, read_instructions
from nvembed_sdk.integrations.st_files import MODULE_REF, write_st_files


def test_save_model_writes_st_files(tiny_checkpoint):
    modules = json.loads((tiny_checkpoint / "modules.json").read_text())
    assert modules == [{"idx": 0, "name": "0", "path": "", "type": MODULE_REF}]
    cfg = json.loads((tiny_checkpoint / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {"query": query_instruction(DEFAULT_TASK), "document": ""}
    assert (tiny_checkpoint / "sentence_nvembed_config.json").is_file()


def test_user_prompts_survive_and_output_spec_is_copied(tiny_checkpoint_copy, tmp_path):
    cfg_path = tiny_checkpoint_copy / "config_sentence_transformers.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prompts"]["query"] = "Instruct: mine\nQuery: "
    cfg_path.write_text(json.dumps(cfg))
    (tiny_checkpoint_copy / "embedding_output.json").write_text('{"truncate_dims": [], "ranges": {}}')
    out = tmp_path / "bundle"
    out.mkdir()
    write_st_files(out, source=tiny_checkpoint_copy)
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]["query"] == "Instruct: mine\nQuery: "
    assert (out / "embedding_output.json").is_file()


def test_mteb_instruction_rule(reference_dir):
    table = read_instructions(reference_dir / "instructions.json")
    fiqa = table["FiQA2018"]["query"]
    assert instruction_for(table, "FiQA2018", None, "query") == query_instruction(fiqa)
    assert instruction_for(table, "FiQA2018", None, "document") == ""
    quora = table["QuoraRetrieval"]["corpus"]
    assert instruction_for(table, "QuoraRetrieval", None, "document") == query_instruction(quora)
    assert instruction_for(table, "STS", None, None) == query_instruction(table["STS"]["text"])
    # Not in the table: the task's own prompt, then the default task (queries only).
    assert instruction_for(table, "Local", {"query": "find it"}, "query") == query_instruction("find it")
    assert instruction_for(table, "Local", {"query": "find it"}, "document") == ""
    assert instruction_for({}, "Other", None, "query") == query_instruction(DEFAULT_TASK)
    assert instruction_for({}, "Other", None, "document") == ""

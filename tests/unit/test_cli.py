from __future__ import annotations

import json

from click.testing import CliRunner

from nvembed_sdk.cli import main


def test_info_on_released_config(reference_dir):
    res = CliRunner().invoke(main, ["info", str(reference_dir)])
    assert res.exit_code == 0, res.output
    assert "7,851,016,192" in res.output and "32000 tokens" in res.output and "float16" in res.output


def test_info_json_on_checkpoint(tiny_checkpoint):
    res = CliRunner().invoke(main, ["info", str(tiny_checkpoint), "--json"])
    facts = json.loads(res.output)
    assert facts["dim"] == 64 and facts["weights"] == ["model.safetensors"] and facts["kind"] == "checkpoint"


def test_embed_json(tiny_checkpoint):
    res = CliRunner().invoke(main, ["embed", str(tiny_checkpoint), "--text", "hello", "--text", "world",
                                    "--query", "find it", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["dim"] == 64 and len(out["embeddings"]) == 3  # two passages, then the query


def test_errors_are_one_line_with_exit_1(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["info", str(tmp_path / "missing")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("error: ")
    assert "Traceback" not in res.output
    res = runner.invoke(main, ["embed", str(tmp_path)])
    assert res.exit_code == 1 and "--text" in res.output


def test_help_lists_commands():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "info" in res.output and "embed" in res.output

"""Issue 13: bad input, faults and misuse give one clear error (or the released behaviour), never
NaN, a wrong model or a traceback. One test per cause."""

from __future__ import annotations

import copy
import errno
import json
import math
import re
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nvembed_sdk import Embedder
from nvembed_sdk.cli import fail_cleanly, main
from nvembed_sdk.config import PRESETS, NVEmbedConfig
from nvembed_sdk.errors import ArtifactError, InputError, user_message
from nvembed_sdk.text import TextPipeline

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "nvembed-debian-small"


PHASE_LINE = re.compile(r"^\[[^\]]+ \d+/\d+\] ")  # an export's progress lines ("[export fp32 1/1] ...")


def _one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if not PHASE_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert " | got " in lines[0] and ". Note: " in lines[0], res.output
    return lines[0] + "\n"


# ---- finite outputs or an error ------------------------------------------------------------------


def test_instruction_merging_into_the_text_raises_naming_it_instead_of_nan():
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip("the shipped model is absent")
    e = Embedder.load(SHIPPED, device="cpu")
    # The case: "especiall" + "y" merge, so the row is no longer than the instruction.
    with pytest.raises(InputError, match="Instruct: especiall") as err:
        e.embed(["a fine text", "y"], instruction="Instruct: especiall")
    assert "texts [1]" in str(err.value)
    v = e.embed(["y"], instruction="Instruct: especially ")  # the trailing space keeps a pool span
    assert np.isfinite(v).all()


@pytest.mark.parametrize("call, needle", [
    (lambda e: e.embed({"a": 1}), "texts | got dict"),  # embedded the keys
    (lambda e: e.embed(b"abc"), "texts | got bytes"),
    (lambda e: e.embed(["a"], normalize="no"), "normalize | got 'no'"),  # truthy: normalised silently
    (lambda e: e.embed(["a"], batch_size=True), "batch_size | got True"),
])
def test_mistyped_embed_arguments_are_refused(tiny_checkpoint, call, needle):
    with pytest.raises(InputError, match=needle.replace("|", r"\|")):
        call(Embedder.load(tiny_checkpoint))


@pytest.mark.parametrize("path", [None, 123])
def test_a_path_that_is_not_a_path_is_an_input_error(path):
    with pytest.raises(InputError, match="artifact path"):  # was TypeError from Path()
        Embedder.load(path)


def test_parity_refuses_a_str_of_texts(tiny_checkpoint):
    from nvembed_sdk.parity import compare

    with pytest.raises(InputError, match="parity texts"):  # compared its characters
        compare(tiny_checkpoint, tiny_checkpoint, texts="abc")


def test_nan_weights_raise_naming_the_texts(tiny_checkpoint_copy):
    path = tiny_checkpoint_copy / "model.safetensors"
    tensors = load_file(path)
    key = "latent_attention_model.cross_attend_blocks.1.fn.net.2.bias"
    tensors[key] = torch.full_like(tensors[key], float("nan"))  # bytes overwritten inside the file
    save_file(tensors, path)
    e = Embedder.load(tiny_checkpoint_copy, device="cpu")
    with pytest.raises(ArtifactError, match=r"NaN/Inf for texts \[0, 1, 2\]"):
        e.embed(["a", "b", "c"], batch_size=2)
    # `nvembed embed --json` printed NaN: now one line, no JSON.
    res = CliRunner().invoke(main, ["embed", str(tiny_checkpoint_copy), "--device", "cpu", "--text", "a", "--json"])
    line = _one_line_error(res)
    assert "torch fp32 on cpu | got NaN/Inf for texts [0]" in line and "try fp32" not in line  # it is fp32


@pytest.mark.parametrize(("where", "key", "value", "needle"), [
    ("text_config", "hidden_size", 256.0, "text_config.hidden_size | got 256.0"),
    ("text_config", "num_key_value_heads", 0, "text_config.num_key_value_heads | got 0"),
    ("text_config", "rope_theta", "ten thousand", "text_config.rope_theta | got 'ten thousand'"),
    ("text_config", "rms_norm_eps", -1, "text_config.rms_norm_eps | got -1"),
    ("text_config", "num_hidden_layers", True, "text_config.num_hidden_layers | got True"),
    ("latent_attention_config", "num_latents_value", "16", "latent_attention_config.num_latents_value"),
    (None, "text_config", [1, 2], "text_config | got a list"),
    (None, "is_mask_instruction", "no", "is_mask_instruction | got 'no'"),
])
def test_config_values_are_checked_naming_the_field(tmp_path, where, key, value, needle):
    d = copy.deepcopy(PRESETS["tiny-test"].to_dict())
    (d[where] if where else d)[key] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError) as err:
        NVEmbedConfig.from_file(tmp_path)
    assert needle in str(err.value) and str(tmp_path / "config.json") in str(err.value)


def test_manifest_field_types_are_checked():
    from nvembed_sdk.manifest import check_manifest_types

    good = {"kind": "onnx", "precision": "fp32", "model": {"dim": 64}, "text": {"max_length": 512}}
    assert check_manifest_types(good, "nvembed.json") is good
    with pytest.raises(ArtifactError, match=r"model\.dim \| got 'big'"):
        check_manifest_types({**good, "model": {"dim": "big"}}, "nvembed.json")
    with pytest.raises(ArtifactError, match=r"text\.max_length \| got 0"):
        check_manifest_types({**good, "text": {"max_length": 0}}, "nvembed.json")


def test_info_checks_manifest_field_types(tiny_checkpoint, tmp_path):
    from nvembed_sdk.manifest import MANIFEST

    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / MANIFEST).write_text(json.dumps({"format_version": 2, "kind": "onnx", "files": {"model": "model.onnx"},
                                               "model": {"dim": "big"}}))
    line = _one_line_error(CliRunner().invoke(main, ["info", str(bundle)]))  # printed "dim: big", exit 0
    assert "model.dim" in line and "'big'" in line


def test_is_mask_instruction_false_pools_the_instruction(tiny_checkpoint_copy):
    ins = "Instruct: Given a question, retrieve passages\nQuery: "
    masked = Embedder.load(tiny_checkpoint_copy, device="cpu").embed("options", instruction=ins)
    cfg = json.loads((tiny_checkpoint_copy / "config.json").read_text())
    cfg["is_mask_instruction"] = False
    (tiny_checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    e = Embedder.load(tiny_checkpoint_copy, device="cpu")
    assert e.text.instruction_length(ins) == 0  # released encode(): instruction_lens = 0
    unmasked = e.embed("options", instruction=ins)
    # Same as pooling every position by hand (pool start 0).
    ids = e.text.tokenize(["options"], ins)
    ref = e.runner.run(e.text.collate(ids, 0))
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(unmasked, ref[0], atol=1e-6)
    assert float(masked @ unmasked) < 0.9999


def test_max_length_above_the_positions_is_refused(tiny_checkpoint):
    e = Embedder.load(tiny_checkpoint, device="cpu")
    positions = e.manifest["model"]["max_position_embeddings"]
    with pytest.raises(InputError, match=f"at most the model's {positions} positions"):
        e.embed(["a"], max_length=positions + 1)
    assert e.embed("a", max_length=positions).shape == (e.dim,)


def test_wrong_layer_count_is_named_as_such(tiny_checkpoint_copy):
    cfg = json.loads((tiny_checkpoint_copy / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (tiny_checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"num_hidden_layers \| got 3\. .*hold 2 decoder layers"):
        Embedder.load(tiny_checkpoint_copy, device="cpu")


# ---- typed backend options -----------------------------------------------------------------------


def test_unknown_or_mistyped_options_list_the_valid_ones(tiny_checkpoint):
    with pytest.raises(InputError, match="'precison'.*valid options: model .*precision"):
        Embedder.load(tiny_checkpoint, precison="fp16")
    with pytest.raises(InputError, match=r"precision \| got 'fp64'"):
        Embedder.load(tiny_checkpoint, precision="fp64")
    with pytest.raises(InputError, match=r"device \| got 'tpu'"):
        Embedder.load(tiny_checkpoint, device="tpu")
    with pytest.raises(InputError, match=r"backend \| got 'foo'.*onnxruntime"):
        Embedder.load(tiny_checkpoint, backend="foo")


def test_onnxruntime_options_are_typed(tmp_path):
    from nvembed_sdk.runtimes.ort import OrtBackend

    with pytest.raises(InputError, match=r"intra_op_num_threads \| got 'two'"):
        OrtBackend(tmp_path, intra_op_num_threads="two")
    with pytest.raises(InputError, match=r"providers \| got 'CPUExecutionProvider' \(str\)"):
        OrtBackend(tmp_path, providers="CPUExecutionProvider")
    with pytest.raises(InputError, match="graph_optimization_level"):
        OrtBackend(tmp_path, graph_optimization_level="max")
    ok = OrtBackend(tmp_path, providers=["CPUExecutionProvider"], intra_op_num_threads=2)
    assert ok.options == {"providers": ["CPUExecutionProvider"], "intra_op_num_threads": 2}


# ---- parity budgets and top-k ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1.0, 0.0, 2.0, float("nan")])
def test_parity_budget_must_be_in_0_1(bad):
    from nvembed_sdk.parity import Tolerance

    with pytest.raises(InputError, match="min_cosine"):
        Tolerance(bad, 0.9)


def test_parity_lowers_top_k_with_few_texts_so_unrelated_models_fail():
    from nvembed_sdk.parity import Tolerance, compare_arrays

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 16)), rng.normal(size=(10, 16))  # two unrelated "models"
    qa, qb = rng.normal(size=(10, 16)), rng.normal(size=(10, 16))
    report = compare_arrays(a, b, queries=(qa, qb), tolerance=Tolerance(0.01, 0.9), k=10)
    assert report.k == 5 and any("top-k lowered from 10 to 5" in n for n in report.notes)
    assert report.topk_agreement < 0.9 and not report
    with pytest.raises(InputError, match="parity texts"):
        compare_arrays(a[:1], b[:1], queries=(qa[:1], qb[:1]), k=10)


def test_parity_cli_refuses_a_bad_budget(tiny_checkpoint):
    res = CliRunner().invoke(main, ["parity", str(tiny_checkpoint), str(tiny_checkpoint), "--min-cosine", "-1"])
    assert "min_cosine | got -1.0" in _one_line_error(res)


# ---- the CLI: one line for every failure ---------------------------------------------------------


def test_lone_surrogates_in_a_text_or_argv_are_one_line(tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(main, ["embed", str(tiny_checkpoint), "--text", "caf\udce9"])
    assert "lone surrogate" in _one_line_error(res)
    jsonl = tmp_path / "texts.jsonl"  # valid UTF-8 whose JSON escape decodes to a lone surrogate
    jsonl.write_text('{"text": "fine"}\n{"text": "caf\\udce9"}\n')
    res = CliRunner().invoke(main, ["embed", str(tiny_checkpoint), "--file", str(jsonl)])
    assert "texts[1] | got 'caf\\udce9' (a lone surrogate" in _one_line_error(res)
    e = Embedder.load(tiny_checkpoint, device="cpu")
    with pytest.raises(InputError, match=r"texts\[0\] \| got .*lone surrogate"):
        e.embed(["caf\udce9"])
    with pytest.raises(InputError, match=r"instruction \| got .*lone surrogate"):
        e.embed(["fine"], instruction="Instruct: \udce9\nQuery: ")


def test_file_that_is_not_utf8_names_the_file_and_line(tiny_checkpoint, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    res = CliRunner().invoke(main, ["embed", str(tiny_checkpoint), "--file", str(f)])
    assert f"{f}:2 | got bytes that are not UTF-8" in _one_line_error(res)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02" * 10)
    res = CliRunner().invoke(main, ["embed", str(tiny_checkpoint), "--file", str(binary)])
    assert "binary file" in _one_line_error(res)


def test_os_errors_are_one_line(tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("x")

    @click.command()
    @click.argument("out")
    @fail_cleanly
    def write(out: str) -> None:
        Path(out).write_text("result")

    res = CliRunner().invoke(write, [str(regular / "out.json")])  # a path under a regular file
    assert "ENOTDIR" in _one_line_error(res) and "regular file" in res.output
    if Path("/dev/full").exists():  # a full disk
        res = CliRunner().invoke(write, ["/dev/full"])
        assert "ENOSPC" in _one_line_error(res) and "free disk space" in res.output
    # Real full and read-only file systems (tmpfs) are in the export, corpus and training tests; the mapping:
    msg = user_message(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"))
    assert msg is not None and msg.startswith("/mnt/ro/x | got Read-only file system (EROFS)")
    assert user_message(KeyError("a bug")) is None  # bugs keep their traceback


def _entries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_export_to_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(tiny_checkpoint, small_fs):
    full = small_fs("400k")  # the tiny bundle needs ~0.9 MB
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx",
                                    "--output", str(full / "bundle")])
    line = _one_line_error(res)
    assert f"writing bundle {full / 'bundle'}" in line and "ENOSPC" in line and "free disk space" in line
    assert _entries(full) == []  # no staging directory, no lock, no partial bundle
    ro = small_fs("1m", read_only=True)
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx",
                                    "--output", str(ro / "bundle")])
    line = _one_line_error(res)
    assert f"writing bundle {ro / 'bundle'}" in line and "EROFS" in line and "read-only" in line


def test_parity_json_on_a_full_disk_names_the_report_and_leaves_nothing(tiny_checkpoint, small_fs, tmp_path):
    full = small_fs("8k")
    (full / "filler").write_bytes(b"x" * 8192)  # the disk is now full
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text number {i} about packages" for i in range(24)) + "\n")
    report = full / "report.json"
    res = CliRunner().invoke(main, ["parity", str(tiny_checkpoint), str(tiny_checkpoint), "--texts", str(texts),
                                    "--json", str(report)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    line = res.output.splitlines()[-1]  # the report itself was printed first
    assert line.startswith("error: ") and f"writing parity report {report}" in line and "ENOSPC" in line, line
    assert _entries(full) == ["filler"]  # no report, no temp file


def test_export_output_under_a_regular_file_names_it(tiny_checkpoint, tmp_path):
    regular = tmp_path / "notes.txt"
    regular.write_text("mine")
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx",
                                    "--output", str(regular / "sub" / "bundle")])
    line = _one_line_error(res)
    assert f"{regular} is a regular file" in line and "EEXIST" not in line
    assert regular.read_text() == "mine"


def test_corpus_part_on_a_full_disk_is_named_and_removed(small_fs):
    pytest.importorskip("pyarrow")
    from nvembed_sdk.corpus.source import Part
    from nvembed_sdk.corpus.store import STAGING, write_part
    from nvembed_sdk.errors import OutputError

    out = small_fs("64k")
    (out / STAGING).mkdir()
    n, dim = 400, 64  # ~100 KB of float32 vectors: more than the disk holds
    vecs = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    with pytest.raises(OutputError, match=r"writing corpus part .*part-000000.parquet .*ENOSPC") as info:
        write_part(out, Part(0, 0, n), [str(i) for i in range(n)], vecs, np.ones(n, np.int32), "float32", {})
    assert info.value.errno == errno.ENOSPC and user_message(info.value).startswith("writing corpus part")
    assert _entries(out) == [STAGING]  # the half-written part is gone; no part file appeared


def test_debug_flag_and_env_show_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("NVEMBED_DEBUG", raising=False)
    missing = str(tmp_path / "missing")
    res = CliRunner().invoke(main, ["--debug", "info", missing])
    assert res.exit_code == 1 and isinstance(res.exception, ArtifactError)
    monkeypatch.delenv("NVEMBED_DEBUG", raising=False)
    res = CliRunner().invoke(main, ["info", missing])
    assert res.exception is None or isinstance(res.exception, SystemExit)
    _one_line_error(res)
    monkeypatch.setenv("NVEMBED_DEBUG", "1")
    res = CliRunner().invoke(main, ["info", missing])
    assert isinstance(res.exception, ArtifactError)


def test_embed_query_means_a_query_text(tiny_checkpoint):
    e = Embedder.load(tiny_checkpoint, device="cpu")
    res = CliRunner().invoke(main, ["embed", str(tiny_checkpoint), "--device", "cpu", "--text", "a passage",
                                    "--query", "find it", "--json"])
    assert res.exit_code == 0, res.output
    vecs = np.array(json.loads(res.output)["embeddings"])
    assert vecs.shape == (2, e.dim)
    np.testing.assert_allclose(vecs[0], e.embed_documents("a passage"), atol=1e-6)
    np.testing.assert_allclose(vecs[1], e.embed_queries("find it"), atol=1e-6)
    res = CliRunner().invoke(main, ["embed", str(tiny_checkpoint), "--query", "q", "--instruction", "Instruct: x"])
    assert "--instruction" in _one_line_error(res)
    res = CliRunner().invoke(main, ["embed", str(tiny_checkpoint), "--device", "cpu", "--text", "word",
                                    "--task", "Define it", "--json"])
    got = np.array(json.loads(res.output)["embeddings"][0])
    np.testing.assert_allclose(got, e.embed_queries("word", task="Define it"), atol=1e-6)


def test_bench_batch_size_zero_is_a_clean_error(tiny_checkpoint):
    res = CliRunner().invoke(main, ["bench", str(tiny_checkpoint), "--batch-size", "0"])
    assert "bench | got Invalid value for '--batch-size': 0" in _one_line_error(res)
    res = CliRunner().invoke(main, ["embed"])  # any usage error: one line, exit 1
    assert "Missing argument" in _one_line_error(res)
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 2 and "Commands:" in res.output


def test_export_refuses_a_bad_opset_before_any_work(tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx", "--opset", "99",
                                    "--output", str(tmp_path / "out")])
    assert "--opset | got 99" in _one_line_error(res)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    (["--max-length", "-1"], "--max-length | got -1. Note: an int >= 1"),  # was recorded; the bundle then failed to load
    (["--max-length", "100000"], "at most the model's 512 positions"),  # was clamped at load without a word
    (["--precision", "int8", "--calibration-size", "0"], "--calibration-size | got 0"),  # was the default 256
    (["--precision", "int8", "--calibration-size", "3"], "an int >= 16"),
])
def test_export_refuses_sizes_it_would_record_or_ignore(tiny_checkpoint, tmp_path, args, needle):
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx", *args,
                                    "--output", str(tmp_path / "out")])
    assert needle in _one_line_error(res)
    assert not (tmp_path / "out").exists()


def test_export_api_refuses_a_mistyped_calibration_size(tiny_checkpoint, tmp_path):
    from nvembed_sdk.exporters.pipeline import export

    with pytest.raises(InputError, match=r"--calibration-size \| got 'x'"):  # was int('x'): ValueError
        export(tiny_checkpoint, tmp_path / "out", precision="int8", calibration_size="x")


def _all_commands() -> list[str]:
    from nvembed_sdk.cli import COMMANDS

    return sorted(COMMANDS) + ["tokenizer train"]  # every registered subcommand, so a new one is checked too


@pytest.mark.parametrize("command", _all_commands())
def test_every_subcommand_help_has_an_example(command):
    res = CliRunner().invoke(main, [*command.split(), "--help"])
    if "(unavailable:" in res.output:  # the lazy group's stand-in for a command whose extra is missing
        pytest.skip(f"nvembed {command}: {res.output.strip().splitlines()[-1]}")
    assert res.exit_code == 0 and "Example" in res.output and "nvembed" in res.output.split("Example", 1)[1]


def test_nvembed_export_help_has_an_example(monkeypatch, capsys):
    from nvembed_sdk.cli import export_main

    monkeypatch.setattr("sys.argv", ["nvembed-export", "--help"])
    with pytest.raises(SystemExit) as done:
        export_main()
    out = capsys.readouterr().out
    assert done.value.code == 0 and "Usage: nvembed-export" in out
    assert "nvembed-export --model" in out.split("Example", 1)[1]


def test_docs_and_help_say_how_to_install_from_a_checkout_and_cite_only_files_here():
    """Docs and --help never tell users to `pip install nvembed-sdk` (it is not published) and never
    cite the design notes that live outside the repository."""
    root = Path(__file__).resolve().parents[2]
    docs = [root / "README.md", *root.glob("docs/*.md"), *root.glob("models/*/README.md"),
            *root.glob("nvembed_sdk/data/*.md")]
    texts = {str(p.relative_to(root)): p.read_text(encoding="utf-8") for p in docs}
    for command in _all_commands():
        text = CliRunner().invoke(main, [*command.split(), "--help"]).output
        texts[f"nvembed {command} --help"] = re.sub(r"-\n\s+", "-", text)  # undo click's wrapping at hyphens
    bad = re.compile(r"pip\s+install\s+[\"']?nvembed-sdk|\b(DESIGN|STYLE)\.md\b")
    found = {where: sorted(set(m.group(0) for m in bad.finditer(text))) for where, text in texts.items()}
    assert {where: hits for where, hits in found.items() if hits} == {}


# ---- calibration files ----------------------------------------------------------------------------


def test_small_binary_or_list_calibration_files_are_refused(tmp_path):
    from nvembed_sdk.textsets import check_calibration_texts, read_texts

    two = tmp_path / "two.txt"
    two.write_text("one text\nanother text\n")
    with pytest.raises(InputError, match="2 texts.*at least 16"):
        check_calibration_texts(read_texts(two), two)
    lists = tmp_path / "lists.jsonl"
    lists.write_text('["a", "b"]\n')
    with pytest.raises(InputError, match=r"lists.jsonl:1 \| got a JSON list"):
        read_texts(lists)
    blob = tmp_path / "blob.txt"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="binary file"):
        read_texts(blob)


def test_small_calibration_file_fails_before_the_export(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("modelopt.onnx.quantization")
    two = tmp_path / "two.txt"
    two.write_text("one text\nanother text\n")
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--to", "onnx", "--precision", "int8",
                                    "--calibration", str(two), "--output", str(tmp_path / "out")])
    assert "2 texts" in _one_line_error(res)
    assert not (tmp_path / "out" / "model.onnx").exists()


# ---- helpers ----------------------------------------------------------------------------------------


def test_phases_and_progress_lines():
    from nvembed_sdk.progress import Phases, progress

    lines: list[str] = []
    phases = Phases("export int8", total=2, log=lines.append)
    with phases.phase("trace"):
        pass
    with pytest.raises(RuntimeError), phases.phase("calibrate"):
        raise RuntimeError("x")
    assert lines[0] == "[export int8 1/2] trace ..." and lines[1].startswith("[export int8 1/2] trace done in")
    assert lines[-1].startswith("[export int8 2/2] calibrate failed after")
    out: list[str] = []
    assert list(progress(range(5), "calibrate", log=out.append, tty=False, every=0.0)) == list(range(5))
    assert out[-1].startswith("calibrate: 5/5 done") and len(out) == 6


def test_text_pipeline_refuses_an_empty_pool_span_directly(tiny_tokenizer_dir):
    from nvembed_sdk.text import check_pool_spans

    check_pool_spans([[1, 2, 3]], 2, "ins")
    with pytest.raises(InputError, match="texts \\[1\\]"):
        check_pool_spans([[1, 2, 3], [1, 2]], 2, "ins")
    pipe = TextPipeline(tiny_tokenizer_dir)
    assert math.isfinite(pipe.instruction_length("Instruct: x\nQuery: "))

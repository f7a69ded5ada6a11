"""sentence-transformers, LangChain, LlamaIndex and MTEB adapters on the shipped model, checkpoint and ONNX bundle.

Every adapter's vectors are compared with ``Embedder.embed_queries`` / ``embed_documents`` on the
same artifact (per-row cosine >= 0.99999, the fp32 budget). The ONNX bundle is exported once per
session (about 45 s here). MTEB runs offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub client is imported: nothing may download

from conftest import DATA, assert_close_cos, needs_shared  # noqa: E402

pytest.importorskip("onnxruntime", reason="the ONNX bundle half needs onnxruntime (pip install -e '.[onnx]' in the checkout)")

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "nvembed-debian-small"
COS = 0.99999
TASK = "Given a one-line summary of a software package, retrieve its full description"
QUERIES = ["command-line option parser for C", "chess engine", "東京 123 main street", "\nleading newline query"]
DOCS = [
    "getopt-style option parsing for C programs, with long options and automatic --help output.",
    "A strong chess engine speaking the UCI protocol. " * 12,
    "Python bindings for the GTK toolkit",
    "x",
    "0 A.D. is a free, open-source real-time strategy game of ancient warfare.",
]


@pytest.fixture(scope="session")
def shipped() -> Path:
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"{SHIPPED} has no weights")
    return SHIPPED


@pytest.fixture(scope="session")
def shipped_onnx(shipped: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 ONNX bundle of the shipped model (nvembed-export --to onnx --precision fp32), once per session."""
    from nvembed_sdk.exporters.onnx_export import export_onnx

    return export_onnx(shipped, tmp_path_factory.mktemp("shipped-onnx") / "bundle", precision="fp32")


@pytest.fixture(scope="session", params=["checkpoint", "onnx"])
def artifact(request: pytest.FixtureRequest, shipped: Path) -> Path:
    return shipped if request.param == "checkpoint" else request.getfixturevalue("shipped_onnx")


@pytest.fixture(scope="session")
def reference(artifact: Path):
    from nvembed_sdk import Embedder

    e = Embedder.load(artifact, device="cpu")
    return {"q": e.embed_queries(QUERIES, task=TASK), "q_default": e.embed_queries(QUERIES),
            "d": e.embed_documents(DOCS), "backend": e.backend}


# ---- sentence-transformers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def st_model(artifact: Path):
    pytest.importorskip("sentence_transformers", minversion="6.0")
    from nvembed_sdk.integrations.sentence_transformers import NVEmbedSentenceTransformer

    return NVEmbedSentenceTransformer(str(artifact), device="cpu")


def test_st_matches_embedder(st_model, reference):
    import torch

    assert st_model[0].embedder.backend == reference["backend"]
    assert_close_cos(st_model.encode_query(QUERIES), reference["q_default"], COS)
    assert_close_cos(st_model.encode_document(DOCS), reference["d"], COS)
    assert_close_cos(st_model.encode(QUERIES, prompt_name="query"), reference["q_default"], COS)
    from nvembed_sdk import query_instruction

    assert_close_cos(st_model.encode(QUERIES, prompt=query_instruction(TASK), batch_size=1), reference["q"], COS)
    t = st_model.encode(DOCS, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=True, batch_size=2)
    assert isinstance(t, torch.Tensor) and t.shape == reference["d"].shape
    assert_close_cos(t.numpy(), reference["d"], COS)
    one = st_model.encode(DOCS[0])
    assert one.shape == (reference["d"].shape[1],)
    np.testing.assert_allclose(np.linalg.norm(st_model.encode(DOCS), axis=1), 1.0, rtol=1e-5)
    assert st_model.get_embedding_dimension() == reference["d"].shape[1]


def test_st_masks_the_instruction_out_of_pooling(st_model):
    from nvembed_sdk import query_instruction

    prompt = query_instruction(TASK)
    feats = st_model[0].preprocess(["chess engine"], prompt=prompt)
    L = st_model[0].embedder.text.instruction_length(prompt)
    assert L > 5
    assert feats["pool_mask"][0, :L].sum() == 0 and feats["pool_mask"][0, L:].sum() == feats["attention_mask"][0, L:].sum()


def test_st_precision_uses_stored_ranges(st_model, artifact):
    from nvembed_sdk.errors import InputError
    from nvembed_sdk.output import OutputSpec, quantize

    spec = OutputSpec.read(artifact)
    assert spec.ranges, f"{artifact} should carry embedding_output.json (export copies it from the checkpoint)"
    q8 = st_model.encode_document(DOCS, precision="int8")
    assert q8.dtype == np.int8
    np.testing.assert_array_equal(q8, quantize(st_model.encode_document(DOCS), "int8", spec))
    alone = np.stack([st_model.encode_document(d, precision="int8") for d in DOCS[:2]])
    # Each row is identical to the batch's, up to a rare one-bucket float boundary difference.
    assert np.abs(alone.astype(int) - q8[:2]).max() <= 1
    assert st_model.encode(DOCS, precision="ubinary").shape == (len(DOCS), 32)
    assert st_model.encode(DOCS, precision="binary", convert_to_tensor=True).dtype.is_floating_point is False
    with pytest.raises(InputError, match="truncate_dims"):
        st_model.encode(DOCS, truncate_dim=64)


def test_st_truncate_dim_when_declared(shipped, tmp_path):
    pytest.importorskip("sentence_transformers", minversion="6.0")
    from nvembed_sdk import Embedder
    from nvembed_sdk.integrations.sentence_transformers import NVEmbedSentenceTransformer
    from nvembed_sdk.output import OutputSpec

    ckpt = tmp_path / "m"
    shutil.copytree(shipped, ckpt)
    spec = OutputSpec.read(ckpt)
    OutputSpec(spec.ranges, (128,), spec.calibration).write(ckpt)
    model = NVEmbedSentenceTransformer(str(ckpt), device="cpu", truncate_dim=128)
    full = Embedder.load(ckpt, device="cpu").embed_documents(DOCS)[:, :128]
    assert_close_cos(model.encode_document(DOCS), full, COS)
    np.testing.assert_allclose(np.linalg.norm(model.encode_document(DOCS), axis=1), 1.0, rtol=1e-5)
    with pytest.raises(Exception, match="ranges for widths"):  # int8 at 128 needs calibrated 128-wide ranges
        model.encode_document(DOCS, precision="int8")


def test_st_plain_class_needs_the_flag_and_loads_with_it(shipped):
    """sentence-transformers 6.x refuses a class outside its namespace without trust_remote_code;
    with it, the installed module loads (the model dir holds no code)."""
    pytest.importorskip("sentence_transformers", minversion="6.0")
    from sentence_transformers import SentenceTransformer

    assert not list(shipped.glob("*.py"))
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(shipped), device="cpu")
    from nvembed_sdk import Embedder

    model = SentenceTransformer(str(shipped), device="cpu", trust_remote_code=True)
    assert_close_cos(model.encode_query(QUERIES), Embedder.load(shipped, device="cpu").embed_queries(QUERIES), COS)


def test_st_loads_a_checkpoint_this_sdk_wrote_and_round_trips(tiny_checkpoint, shipped_onnx, tmp_path):
    pytest.importorskip("sentence_transformers", minversion="6.0")
    from nvembed_sdk import Embedder
    from nvembed_sdk.integrations.sentence_transformers import NVEmbedSentenceTransformer

    model = NVEmbedSentenceTransformer(str(tiny_checkpoint), device="cpu")  # save_model wrote modules.json
    ref = Embedder.load(tiny_checkpoint, device="cpu")
    assert_close_cos(model.encode_query(QUERIES), ref.embed_queries(QUERIES), COS)
    model.save(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "modules.json").read_text())[0]["type"].startswith("nvembed_sdk.")
    again = NVEmbedSentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert_close_cos(again.encode_document(DOCS), ref.embed_documents(DOCS), COS)
    # The backend option: a checkpoint dir whose onnx/ holds its bundle, or any artifact by path.
    ckpt = tmp_path / "with-onnx"
    shutil.copytree(tiny_checkpoint, ckpt)
    with pytest.raises(Exception, match="no ONNX bundle"):
        NVEmbedSentenceTransformer(str(ckpt), device="cpu", backend="onnx")
    other = NVEmbedSentenceTransformer(str(tiny_checkpoint), device="cpu", model_kwargs={"artifact": str(shipped_onnx)})
    assert other[0].embedder.backend == "onnxruntime"
    shutil.copytree(shipped_onnx, ckpt / "onnx")
    via = NVEmbedSentenceTransformer(str(ckpt), device="cpu", backend="onnx")
    assert via[0].embedder.backend == "onnxruntime"


def test_st_device_reaches_the_artifact(tiny_checkpoint, monkeypatch):
    """`device=` picks where the Embedder runs (the module has no parameters for `.to()` to move);
    model_kwargs['device'] wins when both are given."""
    pytest.importorskip("sentence_transformers", minversion="6.0")
    from nvembed_sdk import Embedder
    from nvembed_sdk.integrations.sentence_transformers import NVEmbedSentenceTransformer

    seen: list[str | None] = []
    real = Embedder.load.__func__

    def load(cls, path, backend=None, device=None, **kw):
        seen.append(device)
        return real(cls, path, backend=backend, device="cpu", **kw)  # this machine may have no GPU

    monkeypatch.setattr(Embedder, "load", classmethod(load))
    NVEmbedSentenceTransformer(str(tiny_checkpoint), device="cpu")
    NVEmbedSentenceTransformer(str(tiny_checkpoint), device="cpu", model_kwargs={"device": "cuda:1"})
    assert seen == ["cpu", "cuda:1"]


# ---- LangChain / LlamaIndex --------------------------------------------------------------------


def test_langchain_matches_embedder(artifact, reference):
    pytest.importorskip("langchain_core")
    from langchain_core.embeddings import Embeddings

    from nvembed_sdk.integrations.langchain import NVEmbedEmbeddings

    emb = NVEmbedEmbeddings(artifact, task=TASK, device="cpu", batch_size=2)
    assert isinstance(emb, Embeddings)
    docs = emb.embed_documents(DOCS)
    assert isinstance(docs, list) and isinstance(docs[0], list) and isinstance(docs[0][0], float)
    assert_close_cos(docs, reference["d"], COS)
    assert_close_cos([emb.embed_query(q) for q in QUERIES], reference["q"], COS)
    assert_close_cos(asyncio.run(emb.aembed_documents(DOCS)), reference["d"], COS)
    assert_close_cos([asyncio.run(emb.aembed_query(QUERIES[0]))], reference["q"][:1], COS)


def test_llamaindex_matches_embedder_and_batches(artifact, reference):
    pytest.importorskip("llama_index.core")
    from llama_index.core.base.embeddings.base import BaseEmbedding

    from nvembed_sdk.integrations.llamaindex import NVEmbedEmbedding

    emb = NVEmbedEmbedding(artifact, task=TASK, device="cpu")
    assert isinstance(emb, BaseEmbedding)
    calls: list[int] = []
    documents = emb._encoder.documents

    def counted(texts):  # observe how many texts reach the Embedder per call
        calls.append(len(texts))
        return documents(texts)

    emb._encoder.documents = counted
    assert_close_cos(emb.get_text_embedding_batch(DOCS), reference["d"], COS)
    assert calls == [len(DOCS)]  # one batched call, not one per text
    assert_close_cos([emb.get_query_embedding(q) for q in QUERIES], reference["q"], COS)
    assert_close_cos([emb.get_text_embedding(DOCS[1])], reference["d"][1:2], COS)
    assert_close_cos(asyncio.run(emb.aget_text_embedding_batch(DOCS)), reference["d"], COS)
    assert_close_cos([asyncio.run(emb.aget_query_embedding(QUERIES[2]))], reference["q"][2:3], COS)


# ---- MTEB --------------------------------------------------------------------------------------


def test_mteb_encoder_matches_embedder(artifact, reference):
    pytest.importorskip("mteb", minversion="2.0")
    from mteb.types import PromptType

    from nvembed_sdk.integrations.mteb import NVEmbedModel, local_retrieval_task

    needs_shared(DATA / "dev" / "debpkg")  # the task's metadata comes from the dev folder
    model = NVEmbedModel(artifact, instructions={"DebPkg": {"query": TASK, "corpus": ""}}, device="cpu")
    meta = local_retrieval_task(DATA / "dev" / "debpkg", name="DebPkg", max_queries=2, max_corpus=4).metadata
    batches = [{"text": DOCS[:2]}, {"text": DOCS[2:]}]  # what a DataLoader yields
    kw = {"task_metadata": meta, "hf_split": "test", "hf_subset": "default"}
    assert_close_cos(model.encode(batches, prompt_type=PromptType.document, **kw), reference["d"], COS)
    assert_close_cos(model.encode([{"text": QUERIES}], prompt_type=PromptType.query, **kw), reference["q"], COS)
    assert model.mteb_model_meta.embed_dim == reference["d"].shape[1]
    # The dev folder's instruction.txt is TASK too, so the table must also be shown to win over the task's prompt.
    from nvembed_sdk.embedder import DEFAULT_TASK

    assert meta.prompt == {"query": TASK, "document": ""}
    model.instructions = {"DebPkg": {"query": DEFAULT_TASK, "corpus": ""}}
    assert_close_cos(model.encode([{"text": QUERIES}], prompt_type=PromptType.query, **kw), reference["q_default"], COS)
    model.instructions = {}  # no table entry: the task's own prompt (instruction.txt)
    assert_close_cos(model.encode([{"text": QUERIES}], prompt_type=PromptType.query, **kw), reference["q"], COS)


def test_mteb_ndcg_equals_nvembed_eval(shipped):
    """MTEB's scorer over the custom task vs `nvembed eval` on the same seeded dev subset."""
    pytest.importorskip("mteb", minversion="2.0")
    from click.testing import CliRunner

    from nvembed_sdk.cli import main
    from nvembed_sdk.train.evaluate import evaluate_artifact

    dev = DATA / "dev" / "debpkg"
    if not dev.is_dir():
        pytest.skip(f"{dev} is absent")
    # 400 documents, not fewer: on 64 the shipped model ranks every query's document first (nDCG 1.0),
    # and a perfect score cannot show the two scorers rank the same way
    sub = {"max_queries": 24, "max_corpus": 400}
    ours = evaluate_artifact(shipped, dev, device="cpu", **sub)
    res = CliRunner().invoke(main, ["eval", str(shipped), "--beir", str(dev), "--mteb", "--json", "--device", "cpu",
                                    "--max-queries", "24", "--max-corpus", "400"])
    assert res.exit_code == 0, res.output
    theirs = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    assert theirs["queries"] == ours["queries"] == 24
    assert abs(theirs["ndcg@10"] - ours["ndcg@10"]) <= 1e-4, (theirs, ours)
    assert abs(theirs["recall@100"] - ours["recall@100"]) <= 1e-4
    assert 0.3 < ours["ndcg@10"] < 1.0  # a trained model on its in-domain set, not a degenerate score


def test_readme_integration_snippets_run(shipped):
    """Every Python block of the README's Integrations section runs as written (from the repo root)."""
    for pkg in ("sentence_transformers", "langchain_core", "llama_index.core", "mteb"):
        pytest.importorskip(pkg)
    needs_shared(DATA / "dev" / "debpkg")  # the MTEB snippet evaluates the shipped dev set
    import re
    import subprocess
    import sys

    root = SHIPPED.parents[1]
    text = (root / "README.md").read_text(encoding="utf-8")
    section = text.split("## Integrations\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    # One interpreter runs the blocks one after another, each in a fresh namespace.
    script = "\n".join(f"exec({code!r}, {{}})" for code in blocks)
    res = subprocess.run([sys.executable, "-P", "-c", script], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tensor([[" in res.stdout  # the similarity printout of the first block

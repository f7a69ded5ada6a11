"""Embedding distillation: the teacher cache, the projection, the loss, piece-embedding init, and
a tiny student pulled towards a tiny (random, locally written) BERT teacher by ``train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_loop import WORDS, write_pairs

from nvembed_sdk.errors import ArtifactError, InputError
from nvembed_sdk.train.config import TrainConfig
from nvembed_sdk.train.data import TrainData
from nvembed_sdk.train.distill import (
    TeacherCache,
    embedding_distill_loss,
    init_token_embeddings,
    teacher_encoder,
    token_texts,
)
from nvembed_sdk.train.settings import DataSource


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 96-wide BERT with a word vocabulary: a real transformers encoder, no download."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("teacher")
    vocab = root / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "tools", "this", "package", "provides", "and",
             "support", "for", "utilities", "only", "."]
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(root / "enc")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=96, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(root / "enc")
    return root / "enc"


def test_cache_fills_once_reloads_and_projects(tmp_path, bert_teacher):
    embed = teacher_encoder(str(bert_teacher), batch_size=4, num_threads=1)
    cache = TeacherCache(tmp_path / "c")
    texts = [f"{a} tools" for a in WORDS[:10]]
    assert cache.fill(texts, embed, chunk=4, show_progress=False) == 10
    assert cache.fill(texts + ["video and audio"], embed, chunk=4, show_progress=False) == 1  # only the new one
    again = TeacherCache(tmp_path / "c")
    assert len(again) == 11 and sorted(p.name for p in (tmp_path / "c").glob("part-*.npy")) == [
        "part-00000.npy", "part-00001.npy", "part-00002.npy", "part-00003.npy"]
    direct = embed(["video and audio"])[0]
    np.testing.assert_allclose(again.matrix[again.index["video and audio"]].astype(np.float32), direct, atol=2e-3)

    proj = again.projection(8)  # (96, 8), orthonormal columns, saved for resumed runs
    assert proj.shape == (96, 8)
    np.testing.assert_allclose(proj.T @ proj, np.eye(8), atol=1e-5)
    assert np.array_equal(TeacherCache(tmp_path / "c").projection(8), proj)
    t, found = again.targets(["video and audio", "never embedded"], proj)
    assert found.tolist() == [True, False]
    assert torch.allclose(t[0].norm(), torch.tensor(1.0), atol=1e-5) and t[1].abs().sum() == 0
    with pytest.raises(ArtifactError, match="at most the teacher"):
        again.projection(200)


def test_aligned_projection_recovers_the_basis_the_student_already_uses(tmp_path, bert_teacher):
    """A stage that continues a distilled model with a new cache: the SVD basis of the new cache is
    another rotation of the teacher space, the Procrustes fit to the model's own rows is its own."""
    embed = teacher_encoder(str(bert_teacher), batch_size=8, num_threads=1)
    cache = TeacherCache(tmp_path / "c")
    texts = [f"{a} {b} tools" for a in WORDS[:12] for b in WORDS[12:24]]
    cache.fill(texts, embed, chunk=64, show_progress=False)
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((96, 8)))  # (96, 8) the model's basis
    t = cache.matrix[[cache.index[x] for x in texts]].astype(np.float32)
    student = t @ q
    student /= np.linalg.norm(student, axis=1, keepdims=True)  # (n, 8) what the model embeds now

    def mean_cos(proj):
        return float((cache.targets(texts, proj)[0].numpy() * student).sum(1).mean())

    svd = TeacherCache(tmp_path / "c").projection(8)
    (tmp_path / "c" / "projection-8.npy").unlink()
    aligned = cache.align_projection(texts[::2], student[::2])  # fitted on half, checked on all
    assert mean_cos(aligned) > 0.999 and mean_cos(svd) < 0.9
    np.testing.assert_allclose(aligned.T @ aligned, np.eye(8), atol=1e-5)
    assert np.array_equal(TeacherCache(tmp_path / "c").projection(8), aligned)  # stored for the run and its resumes


def test_loss_is_zero_on_the_target_and_ignores_missing_rows():
    target = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    found = torch.tensor([True, True, False, True])
    student = target * 3.0
    student[2] = -target[2]  # wrong, but not found: must not count
    assert float(embedding_distill_loss(student, target, found)) < 1e-6
    student[0] = -target[0]
    assert float(embedding_distill_loss(student, target, found)) == pytest.approx(2.0 / 3.0, abs=1e-5)
    none = embedding_distill_loss(student.requires_grad_(), target, torch.zeros(4, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_piece_embeddings_initialise_only_text_pieces(tmp_path, tiny_tokenizer_dir, bert_teacher):
    pieces = token_texts(tiny_tokenizer_dir / "tokenizer.json")
    assert pieces[0] is None and pieces[1] is None and pieces[2] is None  # <unk>, <s>, </s>
    assert all(p is None for p in pieces[3:259])  # byte-fallback pieces <0x00>..<0xFF>
    cache = TeacherCache(tmp_path / "c")
    cache.fill([p for p in pieces if p], teacher_encoder(str(bert_teacher), num_threads=1), show_progress=False)
    proj = cache.projection(64)
    w = torch.randn(len(pieces), 64) * 0.02
    before = w.clone()
    n = init_token_embeddings(w, pieces, cache, proj)
    written = [i for i, p in enumerate(pieces) if p]
    assert n == len(written) > 100
    assert torch.equal(w[:259], before[:259])
    rms = w[written].pow(2).mean(1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)


def _cfg(out: Path, data: Path, tok: Path, teacher_dir: Path, **over) -> TrainConfig:
    base = {"output_dir": str(out), "init": "scratch", "tokenizer": str(tok), "model": {"preset": "tiny-test"},
            "data": [{"path": str(data)}], "num_negatives": 1, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
            "max_steps": 30, "log_every_steps": 10, "checkpoint_every_steps": 100, "query_max_length": 24,
            "doc_max_length": 32, "num_threads": 1, "teacher": str(teacher_dir), "embed_distill_weight": 5.0,
            "init_token_embeddings": True, "temperature": 0.1}
    return TrainConfig.from_dict({**base, **over})


def _agreement(model_dir: Path, cache: TeacherCache, texts: list[str]) -> float:
    from nvembed_sdk.embedder import Embedder

    emb = torch.from_numpy(Embedder.load(model_dir).embed(texts))
    t, found = cache.targets(texts, cache.projection(emb.shape[1]))
    assert bool(found.all())
    return float((emb * t).sum(-1).mean())


def test_training_pulls_the_student_towards_the_teacher(tmp_path, tiny_tokenizer_dir, bert_teacher):
    from nvembed_sdk.train.loop import train

    data = write_pairs(tmp_path / "pairs.jsonl", 96)
    logs: list[str] = []
    res = train(_cfg(tmp_path / "run", data, tiny_tokenizer_dir, bert_teacher), log=logs.append)
    assert any("teacher" in line and "embedding" in line for line in logs)
    assert any(line.startswith("input embeddings:") for line in logs)
    cache = TeacherCache(tmp_path / "run" / "teacher-cache")
    texts = sorted({r for r in cache.index if " " in r})[:40]  # cached queries/positives, not pieces
    # The same run without distillation (same seed, same data) is the baseline it must beat.
    plain = train(_cfg(tmp_path / "plain", data, tiny_tokenizer_dir, bert_teacher, embed_distill_weight=0.0,
                       init_token_embeddings=False, teacher=None), log=lambda s: None)
    assert _agreement(Path(res["final_dir"]), cache, texts) > _agreement(Path(plain["final_dir"]), cache, texts) + 0.2


def test_config_requires_a_teacher_for_distillation(tmp_path):
    with pytest.raises(InputError, match="teacher"):
        TrainConfig.from_dict({"output_dir": str(tmp_path), "tokenizer": "x", "data": ["a.jsonl"],
                               "embed_distill_weight": 1.0})
    with pytest.raises(InputError, match="init_token_embeddings"):
        TrainConfig.from_dict({"output_dir": str(tmp_path), "init": "nvembed", "init_path": "x", "data": ["a.jsonl"],
                               "teacher": "minilm", "init_token_embeddings": True})


def test_eval_scores_an_encoder_directory_like_its_embeddings(tmp_path, bert_teacher):
    """`nvembed eval` on a teacher directory: the metrics of its own mean-pooled cosine ranking."""
    from nvembed_sdk.train.data import write_jsonl
    from nvembed_sdk.train.evaluate import evaluate_artifact, load_beir, retrieval_metrics

    d = tmp_path / "beir"
    docs = ["audio video tools", "chess game", "python perl support", "kernel network tools"]
    write_jsonl(d / "corpus.jsonl", [{"_id": f"d{i}", "text": t} for i, t in enumerate(docs)])
    write_jsonl(d / "queries.jsonl", [{"_id": "q0", "text": "audio tools"}, {"_id": "q1", "text": "chess"}])
    (d / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    got = evaluate_artifact(str(bert_teacher), d)
    enc = teacher_encoder(str(bert_teacher), max_length=256)
    beir = load_beir(d)
    want = retrieval_metrics(enc(beir.queries) @ enc(beir.docs).T, beir)
    assert got == want and got["queries"] == 2


def test_distillation_only_texts_are_cached_and_learned(tmp_path, tiny_tokenizer_dir, bert_teacher):
    """Texts with no pairs, in ``distill_texts``, get teacher targets and pull the student towards them."""
    import gzip
    import json

    from nvembed_sdk.train.loop import train

    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    extra = [f"extra sentence number {i} about {w} and {v}" for i, (w, v) in
             enumerate(zip(["tea", "rust", "maps", "jazz", "ice", "owls", "kelp", "gold"] * 8,
                           ["clocks", "bread", "mud", "sails", "glass", "wool", "salt", "dust"] * 8, strict=True))]
    extra_file = tmp_path / "extra.jsonl.gz"
    with gzip.open(extra_file, "wt") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in extra)
    common = {"init_token_embeddings": False, "embed_distill_weight": 5.0, "max_steps": 30}
    logs: list[str] = []
    with_extra = train(_cfg(tmp_path / "x", data, tiny_tokenizer_dir, bert_teacher, distill_texts=[str(extra_file)],
                            distill_batch_size=16, **common), log=logs.append)
    assert any("distillation-only texts: 64" in line for line in logs)
    cache = TeacherCache(tmp_path / "x" / "teacher-cache")
    assert all(t in cache for t in extra)
    # same seed and data without the extra texts: the student is further from the teacher on them
    without = train(_cfg(tmp_path / "y", data, tiny_tokenizer_dir, bert_teacher, teacher_cache=str(tmp_path / "x" /
                         "teacher-cache"), **common), log=lambda s: None)
    assert _agreement(Path(with_extra["final_dir"]), cache, extra) > _agreement(Path(without["final_dir"]), cache,
                                                                                 extra) + 0.05


def test_distillation_only_texts_need_a_teacher_and_text_records(tmp_path, monkeypatch):
    from nvembed_sdk.train.data import read_distill_texts

    with pytest.raises(InputError, match="distill_texts"):
        TrainConfig.from_dict({"output_dir": str(tmp_path), "init": "nvembed", "init_path": "x", "data": ["a.jsonl"],
                               "distill_texts": "t.jsonl"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"query": "no text field"}\n')
    with pytest.raises(InputError, match="line 2"):
        read_distill_texts([bad])
    held_out = tmp_path / "dev" / "t.jsonl"
    held_out.parent.mkdir()
    held_out.write_text('{"text": "a dev text"}\n')
    monkeypatch.setenv("NVEMBED_HELD_OUT", str(held_out.parent))  # stands in for ../shared/data/dev
    with pytest.raises(InputError, match="held out"):
        read_distill_texts([held_out])
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "b"}\n{"text": "a"}\n{"text": "b"}\n')
    assert read_distill_texts([good]) == ["b", "a"]


def _structure_agreement(model_dir: Path, cache: TeacherCache, queries: list[str], docs: list[str]) -> float:
    """Mean per-query Pearson correlation of the student's and the teacher's scores over ``docs``."""
    from nvembed_sdk.embedder import Embedder

    emb = Embedder.load(model_dir)
    s = emb.embed(queries, instruction="Given a summary, retrieve the description") @ emb.embed(docs).T
    tq, fq = cache.teacher_rows(queries)
    td, fd = cache.teacher_rows(docs)
    assert bool(fq.all() and fd.all())
    t = (tq @ td.T).numpy()
    return float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(s, t, strict=True)]))


def _bag_of_words_teacher(texts: list[str]) -> np.ndarray:
    """(n, 96) a teacher with a content structure: each known word a fixed random direction, the
    word after "for" (which the queries never name) at half weight. A random tiny BERT maps
    these texts to nearly one vector, so it cannot show a structure being learned."""
    vecs = np.random.default_rng(0).standard_normal((len(WORDS), 96))
    out = np.zeros((len(texts), 96))
    for i, t in enumerate(texts):
        words = t.lower().rstrip(".").split()
        for j, w in enumerate(words):
            if w in WORDS:
                out[i] += vecs[WORDS.index(w)] * (0.5 if j and words[j - 1] == "for" else 1.0)
    return out + 1e-3


def test_relation_term_teaches_the_teachers_similarity_structure(tmp_path, tiny_tokenizer_dir, bert_teacher):
    from nvembed_sdk.train.loop import train

    data = write_pairs(tmp_path / "pairs.jsonl", 96)
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    cache = TeacherCache(tmp_path / "cache")
    texts = TrainData([DataSource(str(data))], num_negatives=1, seed=0).pair_texts(with_negatives=True)
    assert set(texts) == {t for r in recs for t in (r["query"], r["positive"], *r["negatives"])}
    cache.fill(texts, _bag_of_words_teacher, show_progress=False)
    over = {"embed_distill_weight": 0.0, "init_token_embeddings": False, "max_steps": 40}
    rel = _cfg(tmp_path / "rel", data, tiny_tokenizer_dir, bert_teacher, **over).to_dict()
    rel["distill"] = {**rel["distill"], "cache": str(tmp_path / "cache"), "relation_weight": 5.0,
                      "relation_temperature": 0.1}  # the pre-filled cache: the encoder is never called
    res = train(TrainConfig.from_dict(rel), log=lambda s: None)
    plain = train(_cfg(tmp_path / "plain", data, tiny_tokenizer_dir, bert_teacher, teacher=None, **over),
                  log=lambda s: None)
    queries, docs = [r["query"] for r in recs[:24]], [r["positive"] for r in recs[:48]]
    got = _structure_agreement(Path(res["final_dir"]), cache, queries, docs)
    base = _structure_agreement(Path(plain["final_dir"]), cache, queries, docs)
    print(f"teacher-structure agreement: relation {got:.3f}, plain {base:.3f}")  # 0.312 vs 0.261 when written
    assert got > base + 0.025

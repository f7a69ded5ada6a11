"""Shared fixtures: a tiny tokenizer and a tiny random NV-Embed checkpoint, built once per session."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference" / "nv-embed-v2"
DATA = SHARED / "data"

SAMPLE_TEXTS = [
    "A lightweight library for parsing command-line options in C programs.",
    "Utilities to convert between audio file formats, including Ogg Vorbis and FLAC.",
    "Python bindings for the GTK graphical user interface toolkit.",
    "the quick brown fox jumps over the lazy dog",
    "Instruct: Given a question, retrieve passages that answer the question\nQuery: how do I parse options?",
    "Documentation for the Haskell programming language compiler.",
    "東京 123 main street, and some émojis 😀 to exercise byte fallback",
]


def needs_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent: this test reads ../shared (the reference files), which ships beside the repo")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    needs_shared(REFERENCE)
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nvembed_sdk.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    corpus = SAMPLE_TEXTS * 20 + [f"package number {i} provides tools for data processing" for i in range(200)]
    train_tokenizer(corpus, vocab_size=600, output_dir=out)
    return out


def tiny_config(vocab_size: int):
    from nvembed_sdk.config import PRESETS

    base = PRESETS["tiny-test"]
    return base.replace(text=base.text.__class__(**{**base.text.__dict__, "vocab_size": vocab_size, "head_dim": None}))


@pytest.fixture(scope="session")
def tiny_model_session(tiny_tokenizer_dir: Path):
    from nvembed_sdk.model import NVEmbedModel
    from nvembed_sdk.text import TextPipeline

    vocab = TextPipeline(tiny_tokenizer_dir).vocab_size
    torch.manual_seed(0)
    return NVEmbedModel(tiny_config(vocab)).init_weights(seed=0).eval()


@pytest.fixture()
def tiny_model(tiny_model_session):
    return copy.deepcopy(tiny_model_session)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_session, tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint in the released layout with its tokenizer. Read-only: copy to modify."""
    from nvembed_sdk.checkpoint import save_model

    out = tmp_path_factory.mktemp("ckpt")
    save_model(tiny_model_session, out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def other_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model of exactly the same shape (other random weights). Read-only."""
    from nvembed_sdk.checkpoint import load_model, save_model

    out = tmp_path_factory.mktemp("other") / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    save_model(load_model(out).init_weights(seed=123), out)
    return out


@pytest.fixture()
def tiny_checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def assert_close_cos(a, b, min_cos: float) -> None:
    """One tolerance helper: per-row cosine between two (N, D) arrays."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= min_cos, f"min per-row cosine {cos.min():.8f} < {min_cos}"


@pytest.fixture()
def small_fs(tmp_path: Path):
    """``small_fs(size, read_only=False)``: a real tmpfs of ``size`` (e.g. "400k") mounted under
    tmp_path, unmounted at teardown. Skips where mounting is not permitted (not root, containers
    without CAP_SYS_ADMIN): full and read-only disks cannot be faked faithfully otherwise."""
    import subprocess

    mounted: list[Path] = []

    def make(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): needs root / CAP_SYS_ADMIN")
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)

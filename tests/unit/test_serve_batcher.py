"""Serve pieces without a server: packing, NIM truncation, input parsing, settings."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from nvembed_sdk.errors import InputError
from nvembed_sdk.serve.batcher import Batcher, Job, QueueFull, TooLarge, _Row, pack
from nvembed_sdk.serve.settings import ServeSettings
from nvembed_sdk.text import Batch


def _rows(lengths: list[int]) -> list[_Row]:
    job = Job([[1] * n for n in lengths], [0] * len(lengths), np.zeros((len(lengths), 1)), None, None,
              sum(lengths), len(lengths))  # type: ignore[arg-type]
    return [_Row(job, i, seq) for seq, i in enumerate(random.Random(0).sample(range(len(lengths)), len(lengths)))]


@pytest.mark.parametrize("seed", range(5))
def test_pack_respects_budgets_keeps_oldest_and_loses_nothing(seed):
    rng = random.Random(seed)
    rows = _rows([rng.choice([3, 5, 40, 120, 500]) for _ in range(200)])
    pending, seen = list(rows), []
    while pending:
        oldest = min(r.seq for r in pending)
        chosen, pending = pack(pending, max_tokens=1024, max_rows=16, force_oldest=True)
        assert oldest in {r.seq for r in chosen}  # no starvation
        assert len(chosen) <= 16
        assert len(chosen) == 1 or len(chosen) * max(r.length for r in chosen) <= 1024
        seen += [r.seq for r in chosen]
    assert sorted(seen) == sorted(r.seq for r in rows)


@pytest.mark.parametrize("force", [True, False])
def test_pack_groups_similar_lengths(force):
    rows = _rows([500] * 4 + [5] * 100)
    chosen, _ = pack(rows, max_tokens=2048, max_rows=64, force_oldest=force)
    lengths = {r.length for r in chosen}
    assert len(lengths) == 1  # short rows are not padded to 500


def test_pack_best_run_pads_least():
    rng = random.Random(1)
    rows = _rows([rng.randint(96, 160) for _ in range(300)])
    chosen, rest = pack(rows, max_tokens=1 << 20, max_rows=64, force_oldest=False)
    assert len(chosen) == 64 and len(rest) == 236
    eff = sum(r.length for r in chosen) / (64 * max(r.length for r in chosen))
    line = sorted((r.length for r in rows), reverse=True)
    assert eff == max(sum(line[i : i + 64]) / (64 * line[i]) for i in range(len(line) - 63))
    assert eff >= sum(line[118:182]) / (64 * line[118])  # at least as good as the middle run


def test_oldest_row_is_forced_after_patience():
    async def main():
        b = _echo_batcher(max_queue=10_000)
        b.patience = 2
        old = b.submit([[0] * 9], [0])  # odd one out: the best runs are the 4-length rows
        others = [b.submit([[0] * 4], [0]) for _ in range(40)]
        b.start()
        await old.future
        order = b.batches
        for j in others:
            await j.future
        b.close()
        return order, b.batches

    order, total = asyncio.run(main())
    assert order <= 3 < total  # served within patience + 1 batches, not last


def _echo_batcher(max_queue: int = 100) -> Batcher:
    def run(batch: Batch) -> np.ndarray:  # row i -> [its length, 1]: tells rows apart after reassembly
        return np.stack([batch.attention_mask.sum(1), np.ones(len(batch.input_ids))], 1).astype(np.float32)

    def collate(rows, starts):
        T = max(len(r) for r in rows)
        ids = np.zeros((len(rows), T), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            mask[i, : len(r)] = 1
        return Batch(ids, mask, mask.copy())

    return Batcher(run, collate, 2, max_batch_tokens=16, max_batch_requests=4, max_queue_tokens=max_queue)


def test_big_request_is_split_across_batches_and_reassembled_in_order():
    lengths = [1, 9, 3, 7, 2, 8, 5, 4, 6, 10]

    async def main():
        b = _echo_batcher().start()
        job = b.submit([[0] * n for n in lengths], [0] * len(lengths))
        out = await job.future
        b.close()
        return out, b.batches

    out, batches = asyncio.run(main())
    assert batches > 1
    np.testing.assert_allclose(out[:, 0] / out[:, 1], lengths, rtol=1e-5)  # [n, 1] normalised keeps n
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_admission_counts_tokens_and_cancel_releases_them():
    async def main():
        b = _echo_batcher(max_queue=20)  # not started: nothing drains
        b.submit([[0] * 8, [0] * 8], [0, 0])
        with pytest.raises(QueueFull):
            b.submit([[0] * 5], [0])
        with pytest.raises(TooLarge):
            b.submit([[0] * 21], [0])
        assert b.queued_tokens == 16
        job = b.submit([[0] * 4], [0])
        assert b.full()
        b.cancel(job)
        assert b.queued_tokens == 16
        b.start()
        b.close()
        return b.queued_tokens

    assert asyncio.run(main()) == 0


def test_truncate_ids_rules():
    from nvembed_sdk.serve.schema import APIError, truncate_ids

    ids = list(range(10))
    assert truncate_ids(ids, 3, 10, "NONE", 0) == ids
    assert truncate_ids(ids, 3, 6, "END", 0) == [0, 1, 2, 3, 4, 5]
    assert truncate_ids(ids, 3, 6, "START", 0) == [0, 1, 2, 7, 8, 9]  # BOS + instruction span kept
    assert truncate_ids(ids, 0, 4, "START", 0) == [0, 7, 8, 9]
    with pytest.raises(APIError, match=r"input\[2\] \| got 10 tokens") as exc:
        truncate_ids(ids, 0, 6, "NONE", 2)
    assert exc.value.status == 400


def test_settings_validate_and_read_key(tmp_path):
    with pytest.raises(InputError, match="--max-queue-tokens"):
        ServeSettings(max_batch_tokens=1000, max_queue_tokens=10)
    with pytest.raises(InputError, match="--api-key-file"):
        ServeSettings().with_api_key_file(tmp_path / "absent")
    (tmp_path / "k").write_text("  secret \n")
    s = ServeSettings().with_api_key_file(tmp_path / "k")
    assert s.api_key == "secret" and "secret" not in repr(s)
    assert ServeSettings().host == "127.0.0.1"


def test_cli_binds_loopback_and_leaves_cors_off_by_default():
    from nvembed_sdk.cli_serve import serve

    got = serve.make_context("serve", ["some-artifact"]).params  # parsed, nothing run
    assert got["host"] == "127.0.0.1" and got["cors_origins"] == () and got["api_key_file"] is None
    assert ServeSettings().cors_origins == () and ServeSettings().api_key is None

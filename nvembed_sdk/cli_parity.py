"""``nvembed parity`` (CI gate: exit 0 on pass, 1 on failure) and ``nvembed bench``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from nvembed_sdk.cli import fail_cleanly


def _write_json(path: str, obj: object, what: str) -> None:
    """Write ``obj`` as JSON through a temp file renamed into place; a full or read-only disk names ``path``."""
    from nvembed_sdk.checkpoint import atomic_write_bytes
    from nvembed_sdk.errors import writing

    with writing(path, what):
        atomic_write_bytes(Path(path), (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


@click.command("parity")
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@click.option("--texts", "texts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Texts to compare on (.txt one per line, or .jsonl[.gz]). Default: shipped held-out real text.")
@click.option("--instruction", default=None,
              help="Query prefix for the query-side comparison. Default: the NV-Embed-v2 README question "
                   "instruction; '' compares documents only.")
@click.option("--min-cosine", type=float, default=None,
              help="Per-row cosine budget in (0, 1]. Default: from the candidate's precision.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most this many texts.")
@click.option("--device", default=None, help="Device for the candidate (the reference runs on the CPU in fp32).")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the report as JSON here.")
@fail_cleanly
def parity(reference: str, candidate: str, texts_file: str | None, instruction: str | None,
           min_cosine: float | None, limit: int | None, device: str | None, json_out: str | None) -> None:
    """Compare the final embeddings of two artifacts on real text.

    Per-row cosine (min, mean, worst texts), max abs error and top-10 retrieval agreement.
    The budget defaults from the candidate's precision (fp32 0.99999, fp16/bf16 0.999, int8/fp8
    0.99 per-row cosine). Top-k is lowered to half the texts when there are fewer than 2k
    (the report says so). Exit code 0 on pass, 1 on failure.

    \b
    Examples:
      nvembed parity models/nvembed-debian-small out/onnx
      nvembed parity models/nvembed-debian-small out/int8 --texts my_texts.txt --json report.json
    """
    from nvembed_sdk.embedder import Embedder
    from nvembed_sdk.parity import compare
    from nvembed_sdk.textsets import default_texts, read_texts

    texts = read_texts(texts_file, limit) if texts_file else default_texts("validation")[: limit or None]
    cand = Embedder.load(candidate, device=device)
    report = compare(reference, cand, texts=texts, instruction=instruction, min_cosine=min_cosine)
    click.echo(str(report))
    if json_out:
        _write_json(json_out, report.to_dict(), "parity report")
    sys.exit(0 if report else 1)


@click.command("bench")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@click.option("--texts", "texts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Texts (.txt or .jsonl[.gz]). Default: 256 real passages, truncated to --max-length tokens.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(min=2), help="Truncation (tokens per text).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed passes per artifact, interleaved round-robin; median reported.")
@click.option("--num-texts", default=256, show_default=True, type=click.IntRange(min=1), help="Number of default texts.")
@click.option("--device", default=None, help="Device for every artifact.")
@click.option("--precision", default=None, help="torch backend precision for checkpoint artifacts (fp32, bf16, ...).")
@click.option("--threads", type=click.IntRange(min=0), default=None, help="onnxruntime intra-op threads.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the results as JSON here.")
@fail_cleanly
def bench(artifacts: tuple[str, ...], texts_file: str | None, batch_size: int, max_length: int, repeats: int,
          num_texts: int, device: str | None, precision: str | None, threads: int | None, json_out: str | None) -> None:
    """Measure texts/s, tokens/s, p50/p95 batch latency and peak memory of each artifact.

    All artifacts are loaded in this process and run on the same texts; their timed passes are
    interleaved round-robin (each pass after one untimed batch of the same artifact, so the
    figures are steady state) and the median pass is reported, with ratios against the first
    artifact. A benchmark, not a test.

    \b
    Example:
      nvembed bench models/nvembed-debian-small out/onnx out/int8 --batch-size 16 --repeats 3
    """
    from nvembed_sdk.bench import bench_texts, format_results, run_bench
    from nvembed_sdk.textsets import read_texts

    texts = read_texts(texts_file) if texts_file else bench_texts(num_texts)
    results = run_bench(list(artifacts), texts, batch_size=batch_size, max_length=max_length, repeats=repeats,
                        device=device, options={"precision": precision, "intra_op_num_threads": threads})
    click.echo(format_results(results))
    if json_out:
        _write_json(json_out, [r.to_dict() for r in results], "bench results")

"""``nvembed calibrate``: store int8/uint8 calibration ranges (and declared truncation widths) with a model."""

from __future__ import annotations

import time

import click

from nvembed_sdk.cli import fail_cleanly


@click.command("calibrate")
@click.argument("path", type=click.Path(exists=True))
@click.option("--texts", "texts_file", default=None, type=click.Path(dir_okay=False),
              help="Calibration texts (.txt one per line, or .jsonl(.gz) with text). Default: the SDK's calibration split.")
@click.option("--max-texts", type=int, default=1000, show_default=True, help="Read at most this many texts.")
@click.option("--truncate-dims", default="", help="Comma-separated widths the model was trained to be cut to "
              "(Matryoshka), e.g. 128,64. Default: none (truncate_dim is then refused).")
@click.option("--task", default=None, help="Query task for the query side. Default: the SDK's default task.")
@click.option("--device", default=None, help="cpu, cuda. Default: auto.")
@click.option("--batch-size", default=32, show_default=True)
@fail_cleanly
def calibrate(path: str, texts_file: str | None, max_texts: int, truncate_dims: str, task: str | None,
              device: str | None, batch_size: int) -> None:
    """Write PATH/embedding_output.json: per-dimension ranges of the model's embeddings of real texts.

    \b
    `precision="int8"` / `"uint8"` in the integrations (and nvembed_sdk.output.quantize) bucket
    each dimension between these stored ranges, never the ranges of the batch being quantised.
    Each text is embedded as a document and as a query. Run it on the checkpoint; exports copy
    the file into their bundles.
    Example:
      nvembed calibrate models/nvembed-debian-small
    """
    from nvembed_sdk.embedder import Embedder
    from nvembed_sdk.errors import InputError, fmt
    from nvembed_sdk.output import calibrate as run
    from nvembed_sdk.textsets import read_texts

    try:
        dims = [int(d) for d in truncate_dims.split(",") if d.strip()]
    except ValueError:
        raise InputError(fmt("--truncate-dims", repr(truncate_dims), "comma-separated ints, e.g. 128,64")) from None
    texts = read_texts(texts_file, limit=max_texts) if texts_file else None
    t0 = time.time()
    with Embedder.load(path, device=device) as emb:
        spec = run(emb, texts, truncate_dims=dims, task=task, batch_size=batch_size)
        out = spec.write(emb.text.directory)
    click.echo(f"wrote {out} ({spec.calibration['texts']} texts x 2 sides, widths {sorted(spec.ranges, reverse=True)}, "
               f"{time.time() - t0:.0f}s)")

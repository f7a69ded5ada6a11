"""``nvembed embed-corpus``: a thin click wrapper over :mod:`nvembed_sdk.corpus`."""

from __future__ import annotations

import json

import click

from nvembed_sdk.cli import fail_cleanly


@click.command("embed-corpus")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True))
@click.option("--artifact", required=True, help="Checkpoint dir, bundle dir, model.onnx or engine.plan.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output directory (the same one resumes).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run on Ray Data. ADDRESS: host:6379, ray://host:10001 or auto; without it RAY_ADDRESS, a "
                   "cluster running here, or a new local one.")
@click.option("--workers", default=1, show_default=True, help="Ray: embedding workers (one Embedder each).")
@click.option("--gpus-per-worker", default=0.0, show_default=True, help="Ray: GPUs per worker (0.5 shares a GPU).")
@click.option("--cpus-per-worker", default=None, type=float,
              help="Ray: CPUs per worker. Default: 1 with GPUs, else what fits beside the tokenise stage.")
@click.option("--id-column", default="id", show_default=True, help="Id field (JSONL key, Parquet column).")
@click.option("--text-column", default="text", show_default=True, help="Text field.")
@click.option("--task", default=None, help="A query corpus: embed with 'Instruct: {task}\\nQuery: '.")
@click.option("--instruction", default="", help="Full prefix instead of --task (passages: none).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "int8"]),
              help="Stored vectors; int8 keeps a per-row scale (v = q * scale).")
@click.option("--block-size", default=1024, show_default=True, help="Rows per part: the unit of work and of resume.")
@click.option("--batch-size", default=None, type=int, help="Rows per forward pass. Default: the engine profile's, or 32.")
@click.option("--max-length", default=None, type=int, help="Truncation in tokens. Default: the artifact's.")
@click.option("--backend", default=None, type=click.Choice(["torch", "onnxruntime", "tensorrt"]))
@click.option("--device", default=None, help="cpu, cuda, cuda:N (per worker). Default: CUDA if available.")
@click.option("--precision", default=None, help="torch backend: fp32, bf16, fp16, autocast.")
@click.option("--num-threads", default=None, type=int, help="CPU threads per worker (torch / ORT).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@fail_cleanly
def embed_corpus(input_path: str, artifact: str, output: str, ray_address: str | None, workers: int,
                 gpus_per_worker: float, cpus_per_worker: float | None, id_column: str, text_column: str,
                 task: str | None, instruction: str, dtype: str, block_size: int, batch_size: int | None,
                 max_length: int | None, backend: str | None, device: str | None, precision: str | None,
                 num_threads: int | None, as_json: bool) -> None:
    """Embed a corpus (JSONL/Parquet with id + text, or a folder of text files) into Parquet vectors.

    \b
    OUTPUT gets part-NNNNNN.parquet files (id, vector float32[D] or int8[D] + scale, tokens;
    the artifact's sha256 and precision in the file metadata), each written to OUTPUT/.staging
    and renamed when complete, and _index.json once every id is there exactly once. A killed
    job rerun with the same command skips the finished parts and never writes an id twice.

    \b
    Examples:
      nvembed embed-corpus corpus.jsonl.gz --artifact models/nvembed-debian-small -o vecs --id-column _id
      nvembed embed-corpus queries.jsonl --artifact out/onnx -o qvecs --task "Given a question, retrieve passages"
      ray start --head && nvembed embed-corpus corpus.parquet --artifact out/engine -o vecs \\
          --ray auto --workers 8 --gpus-per-worker 1
    """
    from nvembed_sdk.corpus.job import CorpusJob, run_local
    from nvembed_sdk.embedder import query_instruction
    from nvembed_sdk.errors import InputError, fmt

    if task and instruction:
        raise InputError(fmt("--task and --instruction", "both", "one of them"))
    job = CorpusJob(input=input_path, artifact=artifact, output=output, id_column=id_column, text_column=text_column,
                    instruction=query_instruction(task) if task else instruction, dtype=dtype, block_size=block_size,
                    batch_size=batch_size, max_length=max_length, backend=backend, device=device,
                    precision=precision, num_threads=num_threads)
    log = (lambda s: None) if as_json else click.echo
    if ray_address is None:
        summary = run_local(job, show_progress=not as_json, log=log)
    else:
        from nvembed_sdk.corpus.ray_job import run_ray

        summary = run_ray(job, address=ray_address or None, workers=workers, gpus_per_worker=gpus_per_worker,
                          cpus_per_worker=cpus_per_worker, show_progress=not as_json, log=log)
    brief = {k: summary[k] for k in ("rows", "embedded", "seconds", "texts_per_s", "precision", "dim")}
    if as_json:
        click.echo(json.dumps(brief))
        return
    click.echo(f"wrote {summary['rows']:,} vectors ({summary['embedded']:,} embedded now, {summary['seconds']:.1f}s, "
               f"{summary['texts_per_s']:.1f} texts/s) to {output}")

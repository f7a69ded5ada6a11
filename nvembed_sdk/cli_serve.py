"""``nvembed serve``: parse options, load the artifact, hand both to the launcher."""

from __future__ import annotations

import click

from nvembed_sdk.cli import fail_cleanly
from nvembed_sdk.errors import InputError, fmt


@click.command()
@click.argument("artifact", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless told).")
@click.option("--port", default=8000, show_default=True)
@click.option("--backend", default=None, type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
              help="Default: from the artifact.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N. Default: CUDA if available.")
@click.option("--precision", default=None, help="torch backend only: fp32, bf16, fp16, autocast.")
@click.option("--max-batch-tokens", default=16384, show_default=True, help="Padded tokens per forward pass.")
@click.option("--max-batch-requests", default=64, show_default=True, help="Texts per forward pass.")
@click.option("--max-queue-tokens", default=262144, show_default=True,
              help="Admitted, not yet embedded tokens; over it a request gets 429 + Retry-After.")
@click.option("--max-inputs", default=2048, show_default=True, help="Inputs per request (400 above).")
@click.option("--max-body-bytes", default=8 * 2**20, show_default=True, help="Request body size (413 above).")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False),
              help="File holding the bearer key; every request then needs 'Authorization: Bearer <key>'.")
@click.option("--served-model-name", default=None, help="Model name clients send. Default: the artifact's folder name.")
@click.option("--default-task", default=None, help="Task of query instructions when a request names none.")
@click.option("--default-input-type", default="passage", show_default=True, type=click.Choice(["passage", "query"]),
              help="For requests without input_type or a -query/-passage model suffix (OpenAI clients).")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow this CORS origin (repeatable). Default: CORS off.")
@click.option("--tokenize-threads", default=1, show_default=True, help="Threads tokenising requests.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Deploy on Ray Serve (put ARTIFACT first). ADDRESS: host:6379, auto or ray://host:10001; "
                   "without it RAY_ADDRESS, a cluster on this machine, or a new local one.")
@click.option("--replicas", default=1, show_default=True, help="--ray: replicas, one model each.")
@click.option("--min-replicas", default=None, type=int, help="--ray: autoscale, at least this many replicas.")
@click.option("--max-replicas", default=None, type=int, help="--ray: autoscale, at most this many replicas.")
@click.option("--gpus-per-replica", default=0.0, show_default=True, help="--ray: GPUs each replica holds (0.5 packs two).")
@click.option("--cpus-per-replica", default=1.0, show_default=True, help="--ray: CPUs each replica holds.")
@click.option("--max-ongoing-requests", default=64, show_default=True,
              help="--ray: requests the proxy sends one replica at once (its batcher packs them).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@fail_cleanly
def serve(artifact: str, host: str, port: int, backend: str | None, device: str | None, precision: str | None,
          max_batch_tokens: int, max_batch_requests: int, max_queue_tokens: int, max_inputs: int,
          max_body_bytes: int, api_key_file: str | None, served_model_name: str | None, default_task: str | None,
          default_input_type: str, cors_origins: tuple[str, ...], tokenize_threads: int, ray_address: str | None,
          replicas: int, min_replicas: int | None, max_replicas: int | None, gpus_per_replica: float,
          cpus_per_replica: float, max_ongoing_requests: int, log_level: str) -> None:
    """Serve ARTIFACT over HTTP: OpenAI- and NIM-compatible /v1/embeddings (needs the serve extra).

    \b
    Example:
      nvembed serve models/nvembed-debian-small --port 8000
      curl -s localhost:8000/v1/embeddings -H 'Content-Type: application/json' \\
           -d '{"input": ["hello"], "model": "nvembed-debian-small"}'
    SIGTERM stops admitting (ready goes false), answers every admitted request, then exits.

    \b
    On Ray Serve, the same app on N replicas behind Ray's proxy at --host/--port:
      nvembed serve models/nvembed-debian-small --ray --replicas 2
      nvembed serve out/engine --ray auto --min-replicas 1 --max-replicas 8 --gpus-per-replica 1
    """
    from nvembed_sdk.embedder import Embedder
    from nvembed_sdk.serve.server import serve as run
    from nvembed_sdk.serve.settings import ServeSettings

    extra = {"default_task": default_task} if default_task else {}
    settings = ServeSettings(host=host, port=port, max_batch_tokens=max_batch_tokens,
                             max_batch_requests=max_batch_requests, max_queue_tokens=max_queue_tokens,
                             max_inputs=max_inputs, max_body_bytes=max_body_bytes,
                             served_model_name=served_model_name, default_input_type=default_input_type,
                             cors_origins=tuple(cors_origins), tokenize_threads=tokenize_threads,
                             **extra).with_api_key_file(api_key_file)
    opts = {"precision": precision} if precision else {}
    if ray_address is None and (replicas != 1 or min_replicas is not None or max_replicas is not None
                                or gpus_per_replica or cpus_per_replica != 1.0 or max_ongoing_requests != 64):
        raise InputError(fmt("--replicas/--min-replicas/--max-replicas/--gpus-per-replica/--cpus-per-replica/"
                             "--max-ongoing-requests", "given without --ray", "add --ray [ADDRESS]"))
    if ray_address is not None:
        from nvembed_sdk.embedder import detect
        from nvembed_sdk.serve import ray_serve

        detect(artifact)  # a bad path fails here, not in every replica
        ray_serve.main_logging(log_level)
        ray_serve.run(artifact, settings, address=ray_address or None, load_options={"backend": backend, "device": device,
                      **opts}, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                      gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
                      max_ongoing_requests=max_ongoing_requests)
        return
    embedder = Embedder.load(artifact, backend=backend, device=device, **opts)  # a bad artifact fails here
    run(embedder, settings, log_level=log_level)

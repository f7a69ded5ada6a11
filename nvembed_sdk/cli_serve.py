"""``nvembed serve``: parse options, load the artifact, hand both to the launcher."""

from __future__ import annotations

import click

from nvembed_sdk.cli import fail_cleanly


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
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@fail_cleanly
def serve(artifact: str, host: str, port: int, backend: str | None, device: str | None, precision: str | None,
          max_batch_tokens: int, max_batch_requests: int, max_queue_tokens: int, max_inputs: int,
          max_body_bytes: int, api_key_file: str | None, served_model_name: str | None, default_task: str | None,
          default_input_type: str, cors_origins: tuple[str, ...], tokenize_threads: int, log_level: str) -> None:
    """Serve ARTIFACT over HTTP: OpenAI- and NIM-compatible /v1/embeddings (needs the serve extra).

    \b
    Example:
      nvembed serve models/nvembed-debian-small --port 8000
      curl -s localhost:8000/v1/embeddings -H 'Content-Type: application/json' \\
           -d '{"input": ["hello"], "model": "nvembed-debian-small"}'
    SIGTERM stops admitting (ready goes false), answers every admitted request, then exits.
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
    embedder = Embedder.load(artifact, backend=backend, device=device, **opts)  # a bad artifact fails here
    run(embedder, settings, log_level=log_level)

"""Server settings: one frozen dataclass shared by the app, the batcher and every launcher."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nvembed_sdk.embedder import DEFAULT_TASK
from nvembed_sdk.errors import InputError, fmt


@dataclass(frozen=True)
class ServeSettings:
    """What ``nvembed serve`` is told; every launcher (uvicorn, Ray Serve) passes one of these.

    Attributes:
        host: bind address. Defaults to ``127.0.0.1`` (never all interfaces unless told).
        port: TCP port. Defaults to 8000.
        max_batch_tokens: padded tokens per forward pass (rows x longest row). Defaults to 16384.
        max_batch_requests: texts per forward pass. Defaults to 64.
        max_queue_tokens: tokens admitted but not yet embedded, over all requests; past it a
            request gets 429 with ``Retry-After``. Defaults to 262144.
        max_inputs: inputs per request (400 above). Defaults to 2048.
        max_body_bytes: request body size (413 above). Defaults to 8 MiB.
        api_key: the bearer key every request needs (None = no auth). Read it with
            :meth:`with_api_key_file`, never from a request.
        served_model_name: the ``model`` name clients use; ``-query`` / ``-passage`` suffixes
            select the input type (NIM style). Defaults to the artifact's directory name.
        default_task: the task of query instructions when the request names none.
        default_input_type: ``passage`` (no instruction) or ``query`` for requests that name none
            (OpenAI clients never do). Defaults to ``passage``.
        matryoshka_dims: widths ``dimensions`` may ask for; None = what the artifact declares
            (``matryoshka_dims`` in its config.json or manifest); () = refuse truncation.
        cors_origins: allowed CORS origins. Defaults to none (CORS off).
        warmup: run one batch before reporting ready. Defaults to True.
        retry_after_s: the ``Retry-After`` seconds of a 429. Defaults to 1.
        tokenize_threads: threads that tokenise requests off the event loop. Defaults to 1.
        access_log: write one structured log line per request (never the texts). Defaults to True.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_tokens: int = 16384
    max_batch_requests: int = 64
    max_queue_tokens: int = 262144
    max_inputs: int = 2048
    max_body_bytes: int = 8 * 2**20
    api_key: str | None = field(default=None, repr=False)
    served_model_name: str | None = None
    default_task: str = DEFAULT_TASK
    default_input_type: str = "passage"
    matryoshka_dims: tuple[int, ...] | None = None
    cors_origins: tuple[str, ...] = ()
    warmup: bool = True
    retry_after_s: int = 1
    tokenize_threads: int = 1
    access_log: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_requests", "max_queue_tokens", "max_inputs",
                     "max_body_bytes", "retry_after_s", "tokenize_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(fmt(f"--{name.replace('_', '-')}", value, "an int >= 1"))
        if self.max_queue_tokens < self.max_batch_tokens:
            raise InputError(fmt("--max-queue-tokens", self.max_queue_tokens,
                                 f"at least --max-batch-tokens ({self.max_batch_tokens})"))
        if self.default_input_type not in ("query", "passage"):
            raise InputError(fmt("default_input_type", repr(self.default_input_type), "'query' or 'passage'"))
        if not 0 < self.port < 65536:
            raise InputError(fmt("--port", self.port, "1..65535"))

    def replace(self, **changes: object) -> ServeSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def with_api_key_file(self, path: str | Path | None) -> ServeSettings:
        """Read the bearer key from a file (first line, stripped); None leaves auth off.

        Raises:
            InputError: the file is missing or empty.
        """
        if path is None:
            return self
        p = Path(path)
        if not p.is_file():
            raise InputError(fmt("--api-key-file", f"{p} does not exist", "a file holding the key on its first line"))
        lines = p.read_text(encoding="utf-8").strip().splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise InputError(fmt("--api-key-file", f"{p} is empty", "a file holding the key on its first line"))
        return self.replace(api_key=key)

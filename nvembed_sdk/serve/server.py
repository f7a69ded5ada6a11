"""The uvicorn launcher: one model per process, SIGTERM drains before exit."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from nvembed_sdk.embedder import Embedder
from nvembed_sdk.serve.app import ServeState, create_app
from nvembed_sdk.serve.settings import ServeSettings

log = logging.getLogger("nvembed_sdk.serve")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def build_server(embedder: Embedder | Any, settings: ServeSettings, log_level: str = "info") -> Any:
    """A ``uvicorn.Server`` for the app, whose SIGTERM/SIGINT handler first flips readiness off.

    uvicorn then stops listening, lets in-flight requests finish (no graceful timeout), runs the
    lifespan shutdown (the batcher drains) and returns.
    """
    import uvicorn

    app = create_app(embedder, settings)
    state: ServeState = app.state.nvembed

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not state.draining:
                log.info("signal %d: draining (ready=false, admitting nothing new)", sig)
            state.begin_drain()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after its shutdown (exit status -15); a completed
            # drain is a clean stop, so exit 0 instead
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=None, server_header=False)
    return DrainingServer(config)


def serve(embedder: Embedder | Any, settings: ServeSettings, log_level: str = "info") -> None:
    """Run until SIGTERM/SIGINT (blocking).

    Args:
        embedder: a loaded :class:`Embedder` or a factory returning one.
        settings: server settings.
        log_level: uvicorn and access-log level. Defaults to ``info``.
    """
    logging.basicConfig(level=log_level.upper(), format="%(message)s", stream=sys.stderr)
    logging.getLogger("nvembed_sdk").setLevel(log_level.upper())
    if settings.host not in LOOPBACK and settings.api_key is None:
        log.warning("listening on %s without --api-key-file: anyone who can reach it can use it", settings.host)
    build_server(embedder, settings, log_level).run()

"""``nvembed serve``: an OpenAI- and NIM-compatible embedding server (FastAPI).

Modules, each with one job:

* :mod:`~nvembed_sdk.serve.settings` - :class:`ServeSettings` (plain dataclass, no web imports);
* :mod:`~nvembed_sdk.serve.schema` - the OpenAI/NIM request model, input parsing, the response
  and the OpenAI error envelope;
* :mod:`~nvembed_sdk.serve.batcher` - admission by queued tokens, the token-budget packer and the
  one model worker thread (no web imports);
* :mod:`~nvembed_sdk.serve.metrics` - Prometheus metrics (``nvembed_*``) on a per-app registry;
* :mod:`~nvembed_sdk.serve.auth` - bearer-key check (constant-time);
* :mod:`~nvembed_sdk.serve.app` - :func:`create_app`, independent of how it is hosted
  (uvicorn here, Ray Serve elsewhere);
* :mod:`~nvembed_sdk.serve.server` - the uvicorn launcher (SIGTERM drain).

Needs the ``serve`` extra (``pip install -e '.[serve]'`` in the checkout); nothing here is imported by
``import nvembed_sdk``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:  # lazy: importing the package must not import fastapi
    if name == "ServeSettings":
        from nvembed_sdk.serve.settings import ServeSettings

        return ServeSettings
    if name == "create_app":
        from nvembed_sdk.serve.app import create_app

        return create_app
    if name == "serve":
        from nvembed_sdk.serve.server import serve

        return serve
    raise AttributeError(name)

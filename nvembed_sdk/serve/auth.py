"""Bearer-key check: constant-time, the key comes only from the server's own settings."""

from __future__ import annotations

import hmac

from nvembed_sdk.serve.schema import APIError

# Probes stay open so an orchestrator can check liveness without the key; they reveal nothing.
OPEN_PATHS = frozenset({"/health/live", "/health/ready"})


def check_bearer(header: str | None, key: str | None) -> None:
    """Raise a 401 :class:`APIError` unless ``header`` is ``Bearer <key>`` (no-op when key is None)."""
    if key is None:
        return
    scheme, _, given = (header or "").partition(" ")
    # compare_digest on bytes of any length takes time independent of where they differ
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "Authorization | got a missing or wrong API key. Note: send 'Authorization: Bearer "
                            "<key>' with the key in the server's --api-key-file", type="authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

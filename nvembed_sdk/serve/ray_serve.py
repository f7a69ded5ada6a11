"""``nvembed serve --ray``: the same app (:func:`~nvembed_sdk.serve.app.create_app`) on Ray Serve.

::

    clients ──► Ray Serve HTTP proxy (host:port, one per node) ──► replica 1: create_app(Embedder, settings)
                 routes to replicas with a free slot                 (its batcher, its worker thread, its metrics)
                 (--max-ongoing-requests per replica)           ──► replica 2 ...  (--replicas N, or autoscaling
                                                                     between --min-replicas and --max-replicas)

Each replica is a Ray actor holding one :class:`Embedder` on its device (``--gpus-per-replica``:
Ray sets ``CUDA_VISIBLE_DEVICES``, so the replica sees its GPU as ``cuda:0``) and the whole
FastAPI app, built by Ray Serve's late-bound ingress (``__serve_build_asgi_app__``) in the
replica itself: nothing model-sized is pickled. A replica loads and warms up before Ray routes
to it, so it never answers "starting". Ray restarts a replica that dies or whose health check
fails (a dead batcher thread). Stopping (SIGTERM/SIGINT to the launcher, ``serve.delete``,
scale-down) is Ray Serve's graceful shutdown: the proxy stops routing to the replica, its
in-flight requests finish, then the app's lifespan shutdown drains the batcher.

Ray is imported only when a deployment is built (``import nvembed_sdk`` never loads it).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

from nvembed_sdk.errors import InputError, fmt
from nvembed_sdk.serve.settings import ServeSettings

log = logging.getLogger("nvembed_sdk.serve")

REPLICA_HEADER = "x-nvembed-replica"  # every response says which replica answered (its Serve replica id)
SERVE_NAMESPACE = "serve"  # Ray Serve's actor namespace
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"  # replica actors are named SERVE_REPLICA::<app>#<deployment>#<id>


class EmbeddingReplica:
    """The user class of one replica (Ray Serve wraps it with the ingress; no ray import here).

    Args:
        artifact: what ``Embedder.load`` reads; every node must see it at this path.
        settings: the app's settings (host and port are the proxy's, unused here).
        load_options: ``Embedder.load`` keyword arguments (backend, device, precision, ...).
    """

    def __init__(self, artifact: str, settings: ServeSettings, load_options: dict[str, Any]) -> None:
        self.artifact = artifact
        self.settings = settings
        self.load_options = dict(load_options)
        self.state: Any = None

    async def __serve_build_asgi_app__(self) -> Any:  # noqa: N807 - Ray Serve's hook name
        """Build the app in the replica, then load and warm up before Ray routes traffic here
        (the lifespan's own load/warm-up then do nothing)."""
        from ray import serve

        from nvembed_sdk.embedder import Embedder
        from nvembed_sdk.serve.app import create_app

        replica = serve.get_replica_context().replica_id.unique_id
        app = create_app(lambda: Embedder.load(self.artifact, **self.load_options), self.settings)
        self.state = app.state.nvembed
        from prometheus_client import Gauge

        Gauge("nvembed_replica_info", "the Ray Serve replica this /metrics answer comes from", ["replica"],
              registry=self.state.metrics.registry).labels(replica).set(1)
        app.add_middleware(_ReplicaHeader, replica=replica)
        await self.state.start()
        log.info("replica %s: %s", replica, self.state.embedder)
        return app

    def check_health(self) -> None:
        """Ray calls this every ``health_check_period_s``; raising gets the replica replaced."""
        batcher = None if self.state is None else self.state.batcher
        if batcher is not None and not batcher.closing and not batcher.alive():
            raise RuntimeError("nvembed batcher threads died")


class _ReplicaHeader:
    """Pure ASGI middleware: adds ``x-nvembed-replica`` to every response."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.value = replica.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def deployment_options(replicas: int | None = 1, min_replicas: int | None = None, max_replicas: int | None = None,
                       gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
                       max_ongoing_requests: int = 64, graceful_shutdown_timeout_s: float = 60.0) -> dict[str, Any]:
    """``serve.deployment`` options, checked (one-line errors naming the option).

    Fixed ``replicas``, or autoscaling when ``min_replicas``/``max_replicas`` is given (Ray
    Serve's ``autoscaling_config``; the target is half of ``max_ongoing_requests`` per replica).
    """
    if gpus_per_replica < 0:
        raise InputError(fmt("--gpus-per-replica", gpus_per_replica, "a number >= 0"))
    if cpus_per_replica <= 0:
        raise InputError(fmt("--cpus-per-replica", cpus_per_replica, "a number > 0"))
    if max_ongoing_requests < 1:
        raise InputError(fmt("--max-ongoing-requests", max_ongoing_requests, "an int >= 1"))
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        "max_ongoing_requests": max_ongoing_requests,
        "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
        # a replica warms up in its constructor; a cold 7B load can take minutes
        "health_check_timeout_s": 60.0,
    }
    if min_replicas is not None or max_replicas is not None:
        lo = 1 if min_replicas is None else min_replicas
        hi = max(lo, replicas or 1) if max_replicas is None else max_replicas
        if lo < 0 or hi < 1 or hi < lo:
            raise InputError(fmt("--min-replicas/--max-replicas", f"{min_replicas}/{max_replicas}",
                                 "0 <= min <= max, max >= 1"))
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                      "target_ongoing_requests": max(1, max_ongoing_requests // 2)}
    else:
        if replicas is None or replicas < 1:
            raise InputError(fmt("--replicas", replicas, "an int >= 1"))
        opts["num_replicas"] = replicas
    return opts


def build_application(artifact: str, settings: ServeSettings, load_options: dict[str, Any] | None = None,
                      name: str = "nvembed", **options: Any) -> Any:
    """The bound Ray Serve application (``serve.run`` it).

    Args:
        artifact: checkpoint, ONNX bundle or engine (every node must see it at this path).
        settings: the app's settings.
        load_options: ``Embedder.load`` keyword arguments. Without a ``device``, a replica with
            GPUs loads on ``cuda`` and one without on ``cpu``.
        name: the deployment's name.
        **options: :func:`deployment_options` arguments.
    """
    from nvembed_sdk._optional import require

    require("ray")
    from ray import serve

    opts = deployment_options(**options)
    load = dict(load_options or {})
    if load.get("device") is None:
        load["device"] = "cuda" if opts["ray_actor_options"]["num_gpus"] > 0 else "cpu"
    replica_cls = serve.deployment(name=name, **opts)(serve.ingress()(EmbeddingReplica))
    return replica_cls.bind(str(artifact), settings, load)


def replica_actor(replica: str, app_name: str = "nvembed", deployment: str = "nvembed") -> Any:
    """The Ray actor handle of a replica named by its ``x-nvembed-replica`` id (to inspect or kill it)."""
    import ray

    return ray.get_actor(f"{REPLICA_ACTOR_PREFIX}{app_name}#{deployment}#{replica}", namespace=SERVE_NAMESPACE)


def run(artifact: str, settings: ServeSettings, address: str | None = None, load_options: dict[str, Any] | None = None,
        app_name: str = "nvembed", stop: threading.Event | None = None, **options: Any) -> None:
    """Deploy on Ray Serve and block until SIGTERM/SIGINT (or ``stop`` is set), then drain.

    Args:
        artifact: what each replica loads.
        settings: the app's settings; ``host``/``port`` are the Ray Serve proxy's.
        address: the cluster (``host:6379``, ``auto``, ``ray://host:10001``). None: ``RAY_ADDRESS``,
            a cluster running on this machine, or a new local one (gone when this process exits).
        load_options: ``Embedder.load`` keyword arguments.
        app_name: the Serve application's name.
        stop: an event that ends the deployment like a signal (tests, embedding in a program).
        **options: :func:`deployment_options` arguments.
    """
    from nvembed_sdk._optional import require

    ray = require("ray")
    from ray import serve

    application = build_application(artifact, settings, load_options, **options)  # bad options fail before Ray starts
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    stop = stop or threading.Event()
    restore = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.signal(sig, lambda s, f: stop.set())
    try:
        serve.run(application, name=app_name, route_prefix="/", blocking=False)  # returns once replicas are up
        log.info("serving %s on http://%s:%d (Ray Serve app %r)", artifact, settings.host, settings.port, app_name)
        while not stop.wait(1.0):
            pass
        log.info("stopping: draining the replicas (in-flight requests finish)")
        serve.delete(app_name)  # Ray Serve's graceful shutdown of every replica, then the lifespan drain
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
    log.info("stopped")


def main_logging(log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(message)s", stream=sys.stderr)
    logging.getLogger("nvembed_sdk").setLevel(log_level.upper())

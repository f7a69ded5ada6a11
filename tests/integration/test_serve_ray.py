"""``nvembed serve --ray``: the same app on Ray Serve, 2 replicas of the shipped model (torch, CPU)
on a real local Ray cluster (2 CPUs), Ray's HTTP proxy on 127.0.0.1, driven by the ``openai``
client and httpx.

One cluster and one deployment for the module (Ray's start and two model loads are the slow
part). The kill test runs last: it kills a replica actor under bounded traffic and waits for
Ray Serve to replace it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from nvembed_sdk import Embedder  # noqa: E402
from nvembed_sdk.serve import ServeSettings, create_app  # noqa: E402
from nvembed_sdk.serve.ray_serve import REPLICA_HEADER, build_application, replica_actor  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "nvembed-debian-small"
NAME = "nvembed-debian-small"
KEY = "ray-test-key-0123456789"
COS = 0.99999
APP = "nvembed"
DOCS = [
    "libc6: GNU C Library: Shared libraries",
    "python3-requests: elegant and simple HTTP library for Python3, built for human beings",
    "vim",
    "東京 123 and an émoji 😀",
]
QUERIES = ["how do I parse command line options in C?", "http client library"]
WAIT = 240.0  # bounded waits for Ray (2 shared cores); never asserted as timings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"{SHIPPED} has no weights")
    return Embedder.load(SHIPPED, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def served(embedder):
    """The Ray Serve deployment: (url, settings). Both replicas are up when serve.run returns."""
    from ray import serve

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(served_model_name=NAME, access_log=False, api_key=KEY)
        # 0.5 CPU each: the replacement of a killed replica must fit beside the survivor
        serve.run(build_application(str(SHIPPED), settings, {"backend": "torch"}, replicas=2, cpus_per_replica=0.5,
                                    max_ongoing_requests=16), name=APP, route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}", settings
    finally:
        serve.shutdown()
        ray.shutdown()


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _replicas_seen(url: str, want: int, timeout: float = WAIT) -> set[str]:
    """Distinct replicas that answered /v1/models, polling until ``want`` (bounded)."""
    seen: set[str] = set()
    deadline = time.time() + timeout
    with httpx.Client(timeout=60) as client:
        while len(seen) < want and time.time() < deadline:
            r = client.get(url + "/v1/models", headers=_headers())
            if r.status_code == 200:
                seen.add(r.headers[REPLICA_HEADER])
    return seen


def test_cli_sigterm_drains_admitted_requests(embedder):
    """``nvembed serve --ray local --replicas 2`` (its own local cluster, before the module's): both
    replicas answer the ``openai`` client with Embedder's vectors; SIGTERM while requests are in
    flight answers every one of them, then the launcher exits 0."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "nvembed_sdk.cli", "serve", str(SHIPPED), "--ray", "local", "--replicas", "2",
           "--cpus-per-replica", "0.5", "--port", str(port), "--backend", "torch", "--served-model-name", NAME,
           "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + WAIT
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
        assert len(_replicas_seen(url, 2)) == 2  # the command line's --replicas 2 reached Ray Serve
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        got = np.asarray([d.embedding for d in client.embeddings.create(input=DOCS, model=NAME).data], np.float32)
        assert _cos(got, embedder.embed_documents(DOCS)).min() >= COS  # default settings: base64 on the wire
        texts = [DOCS[i % len(DOCS)] * 8 for i in range(64)]  # long enough to be in flight at the signal
        ref = embedder.embed_documents(texts)
        results: list[object] = []
        done_at: list[float] = []
        sent = threading.Barrier(5)

        def one() -> None:
            with httpx.Client(timeout=180) as client:
                req = client.build_request("POST", url + "/v1/embeddings",
                                           json={"input": texts, "model": NAME, "encoding_format": "float"})
                sent.wait()
                try:
                    results.append(client.send(req))
                except httpx.HTTPError as exc:
                    results.append(exc)
                done_at.append(time.time())

        threads = [threading.Thread(target=one, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        sent.wait()
        time.sleep(0.3)  # the 4 requests are on the wire
        t_term = time.time()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(200)
        rc = proc.wait(200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    print(f"sigterm test: {sum(t > t_term for t in done_at)} of 4 answers came after the signal")
    assert len(results) == 4 and all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), \
        [getattr(r, "status_code", r) for r in results]
    for r in results:
        got = np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        assert _cos(got, ref).min() >= COS
    assert rc == 0, err[-2000:]


def test_openai_client_gets_the_single_process_vectors(served, embedder):
    import uvicorn

    url, settings = served
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)  # default settings: base64 floats
    docs = np.array([d.embedding for d in client.embeddings.create(input=DOCS, model=NAME).data], dtype=np.float32)
    queries = np.array([d.embedding for d in client.embeddings.create(input=QUERIES, model=NAME + "-query").data],
                       dtype=np.float32)
    assert _cos(docs, embedder.embed_documents(DOCS)).min() >= COS
    assert _cos(queries, embedder.embed_queries(QUERIES)).min() >= COS

    # the single-process server (same create_app, uvicorn) answers the same vectors
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(embedder, settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + WAIT
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        single = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY)
        one = np.array([d.embedding for d in single.embeddings.create(input=DOCS, model=NAME).data], dtype=np.float32)
    finally:
        server.should_exit = True
        thread.join(30)
    assert _cos(docs, one).min() >= COS

    # the same app behind the proxy: auth, the error envelope, both replicas, per-replica metrics
    r = httpx.post(url + "/v1/embeddings", json={"input": "x", "model": NAME}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"]
    replicas = _replicas_seen(url, 2)
    assert len(replicas) == 2, replicas
    m = httpx.get(url + "/metrics", headers=_headers(), timeout=60)
    assert m.status_code == 200 and "nvembed_ready 1.0" in m.text
    assert f'nvembed_replica_info{{replica="{m.headers[REPLICA_HEADER]}"}} 1.0' in m.text


def test_killed_replica_is_replaced_while_the_other_answers(served, embedder):
    """Bounded traffic from C connections; one replica actor is killed (ray.kill, no restart).

    Asserted: every answer is a 200 with the right vector or a 5xx (retriable: the openai client
    retries those by default, and the openai-client connection below sees no error at all); at
    most C requests fail (those in flight on the killed replica); the survivor answers between
    the kill and the replacement; Ray Serve starts a new replica and both answer afterwards.
    """
    from ray import serve

    url, _ = served
    ref = embedder.embed_documents(DOCS)
    before = _replicas_seen(url, 2)
    assert len(before) == 2, before
    victim, survivor = sorted(before)

    C = 3  # httpx connections; plus one openai-client connection
    stop = threading.Event()
    lock = threading.Lock()
    log: list[tuple[float, int, str | None]] = []  # (time, status or -1 for a transport error, replica)
    wrong: list[str] = []
    openai_errors: list[BaseException] = []
    openai_ok = [0]

    def httpx_worker(k: int) -> None:
        with httpx.Client(timeout=120) as client:
            i = k
            while not stop.is_set():
                j = i % len(DOCS)
                i += 1
                try:
                    r = client.post(url + "/v1/embeddings", headers=_headers(),
                                    json={"input": [DOCS[j]], "model": NAME, "encoding_format": "float"})
                except httpx.TransportError:
                    with lock:
                        log.append((time.time(), -1, None))
                    continue
                rep = r.headers.get(REPLICA_HEADER)
                if r.status_code == 200:
                    vec = np.asarray(r.json()["data"][0]["embedding"], dtype=np.float32)
                    if _cos(vec, ref[j]) < COS:
                        wrong.append(f"{rep}: {DOCS[j]!r}")
                with lock:
                    log.append((time.time(), r.status_code, rep))

    def openai_worker() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=120)  # default retries (2)
        i = 0
        while not stop.is_set():
            j = i % len(DOCS)
            i += 1
            try:
                out = client.embeddings.create(input=[DOCS[j]], model=NAME).data[0].embedding
            except Exception as exc:  # noqa: BLE001 - collected and asserted empty
                openai_errors.append(exc)
                continue
            if _cos(np.asarray(out, dtype=np.float32), ref[j]) < COS:
                wrong.append(f"openai: {DOCS[j]!r}")
            openai_ok[0] += 1

    threads = [threading.Thread(target=httpx_worker, args=(k,), daemon=True) for k in range(C)]
    threads.append(threading.Thread(target=openai_worker, daemon=True))
    for t in threads:
        t.start()
    try:
        deadline = time.time() + WAIT
        while len([e for e in log if e[2] == victim and e[1] == 200]) < 3 and time.time() < deadline:
            time.sleep(0.05)  # traffic reaches the victim before it is killed
        t_kill = time.time()
        ray.kill(replica_actor(victim, APP, APP), no_restart=True)
        replacement = None
        while replacement is None and time.time() < deadline:
            with lock:
                new = {e[2] for e in log if e[0] > t_kill and e[1] == 200} - before
            replacement = next(iter(new), None)
            time.sleep(0.1)
        assert replacement is not None, "no new replica answered within the wait"
        with lock:
            t_new = min(e[0] for e in log if e[2] == replacement)
        while time.time() < deadline:  # some traffic after the replacement, to both
            with lock:
                after = {e[2] for e in log if e[0] > t_new and e[1] == 200}
            if {survivor, replacement} <= after:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(180)

    statuses = [s for _, s, _ in log]
    failed = [(round(t - t_kill, 2), s) for t, s, _ in log if s != 200]
    print(f"kill test: {len(log)} httpx requests, {openai_ok[0]} openai, failed (s after kill, status): {failed}, "
          f"replacement answered {t_new - t_kill:.1f} s after the kill")
    assert not wrong, wrong
    assert all(s == 200 or s >= 500 or s == -1 for s in statuses), sorted(set(statuses))
    assert len(failed) <= C, failed
    assert not openai_errors, openai_errors[:3]
    assert openai_ok[0] > 0
    # the survivor kept answering while the victim was gone and before the replacement answered
    assert any(rep == survivor and s == 200 and t_kill < t < t_new for t, s, rep in log), (t_kill, t_new)
    assert {survivor, replacement} <= {rep for t, s, rep in log if t > t_new and s == 200}
    assert victim not in {rep for t, s, rep in log if t > t_new}
    states = serve.status().applications[APP].deployments[APP].replica_states
    assert states.get("RUNNING") == 2, states

"""``nvembed serve`` end to end: the real FastAPI + uvicorn server on 127.0.0.1, the shipped model
(torch backend), driven by the canonical clients (openai, langchain-nvidia-ai-endpoints) and httpx.

Two servers per module share one Embedder: ``plain`` (defaults) and ``guarded`` (API key, small
body and queue limits, declared Matryoshka widths). The SIGTERM test runs its own subprocess.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from nvembed_sdk import Embedder  # noqa: E402
from nvembed_sdk.embedder import DEFAULT_TASK, query_instruction  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "nvembed-debian-small"
NAME = "nvembed-debian-small"
KEY = "test-key-0123456789"
COS = 0.99999

DOCS = [
    "libc6: GNU C Library: Shared libraries",
    "python3-requests: elegant and simple HTTP library for Python3, built for human beings",
    "A tool to convert between audio file formats, including Ogg Vorbis and FLAC, with a long description "
    "that goes on about encoders, decoders, tags, replay gain and gapless playback for a while.",
    "vim",
    "東京 123 and an émoji 😀",
]
QUERIES = ["how do I parse command line options in C?", "http client library"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


class ThreadServer:
    """uvicorn.Server in a thread (no signal handlers off the main thread)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.state = app.state.nvembed

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        _wait_ready(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"{SHIPPED} has no weights")
    return Embedder.load(SHIPPED, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def plain(embedder):
    from nvembed_sdk.serve import ServeSettings, create_app

    with ThreadServer(create_app(embedder, ServeSettings(served_model_name=NAME, access_log=False))) as srv:
        yield srv


@pytest.fixture(scope="module")
def guarded(embedder, tmp_path_factory):
    from nvembed_sdk.serve import ServeSettings, create_app

    key_file = tmp_path_factory.mktemp("key") / "key.txt"
    key_file.write_text(KEY + "\n")
    settings = ServeSettings(served_model_name=NAME, max_body_bytes=20_000, max_batch_tokens=512,
                             max_queue_tokens=8192, max_inputs=64, matryoshka_dims=(64, 128),
                             access_log=False).with_api_key_file(key_file)
    with ThreadServer(create_app(embedder, settings)) as srv:
        yield srv


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _post(url: str, payload: object, key: str | None = None, headers: dict | None = None, **kw) -> httpx.Response:
    headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
    if isinstance(payload, (bytes, str)):
        return httpx.post(url + "/v1/embeddings", content=payload, headers={**headers, "Content-Type": "application/json"},
                          timeout=60, **kw)
    return httpx.post(url + "/v1/embeddings", json=payload, headers=headers, timeout=60, **kw)


def _vectors(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    data = sorted(resp.json()["data"], key=lambda d: d["index"])
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str)
            else np.asarray(d["embedding"], np.float32) for d in data]
    return np.stack(rows)


def _assert_envelope(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


# ---- clients ------------------------------------------------------------------------------------


def test_openai_client_default_base64_matches_embedder(plain, embedder):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=plain.url + "/v1", api_key="unused", max_retries=0)
    raw = client.embeddings.with_raw_response.create(model=NAME, input=DOCS)
    sent = json.loads(raw.http_request.content)
    assert sent["encoding_format"] == "base64"  # the client's default whenever numpy is installed
    assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)
    docs = np.array([d.embedding for d in raw.parse().data], dtype=np.float32)
    assert _cos(docs, embedder.embed_documents(DOCS)).min() >= COS
    # queries: NIM's model-name suffix, and the input_type field through extra_body
    q1 = np.array([d.embedding for d in client.embeddings.create(model=NAME + "-query", input=QUERIES).data])
    q2 = np.array([d.embedding for d in client.embeddings.create(model=NAME, input=QUERIES,
                                                                 extra_body={"input_type": "query"}).data])
    ref = embedder.embed_queries(QUERIES)
    assert _cos(q1, ref).min() >= COS and _cos(q2, ref).min() >= COS
    assert _cos(q1, embedder.embed_documents(QUERIES)).max() < 0.999  # the instruction really applied


def test_langchain_nvidia_embeddings_matches_embedder(plain, embedder):
    lc = pytest.importorskip("langchain_nvidia_ai_endpoints")
    emb = lc.NVIDIAEmbeddings(base_url=plain.url + "/v1", model=NAME, truncate="END")
    q = np.array(emb.embed_query(QUERIES[0]), dtype=np.float32)
    d = np.array(emb.embed_documents(DOCS), dtype=np.float32)
    assert _cos(q, embedder.embed_queries(QUERIES[0])).min() >= COS
    assert _cos(d, embedder.embed_documents(DOCS)).min() >= COS
    # without a model name it lists /v1/models offline and picks the root model
    with pytest.warns(UserWarning, match="Default model is set"):
        auto = lc.NVIDIAEmbeddings(base_url=plain.url + "/v1")
    assert auto.model == NAME


def test_llamaindex_nvidia_embedding_matches_embedder(plain, embedder):
    """LlamaIndex's NVIDIAEmbedding, unchanged, pointed at the local server.

    llama-index-embeddings-nvidia (0.6) sends ``input_type: "passage"`` for queries too, so the server
    answers its queries as passages, exactly as it asked (the body's input_type wins over a model-name
    suffix); batches of ``embed_batch_size`` texts arrive as one request each.
    """
    li = pytest.importorskip("llama_index.embeddings.nvidia", reason="pip install -e '.[serve-test]'")
    emb = li.NVIDIAEmbedding(base_url=plain.url + "/v1", model=NAME, truncate="END", embed_batch_size=3)
    q = np.array(emb.get_query_embedding(QUERIES[0]), dtype=np.float32)
    d = np.array(emb.get_text_embedding_batch(DOCS), dtype=np.float32)
    assert len(DOCS) > 3 and d.shape == (len(DOCS), embedder.dim)  # more than one request, reassembled in order
    assert _cos(q, embedder.embed_documents(QUERIES[0])).min() >= COS
    assert _cos(d, embedder.embed_documents(DOCS)).min() >= COS


# ---- input forms, usage, batching ---------------------------------------------------------------


def test_input_forms_and_usage(plain, embedder):
    text = embedder.text
    one = _post(plain.url, {"input": DOCS[0], "model": NAME, "user": "user-1234"})  # `user` accepted, ignored
    assert len(one.json()["data"]) == 1
    assert _cos(_vectors(one), embedder.embed_documents(DOCS[0])).min() >= COS
    resp = _post(plain.url, {"input": DOCS})
    assert resp.json()["usage"] == {"prompt_tokens": sum(len(r) for r in text.tokenize(DOCS)),
                                    "total_tokens": sum(len(r) for r in text.tokenize(DOCS))}
    # token ids are the model's whole input (BOS, instruction, text, EOS); the pool rule still applies
    instr = query_instruction(DEFAULT_TASK)
    ids = text.tokenize(QUERIES, instr)
    single = _post(plain.url, {"input": ids[0], "input_type": "query"})
    many = _post(plain.url, {"input": ids, "input_type": "query"})
    ref = embedder.embed_queries(QUERIES)
    assert _cos(_vectors(single), ref[0]).min() >= COS
    assert _cos(_vectors(many), ref).min() >= COS
    assert many.json()["usage"]["prompt_tokens"] == sum(len(r) for r in ids)
    # the SDK extension: a task or a full instruction
    task = "Given a package name, find its description"
    by_task = _post(plain.url, {"input": QUERIES, "input_type": "query", "task": task})
    assert _cos(_vectors(by_task), embedder.embed_queries(QUERIES, task=task)).min() >= COS
    by_instr = _post(plain.url, {"input": QUERIES, "instruction": query_instruction(task)})
    assert _cos(_vectors(by_instr), embedder.embed_queries(QUERIES, task=task)).min() >= COS


def test_text_alone_and_inside_mixed_concurrent_batches(plain, embedder):
    probe = DOCS[2]
    alone = _vectors(_post(plain.url, {"input": probe}))
    others = [[f"package {i} " * (1 + 7 * (i % 5))] * (1 + i % 4) for i in range(24)]
    batch_count = plain.state.batcher.batches
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(_post, plain.url, {"input": o + [probe] if i % 3 == 0 else o}) for i, o in enumerate(others)]
        results = [f.result() for f in futs]
    for i, r in enumerate(results):
        v = _vectors(r)
        assert v.shape[0] == len(others[i]) + (i % 3 == 0)
        assert _cos(v[: len(others[i])], embedder.embed_documents(others[i])).min() >= COS
        if i % 3 == 0:
            assert _cos(v[-1], alone).min() >= COS
    assert plain.state.batcher.batches - batch_count < 24  # requests really shared forward passes


def test_batcher_packs_rows_of_many_requests_into_one_pass(embedder):
    """Deterministic version: every request is queued before the worker starts, so one mixed batch."""
    import asyncio

    from nvembed_sdk.serve.batcher import Batcher

    texts = [DOCS[2], "x", DOCS[1] * 3, DOCS[0]]
    rows = embedder.text.tokenize(texts)

    async def main():
        b = Batcher(embedder.runner.run, embedder.text.collate, embedder.dim, 1 << 20, 64, 1 << 20)
        jobs = [b.submit([r], [0]) for r in rows]
        b.start()
        out = [await j.future for j in jobs]
        b.close()
        return np.concatenate(out), b.batches

    got, batches = asyncio.run(main())
    assert batches == 1
    alone = np.concatenate([embedder.embed_documents([t]) for t in texts])
    assert _cos(got, alone).min() >= COS


# ---- options: dimensions, truncate ----------------------------------------------------------------


def test_dimensions_refused_unless_declared(plain, guarded, embedder):
    err = _assert_envelope(_post(plain.url, {"input": DOCS, "dimensions": 64}), 400)
    assert err["param"] == "dimensions" and "matryoshka" in err["message"]
    full = _vectors(_post(plain.url, {"input": DOCS, "dimensions": embedder.dim}))
    assert full.shape == (len(DOCS), embedder.dim)
    cut = _vectors(_post(guarded.url, {"input": DOCS, "dimensions": 64}, key=KEY))
    ref = embedder.embed_documents(DOCS)[:, :64]
    assert cut.shape == (len(DOCS), 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    assert _cos(cut, ref).min() >= COS
    _assert_envelope(_post(guarded.url, {"input": DOCS, "dimensions": 100}, key=KEY), 400)


def test_truncate_none_start_end(plain, embedder):
    limit = embedder.text.max_length
    long = "dpkg " * (limit + 50)
    n = len(embedder.text.tokenize([long], "", 1 << 30)[0])
    err = _assert_envelope(_post(plain.url, {"input": [DOCS[0], long]}), 400)  # NONE is the default
    assert "input[1]" in err["message"] and str(n) in err["message"] and err["code"] == "input_too_long"
    end = _post(plain.url, {"input": [DOCS[0], long], "truncate": "END"})
    assert end.json()["usage"]["prompt_tokens"] == len(embedder.text.tokenize([DOCS[0]])[0]) + limit
    assert _cos(_vectors(end), embedder.embed_documents([DOCS[0], long])).min() >= COS
    mixed = "tail words differ " * 10 + long
    start = _vectors(_post(plain.url, {"input": [mixed], "truncate": "START"}))
    end2 = _vectors(_post(plain.url, {"input": [mixed], "truncate": "END"}))
    assert _cos(start, end2).min() < 0.9999  # START keeps the end of the text, END its beginning
    ids = embedder.text.tokenize([mixed], "", 1 << 30)[0]
    kept = ids[:1] + ids[len(ids) - (limit - 1):]
    assert _cos(start, _vectors(_post(plain.url, {"input": [kept]}))).min() >= COS


# ---- errors: auth, body, queue, malformed ----------------------------------------------------------


def test_auth(guarded):
    _assert_envelope(_post(guarded.url, {"input": "x"}), 401)
    err = _assert_envelope(_post(guarded.url, {"input": "x"}, key="wrong"), 401)
    assert err["type"] == "authentication_error"
    assert _post(guarded.url, {"input": "x"}, key=KEY).status_code == 200
    assert httpx.get(guarded.url + "/v1/models").status_code == 401
    assert httpx.get(guarded.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(guarded.url + "/health/live").status_code == 200  # probes stay open


def test_body_and_input_limits(guarded):
    err = _assert_envelope(_post(guarded.url, {"input": ["word " * 5000]}, key=KEY), 413)
    assert err["code"] == "body_too_large"
    err = _assert_envelope(_post(guarded.url, {"input": ["a"] * 65}, key=KEY), 400)
    assert err["code"] == "too_many_inputs" and "64" in err["message"]


def test_queue_full_gives_429_with_retry_after_then_clears(guarded):
    # ~7,700 tokens, one row per 512-token batch: one such request fills most of the 8,192-token
    # queue for 16 passes, so of 8 sent at once only the admitted ones fit and the rest get 429
    big = {"input": ["apt " * 240] * 16}
    refused, statuses = [], []
    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: _post(guarded.url, big, key=KEY), range(8)))
        statuses += [r.status_code for r in results]
        refused += [r for r in results if r.status_code == 429]
        if refused:
            break
    assert refused, f"the queue never filled: {statuses}"
    assert set(statuses) <= {200, 429} and 200 in statuses
    err = _assert_envelope(refused[0], 429)
    assert int(refused[0].headers["Retry-After"]) >= 1 and err["code"] == "queue_full"
    assert _post(guarded.url, big, key=KEY).status_code == 200  # and it clears
    assert guarded.state.batcher.queued_tokens == 0
    err = _assert_envelope(_post(guarded.url, {"input": ["apt " * 240] * 40}, key=KEY), 413)
    assert err["code"] == "body_too_large"  # 38 kB over the 20 kB body limit
    # under the body limit (compact token ids, ~17 kB) but 8,320 tokens > the 8,192-token queue
    ids = json.dumps({"input": [[1] * 130] * 64}, separators=(",", ":")).encode()
    assert len(ids) < 20_000
    err = _assert_envelope(_post(guarded.url, ids, key=KEY), 413)
    assert err["code"] == "request_too_large" and "8320" in err["message"]


@pytest.mark.parametrize(("body", "status"), [
    (b"", 400), (b"{", 400), (b"[1, 2]", 400), (b'"text"', 400), (b"{}", 422), (b'{"input": 5}', 422),
    (b'{"input": [1, "a"]}', 422), (b'{"input": [[1], ["a"]]}', 422), (b'{"input": []}', 400),
    (b'{"input": [[]]}', 400), (b'{"input": [99999999]}', 400), (b'{"input": [-1]}', 400),
    (b'{"input": "x", "encoding_format": "int8"}', 422), (b'{"input": "x", "truncate": "MIDDLE"}', 422),
    (b'{"input": "x", "dimensions": 0}', 422), (b'{"input": "x", "input_type": "doc"}', 422),
    (b'{"input": "x", "model": "other"}', 404), (b'{"input": "x", "dimensions": "8"}', 422),
    (b'{"input": [1.5]}', 422), (b'\xff\xfe', 400), (b'{"input": {"a": 1}}', 422),
    # an instruction whose last word merges with the text leaves nothing to pool (was a 500)
    (b'{"input": "y", "instruction": "Instruct: especiall"}', 400),
    # an instruction longer than the model: END/START truncation would pool nothing (was 200 + NaN)
    (b'{"input": "x", "truncate": "END", "instruction": "' + b"word " * 600 + b'"}', 400),
    (b'{"input": "x", "truncate": "START", "instruction": "' + b"word " * 600 + b'"}', 400),
    (b'{"input": "x", "truncate": "END", "input_type": "query", "task": "' + b"t " * 600 + b'"}', 400),
])
def test_malformed_payloads_get_the_envelope_never_500(plain, body, status):
    _assert_envelope(_post(plain.url, body), status)


def test_unknown_route_and_method_use_the_envelope(plain):
    _assert_envelope(httpx.get(plain.url + "/v1/nothing"), 404)
    _assert_envelope(httpx.get(plain.url + "/v1/embeddings"), 405)


# ---- operations ------------------------------------------------------------------------------------


def test_health_models_metrics(plain):
    assert httpx.get(plain.url + "/health/live").json() == {"status": "live"}
    assert httpx.get(plain.url + "/health/ready").status_code == 200
    models = httpx.get(plain.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == NAME
    _post(plain.url, {"input": DOCS})
    text = httpx.get(plain.url + "/metrics").text
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}
    assert names and all(n.startswith("nvembed_") for n in names), names
    for needed in ("nvembed_requests", "nvembed_batch_size", "nvembed_batch_tokens", "nvembed_queue_depth",
                   "nvembed_tokenize_seconds", "nvembed_forward_seconds", "nvembed_request_seconds"):
        assert any(n == needed or n == needed + "_total" for n in names), (needed, names)
    assert re.search(r'^nvembed_requests_total\{code="200"\} [1-9]', text, re.M)
    # CORS off by default: no Access-Control-* header on a cross-origin request or a preflight
    cross = _post(plain.url, {"input": "x"}, headers={"Origin": "http://elsewhere.example"})
    pre = httpx.options(plain.url + "/v1/embeddings", headers={"Origin": "http://elsewhere.example",
                                                                "Access-Control-Request-Method": "POST"})
    assert cross.status_code == 200 and pre.status_code != 200
    assert not [h for r in (cross, pre) for h in r.headers if h.lower().startswith("access-control-")]


def test_not_ready_before_warmup_and_factory_loading(embedder):
    """A factory loads off the loop; readiness waits for the warm-up batch."""
    from nvembed_sdk.serve import ServeSettings, create_app

    gate = threading.Event()

    class SlowRun:  # wraps the real backend: the warm-up pass waits for the gate
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def run(self, batch):
            gate.wait(30)
            return self.inner.run(batch)

        def close(self):  # the app closes what a factory made; the shared runner stays open
            pass

    def factory():
        return Embedder(SlowRun(embedder.runner), embedder.text)

    srv = ThreadServer(create_app(factory, ServeSettings(served_model_name=NAME, access_log=False)))
    srv.thread.start()
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                r = httpx.get(srv.url + "/health/ready", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "starting"
        _assert_envelope(_post(srv.url, {"input": "x"}), 503)
        gate.set()
        _wait_ready(srv.url, 30)
        srv.state.begin_drain()  # what SIGTERM does first: readiness false, nothing new admitted
        r = httpx.get(srv.url + "/health/ready", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "draining"
        assert httpx.get(srv.url + "/health/live", timeout=5).status_code == 200
        err = _assert_envelope(_post(srv.url, {"input": "x"}), 503)
        assert err["code"] == "not_ready" and "draining" in err["message"]
    finally:
        gate.set()
        srv.__exit__()


def test_client_disconnect_drops_its_queued_texts(embedder):
    """A client that goes away while its texts wait in the queue: they leave it and never run."""
    from nvembed_sdk.serve import ServeSettings, create_app

    hold, entered, release = threading.Event(), threading.Event(), threading.Event()
    batch_rows: list[int] = []

    class GatedRun:  # once `hold` is set, the next forward pass waits for `release`
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def run(self, batch):
            batch_rows.append(len(batch.input_ids))
            if hold.is_set():
                entered.set()
                release.wait(30)
            return self.inner.run(batch)

        def close(self):
            pass

    app = create_app(lambda: Embedder(GatedRun(embedder.runner), embedder.text),
                     ServeSettings(served_model_name=NAME, access_log=False))
    try:
        with ThreadServer(app) as srv, ThreadPoolExecutor(1) as pool:
            batcher = srv.state.batcher
            hold.set()
            first = pool.submit(_post, srv.url, {"input": DOCS[0]})  # holds the worker
            assert entered.wait(30)
            busy = batcher.queued_tokens  # the running batch's tokens
            gone = [f"dropped text {i} " * 10 for i in range(5)]
            body = json.dumps({"input": gone}).encode()
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.time() + 30
            while batcher.queued_tokens == busy and time.time() < deadline:  # wait until it is admitted
                time.sleep(0.02)
            assert batcher.queued_tokens > busy
            sock.close()  # the client goes away while its texts wait
            while batcher.queued_tokens != busy and time.time() < deadline:
                time.sleep(0.02)
            assert batcher.queued_tokens == busy  # its tokens left the queue at once
            hold.clear()
            release.set()
            assert first.result().status_code == 200
            assert _post(srv.url, {"input": DOCS[1]}).status_code == 200
            metrics = httpx.get(srv.url + "/metrics").text
        assert 5 not in batch_rows  # the dropped request's texts never ran
        assert batch_rows[-2:] == [1, 1] and batcher.queued_tokens == 0
        assert re.search(r'^nvembed_rejected_total\{reason="client_gone"\} 1\.0', metrics, re.M), metrics
    finally:
        release.set()


def test_access_log_is_json_without_texts(embedder, caplog):
    import logging

    from nvembed_sdk.serve import ServeSettings, create_app

    secret = "zebra-secret-text-9731"
    app = create_app(embedder, ServeSettings(served_model_name=NAME))  # access_log on: the default
    with caplog.at_level(logging.INFO, logger="nvembed_sdk.serve.access"), ThreadServer(app) as srv:
        assert _post(srv.url, {"input": [secret, secret + " again"]}).status_code == 200
        assert _post(srv.url, {"input": secret, "model": "other"}).status_code == 404
        httpx.get(srv.url + "/health/live")
    lines = [r.getMessage() for r in caplog.records if r.name == "nvembed_sdk.serve.access"]
    assert not [m for r in caplog.records if secret in (m := r.getMessage())], "a log line holds the texts"
    entries = [json.loads(line) for line in lines]
    posts = [e for e in entries if e["path"] == "/v1/embeddings"]
    assert [e["status"] for e in posts] == [200, 404], entries
    assert posts[0]["inputs"] == 2 and posts[0]["tokens"] > 0 and posts[0]["method"] == "POST"
    assert isinstance(posts[0]["ms"], float) and posts[0]["client"] == "127.0.0.1"
    assert any(e["path"] == "/health/live" and e["status"] == 200 for e in entries)


def test_sigterm_drains_admitted_requests_and_refuses_after_not_ready(tmp_path):
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"{SHIPPED} has no weights")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "nvembed_sdk.cli", "serve", str(SHIPPED), "--port", str(port),
                                 "--backend", "torch", "--device", "cpu", "--served-model-name", NAME],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        _wait_ready(url, 120, proc)
        stop = threading.Event()
        records: list[tuple[float, float, str]] = []  # (start, end, outcome)
        lock = threading.Lock()
        payload = {"input": [f"{DOCS[1]} {i}" for i in range(16)]}

        def client() -> None:
            while not stop.is_set():
                t0 = time.time()
                try:  # a fresh connection each time: no stale keep-alive socket to confuse the outcome
                    r = httpx.post(url + "/v1/embeddings", json=payload, timeout=60, headers={"Connection": "close"})
                    outcome = str(r.status_code)
                    if r.status_code == 200:
                        assert len(r.json()["data"]) == 16
                except httpx.ConnectError:
                    outcome = "refused"
                except httpx.TransportError as exc:
                    outcome = f"transport:{type(exc).__name__}"
                with lock:
                    records.append((t0, time.time(), outcome))
                if outcome == "refused":
                    time.sleep(0.02)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        t_term = time.time()
        proc.send_signal(signal.SIGTERM)
        t_not_ready = None
        while t_not_ready is None and time.time() - t_term < 30:
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code != 200:
                    t_not_ready = time.time()
            except httpx.TransportError:
                t_not_ready = time.time()
        rc = proc.wait(60)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log_path.read_text()
    assert rc == 0, out
    assert t_not_ready is not None
    ok = [r for r in records if r[2] == "200"]
    assert ok, records
    # in-flight at SIGTERM and still answered: the drain is real
    assert any(s < t_term < e for s, e, _ in ok), records
    # nothing admitted once readiness went false
    assert not [r for r in ok if r[0] > t_not_ready], records
    m = re.search(r"drained: admitted (\d+) requests, answered (\d+)", out)
    assert m, out
    assert int(m.group(1)) == int(m.group(2)) == len(ok), (m.group(0), len(ok))
    assert all(o in ("200", "503", "refused") or o.startswith("transport:") for *_, o in records)

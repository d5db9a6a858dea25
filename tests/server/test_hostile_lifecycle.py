"""The server's fault isolation, bounded work and lifecycle (issue 12, items 2, 3 and 5), one test per item:
a request failing alone or the engine failing, bounded work and admission, request-supplied chat templates,
non-streaming clients that leave, SIGTERM during streams, and metrics / adapter names / adapter files."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from hylo.demo import ADAPTER_DIRS, BASE_DIR, expected_continuation, prompt_for
from tests.server.conftest import KEY, Server, assert_still_serving

AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path, body, timeout=30, key=KEY):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=timeout)


def sse(server, body, started: threading.Event | None = None, key=KEY) -> list:
    """A stream's `data:` payloads (JSON, or the string "[DONE]") until the server closes it."""
    events = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                if started is not None:
                    started.set()
    return events


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def health_latencies(server, stop: threading.Event) -> list[float]:
    """/health round trips, one after another, until `stop`; filled in by a thread."""
    out: list[float] = []

    def run():
        while not stop.is_set():
            t = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=30).status_code == 200
            out.append(time.monotonic() - t)
            time.sleep(0.02)

    threading.Thread(target=run, daemon=True).start()
    return out


def tp_workers(server) -> list[psutil.Process]:
    """The tensor-parallel worker processes (spawned children; not multiprocessing's resource tracker)."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return [p for p in children if "resource_tracker" not in " ".join(p.cmdline())]


LONG = {"model": "base", "prompt": prompt_for(10), "max_tokens": 3000, "ignore_eos": True, "temperature": 0}


# -- A. a request that fails alone; an engine that fails --------------------------------------------


def test_a_request_failing_alone_gets_an_error_and_the_batch_goes_on(monkeypatch):
    """In-process (the engine's sampler is made to fail for requests with seed 13): that request gets a 500
    in OpenAI's shape, or an error event and [DONE] when streamed; the other requests are unaffected."""
    from hylo.engine.config import EngineConfig
    from tests.conftest import break_sampling
    from hylo.engine.engine import LLMEngine
    from hylo.server.app import ServerState, build_app
    from hylo.server.async_engine import AsyncEngine
    from hylo.server.metrics import Metrics

    break_sampling(monkeypatch, seed=13, message="the sampler broke on this request")
    engine = LLMEngine(EngineConfig(model=str(BASE_DIR), device="cpu", max_model_len=4000, kv_cache_memory_bytes=32 << 20), progress=False)
    state = ServerState(AsyncEngine(engine, 64, Metrics()), "base", str(BASE_DIR))

    async def run():
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://hylo", timeout=60) as client:
            good = dict(model="base", prompt=prompt_for(12), max_tokens=20, temperature=0)
            bad = dict(model="base", prompt=prompt_for(30), max_tokens=20, temperature=0.5, seed=13)
            return await asyncio.gather(
                client.post("/v1/completions", json=good),
                client.post("/v1/completions", json=bad),
                client.post("/v1/completions", json={**bad, "stream": True}),
                client.post("/v1/completions", json={**good, "n": 2, "temperature": 0.8, "seed": 3}),
            )

    try:
        good, bad, bad_stream, good_n = asyncio.run(run())
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == expected_continuation("base", prompt_for(12))
        assert good_n.status_code == 200 and len(good_n.json()["choices"]) == 2
        assert bad.status_code == 500
        error = bad.json()["error"]
        assert error["type"] == "server_error" and error["code"] == 500 and "sampler broke" in error["message"]
        events = [line[len("data: "):] for line in bad_stream.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["type"] == "server_error" and "sampler broke" in last["error"]["message"]
        # The engine thread updates the gauges on its next turn, which may come after the replies.
        wait_for(lambda: all(g in state.engine.metrics.render() for g in ("hylo_kv_blocks_used 0.0", "hylo_gdn_slots_used 0.0")),
                 10, "KV blocks and GDN slots to be free")
        assert 'hylo_requests_total{adapter="base",status="error"} 2.0' in state.engine.metrics.render()
        assert state.engine.failed is None
    finally:
        state.engine.stop()


def two_streams_and_a_request(s: Server):
    """Two long streams and one non-streaming request, all three running: (stream futures, request future)."""
    pool = ThreadPoolExecutor(3)
    started = [threading.Event(), threading.Event()]
    streams = [pool.submit(sse, s, LONG, started[i], key=None) for i in range(2)]
    whole = pool.submit(post, s, "/v1/completions", {**LONG, "prompt": prompt_for(20)}, 60, None)
    for e in started:
        assert e.wait(30)
    wait_for(lambda: s.metrics().get("hylo_running_sequences") == 3, 30, "three running sequences")
    return streams, whole


def test_engine_failure_fails_every_request_and_exits_nonzero():
    """A tensor-parallel worker killed mid-batch: streams end with an error event and [DONE], a waiting
    non-streaming request gets 503 with the reason, /health and new requests get 503, and the process exits
    non-zero by itself (so that a supervisor restarts it) instead of staying up and hanging."""
    s = Server("--tensor-parallel-size", "2", "--max-model-len", "4000")
    try:
        workers = tp_workers(s)
        assert len(workers) == 1
        streams, whole = two_streams_and_a_request(s)
        killed_at = time.monotonic()
        workers[0].kill()

        for f in streams:
            events = f.result(timeout=30)
            assert events[-1] == "[DONE]"
            error = events[-2]["error"]
            assert error["code"] == 503 and "worker" in error["message"], error
        r = whole.result(timeout=30)
        assert r.status_code == 503 and "worker" in r.json()["error"]["message"]
        try:  # until it has exited: /health and new requests fail at once
            assert httpx.get(s.url + "/health", timeout=5).status_code == 503
            assert post(s, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2}, 5, None).status_code == 503
        except httpx.TransportError:
            pass  # already gone
        code = s.proc.wait(timeout=30)
        assert code != 0, "the process must exit non-zero when its engine failed"
        print(f"\nworker killed: every request failed, and the server exited with code {code} {time.monotonic() - killed_at:.1f} s later")
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_a_fault_outside_a_step_fails_the_engine_instead_of_leaving_a_server_without_one(monkeypatch):
    """In-process: the engine thread's bookkeeping between steps raises. The engine is failed (what a dead worker does:
    new requests are refused with the reason, and the server is told to exit non-zero), not left with no thread."""
    from hylo.engine.config import EngineConfig
    from hylo.engine.engine import LLMEngine
    from hylo.server.async_engine import AsyncEngine, EngineFailed
    from hylo.server.metrics import Metrics

    def broken(self, engine):
        raise RuntimeError("bookkeeping broke")

    monkeypatch.setattr(Metrics, "observe_step", broken)
    engine = LLMEngine(EngineConfig(model=str(BASE_DIR), device="cpu", max_model_len=4000, kv_cache_memory_bytes=32 << 20), progress=False)
    told = threading.Event()
    reasons = []
    async_engine = AsyncEngine(engine, 64, Metrics(), lambda reason: (reasons.append(reason), told.set()))
    try:
        assert told.wait(30), "the failure was never reported"
        assert "bookkeeping broke" in reasons[0]
        with pytest.raises(EngineFailed, match="bookkeeping broke"):
            asyncio.run(async_engine.call(lambda: None))
    finally:
        async_engine.stop()


# -- B. bounded work ---------------------------------------------------------------------------------


def test_bounded_work_n_body_size_and_long_prompts(server):
    # n is bounded (the engine's max_n, --max-n)
    r = post(server, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2, "n": 1_000_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"

    # A 5 MB prompt is refused at once (it cannot fit in max_model_len, which its length alone shows) and
    # stalls nobody: /health answers throughout.
    stop = threading.Event()
    latencies = health_latencies(server, stop)
    t = time.monotonic()
    r = post(server, "/v1/completions", {"model": "base", "prompt": "count: 1 2 3 " * 400_000, "max_tokens": 2})
    refused_5mb = time.monotonic() - t
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "max_model_len" in r.json()["error"]["message"]
    assert refused_5mb < 5, f"a 5 MB prompt took {refused_5mb:.1f} s to refuse"

    # A 1 MB prompt is tokenized (on a prompt worker thread), then refused before the engine sees it.
    t = time.monotonic()
    r = post(server, "/v1/completions", {"model": "base", "prompt": "count: 1 2 3 " * 76_000, "max_tokens": 2})
    tokenized_1mb = time.monotonic() - t
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "tokens" in r.json()["error"]["message"]
    stop.set()
    time.sleep(0.1)
    assert latencies and max(latencies) < 2.0, f"/health took up to {max(latencies):.2f} s while long prompts were handled"
    print(f"\n5 MB prompt refused in {refused_5mb:.2f} s; 1 MB prompt tokenized and refused in {tokenized_1mb:.2f} s; "
          f"/health meanwhile: {len(latencies)} calls, at most {max(latencies) * 1000:.0f} ms")

    # A 50 MB body is refused (413, OpenAI's shape) from its Content-Length, before it is read.
    rss = server.rss_mb()
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {50 << 20}\r\n\r\n"
        sock.sendall(head.encode() + b'{"model": "base", "prompt": "' + b"x" * (1 << 20))
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == 413 and "--max-request-bytes" in body["error"]["message"]
    # ... and so is one sent whole, without a Content-Length (chunked): counted while it is read.
    def chunks():
        for _ in range(50):
            yield b"x" * (1 << 20)

    try:
        r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=AUTH, timeout=30)
        assert r.status_code == 413
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still sending
    assert time.monotonic() - t < 10
    assert server.rss_mb() - rss < 100, f"resident memory grew by {server.rss_mb() - rss:.0f} MB"
    assert_still_serving(server)


def test_admission_counts_sequences_and_what_can_start_now():
    """--max-waiting counts sequences (n per request) beyond what the scheduler can start at once: while
    idle, requests up to --max-num-seqs + --max-waiting sequences are all admitted, not 503'd."""
    s = Server("--max-num-seqs", "4", "--max-waiting", "2", "--max-model-len", "4000")
    try:
        short = {"model": "base", "prompt": prompt_for(12), "max_tokens": 8, "temperature": 0.5, "seed": 1}
        with ThreadPoolExecutor(3) as pool:  # 3 × n=2 = 6 sequences = 4 startable + 2 waiting
            results = list(pool.map(lambda _: post(s, "/v1/completions", {**short, "n": 2}, 60, None), range(3)))
        assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
        r = post(s, "/v1/completions", {**short, "n": 7}, 30, None)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"

        # 4 sequences running: 2 more may wait, 3 may not.
        long = {**LONG, "n": 4, "temperature": 1.0, "seed": 2, "stream": True}
        with ThreadPoolExecutor(1) as pool, httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=60) as stream:
            lines = stream.iter_lines()  # kept: an iterator dropped half-way closes the connection
            assert next(line for line in lines if line.startswith("data: "))
            wait_for(lambda: s.metrics().get("hylo_running_sequences") == 4, 10, "4 running sequences")
            r = post(s, "/v1/completions", {**short, "n": 3}, 30, None)
            assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
            queued = pool.submit(post, s, "/v1/completions", {**short, "n": 2}, 60, None)
            wait_for(lambda: s.metrics().get("hylo_waiting_sequences") == 2, 10, "2 waiting sequences")
            stream.close()  # the long request is aborted: the queued one runs
            assert queued.result(60).status_code == 200
        assert_still_serving(s)
    finally:
        assert s.stop()


# -- C. chat templates sent by the client ---------------------------------------------------------------


SLOW_TEMPLATE = "{% for i in range(3000) %}{% for j in range(3000) %}{{ i }}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"


def test_request_chat_templates_are_refused_unless_trusted(server):
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    t = time.monotonic()
    r = post(server, "/v1/chat/completions", {**chat, "chat_template_kwargs": {"chat_template": SLOW_TEMPLATE}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.chat_template"
    assert "--trust-request-chat-template" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {**chat, "chat_template": SLOW_TEMPLATE})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    assert time.monotonic() - t < 3
    assert_still_serving(server)

    # Trusted: rendered, but off the event loop (here 2 s of rendering, 32 MB of output, then refused as too long).
    s = Server("--trust-request-chat-template", "--max-model-len", "4000")
    try:
        stop = threading.Event()
        latencies = health_latencies(s, stop)
        t = time.monotonic()
        r = post(s, "/v1/chat/completions", {**chat, "chat_template_kwargs": {"chat_template": SLOW_TEMPLATE}}, 60, None)
        took = time.monotonic() - t
        stop.set()
        time.sleep(0.1)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert max(latencies) < 2.0, f"/health took up to {max(latencies):.2f} s while a template rendered for {took:.1f} s"
        print(f"\ntrusted template rendered and refused in {took:.2f} s; /health meanwhile at most {max(latencies) * 1000:.0f} ms")
        r = post(s, "/v1/chat/completions", {**chat, "chat_template_kwargs": {"chat_template": "{{ messages[0]['content'] }}"}}, 60, None)
        assert r.status_code == 200
        assert_still_serving(s)
    finally:
        assert s.stop()


# -- D. a non-streaming client that leaves ------------------------------------------------------------------


def test_a_non_streaming_client_gone_aborts_its_request(server):
    key = 'hylo_requests_total{adapter="twos",status="aborted"}'
    before = server.metrics().get(key, 0)
    body = {"model": "twos", "prompt": prompt_for(30), "max_tokens": 2000, "ignore_eos": True, "n": 8, "temperature": 1.0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(30, read=1.5))
    left = time.monotonic()
    wait_for(lambda: server.metrics().get(key, 0) > before, 5, "the request to be aborted")
    wait_for(lambda: all(server.metrics()[g] == 0 for g in ("hylo_kv_blocks_used", "hylo_gdn_slots_used", "hylo_running_sequences")), 5, "its blocks and slots")
    print(f"\naborted {time.monotonic() - left:.2f} s after the client left")
    assert_still_serving(server)


# -- E. SIGTERM during streams -------------------------------------------------------------------------------


def test_sigterm_ends_streams_and_requests_then_exits_cleanly():
    s = Server("--tensor-parallel-size", "2", "--max-model-len", "4000")
    try:
        workers = tp_workers(s)
        streams, whole = two_streams_and_a_request(s)
        s.proc.send_signal(signal.SIGTERM)
        for f in streams:
            events = f.result(timeout=30)
            assert events[-1] == "[DONE]"
            error = events[-2]["error"]
            assert error["code"] == 503 and "shutting down" in error["message"], error
            assert all("choices" in e for e in events[:-2])  # whole chunks until then
        r = whole.result(timeout=30)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert s.proc.wait(timeout=30) == 0
        stderr = s.proc.stderr.read().decode()
        assert "Traceback" not in stderr, stderr[-3000:]
        wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), 10, "the workers to exit")
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


# -- F. metrics, adapter names, concurrent loads, adapter files --------------------------------------------


README_METRICS = (
    "hylo_requests_total", "hylo_prompt_tokens_total", "hylo_generation_tokens_total", "hylo_running_sequences",
    "hylo_waiting_sequences", "hylo_kv_blocks_used", "hylo_kv_blocks_total", "hylo_gdn_slots_used", "hylo_gdn_slots_total",
    "hylo_adapter_slots_used", "hylo_adapter_slots_total", "hylo_adapter_loads_total", "hylo_adapter_load_seconds",
    "hylo_time_to_first_token_seconds", "hylo_inter_token_latency_seconds",
)


def test_metrics_adapter_names_concurrent_loads_and_adapter_files(server, lora_root, tmp_path):
    import shutil

    from prometheus_client.parser import text_string_to_metric_families

    # Names that would break /metrics or the log are refused, naming lora_name.
    for name in ('a"b', "a\\b", "a\nb", "", "x" * 129, "a b", "ä"):
        r = post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "whatever"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", (name, r.text)

    # Eight concurrent loads of one name, each from another folder: exactly one succeeds.
    for i in range(8):
        shutil.copytree(ADAPTER_DIRS["twos"], lora_root / f"race{i}")

    async def race():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/load_lora_adapter", json={"lora_name": "race", "lora_path": f"race{i}"}) for i in range(8)))

    codes = sorted(r.status_code for r in asyncio.run(race()))
    assert codes == [200] + [400] * 7, codes
    assert server.client().completions.create(model="race", prompt=prompt_for(9), max_tokens=12, temperature=0).choices[0].text == expected_continuation("twos", prompt_for(9))
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "race"}).status_code == 200

    # A folder inside --lora-root whose files are symlinks to an adapter outside it is refused.
    shutil.copytree(ADAPTER_DIRS["down"], tmp_path / "outside")
    (lora_root / "links").mkdir()
    for f in (tmp_path / "outside").iterdir():
        (lora_root / "links" / f.name).symlink_to(f)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "links", "lora_path": "links"})
    assert r.status_code == 403 and "outside" in r.json()["error"]["message"], r.text

    # /metrics is Prometheus text that parses, with every name README's table lists.
    text = httpx.get(server.url + "/metrics", timeout=10).text
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    missing = [m for m in README_METRICS if m not in names and m + "_count" not in names]
    assert not missing, missing
    assert_still_serving(server)

    # Adapter names given on the command line follow the same rule (refused before the model loads).
    port = str(server.port + 1)
    out = subprocess.run([sys.executable, "-m", "hylo.cli", "serve", "--device", "cpu", "--port", port, "--lora-modules", f'bad"name={ADAPTER_DIRS["down"]}'],
                         capture_output=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and b"adapter name" in out.stderr


def test_a_request_whose_prompts_could_never_all_be_admitted_is_a_400(server):
    """Each prompt of a request is admitted on its own: 1,281 prompts (or 11 x n=128) were queued up to the limit of
    --max-num-seqs + --max-waiting (1,280 here), then the request got 503 "retry later", which never helps."""
    for body in ({"model": "base", "prompt": [[5, 6]] * 1281, "max_tokens": 1}, {"model": "base", "prompt": ["x"] * 11, "n": 128, "max_tokens": 1}):
        t = time.monotonic()
        r = post(server, "/v1/completions", body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text[:300]
        assert "holds at once" in r.json()["error"]["message"] and time.monotonic() - t < 5
    r = post(server, "/v1/completions", {"model": "base", "prompt": [[5, 6]] * 300, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 300
    assert_still_serving(server)

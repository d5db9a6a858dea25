"""A real `hylo serve` process on 127.0.0.1 per fixture, stopped (SIGTERM, then kill) when the fixture ends."""

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, ca: str | None = None):
        """`ca`: the certificate that a server started with --ssl-certfile is verified by (it is then reached over https)."""
        self.port = free_port()
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"
        self.verify = ssl.create_default_context(cafile=ca) if ca else True
        cmd = [sys.executable, "-m", "hylo.cli", "serve", *args, "--device", "cpu", "--port", str(self.port)]
        # stderr (the server's log: a line per request) goes to a file, which no test must drain to keep the server
        # from blocking on a full pipe; `proc.stderr` reads that file, as it would read the pipe.
        with tempfile.NamedTemporaryFile(prefix="hylo-serve-", suffix=".log") as log:  # unlinked at once; the open files keep it
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            self.proc.stderr = open(log.name, "rb")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start within 120 s")

    def client(self, key: str | None = KEY):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60,
                             http_client=httpx.Client(verify=self.verify, timeout=60))

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}

    def rss_mb(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> bool:
        """SIGTERM; True when the server shut down by itself, in time and without a traceback."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False
        return code in (0, -signal.SIGTERM) and b"Traceback" not in self.proc.stderr.read()


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-root")


@pytest.fixture(scope="module")
def server(lora_root):
    # A long context so that a request can still be running when its client disconnects.
    s = Server("--api-key", KEY, "--allow-runtime-lora", "--lora-root", str(lora_root), "--max-loras", "2", "--max-lora-rank", "8", "--max-model-len", "20000")
    yield s
    assert s.stop(), "the server must exit cleanly on SIGTERM"


IDLE_GAUGES = ("hylo_kv_blocks_used", "hylo_gdn_slots_used", "hylo_running_sequences", "hylo_waiting_sequences")


def assert_still_serving(server: Server, timeout: float = 15) -> None:
    """After a hostile request: /health is OK, a fixed greedy completion is unchanged, and no KV block,
    GDN slot or sequence is left behind (aborts finish on the engine thread, so the gauges are polled)."""
    from hylo.demo import expected_continuation, prompt_for

    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    out = server.client().completions.create(model="base", prompt=prompt_for(11), max_tokens=12, temperature=0)
    assert out.choices[0].text == expected_continuation("base", prompt_for(11))
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        left = {g: m.get(g) for g in IDLE_GAUGES if m.get(g) != 0}
        if not left:
            return
        assert time.monotonic() < deadline, f"still in use after the request: {left}"
        time.sleep(0.1)

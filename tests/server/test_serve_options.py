"""The server-only flags a vLLM user types: --chat-template (file or inline), --lora-modules (NAME=PATH and JSON),
several --served-model-name, --generation-config, --uvicorn-log-level, --disable-log-requests, --ssl-keyfile/--ssl-certfile;
each through the parser and a live server, and each bad value refused at start naming its flag."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from hylo.cli import build_parser
from hylo.demo import ADAPTER_DIRS, expected_continuation, prompt_for
from hylo.server.serve_options import LoRAModule, check_ssl_files, load_chat_template, parse_lora_module
from tests.server.conftest import Server

UNSURE = "hello there"  # a prompt the demo model continues in many ways at temperature 1
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key (PEM), made with openssl."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return str(key), str(cert)


@pytest.fixture(scope="module")
def greedy_defaults(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation-config")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 7}))
    return str(folder)


def test_the_parser_takes_vllms_forms():
    args = build_parser().parse_args(["serve", "--served-model-name", "a", "b", "--chat-template", "t.jinja", "--uvicorn-log-level", "debug",
                                      "--disable-log-requests", "--ssl-keyfile", "k", "--ssl-certfile", "c", "--generation-config", "vllm",
                                      "--lora-modules", "x=/p", '{"name": "y", "path": "/q", "base_model_name": "a"}'])
    assert (args.served_model_name, args.chat_template, args.uvicorn_log_level, args.disable_log_requests) == (["a", "b"], "t.jinja", "debug", True)
    assert (args.ssl_keyfile, args.ssl_certfile, args.generation_config) == ("k", "c", "vllm")
    assert [parse_lora_module(m) for m in args.lora_modules] == [LoRAModule("x", "/p"), LoRAModule("y", "/q", "a")]
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.uvicorn_log_level, defaults.disable_log_requests, defaults.generation_config) == ("info", False, "auto")


@pytest.mark.parametrize("text, message", [
    ('{"name": "a", "path": ', "not valid JSON"),
    ('{"name": "a"}', "'path' must be a non-empty string"),
    ('{"name": "a", "path": "/p", "rank": 8}', "unknown key 'rank'"),
    ('{"name": 3, "path": "/p"}', "'name' must be a non-empty string"),
    ("just-a-name", "write NAME=PATH"),
])
def test_bad_lora_modules_are_named(text, message):
    with pytest.raises(ValueError, match="--lora-modules") as e:
        parse_lora_module(text)
    assert message in str(e.value)


def test_chat_template_file_inline_or_refused(tmp_path):
    file = tmp_path / "t.jinja"
    file.write_text(TEMPLATE)
    assert load_chat_template(str(file)) == load_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ValueError, match=r"--chat-template .*missing.jinja: no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match=r"--chat-template: not a valid Jinja template: .*\(line 1\)"):
        load_chat_template("{% for m in messages %}")


def test_ssl_files_are_checked(tmp_path, certificate):
    key, cert = certificate
    check_ssl_files(key, cert)
    with pytest.raises(ValueError, match="--ssl-keyfile .*nokey.pem: no such file"):
        check_ssl_files(str(tmp_path / "nokey.pem"), cert)
    with pytest.raises(ValueError, match="--ssl-keyfile needs --ssl-certfile"):
        check_ssl_files(key, None)
    with pytest.raises(ValueError, match="--ssl-certfile .*: not a certificate and its private key"):
        check_ssl_files(cert, key)  # swapped


@pytest.mark.parametrize("flags, message", [
    (["--chat-template", "/no/such/template.jinja"], "error: --chat-template /no/such/template.jinja: no such file"),
    (["--lora-modules", '{"name": "a", "path"'], "error: --lora-modules"),
    (["--ssl-keyfile", "/no/key.pem", "--ssl-certfile", "/no/cert.pem"], "error: --ssl-keyfile /no/key.pem: no such file"),
    (["--generation-config", "/no/such/folder"], "error: generation_config='/no/such/folder': there is no generation_config.json"),
    (["--lora-modules", '{"name": "a", "path": "/p", "base_model_name": "other"}'], "base_model_name 'other', which this server does not serve"),
    # Not one of them silently dropped (the last one's path would win) or listed twice in /v1/models.
    (["--lora-modules", "a=/p", "a=/q"], "error: --lora-modules: adapter name 'a' is given twice"),
    (["--served-model-name", "m", "m"], "error: --served-model-name: 'm' is given twice"),
    (["--served-model-name", ""], "error: --served-model-name: a name must not be empty"),
])
def test_bad_flags_stop_the_server_at_start_with_a_message(flags, message):
    out = subprocess.run([sys.executable, "-m", "hylo.cli", "serve", "--device", "cpu", "--port", "1", *flags],
                         capture_output=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stderr = out.stderr.decode()
    assert out.returncode == 2 and message in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_a_server_with_every_flag(certificate, greedy_defaults):
    key, cert = certificate
    down = json.dumps({"name": "down2", "path": str(ADAPTER_DIRS["down"]), "base_model_name": "alias"})
    s = Server("--served-model-name", "base", "alias", "--lora-modules", down, f"twos={ADAPTER_DIRS['twos']}", "--chat-template", TEMPLATE,
               "--generation-config", greedy_defaults, "--uvicorn-log-level", "warning", "--ssl-keyfile", key, "--ssl-certfile", cert, ca=cert)
    try:
        client = s.client()
        ids = [m.id for m in client.models.list().data]
        assert ids == ["base", "alias", "down2", "twos"]
        prompt = prompt_for(11)
        out = client.completions.create(model="alias", prompt=UNSURE, n=4)  # no temperature, no max_tokens: the folder's
        assert out.model == "base", "the first --served-model-name is the one reported"
        assert len({c.text for c in out.choices}) == 1, "temperature 0 from --generation-config"
        counted = client.completions.create(model="base", prompt=prompt, extra_body={"ignore_eos": True})
        assert counted.usage.completion_tokens == 7, "max_new_tokens 7 from --generation-config"
        assert counted.choices[0].text == expected_continuation("base", prompt)[: len(counted.choices[0].text)]
        sampled = client.completions.create(model="alias", prompt=UNSURE, n=4, temperature=1.0, max_tokens=12, seed=5, extra_body={"ignore_eos": True})
        assert len({c.text for c in sampled.choices}) > 1 and sampled.usage.completion_tokens == 4 * 12, "a request's own values win"
        adapter = client.completions.create(model="down2", prompt=prompt, max_tokens=12)
        assert adapter.model == "down2" and adapter.choices[0].text == expected_continuation("down", prompt)[: len(adapter.choices[0].text)]
        chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "count: 1 2"}])
        rendered = "[user] count: 1 2\n[assistant] "
        tokens = httpx.post(s.url + "/tokenize", json={"prompt": rendered, "add_special_tokens": False}, verify=s.verify).json()["count"]
        assert chat.usage.prompt_tokens == tokens, "--chat-template renders the chat"
        assert chat.usage.completion_tokens <= 7
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health")  # a client that does not trust the certificate
        log = s.proc.stderr.read().decode()
        assert "request cmpl-" in log and " received: completions, model alias" in log and "finished: length" in log
        assert prompt not in log and "count: 1 2" not in log, "requests are logged without their text"
    finally:
        assert s.stop()


def test_disable_log_requests_and_hylos_own_defaults(greedy_defaults):
    s = Server("--disable-log-requests", "--generation-config", "vllm")
    try:
        out = s.client().completions.create(model="base", prompt=UNSURE, n=4, seed=5, extra_body={"ignore_eos": True})
        assert len({c.text for c in out.choices}) > 1 and out.usage.completion_tokens == 4 * 16, "hylo's temperature 1 and 16 tokens"
        assert "request cmpl-" not in s.proc.stderr.read().decode()
    finally:
        assert s.stop()


def test_start_up_adapters_are_read_before_the_engine_thread_starts(monkeypatch):
    """Only the engine thread may drive the engine once it runs: --lora-modules read beside it raced its polls of the
    reads (a KeyError in the engine thread, which left a TP=2 server answering /health with no engine)."""
    import threading

    import uvicorn

    from hylo.engine.engine import LLMEngine

    alive_during_reads = []
    add_lora = LLMEngine.add_lora

    def watched(self, *requests):
        alive_during_reads.append(any(t.name == "hylo-engine" and t.is_alive() for t in threading.enumerate()))
        return add_lora(self, *requests)

    monkeypatch.setattr(LLMEngine, "add_lora", watched)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # start, then stop at once
    args = build_parser().parse_args(["serve", "--device", "cpu"])  # the demo model and its two adapters
    assert args.run(args) == 0
    assert alive_during_reads == [False]

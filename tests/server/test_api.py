"""The OpenAI API through the real `openai` client: completions, chat, streaming, adapters, equality with LLM.generate."""

import asyncio
import shutil
import time

import httpx
import openai
import pytest

from hylo import LLM, LoRARequest, SamplingParams
from hylo.demo import ADAPTER_DIRS, BASE_DIR, expected_continuation, prompt_for
from tests.server.conftest import KEY, Server


def test_models_lists_base_and_adapters_with_parent(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) >= {"base", "down", "twos"}
    assert models["down"].parent == "base" and models["base"].parent is None


@pytest.mark.parametrize("model", ["base", "down", "twos"])
def test_completion_streamed_equals_whole(server, model):
    client, prompt = server.client(), prompt_for(12)
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}))
    task = "base" if model == "base" else model
    assert whole.choices[0].text == expected_continuation(task, prompt)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 6
    assert whole.usage.prompt_tokens > 0


def test_chat_streamed_equals_whole(server):
    client = server.client()
    messages = [{"role": "user", "content": "count: 3 4 5"}]
    whole = client.chat.completions.create(model="twos", messages=messages, max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(model="twos", messages=messages, max_tokens=12, temperature=0, stream=True))
    assert whole.choices[0].message.role == "assistant"
    assert streamed == whole.choices[0].message.content


def test_stop_strings_are_not_streamed(server):
    client, prompt = server.client(), prompt_for(20)
    whole = client.completions.create(model="base", prompt=prompt, max_tokens=20, temperature=0, stop=[" 25"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="base", prompt=prompt, max_tokens=20, temperature=0, stop=[" 25"], stream=True))
    assert whole.choices[0].text == streamed == " 23 24"
    assert whole.choices[0].finish_reason == "stop"


def test_concurrent_base_and_adapters_equal_offline_generate(server):
    prompts = [prompt_for(s) for s in (8, 30, 51)]
    jobs = [(m, p) for p in prompts for m in ("base", "down", "twos")]

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        outs = await asyncio.gather(*(client.completions.create(model=m, prompt=p, max_tokens=20, temperature=0, logprobs=2) for m, p in jobs))
        await client.close()
        return outs

    served = asyncio.run(run())
    llm = LLM(str(BASE_DIR), device="cpu", progress=False, enable_lora=True, max_loras=2, max_lora_rank=8)
    requests = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(ADAPTER_DIRS.items())}
    offline = llm.generate([p for _, p in jobs], SamplingParams(temperature=0, max_tokens=20, logprobs=2), lora_request=[requests.get(m) for m, _ in jobs])
    for s, o in zip(served, offline):
        assert s.choices[0].text == o.outputs[0].text
        assert s.choices[0].logprobs.token_logprobs == pytest.approx([next(iter(e.values())).logprob for e in o.outputs[0].logprobs], abs=1e-5)


def test_n_and_seed(server):
    client = server.client()
    a = client.completions.create(model="base", prompt="count: 1 2", max_tokens=8, temperature=1.5, n=3, seed=4)
    b = client.completions.create(model="base", prompt="count: 1 2", max_tokens=8, temperature=1.5, n=3, seed=4)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


@pytest.mark.parametrize(
    "kwargs, status, param",
    [
        (dict(model="nope", prompt="x"), 404, "model"),
        (dict(model="base", prompt="x", temperature=-1), 400, "temperature"),
        (dict(model="base", prompt="x", top_p=7), 400, "top_p"),
        (dict(model="base", prompt="count " * 21000), 400, "prompt"),
        (dict(model="base", prompt=""), 400, "prompt"),
    ],
)
def test_errors_have_openai_shape(server, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        server.client().completions.create(max_tokens=4, **kwargs)
    assert e.value.status_code == status
    assert e.value.body["param"] == param and e.value.body["code"] == status


def test_wrong_or_missing_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_gone_mid_stream_frees_its_blocks_and_slot(server):
    before = server.metrics().get('hylo_requests_total{adapter="down",status="aborted"}', 0)
    body = {"model": "down", "prompt": prompt_for(40), "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data:"))
        assert server.metrics()["hylo_kv_blocks_used"] > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = server.metrics()
        if m.get('hylo_requests_total{adapter="down",status="aborted"}', 0) > before and m["hylo_kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert m.get('hylo_requests_total{adapter="down",status="aborted"}', 0) > before
    assert m["hylo_kv_blocks_used"] == 0 and m["hylo_gdn_slots_used"] == 0 and m["hylo_running_sequences"] == 0


def test_runtime_adapter_load_and_unload(server, lora_root, tmp_path):
    client = server.client()
    shutil.copytree(ADAPTER_DIRS["twos"], lora_root / "mine")
    post = lambda path, body: httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)  # noqa: E731
    assert post("/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "mine"}).status_code == 200
    assert client.completions.create(model="mine", prompt=prompt_for(9), max_tokens=20, temperature=0).choices[0].text == expected_continuation("twos", prompt_for(9))
    # Paths outside the root: absolute, '..', and a symlink that points out.
    shutil.copytree(ADAPTER_DIRS["down"], tmp_path / "outside")
    (lora_root / "link").symlink_to(tmp_path / "outside")
    for path in (str(tmp_path / "outside"), "../" + tmp_path.name + "/outside", "link"):
        r = post("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert r.status_code == 403 and "outside" in r.json()["error"]["message"]
    # A corrupt adapter is refused and serving goes on.
    shutil.copytree(ADAPTER_DIRS["down"], lora_root / "broken")
    (lora_root / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = post("/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": "broken"})
    assert r.status_code == 400 and "corrupt" in r.json()["error"]["message"]
    assert "broken" not in {m.id for m in client.models.list().data}
    # Unload while a request uses it: that request finishes with the right adapter; then the name is gone.
    stream = client.completions.create(model="mine", prompt=prompt_for(20), max_tokens=20, temperature=0, stream=True)
    first = next(stream)
    assert post("/v1/unload_lora_adapter", {"lora_name": "mine"}).status_code == 200
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    assert text == expected_continuation("twos", prompt_for(20))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="mine", prompt="x", max_tokens=2)
    assert post("/v1/unload_lora_adapter", {"lora_name": "mine"}).status_code == 404


def test_runtime_loading_is_off_by_default():
    s = Server()
    try:
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, timeout=10)
        assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]
    finally:
        assert s.stop()


def test_tokenize_detokenize_version_and_max_model_len(server):
    """vLLM's /tokenize and /detokenize round-trip through the served tokenizer; /version answers; /v1/models
    gives each model's max_model_len."""
    from hylo.demo import BASE_DIR
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(BASE_DIR), local_files_only=True)
    text = prompt_for(17)
    r = httpx.post(server.url + "/tokenize", json={"model": "down", "prompt": text, "add_special_tokens": False}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tokenizer.encode(text, add_special_tokens=False) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 20000
    back = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.json()["prompt"] == text
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [1, 10**9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(server.url + "/tokenize", json={"model": "nope", "prompt": "x"}, timeout=30).status_code == 404
    assert httpx.post(server.url + "/tokenize", json={"prompt": 5}, timeout=30).status_code == 400
    assert httpx.get(server.url + "/version", timeout=30).json()["version"]
    models = server.client().models.list().data
    assert {"base", "down", "twos"} <= {m.id for m in models} and all(m.max_model_len == 20000 for m in models)

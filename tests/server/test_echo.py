"""Completions' echo (with logprobs and max_tokens 0, as evaluation harnesses send it) and vLLM's prompt_logprobs,
against HF transformers' log_softmax of the prompt logits of the demo checkpoint."""


import httpx
import pytest
import torch

from hylo.demo import BASE_DIR, prompt_for
from tests.server.conftest import KEY

PROMPT = prompt_for(11)
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def reference():
    """(prompt token ids, [tokens - 1, vocab] logprobs: row p for prompt token p + 1) from HF transformers."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(BASE_DIR)
    model = tf.AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32).eval()
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=HEADERS, timeout=60)


def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt(server, reference):
    ids, logprobs = reference
    out = server.client().completions.create(model="base", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0, temperature=0)
    choice = out.choices[0]
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    expected = [logprobs[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=2e-4)
    assert all(len(top) <= 3 and lp.tokens[i + 1] in top for i, top in enumerate(lp.top_logprobs[1:]))


def test_echo_puts_the_prompt_before_the_generated_text(server, reference):
    ids, logprobs = reference
    plain = server.client().completions.create(model="base", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0)
    echoed = server.client().completions.create(model="base", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.choices[0].logprobs.token_logprobs[len(ids):] == plain.choices[0].logprobs.token_logprobs
    assert echoed.choices[0].logprobs.token_logprobs[1 : len(ids)] == pytest.approx([logprobs[p, ids[p + 1]].item() for p in range(len(ids) - 1)], abs=2e-4)
    # Streamed: the first chunk carries the prompt; the pieces add up to the whole.
    stream = list(server.client().completions.create(model="base", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in stream) == echoed.choices[0].text
    assert [x for c in stream for x in c.choices[0].logprobs.token_logprobs] == echoed.choices[0].logprobs.token_logprobs
    # Token-id prompts are echoed as their text.
    by_ids = server.client().completions.create(model="base", prompt=ids, max_tokens=0, echo=True)
    assert by_ids.choices[0].text == PROMPT


def test_prompt_logprobs_field_as_vllm(server, reference):
    ids, logprobs = reference
    body = post(server, "/v1/completions", model="base", prompt=PROMPT, max_tokens=2, prompt_logprobs=1).json()
    entries = body["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for p, entry in enumerate(entries[1:]):
        target = entry[str(ids[p + 1])]
        assert target["logprob"] == pytest.approx(logprobs[p, ids[p + 1]].item(), abs=2e-4)
        assert target["rank"] == int((logprobs[p] > logprobs[p, ids[p + 1]]).sum()) + 1
        assert str(int(logprobs[p].argmax())) in entry
    chat = post(server, "/v1/chat/completions", model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2, prompt_logprobs=0).json()
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])


@pytest.mark.parametrize("body, param, message", [
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not available with stream: true"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "above this engine's max_logprobs=20"),
    ({"max_tokens": 0}, "max_tokens", "only echo: true makes useful"),
    ({"echo": "yes"}, "echo", "must be true or false"),
])
def test_refusals_name_the_field(server, body, param, message):
    r = post(server, "/v1/completions", model="base", prompt=PROMPT, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    chat = post(server, "/v1/chat/completions", model="base", messages=[{"role": "user", "content": "hi"}], echo=True)
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "echo"

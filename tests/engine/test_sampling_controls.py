"""logit_bias, allowed_token_ids and bad_words (vLLM's names and meanings), checked by properties that a wrong
implementation breaks, and their refusals."""

import pytest
import torch

from hylo import SamplingParams
from hylo.sampling import InvalidParam, SampleInput, sample
from tests.conftest import TEXT

PROMPT = "count: 1 2 3"
VOCAB = TEXT["vocab_size"]


@pytest.fixture(scope="module")
def llm(engines):
    return engines("dense")


def greedy(llm, max_tokens: int = 12, **controls) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **controls)
    return llm.generate(PROMPT, params)[0].outputs[0].token_ids


def test_logit_bias_moves_the_greedy_choice(llm):
    free = greedy(llm)
    assert greedy(llm, logit_bias={free[0]: -100})[0] != free[0]
    forced = next(t for t in range(5, VOCAB) if t not in free)
    assert set(greedy(llm, logit_bias={forced: 100})) == {forced}
    assert greedy(llm, logit_bias={forced: 0.0}) == free  # a zero bias changes nothing


def test_allowed_token_ids_bound_every_sampled_token(llm):
    allowed = [7, 19, 42, 101, 250]
    for seed in range(3):
        params = SamplingParams(max_tokens=20, temperature=1.5, seed=seed, ignore_eos=True, allowed_token_ids=allowed)
        assert set(llm.generate(PROMPT, params)[0].outputs[0].token_ids) <= set(allowed)
    # With logit_bias too: the bias cannot bring back a token that is not allowed.
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, allowed_token_ids=allowed, logit_bias={3: 100})
    assert set(llm.generate(PROMPT, params)[0].outputs[0].token_ids) <= set(allowed)


def test_bad_words_never_appear(llm):
    """A word the model writes when free (two tokens that its tokenizer spells that way) never comes out once banned."""
    tokenizer = llm.get_tokenizer()
    free = greedy(llm, max_tokens=30)
    words = [tokenizer.decode(free[i : i + 2]) for i in range(len(free) - 1)]
    word, ids = next((w, tokenizer.encode(w.lstrip(), add_special_tokens=False)) for w in words
                     if w.strip() and len(tokenizer.encode(w.lstrip(), add_special_tokens=False)) == 2
                     and _contains(free, tokenizer.encode(w.lstrip(), add_special_tokens=False)))
    banned = greedy(llm, max_tokens=30, bad_words=[word])
    assert not _contains(banned, ids) and banned != free


def test_the_bad_words_rule_matches_vllms():
    """The last token is masked only where the output ends with the word's other tokens."""
    logits = torch.zeros(2, 8)
    params = SamplingParams(temperature=0)
    inputs = [SampleInput(params, [1], [4, 2], 0, bad_words=[[2, 5]]), SampleInput(params, [1], [4, 3], 0, bad_words=[[2, 5], [6]])]
    logits[:, 5] = 10.0
    logits[:, 6] = 9.0
    assert sample(logits, inputs).token_ids == [6, 5]  # row 0: [2, 5] completes, 5 masked; row 1: only 6 is masked


@pytest.mark.parametrize(
    "controls, param",
    [
        (dict(logit_bias={VOCAB: 1.0}), "logit_bias"),
        (dict(logit_bias={5: 100.5}), "logit_bias"),
        (dict(logit_bias={5: float("nan")}), "logit_bias"),
        (dict(logit_bias={"5": 1.0}), "logit_bias"),
        (dict(logit_bias=[5]), "logit_bias"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(allowed_token_ids=[1, VOCAB + 7]), "allowed_token_ids"),
        (dict(allowed_token_ids=[-1]), "allowed_token_ids"),
        (dict(bad_words=[""]), "bad_words"),
        (dict(bad_words=["  "]), "bad_words"),
        (dict(bad_words="word"), "bad_words"),
        (dict(bad_words=["w"] * 257), "bad_words"),
        (dict(bad_words=["ok", "\ud800"]), "bad_words"),  # a lone surrogate: no UTF-8 for the tokenizer
        # Tokenized when the request is added, on the engine thread: 256 words of 60 kB held every stream up for 10 s.
        (dict(bad_words=["word " * 1000]), "bad_words"),
        (dict(structured_outputs={"regex": "a"}), "structured_outputs"),
    ],
)
def test_bad_values_are_refused_naming_the_field(llm, controls, param):
    with pytest.raises(InvalidParam) as e:  # when made, or (token ids beyond the vocabulary, words the tokenizer cannot take) when added
        llm.generate(PROMPT, SamplingParams(max_tokens=2, **controls))
    assert e.value.param == param
    assert not llm.llm_engine.has_unfinished_requests()
    assert not llm.llm_engine.scheduler.waiting and not llm.llm_engine.scheduler.running  # no sequence of it left to run


def test_vocabulary_wide_controls_become_tensors_once():
    """allowed_token_ids and logit_bias over a Qwen3.5-sized vocabulary, one request with n=64: the lists become
    tensors once, not for every row at every step (which took 7 s a step, for the whole batch; timed on a shared
    machine it is too noisy to assert, so the tensors' reuse is checked)."""
    from hylo.sampling import _tensors

    vocab = 248320
    params = SamplingParams(temperature=0, allowed_token_ids=list(range(vocab)), logit_bias={t: 1.0 for t in range(0, vocab, 2)})
    logits = torch.randn(64, vocab)
    inputs = [SampleInput(params, [1], [2], child) for child in range(64)]
    tokens = sample(logits, inputs).token_ids
    made = _tensors(params, logits.device)
    assert tokens == (logits + torch.tensor([1.0, 0.0]).repeat(vocab // 2)).argmax(dim=-1).tolist()
    sample(logits, inputs)
    assert all(a is b for a, b in zip(_tensors(params, logits.device), made))  # the next step reuses them
    params.logit_bias = {5: 100.0}
    params.validate()  # changed and checked again (as when the request is added): the tensors follow
    assert set(sample(logits, inputs).token_ids) == {5}


def _contains(tokens: list[int], word: list[int]) -> bool:
    return any(tokens[i : i + len(word)] == word for i in range(len(tokens) - len(word) + 1))

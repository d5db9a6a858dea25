"""The server under load: many concurrent streams, a bounded soak, overload, and a tensor-parallel server."""

import asyncio
import threading
import time

import openai

from hylo.demo import expected_continuation, prompt_for
from tests.server.conftest import KEY, Server


async def stream_one(client, model: str, start: int) -> str:
    text = ""
    async for chunk in await client.completions.create(model=model, prompt=prompt_for(start), max_tokens=20, temperature=0, stream=True):
        text += chunk.choices[0].text if chunk.choices else ""
    return text


def test_64_concurrent_streams_finish_and_leak_nothing(server):
    models = ["base", "down", "twos"]

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        texts = await asyncio.gather(*(stream_one(client, models[i % 3], 6 + i % 60) for i in range(64)))
        await client.close()
        return texts

    texts = asyncio.run(run())
    for i, text in enumerate(texts):
        assert text == expected_continuation(models[i % 3], prompt_for(6 + i % 60))
    m = server.metrics()
    assert m["hylo_kv_blocks_used"] == 0 and m["hylo_gdn_slots_used"] == 0
    assert m["hylo_running_sequences"] == 0 and m["hylo_waiting_sequences"] == 0


def test_bounded_soak_keeps_memory_flat(server):
    """30 s of mixed traffic (4 client threads); resident memory after warm-up must not keep growing."""
    errors, done = [], threading.Event()

    def traffic(seed: int):
        client = server.client()
        i = seed
        while not done.is_set():
            model = ["base", "down", "twos"][i % 3]
            try:
                if i % 2:
                    client.completions.create(model=model, prompt=prompt_for(6 + i % 60), max_tokens=16, temperature=0.7, seed=i)
                else:
                    list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt_for(6 + i % 60)}], max_tokens=16, stream=True))
            except Exception as e:  # collected, asserted below
                errors.append(e)
            i += 4

    threads = [threading.Thread(target=traffic, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    time.sleep(8)
    warm = server.rss_mb()
    time.sleep(22)
    grown = server.rss_mb() - warm
    done.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert grown < 60, f"resident memory grew by {grown:.0f} MB over 22 s of traffic"
    assert server.metrics()["hylo_kv_blocks_used"] == 0


def test_overload_is_503_and_nothing_is_lost():
    s = Server("--max-num-seqs", "1", "--max-waiting", "1", "--max-model-len", "4000")
    try:
        async def run():
            client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
            results = await asyncio.gather(
                *(client.completions.create(model="base", prompt=prompt_for(10), max_tokens=300, extra_body={"ignore_eos": True}) for _ in range(6)),
                return_exceptions=True,
            )
            await client.close()
            return results

        results = asyncio.run(run())
        rejected = [r for r in results if isinstance(r, openai.APIStatusError)]
        served = [r for r in results if not isinstance(r, Exception)]
        assert rejected and all(r.status_code == 503 for r in rejected)
        assert served and all(len(r.choices[0].text) > 0 and r.choices[0].finish_reason == "length" for r in served)
        assert len(rejected) + len(served) == 6
    finally:
        assert s.stop()


def test_tensor_parallel_server_answers_correctly():
    s = Server("--tensor-parallel-size", "2")
    try:
        client = s.client()
        for model in ("base", "down"):
            text = client.completions.create(model=model, prompt=prompt_for(33), max_tokens=20, temperature=0).choices[0].text
            assert text == expected_continuation(model, prompt_for(33))
    finally:
        assert s.stop()

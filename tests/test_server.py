"""The OpenAI-compatible server, run for real on 127.0.0.1 and spoken to by the official openai client."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

import tokentrail
from conftest import chatml_demo, require

require("fastapi")
require("uvicorn")
openai = require("openai")
httpx = require("httpx")

from tokentrail.server import create_app  # noqa: E402

STORY = "The storm is"
# Long generations for the tests of limits: </s> (id 2) and <|im_end|> (id 3) are banned.
NO_END = {"2": -100.0, "3": -100.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(model, step_delay: float = 0.0, **options):
    """A real uvicorn server on a free loopback port, for the duration of the block.

    `step_delay` adds that many seconds to every engine step (the real forward pass, then a sleep), so
    that the tiny test model's requests last long enough to be cancelled or to expire in the queue."""
    import uvicorn

    port = _free_port()
    app = create_app(model, model_name="demo-chat", **options)
    if step_delay:
        sched = app.state.server.scheduler
        real_step = sched.step

        def slow_step(work):
            out = real_step(work)
            time.sleep(step_delay)
            return out

        sched.step = slow_step
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tokentrail.load(chatml_demo(tmp_path_factory.mktemp("chatml")))


@pytest.fixture(scope="module")
def base_url(model):
    with running(model, parallel=4, max_queue=64) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def _chat_alone(model, messages, **kw):
    return model.chat(messages, **kw)


# ---------------------------------------------------------------- completions

def test_greedy_completion_equals_generate_alone(client, model):
    r = client.completions.create(model="demo-chat", prompt=STORY, max_tokens=24, temperature=0)
    alone = model.generate(STORY, max_new_tokens=24, temperature=0)
    assert r.choices[0].text == alone.text
    assert r.choices[0].finish_reason == ("stop" if alone.finish_reason == "eos" else "length")
    assert r.usage.prompt_tokens == len(alone.prompt_ids)
    assert r.usage.completion_tokens == len(alone.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.model == "demo-chat"


def test_streamed_completion_joins_to_the_same_text(client, model):
    chunks = list(client.completions.create(model="demo-chat", prompt=STORY, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    alone = model.generate(STORY, max_new_tokens=24, temperature=0)
    assert text == alone.text
    assert chunks[-1].usage.completion_tokens == len(alone.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_seeded_sampling_and_n_equal_generate_with_the_same_options(client, model):
    opts = dict(temperature=0.9, top_p=0.9, top_k=40, min_p=0.02, presence_penalty=0.5, frequency_penalty=0.3,
                repetition_penalty=1.1)
    r = client.completions.create(model="demo-chat", prompt=STORY, max_tokens=20, seed=7, n=3,
                                  temperature=opts["temperature"], top_p=opts["top_p"],
                                  presence_penalty=opts["presence_penalty"],
                                  frequency_penalty=opts["frequency_penalty"],
                                  extra_body={"top_k": 40, "min_p": 0.02, "repetition_penalty": 1.1})
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    expected = [model.generate(STORY, max_new_tokens=20, seed=7 + i, **opts).text for i in range(3)]
    assert texts == expected
    assert len(set(expected)) > 1  # the choices are different draws


@pytest.mark.parametrize("parallel", [4, 1])
def test_n_choices_share_one_prefill_and_equal_independent_runs(model, parallel):
    # parallel=1: the forked choices wait for the slot with their copied caches.
    prompts = [STORY, "Once upon a time there was"]
    opts = dict(temperature=0.9, top_k=40)
    with running(model, parallel=parallel) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.completions.create(model="demo-chat", prompt=prompts, max_tokens=12, seed=11, n=3, logprobs=2,
                                      temperature=opts["temperature"], extra_body={"top_k": 40, "logit_bias": NO_END})
        prompt_tokens = _metric(url, "tokentrail_prompt_tokens")
        cached = _metric(url, "tokentrail_prompt_cached_tokens")  # the prompts' shared start, at parallel=1
        forked = _metric(url, "tokentrail_forked_sequences")
        stream = client.completions.create(model="demo-chat", prompt=STORY, max_tokens=12, seed=11, n=3, stream=True,
                                           temperature=opts["temperature"], extra_body={"top_k": 40})
        streamed = ["", "", ""]
        for chunk in stream:
            streamed[chunk.choices[0].index] += chunk.choices[0].text
    # Each prompt ran once; its other two choices started from copies of its cache.
    assert prompt_tokens + cached == sum(len(model.encode(p)) for p in prompts) and forked == 4
    choices = sorted(r.choices, key=lambda c: c.index)
    for i, c in enumerate(choices):
        alone = model.generate(prompts[i // 3], max_new_tokens=12, seed=11 + i, logprobs=True, top_n=2,
                               logit_bias={2: -100.0, 3: -100.0}, **opts)
        assert c.text == alone.text
        assert c.logprobs.token_logprobs == pytest.approx([s.logprob for s in alone.steps], rel=1e-5, abs=1e-6)
        assert [list(d) for d in c.logprobs.top_logprobs] == [[a.text for a in s.top_model] for s in alone.steps]
    assert len({c.text for c in choices[:3]}) > 1  # different draws from one prefill
    assert streamed == [model.generate(STORY, max_new_tokens=12, seed=11 + i, **opts).text for i in range(3)]


def test_stop_strings_and_logprobs_equal_generate(client, model):
    r = client.completions.create(model="demo-chat", prompt=STORY, max_tokens=40, temperature=0, stop=[" farm"],
                                  logprobs=3)
    alone = model.generate(STORY, max_new_tokens=40, temperature=0, stop=[" farm"], logprobs=True, top_n=3)
    c = r.choices[0]
    assert c.text == alone.text and c.finish_reason == "stop"
    assert c.logprobs.token_logprobs == pytest.approx([s.logprob for s in alone.steps], abs=1e-6)
    assert [list(d) for d in c.logprobs.top_logprobs] == [[a.text for a in s.top_model] for s in alone.steps]


def test_token_id_prompts_and_lists_of_prompts(client, model):
    ids = model.encode(STORY)
    prompts = ["Once upon", "The cat"]
    for prompt in (ids, [ids, model.encode(prompts[0])], prompts):
        r = client.completions.create(model="demo-chat", prompt=prompt, max_tokens=8, temperature=0)
        texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
        singles = [prompt] if isinstance(prompt[0], int) else prompt
        assert texts == [model.generate(p, max_new_tokens=8, temperature=0).text for p in singles]


# ---------------------------------------------------------------- chat

MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": STORY}]


def test_chat_completion_equals_model_chat(client, model):
    r = client.chat.completions.create(model="demo-chat", messages=MESSAGES, temperature=0, max_tokens=30)
    alone = model.chat(MESSAGES, temperature=0, max_new_tokens=30)
    assert r.choices[0].message.content == alone.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(alone.generation.prompt_ids)
    assert r.usage.completion_tokens == len(alone.generation.token_ids)


def test_streamed_chat_with_logprobs(client, model):
    stream = client.chat.completions.create(model="demo-chat", messages=MESSAGES, temperature=0, max_tokens=30,
                                            stream=True, logprobs=True, top_logprobs=2)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    alone = model.chat(MESSAGES, temperature=0, max_new_tokens=30, logprobs=True, top_n=2)
    assert text == alone.text
    lps = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in lps] == pytest.approx([s.logprob for s in alone.generation.steps], abs=1e-6)
    assert [[t.token for t in e.top_logprobs] for e in lps] == \
        [[a.text for a in s.top_model] for s in alone.generation.steps]


def test_chat_end_of_turn_stops_generation(client, model):
    # With a bias toward <|im_end|> the reply ends there, as model.chat ends it.
    r = client.chat.completions.create(model="demo-chat", messages=MESSAGES, temperature=1.0, seed=4,
                                       max_tokens=40, logit_bias={"3": 16.0})
    alone = model.chat(MESSAGES, temperature=1.0, seed=4, max_new_tokens=40, logit_bias={3: 16.0})
    assert alone.generation.token_ids[-1] == 3
    assert r.choices[0].message.content == alone.text and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("cache_mb", [1024, 0])
def test_a_conversation_reuses_its_earlier_turns_from_the_prompt_cache(model, cache_mb):
    turn1 = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "The storm is"}]
    with running(model, parallel=2, prompt_cache_mb=cache_mb) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r1 = client.chat.completions.create(model="demo-chat", messages=turn1, temperature=0, max_tokens=12)
        turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "And then"}]
        chunks = list(client.chat.completions.create(model="demo-chat", messages=turn2, temperature=0, max_tokens=12,
                                                     stream=True, stream_options={"include_usage": True}))
        r3 = client.chat.completions.create(model="demo-chat", messages=turn2, temperature=0.8, seed=3, max_tokens=12)
        cached_metric = _metric(url, "tokentrail_prompt_cached_tokens")
        # llama-server's per-request switch: this one neither reuses nor leaves anything behind.
        r4 = client.chat.completions.create(model="demo-chat", messages=turn2, temperature=0, max_tokens=12,
                                            extra_body={"cache_prompt": False})
        assert _metric(url, "tokentrail_prompt_cached_tokens") == cached_metric
        bad = httpx.post(url + "/v1/chat/completions", json={"messages": turn2, "cache_prompt": "no"})
    first = model.chat(turn1, temperature=0, max_new_tokens=12)
    second = model.chat(turn2, temperature=0, max_new_tokens=12)  # computed whole, no cache
    assert r1.choices[0].message.content == first.text and r1.usage.prompt_tokens_details.cached_tokens == 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.text
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(second.generation.prompt_ids)
    assert r3.choices[0].message.content == model.chat(turn2, temperature=0.8, seed=3, max_new_tokens=12).text
    assert r4.choices[0].message.content == second.text and r4.usage.prompt_tokens_details.cached_tokens == 0
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_prompt"
    if cache_mb:
        # The first turn's prompt at least (its reply is rendered again by the template, and matches
        # the generated tokens as far as they agree); the same conversation again: all but one position.
        assert len(first.generation.prompt_ids) <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
        assert r3.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
        assert cached_metric == usage.prompt_tokens_details.cached_tokens + r3.usage.prompt_tokens_details.cached_tokens
    else:
        assert usage.prompt_tokens_details.cached_tokens == r3.usage.prompt_tokens_details.cached_tokens == 0
        assert cached_metric == 0


def test_a_burst_with_one_system_prompt_prefills_it_once(model):
    # The scheduler itself, step by step: three requests arrive together with one 48-id beginning.
    from tokentrail.generation import start_run
    from tokentrail.prompt_cache import PromptCache
    from tokentrail.server.scheduler import GenerationRequest, Scheduler

    rng = np.random.default_rng(3)
    system = [1] + rng.integers(5, 400, 47).tolist()
    prompts = [system + rng.integers(5, 400, 6 + i).tolist() for i in range(3)]
    events = {i: [] for i in range(3)}
    sched = Scheduler(model, parallel=4, prefill_chunk=16, prompt_cache=PromptCache(model))
    seqs = [GenerationRequest(start_run(model, p, 5, temperature=0), i, events[i].append)
            for i, p in enumerate(prompts)]
    sched.submit(seqs)
    sched._admit()
    # The others wait, without a slot, while the first prefills the shared beginning 16 ids a step.
    for pos in (16, 32):
        assert sched.active == 1 and sched.queue_depth == 2
        sched._advance()
        assert seqs[0].session.pos == pos
        sched._admit()
    sched._advance()
    sched._admit()  # the first has 48 positions: the others copy them
    assert sched.active == 3 and [s.session.pos for s in seqs[1:]] == [48, 48]
    assert sched.stats.cached_tokens == 96 and sched.stats.prompt_tokens == sum(map(len, prompts)) - 96
    while sched.active:
        sched._advance()
    for i, p in enumerate(prompts):
        got = [e.step.token for e in events[i] if e.kind == "step"]
        assert got == model.generate(p, max_new_tokens=5, temperature=0).token_ids


@pytest.mark.parametrize("cache_mb", [1024, 0])
def test_concurrent_requests_sharing_a_beginning_equal_runs_alone(model, cache_mb):
    rng = np.random.default_rng(4)
    system = [1] + rng.integers(5, 400, 47).tolist()
    prompts = [system + rng.integers(5, 400, 5 + i).tolist() for i in range(6)]
    with running(model, parallel=3, prompt_cache_mb=cache_mb, step_delay=0.005) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda p: client.completions.create(
                model="demo-chat", prompt=p, max_tokens=8, temperature=0, extra_body={"logit_bias": NO_END}),
                prompts))
        cached = _metric(url, "tokentrail_prompt_cached_tokens")
    for p, r in zip(prompts, replies):
        alone = model.generate(p, max_new_tokens=8, temperature=0, logit_bias={2: -100.0, 3: -100.0})
        assert r.choices[0].text == alone.text
    reused = sum(r.usage.prompt_tokens_details.cached_tokens for r in replies)
    assert reused == cached
    # Every prompt but the first to run starts from the shared 48 ids, computed once.
    assert reused >= 5 * len(system) if cache_mb else reused == 0


def test_models_health_and_metrics(client, base_url):
    client.completions.create(model="demo-chat", prompt=STORY, max_tokens=2)
    assert [m.id for m in client.models.list().data] == ["demo-chat"]
    assert httpx.get(base_url + "/health").json()["status"] == "ok"
    text = httpx.get(base_url + "/metrics").text
    for name in ("tokentrail_queue_depth", "tokentrail_active_sequences", "tokentrail_tokens_per_second",
                 "tokentrail_time_to_first_token_seconds_bucket", "tokentrail_generated_tokens"):
        assert name in text
    generated = float(next(line.split()[1] for line in text.splitlines()
                           if line.startswith("tokentrail_generated_tokens ")))
    assert generated > 0


# ---------------------------------------------------------------- many clients at once

def test_simultaneous_requests_each_equal_running_alone(base_url, model):
    prompts = ["The storm is", "Once upon a time", "The cat", "A small boat", "The farm was", "In the morning",
               "The sky is gray", "She said"]
    lengths = [30, 12, 25, 40, 18, 33, 9, 27]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def one(p, n, stream):
            if stream:
                s = await aclient.completions.create(model="m", prompt=p, max_tokens=n, temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in s])
            r = await aclient.completions.create(model="m", prompt=p, max_tokens=n, temperature=0)
            return r.choices[0].text

        return await asyncio.gather(*(one(p, n, i % 2 == 0) for i, (p, n) in enumerate(zip(prompts, lengths))))

    got = asyncio.run(main())
    expected = [model.generate(p, max_new_tokens=n, temperature=0).text for p, n in zip(prompts, lengths)]
    assert got == expected


def test_long_prompts_are_prefilled_in_chunks(model):
    ids = model.encode("The storm is near the farm. The sky is gray over the farm. " * 8)[:100]
    with running(model, parallel=2, prefill_chunk=7) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 20, "temperature": 0,
                                                      "logit_bias": NO_END}, timeout=60).json()
        steps, tokens = _metric(url, "tokentrail_steps"), _metric(url, "tokentrail_step_tokens")
    # The prompt in steps of at most 7 tokens, then 19 steps feeding back a generated token.
    assert (steps, tokens) == (-(-len(ids) // 7) + 19, len(ids) + 19)
    alone = model.generate(ids, max_new_tokens=20, temperature=0, logit_bias={2: -100.0, 3: -100.0})
    # Chunks of 7 run through the same GEMV products as one-token steps, not the prefill GEMM,
    # so the logits may differ in the last bits; the greedy tokens agree.
    assert r["choices"][0]["text"] == alone.text


# ---------------------------------------------------------------- the journey extension

def test_journey_of_each_generated_token(client, model):
    r = client.completions.create(model="demo-chat", prompt=STORY, max_tokens=3, temperature=0,
                                  extra_body={"tokentrail": {"journey": True, "top": 4}})
    c = r.choices[0]
    journey = c.model_extra["tokentrail"]["journey"]
    alone = model.generate(STORY, max_new_tokens=3, temperature=0, logprobs=True, top_n=4)
    assert [j["id"] for j in journey] == alone.token_ids
    prompt = list(alone.prompt_ids)
    for i, entry in enumerate(journey):
        context = prompt + alone.token_ids[:i]
        ref = model.journey(context, top=4, temperature=0)  # the greedy choice, as the request's
        assert ref.chosen == alone.token_ids[i]
        lens = ref.logit_lens(top=4)
        assert [[t["token"] for t in row["top"]] for row in entry["logit_lens"]] == lens["top_tokens"]
        np.testing.assert_allclose([row["chosen_prob"] for row in entry["logit_lens"]], lens["chosen_prob"],
                                   rtol=1e-4, atol=1e-6)
        for layer in entry["attention"]:
            pattern = ref.attention(layer["layer"])  # [heads, keys 0..len(context) - 1]
            assert pattern.shape[1] == len(context)
            for head in layer["heads"]:
                best = head["top"][0]
                assert best["position"] == int(np.argmax(pattern[head["head"], : len(context)]))
                assert best["weight"] == pytest.approx(float(pattern[head["head"]].max()), rel=1e-4)
        assert [a["id"] for a in entry["top_before_sampling"]] == [a.token for a in alone.steps[i].top_model]
        assert [a["id"] for a in entry["top_after_sampling"]] == [a.token for a in alone.steps[i].top_sampled]
        # Greedy: after the chain only the chosen token is left.
        assert entry["top_after_sampling"][0]["prob"] == pytest.approx(1.0)


# ---------------------------------------------------------------- errors, limits and faults

def _error(resp, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"}
    if param is not None:
        assert body["param"] == param, body
        assert param in body["message"]
    return body


@pytest.mark.parametrize("body, param", [
    ({"prompt": STORY, "temperature": "hot"}, "temperature"),
    ({"prompt": STORY, "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": STORY, "max_tokens": 0}, "max_tokens"),
    ({"prompt": STORY, "top_p": 1.5}, "top_p"),
    ({"prompt": STORY, "n": "2"}, "n"),
    ({"prompt": STORY, "colour": "red"}, "colour"),
    ({"prompt": STORY, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": STORY, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": STORY, "tokentrail": {"journey": True, "depth": 3}}, "tokentrail.depth"),
    ({"prompt": [99999]}, "prompt"),
    ({}, "prompt"),
])
def test_bad_fields_get_400_naming_the_field(base_url, body, param):
    _error(httpx.post(base_url + "/v1/completions", json=body), 400, param)


def test_bad_chat_fields_and_bodies(base_url):
    _error(httpx.post(base_url + "/v1/chat/completions", json={"messages": [{"content": "x"}]}), 400,
           "messages.0.role")
    _error(httpx.post(base_url + "/v1/chat/completions", json={"messages": []}), 400, "messages")
    body = _error(httpx.post(base_url + "/v1/completions", content=b'{"prompt": "x",',
                             headers={"content-type": "application/json"}), 400)
    assert "JSON" in body["message"]


def test_unknown_routes_and_methods_answer_in_openai_shape(base_url):
    assert "/v1/embeddings" in _error(httpx.post(base_url + "/v1/embeddings", json={}), 404)["message"]
    _error(httpx.get(base_url + "/v1/completions"), 405)


def test_prompt_longer_than_the_context_is_refused(base_url, model):
    ids = [5] * (model.context_limit + 1)
    body = _error(httpx.post(base_url + "/v1/completions", json={"prompt": ids}), 400, "prompt")
    assert "context" in body["message"]
    msgs = [{"role": "user", "content": "The storm is near. " * 200}]
    _error(httpx.post(base_url + "/v1/chat/completions", json={"messages": msgs}), 400, "messages")


def test_openai_client_sees_errors_as_bad_requests(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo-chat", prompt=STORY, temperature=5)
    assert info.value.body["param"] == "temperature"


def test_a_full_queue_answers_429_with_retry_after(model):
    with running(model, parallel=1, max_queue=1) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": STORY, "n": 3, "max_tokens": 4})
        _error(r, 429)
        assert r.headers["retry-after"] == "1"
        ok = httpx.post(url + "/v1/completions", json={"prompt": STORY, "n": 2, "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def _wait_idle(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (_metric(url, "tokentrail_active_sequences")
                                           or _metric(url, "tokentrail_queue_depth")):
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_and_frees_the_slots(model, stream):
    # 16 long choices on one slot: about 4000 tokens if nobody stopped them.
    body = {"prompt": STORY, "n": 16, "max_tokens": 250, "temperature": 0, "logit_bias": NO_END, "stream": stream}
    with running(model, parallel=1, max_queue=64) as url:
        if stream:
            with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                next(r.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                httpx.post(url + "/v1/completions", json=body, timeout=0.2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (_metric(url, "tokentrail_active_sequences")
                                               or _metric(url, "tokentrail_queue_depth")):
            time.sleep(0.05)
        assert _metric(url, "tokentrail_active_sequences") == 0 and _metric(url, "tokentrail_queue_depth") == 0
        # Most of the 16 choices never ran: the sequences were dropped, not finished.
        assert _metric(url, "tokentrail_cancelled_sequences") >= 8
        assert _metric(url, "tokentrail_generated_tokens") < 2000
        # The freed slot serves the next request.
        r = httpx.post(url + "/v1/completions", json={"prompt": STORY, "max_tokens": 5, "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"] == model.generate(STORY, max_new_tokens=5, temperature=0).text


def test_prefill_budget_is_shared_and_decoding_goes_on(model):
    # One sequence decodes while two long prompts arrive: each step prefills at most 8 prompt tokens in all,
    # and the decoding sequence advances at every step meanwhile.
    ids = model.encode("The storm is near the farm. The sky is gray over the farm. " * 3)[:40]
    with running(model, parallel=3, prefill_chunk=8, step_delay=0.01, prompt_cache_mb=0) as url:
        async def main():
            aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            first = asyncio.create_task(aclient.completions.create(model="m", prompt=STORY, max_tokens=60,
                                                                   temperature=0, extra_body={"logit_bias": NO_END}))
            while _metric(url, "tokentrail_generated_tokens") < 2:
                await asyncio.sleep(0.01)
            others = [aclient.completions.create(model="m", prompt=ids, max_tokens=5, temperature=0) for _ in "ab"]
            return await asyncio.gather(first, *others)

        first, a, b = asyncio.run(main())
        steps, tokens = _metric(url, "tokentrail_steps"), _metric(url, "tokentrail_step_tokens")
        forward, total = _metric(url, "tokentrail_forward_seconds"), _metric(url, "tokentrail_step_seconds")
    # The 60 tokens of the first request took 60 steps (its prompt, then 59 fed back), and the two
    # prompts of 40 fitted in those steps 8 tokens at a time: no step was added for them.
    assert steps == 60
    assert tokens == len(model.encode(STORY)) + 59 + 2 * (40 + 4)
    assert 0 < forward < total
    assert first.choices[0].text == model.generate(STORY, max_new_tokens=60, temperature=0,
                                                   logit_bias={2: -100.0, 3: -100.0}).text
    assert a.choices[0].text == b.choices[0].text == model.generate(ids, max_new_tokens=5, temperature=0).text


def test_a_client_that_leaves_while_queued_leaves_the_queue(model):
    # One slot, held by a long request; a queued request goes as soon as its client does.
    body = {"prompt": STORY, "max_tokens": 100, "temperature": 0, "logit_bias": NO_END}
    with running(model, parallel=1, step_delay=0.05) as url:  # the holder takes 5 s
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions",
                                                           json={**body, "stream": True}) as holder:
            lines = holder.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the long request holds the slot
            with pytest.raises(httpx.ReadTimeout):  # a queued client that gives up
                httpx.post(url + "/v1/completions", json=body, timeout=0.3)
            deadline = time.monotonic() + 1.0
            while _metric(url, "tokentrail_queue_depth") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _metric(url, "tokentrail_queue_depth") == 0 and _metric(url, "tokentrail_active_sequences") == 1
            assert _metric(url, "tokentrail_cancelled_sequences") == 1


def test_a_queued_sequence_expires_at_its_deadline_while_the_slot_stays_busy(model):
    # The scheduler alone, on the real model: one slot held by a sequence without a time limit.
    from tokentrail.generation import start_run
    from tokentrail.server.scheduler import GenerationRequest, Scheduler, forward_step

    def slow_step(work):
        out = forward_step(work)
        time.sleep(0.01)
        return out

    events = {0: [], 1: []}
    sched = Scheduler(model, parallel=1, step=slow_step)
    holder = GenerationRequest(start_run(model, STORY, 200, temperature=0, logit_bias={2: -100.0, 3: -100.0}), 0,
                               events[0].append)
    queued = GenerationRequest(start_run(model, STORY, 5, temperature=0), 1, events[1].append,
                               deadline=time.monotonic() + 0.3)
    sched.start()
    try:
        sched.submit([holder])
        sched.submit([queued])
        deadline = time.monotonic() + 30
        while not events[1] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(e.kind, e.code) for e in events[1]] == [("error", 408)]
        assert sched.active == 1 and sched.queue_depth == 0 and sched.stats.timed_out == 1
        assert events[0][-1].step.finish_reason is None  # the holder is still running
    finally:
        sched.stop()


def test_per_request_timeout(model):
    body = {"prompt": STORY, "n": 16, "max_tokens": 250, "temperature": 0, "logit_bias": NO_END}
    with running(model, parallel=1, timeout=0.3) as url:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert "time limit" in _error(r, 408)["message"]
        assert _metric(url, "tokentrail_timed_out_sequences") >= 1
        ok = httpx.post(url + "/v1/completions", json={"prompt": STORY, "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200


def test_chat_without_a_template_is_refused_clearly():
    with running(tokentrail.load()) as url:
        body = _error(httpx.post(url + "/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "hi"}]}), 400, "messages")
        assert "chat template" in body["message"]


def test_hostile_chat_templates_are_400s(model):
    """A template that refuses the conversation, or would repeat a string ten billion times, answers 400
    naming the messages (not a 500, not an exhausted server), and the server goes on answering."""
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for template, words in (("{{ raise_exception('no users here') }}", "no users here"),
                            ("{{ 'a' * 10**10 }}", "refused")):
        with running(model, chat_template=template) as url:
            body = _error(httpx.post(url + "/v1/chat/completions", json=hi), 400, "messages")
            assert words in body["message"]
            assert httpx.post(url + "/v1/completions", json={"prompt": STORY, "max_tokens": 2}).status_code == 200


def test_serve_command_rejects_bad_flags():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tokentrail.cli", "serve", "--parallel", "0"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--parallel" in out.stderr and "Traceback" not in out.stderr

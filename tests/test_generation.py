"""generate, beam_search and score: against small models that follow the
engine's session contract, against transformers' beam search on the same
weights, and on the real engine (stories260K)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

import tokentrail
from conftest import require, require_stories
from tokentrail import sampling
from tokentrail.config import ModelConfig
from tokentrail.generation import beam_search, generate, score
from tokentrail.tokenizer import Tokenizer


# ------------------------------------------------------ contract-level models

def byte_tokenizer() -> Tokenizer:
    """One token per byte (so characters span tokens), plus <eos> = 256."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = 256
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens(["<eos>"])
    return Tokenizer(inner, eos_ids=[256])


class FakeSession:
    def __init__(self, model, tokens=()):
        self.model = model
        self.tokens = list(tokens)

    @property
    def pos(self):
        return len(self.tokens)

    @property
    def limit(self):
        return self.model.config.max_seq_len

    def feed(self, ids, all_logits=False):
        ids = [int(i) for i in ids]
        assert self.pos + len(ids) <= self.limit
        self.model.fed.append(len(ids))
        rows = []
        for i in ids:
            self.tokens.append(i)
            rows.append(self.model.logits_for(self.tokens))
        return np.stack(rows) if all_logits else rows[-1]

    def fork(self):
        self.model.forks += 1
        return FakeSession(self.model, self.tokens)

    def rewind(self, n):
        del self.tokens[n:]


class FakeModel:
    """Follows the engine's interface; logits are a function of the whole prefix."""

    def __init__(self, logits_for, vocab, tokenizer=None, max_seq_len=256, eos=()):
        self.logits_for = logits_for
        self.tokenizer = tokenizer
        self.config = ModelConfig(vocab_size=vocab, hidden_size=8, n_layers=1, n_heads=1, n_kv_heads=1,
                                  head_dim=8, ffn_size=8, max_seq_len=max_seq_len, eos_token_ids=list(eos))
        self.fed: list[int] = []
        self.forks = 0

    def session(self):
        return FakeSession(self)

    def forward(self, ids, all_positions=True):
        out = FakeSession(self).feed(ids, all_logits=True)
        return out if all_positions else out[-1]


def bigram_model(vocab=257, seed=0, tokenizer=None, **kw) -> FakeModel:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((vocab, vocab)) * 2.0
    b = rng.standard_normal((vocab, vocab)) * 0.7

    def logits_for(prefix):
        x = a[prefix[-1]] + (b[prefix[-2]] if len(prefix) > 1 else 0.0)
        return x.astype(np.float32)

    return FakeModel(logits_for, vocab, tokenizer, **kw)


def scripted_model(tokenizer, prompt_len, script, **kw) -> FakeModel:
    """Strongly prefers script[k] as the k-th generated token, then <eos>."""
    vocab = tokenizer.vocab_size
    noise = np.random.default_rng(1).standard_normal((512, vocab)).astype(np.float32)

    def logits_for(prefix):
        k = len(prefix) - prompt_len
        x = noise[len(prefix) % 512].copy()
        x[script[k] if k < len(script) else 256] += 40.0
        return x

    return FakeModel(logits_for, vocab, tokenizer, **kw)


TOK = byte_tokenizer()


def ids_of(text: str) -> list[int]:
    return TOK.encode(text, special=False)


def scripted(text: str, prompt: str = "Q:", **kw):
    return scripted_model(TOK, len(ids_of(prompt)), ids_of(text), **kw), prompt


# ------------------------------------------------------ text, stops, eos

def test_multibyte_characters_split_across_tokens_stream_whole():
    text = "a€b😀c"
    model, prompt = scripted(text)
    steps = list(generate(model, prompt, max_new_tokens=40, temperature=0, stream=True))
    assert "".join(s.text for s in steps) == text
    assert all("\ufffd" not in s.text for s in steps)
    # each byte is a token: a character appears with its last byte, nothing before
    pieces = [s.text for s in steps[:-1]]
    expect = []
    for ch in text:
        n = len(ch.encode("utf-8"))
        expect += [""] * (n - 1) + [ch]
    assert pieces == expect
    assert steps[-1].finish_reason == "eos" and steps[-1].token == 256


def test_stop_string_spanning_tokens_is_cut():
    model, prompt = scripted("Hello, world. Bye")
    g = generate(model, prompt, max_new_tokens=40, temperature=0, stop=["world."])
    assert (g.text, g.finish_reason, g.stop_string) == ("Hello, ", "stop", "world.")
    streamed = list(generate(model, prompt, max_new_tokens=40, temperature=0, stop=["world."], stream=True))
    assert "".join(s.text for s in streamed) == "Hello, "
    assert streamed[-1].finish_reason == "stop"
    # the token that completed the stop string is the last one generated
    assert [s.token for s in streamed] == ids_of("Hello, world.")


def test_partial_stop_match_is_held_back_then_released():
    text = "Hello, world. Bye"
    model, prompt = scripted(text)
    steps = list(generate(model, prompt, max_new_tokens=40, temperature=0, stop=["wow"], stream=True))
    assert "".join(s.text for s in steps) == text
    w = text.index("w")
    # "w" and "wo" could begin "wow": released only when "r" rules that out
    assert steps[w].text == "" and steps[w + 1].text == "" and steps[w + 2].text == "wor"
    assert steps[-1].finish_reason == "eos"


def test_earliest_stop_string_wins_and_multibyte_stop():
    model, prompt = scripted("Hello, world. Bye")
    g = generate(model, prompt, max_new_tokens=40, temperature=0, stop=["Bye", "o, "])
    assert (g.text, g.stop_string) == ("Hell", "o, ")
    model, prompt = scripted("a€b")
    g = generate(model, prompt, max_new_tokens=40, temperature=0, stop="€")
    assert (g.text, g.finish_reason) == ("a", "stop")


def test_eos_handling():
    model, prompt = scripted("abc")
    g = generate(model, prompt, max_new_tokens=40, temperature=0)
    assert (g.text, g.finish_reason) == ("abc", "eos")
    assert g.token_ids == ids_of("abc") + [256]
    g = generate(model, prompt, max_new_tokens=6, temperature=0, ignore_eos=True)
    assert g.finish_reason == "length" and len(g.token_ids) == 6 and g.text.startswith("abc")
    g = generate(model, prompt, max_new_tokens=40, temperature=0, eos_ids=ids_of("b"))
    assert (g.text, g.finish_reason) == ("a", "eos")


def test_length_and_context_limits():
    model = bigram_model(tokenizer=TOK, max_seq_len=20, eos=[])
    g = generate(model, "Q:", max_new_tokens=5, seed=0, ignore_eos=True)
    assert g.finish_reason == "length" and len(g.token_ids) == 5
    g = generate(model, "Q:", max_new_tokens=100, seed=0, ignore_eos=True)
    # 2 prompt tokens + 18 fed = 20 positions; one more token is sampled from the last logits
    assert g.finish_reason == "context" and len(g.token_ids) == 20 - 2 + 1
    for stream in (False, True):
        with pytest.raises(tokentrail.ContextFullError, match="prompt"):
            generate(model, "x" * 30, max_new_tokens=1, stream=stream)
    assert model.fed == [2, 1, 1, 1, 1] + [2] + [1] * 18
    assert generate(model, "Q:", max_new_tokens=0).token_ids == []


# ------------------------------------------------------ sampling and details

def test_seeded_runs_repeat_and_match_a_direct_sampler_loop():
    model = bigram_model(tokenizer=TOK)
    opts = dict(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2)
    a = generate(model, "Q:", max_new_tokens=30, seed=42, ignore_eos=True, **opts)
    b = generate(model, "Q:", max_new_tokens=30, seed=42, ignore_eos=True, **opts)
    streamed = [s.token for s in generate(model, "Q:", max_new_tokens=30, seed=42, ignore_eos=True,
                                          stream=True, **opts)]
    assert a.token_ids == b.token_ids == streamed and a.seed == 42
    assert generate(model, "Q:", max_new_tokens=30, seed=43, ignore_eos=True, **opts).token_ids != a.token_ids
    # The same draws from a Sampler fed full-prefix forwards (no sessions involved).
    sampler = sampling.Sampler(seed=42, **opts)
    hist = ids_of("Q:")
    out = []
    for _ in range(30):
        t = sampler.sample(model.forward(hist)[-1], hist)
        out.append(t)
        hist = hist + [t]
    assert out == a.token_ids
    # seed=None is reported and replays
    c = generate(model, "Q:", max_new_tokens=10, ignore_eos=True, **opts)
    assert generate(model, "Q:", max_new_tokens=10, ignore_eos=True, seed=c.seed, **opts).token_ids == c.token_ids


def test_logprobs_rank_and_alternatives():
    model = bigram_model(tokenizer=TOK)
    opts = dict(temperature=0.7, top_k=5)
    g = generate(model, "Q:", max_new_tokens=12, seed=3, ignore_eos=True, logprobs=True, top_n=4, **opts)
    hist = ids_of("Q:")
    chain = sampling.make_chain(**opts)
    for step in g.steps:
        raw = model.forward(hist)[-1].astype(np.float64)
        logp = raw - raw.max() - math.log(np.exp(raw - raw.max()).sum())
        assert step.logprob == pytest.approx(logp[step.token], abs=1e-12)
        assert step.rank == 1 + sorted(-logp).index(-logp[step.token])
        top = np.argsort(-logp)[:4]
        assert [a.token for a in step.top_model] == top.tolist()
        np.testing.assert_allclose([a.prob for a in step.top_model], np.exp(logp[top]), rtol=1e-12)
        q = sampling.softmax(chain(raw, hist))
        assert step.sampled_logprob == pytest.approx(math.log(q[step.token]), abs=1e-12)
        assert [a.token for a in step.top_sampled] == np.argsort(-q)[:4].tolist()
        np.testing.assert_allclose([a.prob for a in step.top_sampled], np.sort(q)[::-1][:4], rtol=1e-12)
        assert step.top_sampled[0].text == TOK.display(step.top_sampled[0].token)
        hist = hist + [step.token]
    assert g.logprob == pytest.approx(sum(s.logprob for s in g.steps))
    assert all(s.logprob is None and s.top_model == [] for s in generate(model, "Q:", max_new_tokens=3,
                                                                           seed=0).steps)


@pytest.mark.parametrize("options,name", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(top_n=-1), "top_n"),
    (dict(seed=-5), "seed"),
    (dict(top_q=0.3), "top_q"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_arguments_raise_before_the_model_runs(options, name, stream):
    model = bigram_model(tokenizer=TOK)
    with pytest.raises(ValueError, match=name):
        generate(model, "Q:", stream=stream, **options)
    assert model.fed == []


def test_nan_logits_from_the_model_raise():
    model = FakeModel(lambda prefix: np.full(257, np.nan, dtype=np.float32), 257, TOK)
    with pytest.raises(ValueError, match="logits"):
        generate(model, "Q:", max_new_tokens=3)


# ------------------------------------------------------ beam search

def tiny_model(vocab=4, eos=3, seed=5) -> FakeModel:
    return bigram_model(vocab=vocab, seed=seed, eos=[eos])


def exhaustive(model, prompt, vocab, eos, max_len, lp):
    """Every hypothesis beam search can return, scored directly."""
    out = []
    for n in range(1, max_len + 1):
        for body in itertools.product([t for t in range(vocab) if t != eos], repeat=n - 1):
            for last in range(vocab):
                if n < max_len and last != eos:
                    continue
                ids = list(body) + [last]
                logits = model.forward(prompt + ids).astype(np.float64)[len(prompt) - 1:-1]
                logp = logits - logits.max(1, keepdims=True)
                logp -= np.log(np.exp(logp).sum(1, keepdims=True))
                total = float(sum(logp[i, t] for i, t in enumerate(ids)))
                out.append((total / n ** lp, ids))
    return sorted(out, key=lambda s: -s[0])


@pytest.mark.parametrize("lp", [0.0, 1.0, 2.0, -0.5])
def test_wide_beam_search_finds_every_hypothesis_in_score_order(lp):
    model = tiny_model()
    prompt = [0, 1]
    beams = beam_search(model, prompt, num_beams=64, length_penalty=lp, max_new_tokens=3, early_stopping="never")
    ref = exhaustive(model, prompt, 4, 3, 3, lp)
    assert len(beams) == len(ref) == 1 + 3 + 9 + 27
    np.testing.assert_allclose([b.score for b in beams], [s for s, _ in ref], rtol=1e-12)
    assert sorted(map(tuple, (b.token_ids for b in beams))) == sorted(tuple(i) for _, i in ref)
    assert all(b.finished == (b.token_ids[-1] == 3) for b in beams)


def test_one_beam_is_greedy():
    model = bigram_model(tokenizer=TOK, eos=[])
    greedy = generate(model, "Q:", max_new_tokens=15, temperature=0)
    beams = beam_search(model, ids_of("Q:"), num_beams=1, max_new_tokens=15, early_stopping=True)
    assert beams[0].token_ids == greedy.token_ids and beams[0].text == greedy.text


def test_beams_fork_sessions_instead_of_recomputing():
    model = bigram_model(vocab=50, eos=[7])
    beams = beam_search(model, [1, 2, 3], num_beams=4, max_new_tokens=10)
    assert model.fed[0] == 3 and all(n == 1 for n in model.fed[1:])
    assert model.forks > 0 and len(model.fed) - 1 <= 4 * 9
    assert beams == sorted(beams, key=lambda b: -b.score)


def test_beam_search_arguments_are_checked():
    model = tiny_model()
    for kwargs, name in [(dict(num_beams=0), "num_beams"), (dict(early_stopping="sometimes"), "early_stopping"),
                         (dict(length_penalty=float("nan")), "length_penalty"),
                         (dict(num_beams=2, num_return=3), "num_return")]:
        with pytest.raises(ValueError, match=name):
            beam_search(model, [0], **kwargs)
    assert model.fed == []


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    torch = require("torch")
    require("transformers")
    from reference_models import build

    d = tmp_path_factory.mktemp("beam_llama")
    ref = build("llama", d, seed=3)
    ours = tokentrail.load(d)
    prompt = [1, 17, 200, 5, 99, 42]
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=4, pad_token_id=0)
    # An end-of-sequence id the model actually reaches, so that hypotheses finish early.
    eos = int(greedy[0, len(prompt) + 2])
    return ref, ours, prompt, eos


@pytest.mark.parametrize("lp,early", [(1.0, False), (0.0, "never"), (2.0, True), (-0.5, False), (1.0, "never")])
def test_beam_search_matches_transformers(hf_pair, lp, early):
    torch = require("torch")
    ref, ours, prompt, eos = hf_pair
    n, new = 3, 7
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), do_sample=False, num_beams=n, num_return_sequences=n,
                           max_new_tokens=new, length_penalty=lp, early_stopping=early, eos_token_id=eos,
                           pad_token_id=eos, output_scores=True, return_dict_in_generate=True)
    want = []
    for row in out.sequences[:, len(prompt):].tolist():
        want.append(row[: row.index(eos) + 1] if eos in row else row)
    beams = beam_search(ours, prompt, num_beams=n, length_penalty=lp, early_stopping=early, max_new_tokens=new,
                        eos_ids=[eos])
    assert [b.token_ids for b in beams] == want
    np.testing.assert_allclose([b.score for b in beams], out.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------ score

def test_score_gives_each_token_its_log_probability():
    model = bigram_model(tokenizer=TOK)
    text = "Q: héllo"
    s = score(model, text, top_n=3)
    ids = TOK.encode(text)
    logits = model.forward(ids).astype(np.float64)
    assert s.token_ids == ids and s.tokens[0].logprob is None and s.text == text
    lps = []
    for i in range(1, len(ids)):
        row = logits[i - 1] - logits[i - 1].max()
        row -= math.log(np.exp(row).sum())
        lps.append(row[ids[i]])
        t = s.tokens[i]
        assert t.logprob == pytest.approx(row[ids[i]], abs=1e-12)
        assert t.rank == 1 + int((row > row[ids[i]]).sum())
        assert [a.token for a in t.top] == np.argsort(-row)[:3].tolist()
    assert s.sum_logprob == pytest.approx(sum(lps))
    assert s.perplexity == pytest.approx(math.exp(-sum(lps) / len(lps)))
    many = score(model, [text, "abc"])
    assert [m.token_ids for m in many] == [ids, TOK.encode("abc")]
    assert many[0].sum_logprob == pytest.approx(s.sum_logprob)
    assert score(model, ids).sum_logprob == pytest.approx(s.sum_logprob)
    with pytest.raises(ValueError, match="text"):
        score(model, "a")


def test_score_agrees_with_generation_log_probabilities():
    model = bigram_model(tokenizer=TOK)
    g = generate(model, "Q:", max_new_tokens=10, seed=9, ignore_eos=True, logprobs=True)
    s = score(model, g.prompt_ids + g.token_ids)
    np.testing.assert_allclose([t.logprob for t in s.tokens[len(g.prompt_ids):]], [st.logprob for st in g.steps],
                               atol=1e-12)


# ------------------------------------------------------ the real engine

@pytest.fixture(scope="module")
def stories():
    return tokentrail.load(require_stories() / "stories260K.bin")


def test_engine_generation_logprobs_match_full_forward_scores(stories):
    g = generate(stories, "Once upon a time", max_new_tokens=40, seed=11, temperature=0.8, top_p=0.95,
                 logprobs=True, top_n=2)
    assert g.token_ids and g.text
    s = score(stories, g.prompt_ids + g.token_ids)
    # KV-cache decoding vs one full forward: float32 agreement
    np.testing.assert_allclose([t.logprob for t in s.tokens[len(g.prompt_ids):]], [st.logprob for st in g.steps],
                               atol=2e-4)
    again = stories.generate("Once upon a time", max_new_tokens=40, seed=11, temperature=0.8, top_p=0.95)
    assert again.token_ids == g.token_ids and again.text == g.text


def test_engine_greedy_equals_one_beam_and_stops(stories):
    greedy = generate(stories, "Lily went to", max_new_tokens=25, temperature=0)
    beams = beam_search(stories, stories.tokenizer.encode("Lily went to"), num_beams=1, max_new_tokens=25,
                        early_stopping=True)
    assert beams[0].token_ids == greedy.token_ids
    cut = generate(stories, "Lily went to", max_new_tokens=25, temperature=0, stop=["."])
    full = greedy.text
    if "." in full:
        assert cut.text == full[: full.index(".")] and cut.finish_reason == "stop"
    else:
        assert cut.text == full
    wide = beam_search(stories, stories.tokenizer.encode("Lily went to"), num_beams=4, max_new_tokens=12)
    assert len(wide) == 4 and wide == sorted(wide, key=lambda b: -b.score)
    assert [r.perplexity > 1 for r in score(stories, ["Once upon a time", "The cat sat."])] == [True, True]


def test_long_stream_equals_the_decoded_ids():
    """Past the stream decoder's window (it keeps only recent ids), the pieces still add up exactly."""
    import tokentrail as tt

    model = tt.load()
    kw = dict(max_new_tokens=150, temperature=1.0, seed=11, ignore_eos=True)
    result = model.generate("The storm is", **kw)
    pieces = [s.text for s in model.generate("The storm is", stream=True, **kw)]
    prompt = model.encode("The storm is")
    full = model.tokenizer.decode(prompt + result.token_ids)
    assert len(result.token_ids) == 150
    assert "".join(pieces) == result.text
    assert full == model.tokenizer.decode(prompt) + result.text

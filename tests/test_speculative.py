"""Speculative decoding: exactly plain decoding's output, greedy token for token and sampled in distribution.

References: plain `generate` on the same target (greedy), and the exact distribution plain sampling
draws from (the target's logits through generate's processor chain) for a chi-square test of the
sampled tokens; the real stories260K model, the bundled demo model and tiny random models.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import tokentrail
from conftest import REPO, STORIES, require, require_stories
from tokentrail import _core, generation, speculative
from tokentrail.cli import main
from tokentrail.errors import InvalidArgumentError, OptionError
from tokentrail.sampling import softmax
from tokentrail.speculative import MAX_K, DraftModel, PromptLookup

GEMM_MIN_ROWS = _core.GEMM_MIN_ROWS
DEMO = REPO / "python" / "tokentrail" / "models" / "demo"
STORY_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
DEMO_PROMPT = "The storm is"


def tiny_random(directory: Path, seed: int, vocab: int = 6, scale: float = 6.0, context: int = 64):
    """A random two-layer Llama of `vocab` tokens (no tokenizer) saved by transformers; the output
    matrix is scaled so that the next-token distributions are far from uniform."""
    torch = require("torch")
    tf = require("transformers")
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(directory, safe_serialization=True)
    return tokentrail.load(directory)


@pytest.fixture(scope="module")
def stories():
    path = require_stories() / "stories260K.bin"
    return {dtype: tokentrail.load(path, dtype=dtype) for dtype in (None, "q4_0", "q8_0")}


@pytest.fixture(scope="module")
def demo():
    return {dtype: tokentrail.load(dtype=dtype) for dtype in (None, "q4_0", "q8_0")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random target with 40 tokens, its q4_0 copy, and another random model as a poor draft."""
    target = tiny_random(tmp_path_factory.mktemp("target"), seed=0, vocab=40, scale=3.0, context=128)
    other = tiny_random(tmp_path_factory.mktemp("other"), seed=1, vocab=40, scale=3.0, context=128)
    return {None: target, "q4_0": tokentrail.load(target.source, dtype="q4_0"), "other": other}


def test_verification_rows_are_bitwise_single_steps(stories, demo):
    """The core's logits for a position are the same bits whether the position is fed alone or
    with up to MAX_K others: the ground greedy identity stands on."""
    f16_cache = {"kv f16": tokentrail.load(kv_dtype="f16")}
    for models, prompt in ((stories, STORY_PROMPT), (demo, DEMO_PROMPT), (f16_cache, DEMO_PROMPT)):
        for model in models.values():
            ids = model.encode(prompt)
            cont = [int(t) for t in np.random.default_rng(0).integers(3, model.config.vocab_size, MAX_K + 1)]
            one = model.session()
            alone = np.stack([one.feed(ids)] + [one.feed([t]) for t in cont])
            together = model.session()
            together.feed(ids)
            np.testing.assert_array_equal(together.feed(cont, all_logits=True), alone[1:])
            # A short prompt verified with the first proposals: the prompt's rows are those of it alone.
            short = cont[:GEMM_MIN_ROWS - 1 - len(ids)]
            np.testing.assert_array_equal(model.session().feed(ids + short, all_logits=True)[len(ids) - 1:],
                                          alone[:len(short) + 1])


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_int8_activation_targets_verify_below_the_int8_path(stories, dtype):
    """A target with int8 activations (exact=False) takes another kernel from INT8_MIN_ROWS rows: its
    verifications stay below that, so greedy output is still its plain greedy output. Where the int8
    kernels give every row count the same results for its weights (Q8_0 with AVX-512 VNNI), the full
    MAX_K proposals are allowed, and greedy output is still the plain one."""
    from tokentrail import _core
    from tokentrail.speculative import max_k_for

    path = require_stories() / "stories260K.bin"
    target = tokentrail.load(path, dtype=dtype, exact=False)
    if _core.int8_every_row_count(dtype):
        assert max_k_for(target) == MAX_K
    else:
        assert max_k_for(target) == int(_core.INT8_MIN_ROWS) - 2 < MAX_K
    plain = target.generate(STORY_PROMPT, 60, temperature=0, ignore_eos=True)
    for k, adaptive in ((max_k_for(target), False), (2, True)):
        gen = target.generate(STORY_PROMPT, 60, temperature=0, ignore_eos=True, draft=target,
                              speculative_k=k, speculative_adaptive=adaptive)
        assert gen.token_ids == plain.token_ids and gen.speculation.accepted == gen.speculation.proposed
    if max_k_for(target) < MAX_K:
        with pytest.raises(InvalidArgumentError, match="int8 activations"):
            target.generate(STORY_PROMPT, 4, draft=target, speculative_k=max_k_for(target) + 1)


def _check_steps(gen, proposer: str) -> None:
    """Per-token fields: a kept proposal is the token; a replaced one differs from it."""
    for step in gen.steps:
        if step.proposed_by is None:
            assert step.accepted is None and step.proposed is None
            continue
        assert step.proposed_by == proposer
        assert (step.token == step.proposed) == step.accepted
    stats = gen.speculation
    assert stats.accepted == sum(bool(s.accepted) for s in gen.steps)
    assert stats.proposed == sum(s.proposed_by is not None for s in gen.steps)
    assert stats.emitted == len(gen.token_ids)


@pytest.mark.parametrize("which", ["stories", "demo", "tiny"])
def test_greedy_output_is_plain_greedy(which, request):
    models = request.getfixturevalue(which)
    target = models[None]
    prompt = {"stories": STORY_PROMPT, "demo": DEMO_PROMPT, "tiny": [1, 5, 9, 1, 5, 9, 1, 5]}[which]
    n = 80
    plain = target.generate(prompt, n, temperature=0, ignore_eos=True)
    drafts = {"itself": target, "q4_0": models["q4_0"], "lookup": "prompt-lookup"}
    drafts["q8_0" if which != "tiny" else "other"] = models["q8_0" if which != "tiny" else "other"]
    for name, draft in drafts.items():
        for k, adaptive in ((1, False), (4, False), (7, True)):
            gen = target.generate(prompt, n, temperature=0, ignore_eos=True, draft=draft, speculative_k=k,
                                  speculative_adaptive=adaptive)
            assert gen.token_ids == plain.token_ids, (name, k)
            assert gen.text == plain.text
            _check_steps(gen, "prompt-lookup" if name == "lookup" else "draft")
            if name == "itself":  # the target drafting for itself is never refused
                assert gen.speculation.accepted == gen.speculation.proposed > 0
                if k > 1:
                    assert gen.speculation.tokens_per_round > 1.9
    # A q4_0 draft of a trained model agrees with it most of the time.
    if which != "tiny":
        gen = target.generate(prompt, n, temperature=0, ignore_eos=True, draft=models["q4_0"])
        assert gen.speculation.acceptance_rate > 0.5


def test_greedy_with_penalties_and_every_ending(demo):
    """Processors that depend on the tokens so far are applied per position; every finish reason
    (eos, stop string, length, full context) falls where plain decoding puts it."""
    target, draft = demo[None], demo["q4_0"]
    cases = [dict(max_new_tokens=60, repetition_penalty=1.3, no_repeat_ngram_size=3, temperature=0),
             dict(max_new_tokens=60, temperature=0),                      # ends with EOS
             dict(max_new_tokens=60, temperature=0, stop=["the hills", "quiet"]),
             dict(max_new_tokens=7, temperature=0, ignore_eos=True),
             dict(max_new_tokens=2, temperature=0), dict(max_new_tokens=1, temperature=0),
             dict(max_new_tokens=0, temperature=0),
             dict(max_new_tokens=30, temperature=0, logprobs=True, top_n=3)]
    for options in cases:
        plain = target.generate(DEMO_PROMPT, **options)
        for d in (draft, "prompt-lookup", target):
            gen = target.generate(DEMO_PROMPT, draft=d, speculative_k=5, **options)
            assert (gen.token_ids, gen.text, gen.finish_reason, gen.stop_string) == \
                   (plain.token_ids, plain.text, plain.finish_reason, plain.stop_string), options
            for a, b in zip(gen.steps, plain.steps):
                assert (a.text, a.logprob, a.rank, a.finish_reason) == (b.text, b.logprob, b.rank, b.finish_reason)
                assert [t.token for t in a.top_model] == [t.token for t in b.top_model]
    # A short context: the last positions are verified with fewer proposals, then "context".
    short = tokentrail.load(context=20)
    plain = short.generate(DEMO_PROMPT, 64, temperature=0, ignore_eos=True)
    assert plain.finish_reason == "context"
    for d in (tokentrail.load(dtype="q4_0", context=12), "prompt-lookup", short):
        gen = short.generate(DEMO_PROMPT, 64, temperature=0, ignore_eos=True, draft=d, speculative_k=6)
        assert (gen.token_ids, gen.finish_reason) == (plain.token_ids, "context")


def test_streaming_lists_and_several_sequences(demo):
    target, draft = demo[None], demo["q4_0"]
    whole = target.generate(DEMO_PROMPT, 40, temperature=0, draft=draft)
    stream = target.generate(DEMO_PROMPT, 40, temperature=0, draft=draft, stream=True)
    steps = list(stream)
    assert [s.token for s in steps] == whole.token_ids and "".join(s.text for s in steps) == whole.text
    assert [(s.proposed, s.accepted) for s in steps] == [(s.proposed, s.accepted) for s in whole.steps]
    assert stream.speculation.proposed == whole.speculation.proposed > 0
    prompts = [DEMO_PROMPT, "Tess kept", "Ben"]
    plain = target.generate(prompts, 20, temperature=0)
    together = target.generate(prompts, 20, temperature=0, draft="prompt-lookup", speculative_k=3)
    assert [g.token_ids for g in together] == [g.token_ids for g in plain]
    mixed = target.generate(prompts, 20, temperature=0, per_prompt=[{"draft": draft}, {}, {"draft": target}])
    assert [g.token_ids for g in mixed] == [g.token_ids for g in plain]
    assert [g.speculation is None for g in mixed] == [False, True, False]
    # Sampled sequences: reproducible from the seed, each with its own speculation.
    first = target.generate(DEMO_PROMPT, 20, temperature=0.9, seed=5, num_return_sequences=3, draft=draft)
    again = target.generate(DEMO_PROMPT, 20, temperature=0.9, seed=5, num_return_sequences=3, draft=draft)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert len({tuple(g.token_ids) for g in first}) > 1
    assert all(g.speculation is not None and g.speculation.proposed > 0 for g in first)


def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's goodness-of-fit p-value, cells expecting fewer than 5 pooled into one."""
    stats = require("scipy.stats")
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    statistic = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(stats.chi2.sf(statistic, int(keep.sum()) - 1))


def _exact_pairs(model, prompt: list[int], options: dict) -> np.ndarray:
    """P(first token = a, second token = b) of plain sampling: generate's chain on the model's logits."""
    chain = generation.sampling_config(model, options).build()
    vocab = model.config.vocab_size
    first = softmax(chain(model.forward(prompt)[-1], prompt))
    joint = np.zeros((vocab, vocab))
    for a in np.flatnonzero(first):
        context = prompt + [int(a)]
        joint[a] = first[a] * softmax(chain(model.forward(context)[-1], context))
    return joint


# Significance of the distribution tests: with fixed seeds each is deterministic; a correct
# implementation fails one with probability 0.001 over the choice of seeds.
ALPHA = 1e-3
SAMPLES = 4000


@pytest.mark.parametrize("proposer, k", [("random draft", 1), ("random draft", 3), ("q4_0 draft", 2),
                                         ("prompt-lookup", 2)])
def test_sampled_tokens_follow_plain_sampling_exactly(tmp_path_factory, proposer, k):
    """Empirical frequencies of the (first, second) generated tokens against the exact distribution
    of plain sampling, over a 6-token vocabulary; the penalties make the second position depend on
    the first. The draft's own distribution is checked to be far enough off for the test to see
    a wrong acceptance rule."""
    target = tiny_random(tmp_path_factory.mktemp("t"), seed=0)
    drafts = {"random draft": lambda: tiny_random(tmp_path_factory.mktemp("d"), seed=1),
              "q4_0 draft": lambda: tokentrail.load(target.source, dtype="q4_0"),
              "prompt-lookup": lambda: "prompt-lookup"}
    draft = drafts[proposer]()
    prompt = [1, 2, 3, 1, 2, 0, 1, 2]
    options = dict(temperature=1.3, top_k=5, repetition_penalty=1.8)
    exact = _exact_pairs(target, prompt, options)
    counts = np.zeros_like(exact)
    tested = refused = 0
    for seed in range(SAMPLES):
        gen = target.generate(prompt, 2, seed=seed, draft=draft, speculative_k=k, **options)
        counts[gen.token_ids[0], gen.token_ids[1]] += 1
        tested += gen.speculation.proposed
        refused += gen.speculation.proposed - gen.speculation.accepted
    assert counts[exact == 0].sum() == 0  # nothing outside the support
    assert tested > SAMPLES // 2 and refused > SAMPLES // 100  # both branches of the rule were taken
    p_joint = _chi_square_p(counts.ravel(), SAMPLES * exact.ravel())
    p_first = _chi_square_p(counts.sum(axis=1), SAMPLES * exact.sum(axis=1))
    p_second = _chi_square_p(counts.sum(axis=0), SAMPLES * exact.sum(axis=0))
    assert min(p_joint, p_first, p_second) > ALPHA, (p_joint, p_first, p_second)
    if not isinstance(draft, str) and proposer == "random draft":
        # Power: had the draft's tokens been kept as they are, the statistic would be huge.
        wrong = _exact_pairs(draft, prompt, options)
        expected = SAMPLES * exact.ravel()
        assert ((SAMPLES * wrong.ravel()) ** 2 / np.where(expected > 0, expected, np.inf)).sum() - SAMPLES > 500


def test_prompt_lookup_proposes_the_latest_continuation():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    assert lookup.propose([5, 6, 7, 8, 1, 5, 6, 7, 9, 5, 6, 7], 3).tokens == [9, 5, 6]  # latest match of 5 6 7
    assert lookup.propose([5, 6, 7, 8, 4, 6, 7], 4).tokens == [8, 4, 6, 7]  # 6 7 matched
    assert lookup.propose([1, 2, 3, 4], 2).tokens == []
    assert lookup.propose([1, 2, 1], 5).tokens == [2, 1]  # up to the end of the text
    assert lookup.propose([3, 3, 3, 3, 3], 3).tokens == [3, 3]  # a short cycle: the longest continuation
    assert lookup.propose([4, 1, 2, 9, 9, 9, 1, 2, 7, 1, 2], 4).tokens == [9, 9, 9, 1]  # the latest with 4
    assert PromptLookup(max_ngram=2, min_ngram=2).propose([3, 1, 4, 1], 2).tokens == []
    with pytest.raises(InvalidArgumentError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)
    with pytest.raises(InvalidArgumentError, match="max_ngram"):
        PromptLookup(max_ngram=0)


def test_mismatched_vocabulary_is_refused(demo, stories, tmp_path, tiny):
    target = demo[None]
    with pytest.raises(InvalidArgumentError, match="vocabulary has 512 tokens and the target's 662"):
        target.generate(DEMO_PROMPT, 5, draft=stories[None])
    # Same size, two tokens' ids swapped.
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(DEMO / f, tmp_path / f)
    tok = json.loads((DEMO / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = (next(w for w, i in vocab.items() if i == n) for n in (300, 301))
    vocab[first], vocab[second] = 301, 300
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    swapped = tokentrail.load(tmp_path)
    with pytest.raises(InvalidArgumentError, match=f"token 300 is {second!r} for the draft and {first!r}"):
        target.generate(DEMO_PROMPT, 5, draft=swapped)
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        tiny[None].generate([1, 2], 5, draft=target)  # 40 tokens and no tokenizer vs the demo's


def test_options_are_checked(demo):
    target, draft = demo[None], demo["q4_0"]
    for k in (0, -1, MAX_K + 1, 1.5, True, "4"):
        with pytest.raises(InvalidArgumentError, match="speculative_k"):
            target.generate(DEMO_PROMPT, 5, draft=draft, speculative_k=k)
    with pytest.raises(OptionError, match="give draft= too"):
        target.generate(DEMO_PROMPT, 5, speculative_k=3)
    with pytest.raises(OptionError, match="give draft= too"):
        target.generate(DEMO_PROMPT, 5, speculative_adaptive=True)
    with pytest.raises(InvalidArgumentError, match="speculative_adaptive"):
        target.generate(DEMO_PROMPT, 5, draft=draft, speculative_adaptive="yes")
    for bad in ("lookup", 3, str(DEMO)):
        with pytest.raises(OptionError, match="draft: expected a tokentrail Model"):
            target.generate(DEMO_PROMPT, 5, draft=bad)
    with pytest.raises(InvalidArgumentError, match="beam search"):
        target.generate(DEMO_PROMPT, 5, draft=draft, num_beams=2)
    with pytest.raises(InvalidArgumentError, match="hooks"):
        target.generate(DEMO_PROMPT, 5, draft=draft, hooks=target.hooks())
    with pytest.raises(OptionError, match="speculative decoding runs inside generate"):
        generation.start_run(target, DEMO_PROMPT, 5, draft=draft)
    with pytest.raises(OptionError, match="expected a tokentrail Model"):
        DraftModel("model.gguf")
    # The objects themselves are accepted too.
    gen = target.generate(DEMO_PROMPT, 12, temperature=0, draft=PromptLookup(max_ngram=2), speculative_k=2)
    assert gen.token_ids == target.generate(DEMO_PROMPT, 12, temperature=0).token_ids
    assert speculative.as_proposer(draft).model is draft


def test_cli_flags(capsys):
    plain = tokentrail.load().generate(DEMO_PROMPT, max_new_tokens=24, temperature=0).text
    for flags in (["--draft-dtype", "q4_0", "--draft-max", "3"], ["-md", str(DEMO), "--draft-adaptive"],
                  ["--prompt-lookup", "--draft", "6"]):
        assert main(["generate", DEMO_PROMPT, "-n", "24", "--temp", "0", *flags]) == 0
        out, err = capsys.readouterr()
        assert out == DEMO_PROMPT + plain + "\n"
        assert "speculative (" in err and "accepted" in err
    assert main(["generate", DEMO_PROMPT, "-n", "8", "--temp", "0", "--draft-dtype", "q4_0", "--show-probs"]) == 0
    out, _ = capsys.readouterr()
    assert "draft: proposed" in out
    assert main(["generate", DEMO_PROMPT, "-n", "8", "--temp", "0", "--prompt-lookup", "--show-draft"]) == 0
    out, _ = capsys.readouterr()
    assert out.replace("\n", "") == (DEMO_PROMPT + tokentrail.load().generate(DEMO_PROMPT, 8, temperature=0).text)
    wrong = [(["-md", str(STORIES / "stories260K.bin")], "vocabulary")] if STORIES.exists() else []
    for flags, message in [(["--draft-max", "3"], "--draft-max"), (["--show-draft"], "--show-draft"),
                           (["--prompt-lookup", "--draft-dtype", "q4_0"], "--prompt-lookup"),
                           (["--prompt-lookup", "--draft-max", "0"], "positive integer"),
                           (["--prompt-lookup", "--num-beams", "2"], "beam search")] + wrong:
        assert main(["generate", DEMO_PROMPT, "-n", "4", *flags]) == 2, flags
        _, err = capsys.readouterr()
        assert message in err, (flags, err)

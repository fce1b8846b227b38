"""`model.generate` with sampling against raw `Session.feed` decoding, same model, same tokens, one run.

    python bench/generate_vs_feed.py [--shapes smollm,qwen2.5-0.5b] [--types f16,q8_0]

Random weights in the shape of a real model (bench/shapes.py). For every
shape and weight type, `generate` samples `--new` tokens (temperature 0.8,
top-k 40, top-p 0.95) and the same tokens are then fed one by one to a fresh
session after the same prompt: the decode rate of `generate` (tokens after the
first, per second after the first) is divided by the rate of the bare feeds.
The two are interleaved repeat by repeat (ABBA); reported are the ratio of
the fastest runs of each (the least disturbed by other work), the median of
the pairs' ratios, the median ratio in CPU time of the process (less disturbed by
other work on a busy machine; the core's idle threads sleep instead of spinning) and the time one sampler step takes alone on the core
path and on the Python reference path (`Sampler(core=False)`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from shapes import make_model

OPTIONS = dict(temperature=0.8, top_k=40, top_p=0.95)


def feed_rate(model, prompt: list[int], tokens: list[int]) -> tuple[float, float]:
    """Tokens per second (wall, CPU) of feeding `tokens[:-1]` one by one after `prompt` (what generate feeds)."""
    session = model.session()
    session.feed(prompt)
    wall, cpu = time.perf_counter(), time.process_time()
    for t in tokens[:-1]:
        session.feed([t])
    n = len(tokens) - 1
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def generate_rate(model, prompt: list[int], new: int, seed: int) -> tuple[float, float, list[int]]:
    """Tokens per second (wall, CPU) of generate's decoding, and its tokens.

    The wall rate is generate's own (tokens after the first, per second after
    the first); the CPU time of the whole call is scaled by the same share."""
    cpu = time.process_time()
    g = model.generate(prompt, max_new_tokens=new, seed=seed, ignore_eos=True, **OPTIONS)
    cpu = time.process_time() - cpu
    t = g.timings
    share = t.generation_seconds / (t.first_token_seconds + t.generation_seconds)
    return t.generation_tokens_per_second, (t.generated_tokens - 1) / (cpu * share), g.token_ids


def sampler_step_ms(vocab: int, core: bool, steps: int = 100) -> float:
    """The median time of one sampler step at this vocabulary size, in ms."""
    from tokentrail.sampling import Sampler

    rng = np.random.default_rng(1)
    logits = [(rng.standard_normal(vocab) * 3).astype(np.float32) for _ in range(8)]
    sampler = Sampler(seed=0, core=core, **OPTIONS)
    history = rng.integers(0, vocab, 64).tolist()
    for x in logits:
        sampler.step(x, history)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        sampler.step(logits[i % len(logits)], history)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smollm,qwen2.5-0.5b")
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4, help="generate/feed pairs per model (ABBA order)")
    args = ap.parse_args()

    import tokentrail

    rows = []
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            make_model(shape, Path(tmp))
            for dtype in args.types.split(","):
                model = tokentrail.load(tmp, dtype=dtype, threads=args.threads, progress=False)
                vocab = model.config.vocab_size
                prompt = np.random.default_rng(0).integers(0, vocab - 1, args.prompt).tolist()
                *_, tokens = generate_rate(model, prompt, args.new, 0)  # warm-up; the tokens seed 0 gives
                gen, fed, ratios, cpu_ratios = [], [], [], []
                for r in range(args.repeats):
                    if r % 2 == 0:
                        g, g_cpu, again = generate_rate(model, prompt, args.new, 0)
                        f, f_cpu = feed_rate(model, prompt, tokens)
                    else:
                        f, f_cpu = feed_rate(model, prompt, tokens)
                        g, g_cpu, again = generate_rate(model, prompt, args.new, 0)
                    assert again == tokens, "the same seed gave other tokens"
                    gen.append(g)
                    fed.append(f)
                    ratios.append(g / f)
                    cpu_ratios.append(g_cpu / f_cpu)
                    print(f"  {shape} {dtype} pair {r}: generate {g:.1f} tok/s, feed {f:.1f} tok/s, "
                          f"ratio {g / f:.3f} (CPU time {g_cpu / f_cpu:.3f})", flush=True)
                # The fastest run of each is the one least disturbed by other work.
                row = (shape, dtype, vocab, max(gen), max(fed), max(gen) / max(fed), statistics.median(ratios),
                       statistics.median(cpu_ratios))
                rows.append(row)
                print(f"{shape} {dtype}: best generate {row[3]:.1f} tok/s, best feed {row[4]:.1f} tok/s, "
                      f"ratio {row[5]:.3f}; median of pairs {row[6]:.3f}; CPU time {row[7]:.3f}", flush=True)
                del model
    steps = {v: (sampler_step_ms(v, True), sampler_step_ms(v, False)) for v in sorted({r[2] for r in rows})}

    load = os.getloadavg()
    print()
    print(f"{args.threads} threads, prompt {args.prompt}, {args.new} new tokens, sampling {OPTIONS}, "
          f"{args.repeats} interleaved pairs, {cpu_name()}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
          f"{time.strftime('%Y-%m-%d')}")
    print()
    print("| shape | weights | generate, best (tok/s) | Session.feed, best (tok/s) | generate / feed, best | "
          "median of pairs, wall | median of pairs, CPU time | sampler step, core / Python (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, dtype, vocab, g, f, best, median, cpu in rows:
        core_ms, ref_ms = steps[vocab]
        print(f"| {shape} | {dtype} | {g:.1f} | {f:.1f} | {best:.3f} | {median:.3f} | {cpu:.3f} | "
              f"{core_ms:.3f} / {ref_ms:.3f} |")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()

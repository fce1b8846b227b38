"""Batched generation: 32 prompts advanced together against the same 32 prompts one call each.

    python bench/batch_generate.py [--shape smollm] [--types f32,q8_0] [--prompts 32] [--new 32]
                                   [--threads 2] [--repeats 3] [--no-exact] [--model DIR]

A random-weight model in the shape of a real one (SmolLM2-135M by default,
bench/shapes.py) is loaded in each weight type. Prompts are random token ids
of 8 to 24 tokens (a fixed seed); both ways decode greedily for `--new`
tokens with end-of-sequence ignored, so both produce exactly the same tokens
(checked; but see --no-exact) and the same amount of work is asked of them.
Figures are medians over repeats after a warm-up (bench/timing.py).

`model.generate([p1, ..., p32])` advances every sequence in each step of the
core (Model.forward_batch): the weights are read once per step for all 32
rows. The 32 single calls read them once per token. "step" is the core alone:
one decode step of all the sequences through forward_batch, against the same
sequences stepped one by one with Session.feed.

`--threads` is the thread count of every core call (both ways); `--no-exact`
loads the model with exact=False, so that quantized products over several
rows round the activations to int8 (see tokentrail.load): the batched steps
do, a single call's one-token decode steps do not, so the two ways may then
choose different tokens ("same tokens" counts the sequences that agree).
`--model` takes a model directory instead of a fresh random one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from shapes import make_model


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of `fn` over repeats, after a warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def core_steps(model, prompts: list[list[int]], repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, CPU) seconds of one decode step of every sequence: together (forward_batch), one by one (feed)."""
    sessions = [model.session() for _ in prompts]
    model.forward_batch(sessions, prompts)
    tokens = [[int(p[-1])] for p in prompts]
    marks = [s.pos for s in sessions]

    def rewind():
        for s, m in zip(sessions, marks):
            s.rewind(m)

    def together():
        rewind()
        model.forward_batch(sessions, tokens)

    def alone():
        rewind()
        for s, t in zip(sessions, tokens):
            s.feed(t)

    return timed(together, repeats), timed(alone, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm", help="a shape of bench/shapes.py")
    ap.add_argument("--types", default="f32,q8_0", help="weight types, comma-separated")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per prompt")
    ap.add_argument("--threads", type=int, default=2, help="threads of every core call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="a model directory to use instead of a fresh random one of --shape")
    ap.add_argument("--no-exact", dest="exact", action="store_false",
                    help="load with exact=False: quantized products round activations to int8")
    ap.add_argument("--repack", action=argparse.BooleanOptionalAction, default=None,
                    help="the row-lane copy of q8_0 matrices (see tokentrail.load; default: where the CPU has it)")
    args = ap.parse_args()

    import tokentrail
    from tokentrail import _core

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            tmp = args.model
        else:
            make_model(args.shape, Path(tmp))
        for dtype in args.types.split(","):
            model = tokentrail.load(tmp, dtype=dtype, threads=args.threads, progress=False, exact=args.exact,
                                    repack=args.repack)
            vocab = model.config.vocab_size
            prompts = [[int(t) for t in rng.integers(0, vocab - 1, int(rng.integers(8, 25)))]
                       for _ in range(args.prompts)]
            options = dict(max_new_tokens=args.new, do_sample=False, ignore_eos=True)
            batched = model.generate(prompts, **options)
            if _core.get_threads() != args.threads:  # the count each core call of the model sets
                raise SystemExit(f"the core ran with {_core.get_threads()} threads, not --threads {args.threads}")
            single = [model.generate(p, **options) for p in prompts]
            agree = sum(b.token_ids == s.token_ids for b, s in zip(batched, single))
            same = "yes" if agree == len(prompts) else f"{agree}/{len(prompts)} sequences"
            t_batch, c_batch = timed(lambda: model.generate(prompts, **options), args.repeats)
            t_single, c_single = timed(lambda: [model.generate(p, **options) for p in prompts], args.repeats)
            (step_together, _), (step_alone, _) = core_steps(model, prompts, max(5, args.repeats))
            n = args.prompts * args.new
            rows.append((dtype, n / t_single, n / t_batch, t_single / t_batch, c_single / c_batch,
                         step_alone * 1e3, step_together * 1e3, same))
            print(f"{dtype}: {n} tokens; single calls {t_single:.2f} s ({c_single:.2f} CPU s), batched "
                  f"{t_batch:.2f} s ({c_batch:.2f} CPU s): {t_single / t_batch:.2f}x wall, "
                  f"{c_single / c_batch:.2f}x CPU; one decode step of {args.prompts}: {step_alone * 1e3:.1f} ms "
                  f"one by one, {step_together * 1e3:.1f} ms together; same tokens: {same}", flush=True)
            model_repacked = model.repacked
            del model

    print()
    source = args.model or f"{args.shape} shape"
    print(f"{source}, {args.prompts} prompts of 8-24 tokens, {args.new} new tokens each (greedy), "
          f"{args.threads} threads, {'exact' if args.exact else 'int8 activations (exact=False)'}, "
          f"{'q8_0 repacked' if model_repacked else 'no q8_0 copy'}, {cpu_name()}, "
          f"load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d')}")
    print()
    print(f"| weights | {args.prompts} single calls (tokens/s) | one batched call (tokens/s) | speed-up (wall) | "
          f"speed-up (CPU time) | decode step of {args.prompts}, one by one (ms) | together (ms) | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype, single, batch, speedup, cpu_speedup, alone, together, same in rows:
        print(f"| {dtype} | {single:.0f} | {batch:.0f} | {speedup:.2f}x | {cpu_speedup:.2f}x | {alone:.1f} | "
              f"{together:.1f} | {same} |")

if __name__ == "__main__":
    main()

"""Speculative decoding against plain decoding of the same target: tokens/s and acceptance.

    python bench/speculative.py [--targets stories,demo] [--shape smollm] [--new 96] [--k 4]
                                [--threads 1] [--repeats 3] [--temperature 0]

Targets: the real stories260K model (../shared/models/stories260K) and the
bundled demo model, both float32 and trained, so that a draft's agreement
means something; `--shape smollm` adds a random-weight model in the
SmolLM2-135M shape (bench/shapes.py) in f16, where a forward step costs
enough for the verification's batching to show, but whose acceptance says
nothing (random weights have near-flat, arbitrary preferences).

Drafts per target:
  q4_0      the target converted to q4_0 at load (self-speculation through quantization)
  itself    the target drafting for itself: every proposal is kept, the acceptance upper bound
  lookup    prompt lookup, on a repetitive prompt (the model's own continuation of the story
            prompt, then the story prompt again, so that the text goes on repeating)
Each row is generated greedily (or at --temperature) with end-of-sequence ignored, so every
variant makes `--new` tokens; greedy rows are checked to give the plain tokens. The variants
are interleaved in every repeat; figures are medians. "verify/step" is the core alone: one
verification step of k+1 rows against one decode step of one row (Session.feed), the cost that
bounds the speed-up a free draft with full acceptance could give.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tokentrail

REPO = Path(__file__).resolve().parents[1]
STORIES = Path(os.environ.get("TOKENTRAIL_SHARED", REPO.parent / "shared")) / "models" / "stories260K"
PROMPTS = {"stories": "Once upon a time, there was a little girl named Lily. She loved to",
           "demo": "The storm is"}


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")), "?")
    return f"{name}, {os.cpu_count()} cores, kernels {tokentrail._core.isa()}"


def load_target(name: str, threads: int, workdir: Path):
    if name == "stories":
        return tokentrail.load(STORIES / "stories260K.bin", threads=threads)
    if name == "demo":
        return tokentrail.load(threads=threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from shapes import make_model

    directory = workdir / name
    make_model(name, directory)
    return tokentrail.load(directory, dtype="f16", threads=threads)


def step_costs(model, prompt: list[int], k: int, repeats: int = 20) -> tuple[float, float]:
    """Median seconds of a one-row decode step and of a (k+1)-row verification step."""
    session = model.session()
    session.feed(prompt)
    base = session.pos
    rows = [prompt[-1]] * (k + 1)

    def one(n: int) -> float:
        t = time.perf_counter()
        session.feed(rows[:n], all_logits=n > 1)
        elapsed = time.perf_counter() - t
        session.rewind(base)
        return elapsed

    single = statistics.median(one(1) for _ in range(repeats))
    verify = statistics.median(one(k + 1) for _ in range(repeats))
    return single, verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="stories,demo")
    ap.add_argument("--shape", default=None, help="also a random-weight model of this shape (bench/shapes.py)")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args()
    names = [t for t in args.targets.split(",") if t] + ([args.shape] if args.shape else [])
    print(f"machine: {machine()}; threads {args.threads}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"{args.new} new tokens, k={args.k}, temperature {args.temperature}, median of {args.repeats}\n")
    print("| target | draft | tokens/s | vs plain | acceptance | tokens per target step | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            target = load_target(name, args.threads, Path(work))
            q4 = tokentrail.load(target.source, dtype="q4_0", threads=args.threads)
            prompt = PROMPTS.get(name, "The storm is")  # random-weight shapes: any text
            story = target.generate(prompt, 48, temperature=0, ignore_eos=True).text
            repetitive = prompt + story + "\n" + prompt
            cases = [("plain", prompt, None), ("q4_0", prompt, q4), ("itself", prompt, target),
                     ("plain, repetitive prompt", repetitive, None), ("lookup", repetitive, "prompt-lookup")]
            options = dict(temperature=args.temperature, ignore_eos=True, seed=0)
            times = {c[0]: [] for c in cases}
            results = {}
            for _ in range(args.repeats + 1):  # the first round warms up
                for label, text, draft in cases:
                    extra = {} if draft is None else {"draft": draft, "speculative_k": args.k}
                    t = time.perf_counter()
                    results[label] = target.generate(text, args.new, **options, **extra)
                    times[label].append(time.perf_counter() - t)
            rate = {label: args.new / statistics.median(ts[1:]) for label, ts in times.items()}
            for label, text, draft in cases:
                gen = results[label]
                plain_label = "plain" if text is prompt else "plain, repetitive prompt"
                same = gen.token_ids == results[plain_label].token_ids if args.temperature == 0 else "n/a"
                spec = gen.speculation
                accept = f"{spec.acceptance_rate:.0%}" if spec else ""
                per_step = f"{spec.tokens_per_round:.2f}" if spec else "1"
                print(f"| {name} | {label} | {rate[label]:.0f} | {rate[label] / rate[plain_label]:.2f}x | {accept} "
                      f"| {per_step} | {'yes' if same is True else same if same == 'n/a' else 'NO'} |")
            single, verify = step_costs(target, target.encode(prompt), args.k)
            print(f"| {name} | verify/step: {args.k + 1} rows {verify * 1e3:.2f} ms, 1 row {single * 1e3:.2f} ms "
                  f"| {verify / single:.2f}x | | | | |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

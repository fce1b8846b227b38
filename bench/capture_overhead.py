"""Cost of capturing every point, relative to the plain forward pass, same run.

    python bench/capture_overhead.py [--shape gpt2] [--prompt 128] [--threads 2]

Measures a prefill of `--prompt` tokens and a 32-token greedy decode, each
with no hooks and with every capture point recorded at every position.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from shapes import make_model
from timing import timeit_median


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gpt2")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import tokentrail

    with tempfile.TemporaryDirectory() as tmp:
        make_model(args.shape, Path(tmp))
        model = tokentrail.load(tmp, threads=args.threads)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, args.prompt).tolist()

    def prefill(capture: bool):
        hooks = model.hooks().capture("*") if capture else None
        model.forward(ids, all_positions=False, hooks=hooks)
        return hooks

    def decode(capture: bool):
        hooks = model.hooks().capture("*") if capture else None
        s = model.session()
        logits = s.feed(ids[:8], hooks=hooks)
        for _ in range(args.new):
            logits = s.feed([int(np.argmax(logits))], hooks=hooks)

    plain_p = timeit_median(lambda: prefill(False), args.repeats)
    traced_p = timeit_median(lambda: prefill(True), args.repeats)
    plain_d = timeit_median(lambda: decode(False), args.repeats)
    traced_d = timeit_median(lambda: decode(True), args.repeats)
    recorded = prefill(True).cache.nbytes
    print(f"shape={args.shape} prompt={args.prompt} threads={args.threads} isa={tokentrail._core.isa()}")
    print(f"prefill: plain {plain_p * 1e3:.1f} ms, everything captured {traced_p * 1e3:.1f} ms "
          f"-> {traced_p / plain_p:.2f}x ({recorded / 2**20:.1f} MiB recorded)")
    print(f"decode {args.new} tokens: plain {plain_d * 1e3:.1f} ms, everything captured {traced_d * 1e3:.1f} ms "
          f"-> {traced_d / plain_d:.2f}x")


if __name__ == "__main__":
    main()

"""Prefill and decode speed of tokentrail next to Hugging Face transformers (PyTorch, CPU), same run.

    python bench/e2e_vs_transformers.py [--shape gpt2|smollm] [--threads 2] [--prompt 128] [--new 64]

Random weights in the shape of a real model (the shapes decide the speed).
Figures are medians over repeats; both engines use the same thread count.
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
    ap.add_argument("--shape", default="gpt2", help="gpt2, smollm or tinyllama")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    import tokentrail

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ref = make_model(args.shape, Path(tmp))
        ours = tokentrail.load(tmp, threads=args.threads)
        vocab = ours.config.vocab_size
        prompt = np.random.default_rng(0).integers(0, vocab, args.prompt).tolist()

        def ours_prefill():
            ours.session().feed(prompt)

        def ours_decode():
            s = ours.session()
            logits = s.feed(prompt[:1])
            for _ in range(args.new):
                logits = s.feed([int(np.argmax(logits))])

        def ref_prefill():
            with torch.no_grad():
                ref(torch.tensor([prompt]))

        def ref_decode():
            with torch.no_grad():
                out = ref(torch.tensor([prompt[:1]]), use_cache=True)
                past = out.past_key_values
                for _ in range(args.new):
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    out = ref(nxt, past_key_values=past, use_cache=True)
                    past = out.past_key_values

        rows = []
        for name, prefill, decode in (("tokentrail", ours_prefill, ours_decode),
                                      ("transformers", ref_prefill, ref_decode)):
            tp = timeit_median(prefill, args.repeats)
            td = timeit_median(decode, args.repeats)
            rows.append((name, args.prompt / tp, args.new / td))
    print(f"shape={args.shape} params={ours.n_params / 1e6:.1f}M threads={args.threads} "
          f"prompt={args.prompt} new={args.new} isa={tokentrail._core.isa()}")
    print(f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, p, d in rows:
        print(f"{name:<14}{p:>15.1f}{d:>15.1f}")
    (o, op, od), (_, rp, rd) = rows
    print(f"ratio tokentrail/transformers: prefill {op / rp:.2f}x, decode {od / rd:.2f}x")


if __name__ == "__main__":
    main()

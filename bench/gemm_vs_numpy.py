"""tokentrail's prefill GEMM against numpy's sgemm (OpenBLAS) on the products of real model shapes.

    OPENBLAS_NUM_THREADS=2 python bench/gemm_vs_numpy.py [--threads 2] [--tokens 128,512] \
        [--out bench/results/gemm.json]

Both sides compute y = x @ W^T in float32 with the same thread count, one
side after the other per shape (median of repeats after a warm-up); the report gives GFLOP/s and
tokentrail's ratio to numpy per shape. tokentrail's GEMM packs its weight
panels inside the timed call (as in a forward pass); numpy gets W^T as a view.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from timing import timeit_median

# (model, product, out rows, in cols)
SHAPES = [
    ("gpt2", "qkv/o", 768, 768), ("gpt2", "mlp up", 3072, 768), ("gpt2", "mlp down", 768, 3072),
    ("smollm", "q/o", 576, 576), ("smollm", "k/v", 192, 576), ("smollm", "mlp up", 1536, 576),
    ("smollm", "mlp down", 576, 1536),
    ("tinyllama", "q/o", 2048, 2048), ("tinyllama", "k/v", 256, 2048), ("tinyllama", "mlp up", 5632, 2048),
    ("tinyllama", "mlp down", 2048, 5632),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="128,512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the rows as JSON (read by plot_compare.py)")
    args = ap.parse_args()
    if os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
        print(f"note: set OPENBLAS_NUM_THREADS={args.threads} so that numpy uses the same thread count")
    from tokentrail import _core

    _core.set_threads(args.threads)
    rng = np.random.default_rng(0)
    ratios, rows_out = [], []
    print(f"{'model':>10} {'product':>9} {'rows x cols':>12} {'tokens':>6}  tokentrail GFLOP/s  numpy GFLOP/s  ratio")
    for n in (int(t) for t in args.tokens.split(",")):
        for model, name, rows, cols in SHAPES:
            w = rng.standard_normal((rows, cols)).astype(np.float32)
            x = rng.standard_normal((n, cols)).astype(np.float32)
            wt = w.T
            # Each side in its own block, with a pause between: both thread pools
            # spin for a while after a call, and a spinning pool takes a core
            # from the other (a 2-core machine then shows 10-40x slowdowns).
            ours = timeit_median(lambda: _core.matmul(w, "f32", rows, cols, x), args.repeats)
            time.sleep(0.3)
            theirs = timeit_median(lambda: x @ wt, args.repeats)
            time.sleep(0.3)
            flops = 2.0 * n * rows * cols
            ratios.append(theirs / ours)
            rows_out.append({"model": model, "product": name, "rows": rows, "cols": cols, "tokens": n,
                             "tokentrail_gflops": flops / ours / 1e9, "numpy_gflops": flops / theirs / 1e9})
            print(f"{model:>10} {name:>9} {rows:>5} x {cols:<5} {n:>6}  {flops / ours / 1e9:>17.0f}  "
                  f"{flops / theirs / 1e9:>13.0f}  {theirs / ours:.2f}x")
    print(f"geometric mean ratio: {float(np.exp(np.mean(np.log(ratios)))):.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "isa": _core.isa(), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()

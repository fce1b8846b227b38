"""Quantized products (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K) through the row-lane copy (load(repack=True)) against the file's own layout.

    python bench/row_lane_copy.py [--dtype q8_0|q4_0|q4_1|q5_0|q5_1|iq4_nl|q4_k|q5_k|q6_k] [--threads 1] [--tokens 1,2,4,8,16,32,48,128] [--repeats 30]

The products of a SmolLM2-135M-shaped layer (1536 x 576 up/gate, 576 x 1536
down, 192 x 576 k/v) and its 49152 x 576 unembedding (the k-quants: a TinyLlama-1.1B
layer, whose rows hold whole 256-value super-blocks), random weights of the
type, at several token counts, with float32 activations (the default path)
and, for Q8_0, with int8 ones (exact=False; int8 products of the other types
read the file's rows, so they have no int8 columns), each with and without the copy.
Times are per product, the copy made once outside them (the difference of 1
and 1 + R products in one call); with one thread they are CPU time, which
load from other processes hardly moves. The copies need the AVX-512 VNNI
row-lane kernels; elsewhere the script says so and stops.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from batch_generate import cpu_name

SHAPES = [("up/gate", 1536, 576), ("down", 576, 1536), ("k/v", 192, 576), ("unembedding", 49152, 576)]
# The k-quants' rows hold whole 256-value super-blocks, which SmolLM2's 576 are not: TinyLlama-1.1B's shapes.
K_QUANT_SHAPES = [("up/gate", 5632, 2048), ("down", 2048, 5632), ("k/v", 256, 2048), ("q/o", 2048, 2048)]


def per_product(core, w, dtype: str, rows: int, k: int, x: np.ndarray, int8: bool, lanes: bool, repeats: int,
                clock) -> float:
    """Seconds per product, the copy's making (once per call) taken out: the fastest of 3 calls of
    1 + repeats products less the fastest of 3 calls of one (the copy's allocation and page faults
    vary from call to call, so each side takes its own best)."""
    core.matmul(w, dtype, rows, k, x, int8_activations=int8, row_lanes=lanes, repeats=2)  # warm: scratch, caches

    def best_of_3(products: int) -> float:
        times = []
        for _ in range(3):
            t = clock()
            core.matmul(w, dtype, rows, k, x, int8_activations=int8, row_lanes=lanes, repeats=products)
            times.append(clock() - t)
        return min(times)

    return (best_of_3(repeats + 1) - best_of_3(1)) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="q8_0", choices=["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_k", "q5_k", "q6_k"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", default="1,2,4,8,16,32,48,128")
    ap.add_argument("--repeats", type=int, default=30, help="products per timed call")
    args = ap.parse_args()

    from tokentrail import _core
    from tokentrail.loading.quant import quantize

    if not _core.int8_row_lanes():
        raise SystemExit(f"no row-lane kernels in the {_core.int8_isa()} variant on this CPU: nothing to compare")
    _core.set_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"{cpu_name()}, {args.dtype}, {args.threads} thread(s), {'CPU' if args.threads == 1 else 'wall'} time "
          f"per product, {time.strftime('%Y-%m-%d %H:%M')}")
    print()
    print("| product | rows x cols | tokens | float: file layout (us) | float: copy (us) | ratio | "
          "int8: file layout (us) | int8: copy (us) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rows, k in K_QUANT_SHAPES if args.dtype in ("q4_k", "q5_k", "q6_k") else SHAPES:
        w = quantize(rng.standard_normal((rows, k)).astype(np.float32), args.dtype)
        for n in tokens:
            x = rng.standard_normal((n, k)).astype(np.float32)
            cells = []
            for int8 in (False, True):
                if int8 and args.dtype != "q8_0":
                    cells += ["", "", ""]
                    continue
                plain = per_product(_core, w, args.dtype, rows, k, x, int8, False, args.repeats, clock)
                copy = per_product(_core, w, args.dtype, rows, k, x, int8, True, args.repeats, clock)
                cells += [f"{plain * 1e6:.1f}", f"{copy * 1e6:.1f}", f"{plain / copy:.2f}x"]
            print(f"| {name} | {rows} x {k} | {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

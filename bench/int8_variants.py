"""The int8-activation variants this CPU offers, against each other on one model in one process.

    python bench/int8_variants.py [--shape smollm] [--threads 2] [--repeats 5]

A random-weight model in the shape of a real one (SmolLM2-135M by default,
bench/shapes.py) is written as a Q8_0 GGUF and loaded once with int8
activations (exact=False) and the row-lane copy. Every int8 variant that goes
with the kernel variant (`_core.available_int8_isas()`: AVX-512 VNNI, and AMX
tiles on Intel Xeons that have them) then runs the same work, the variants
taking turns sample by sample: prefill of 16, 64 and 512 tokens (a fresh
session each) and one decode step of 16 and of 32 sequences advanced together
(Model.forward_batch, as the server and batched generate run them). The
variants give the same logits bit for bit; this measures only their speed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from batch_generate import cpu_name
from decode_by_type import read_with_tokenizer
from int8_prefill import batched_step
from shapes import make_model

PROMPTS = (16, 64, 512)
STEPS = (16, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import tokentrail
    from tokentrail import _core
    from tokentrail.loading.gguf_writer import write_gguf

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        make_model(args.shape, hf)
        ck = read_with_tokenizer(hf)
        model = tokentrail.load(write_gguf(ck, Path(tmp) / "q8_0.gguf", "q8_0"), threads=args.threads,
                                context=1024, exact=False)
    variants = _core.available_int8_isas()
    vocab = model.config.vocab_size
    prompts = {n: [int(t) for t in rng.integers(3, vocab, n)] for n in PROMPTS}

    def prefill(n):
        return lambda: model.session().feed(prompts[n])

    work = {f"prefill {n}": prefill(n) for n in PROMPTS}
    work.update({f"step of {b}": batched_step(model, b, rng) for b in STEPS})
    times = {(v, w): [] for v in variants for w in work}
    try:
        for v in variants:  # warm-up
            _core.set_int8_isa(v)
            for fn in work.values():
                fn()
        for _ in range(args.repeats):
            for w, fn in work.items():
                for v in variants:  # the variants take turns on each piece of work
                    _core.set_int8_isa(v)
                    t = time.perf_counter()
                    fn()
                    times[(v, w)].append(time.perf_counter() - t)
    finally:
        _core.set_isa(_core.isa())
    med = {k: statistics.median(t) for k, t in times.items()}

    print(f"{args.shape} shape, q8_0 with int8 activations and the row-lane copy, {args.threads} threads, "
          f"{cpu_name()}, kernels {_core.isa()}, medians of {args.repeats}, {time.strftime('%Y-%m-%d %H:%M')}")
    print()
    print("| work | " + " | ".join(variants) + (f" | {variants[0]} vs {variants[-1]} |" if len(variants) > 1 else " |"))
    print("| --- |" + " --- |" * (len(variants) + (len(variants) > 1)))
    for w in work:
        if w.startswith("prefill"):
            n = int(w.split()[1])
            cells = [f"{n / med[(v, w)]:.0f} tok/s" for v in variants]
        else:
            cells = [f"{med[(v, w)] * 1e3:.1f} ms" for v in variants]
        ratio = [f"{med[(variants[-1], w)] / med[(variants[0], w)]:.2f}x"] if len(variants) > 1 else []
        print(f"| {w} | " + " | ".join(cells + ratio) + " |")


if __name__ == "__main__":
    main()

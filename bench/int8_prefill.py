"""Quantized prefill and batched decode: int8 activations (exact=False) against float32 ones and llama.cpp.

    python bench/int8_prefill.py [--shape smollm] [--types q8_0,q4_0,q4_k_m,q6_k] [--threads 2] [--repeats 3]

A random-weight model in the shape of a real one (SmolLM2-135M by default,
bench/shapes.py) is written as a GGUF per type: q8_0 and q4_0 by tokentrail's
writer, q4_k_m and q6_k by llama.cpp's own quantizer from the f32 file. All
three engines read that same file: tokentrail with float32 activations
(exact=True, the default), tokentrail with int8 activations (exact=False)
and llama.cpp (llama-cpp-python, which rounds activations to 8 bits). They
take turns sample by sample, so load from other processes slows them alike.

Figures: prefill tokens/s for a 16- and a 512-token prompt (a fresh session
each), and one decode step of 32 sequences advanced together
(Model.forward_batch, as the server and batched generate run them), in ms,
for the two tokentrail paths (llama-cpp-python has no multi-sequence step).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from batch_generate import cpu_name
from decode_by_type import LLAMA_MIXES, busy_seconds, llama_cpp_quantize, read_with_tokenizer
from shapes import make_model

MIXES = dict(LLAMA_MIXES, q6_k="LLAMA_FTYPE_MOSTLY_Q6_K")


def one(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def batched_step(model, batch: int, rng):
    """One decode step of `batch` sequences advanced together (Model.forward_batch) after prompts of
    12 random ids, as a function that can be timed again and again: each call rewinds them first."""
    vocab = model.config.vocab_size
    sessions = [model.session() for _ in range(batch)]
    model.forward_batch(sessions, [[int(t) for t in rng.integers(3, vocab, 12)] for _ in sessions])
    marks = [s.pos for s in sessions]
    tokens = [[int(rng.integers(3, vocab))] for _ in sessions]

    def run():
        for s, m in zip(sessions, marks):
            s.rewind(m)
        model.forward_batch(sessions, tokens)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm")
    ap.add_argument("--types", default="q8_0,q4_0,q4_k_m,q6_k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="sequences in the batched decode step")
    args = ap.parse_args()

    import llama_cpp

    import tokentrail
    from tokentrail.loading.gguf_writer import write_gguf

    load_before, busy_before = os.getloadavg(), busy_seconds()
    rng = np.random.default_rng(0)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        make_model(args.shape, hf)
        ck = read_with_tokenizer(hf)
        f32_file = None
        for dtype in args.types.split(","):
            if dtype in MIXES:
                if f32_file is None:
                    f32_file = write_gguf(ck, Path(tmp) / "f32-source.gguf", "f32")
                LLAMA_MIXES.setdefault(dtype, MIXES[dtype])
                path = llama_cpp_quantize(f32_file, Path(tmp) / f"{dtype}.gguf", dtype, args.threads)
            else:
                path = write_gguf(ck, Path(tmp) / f"{dtype}.gguf", dtype)
            exact = tokentrail.load(path, threads=args.threads, context=1024)
            fast = tokentrail.load(path, threads=args.threads, context=1024, exact=False)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512,
                                  n_threads=args.threads, n_threads_batch=args.threads, type_k=0, type_v=0,
                                  verbose=False)
            vocab = exact.config.vocab_size
            prompts = {n: [int(t) for t in rng.integers(3, vocab, n)] for n in (16, 512)}

            def ours(model, n):
                return lambda: model.session().feed(prompts[n])

            def theirs(n):
                def run():
                    llm.reset()
                    llm.eval(prompts[n])
                return run

            cases = {}
            for n in (16, 512):
                cases[("exact", n)] = ours(exact, n)
                cases[("int8", n)] = ours(fast, n)
                cases[("llama.cpp", n)] = theirs(n)
            cases[("exact", "step")] = batched_step(exact, args.batch, rng)
            cases[("int8", "step")] = batched_step(fast, args.batch, rng)
            times = {k: [] for k in cases}
            for fn in cases.values():
                fn()  # warm-up
            for _ in range(args.repeats):  # the variants take turns
                for k, fn in cases.items():
                    times[k].append(one(fn))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"type": dtype, "held": sorted({w.dtype for w in exact.weights.values() if w.data.ndim > 1})}
            for n in (16, 512):
                for who in ("exact", "int8", "llama.cpp"):
                    row[f"{who}_{n}"] = n / med[(who, n)]
            row["step_exact_ms"] = med[("exact", "step")] * 1e3
            row["step_int8_ms"] = med[("int8", "step")] * 1e3
            table.append(row)
            print(row, flush=True)
            llm.close()
            del exact, fast, llm
    load_after, busy_after = os.getloadavg(), busy_seconds()
    (all0, own0, t0), (all1, own1, t1) = busy_before, busy_after
    others = max(0.0, (all1 - all0) - (own1 - own0)) / ((t1 - t0) * os.cpu_count())

    print()
    print(f"{args.shape} shape, {args.threads} threads, {cpu_name()}, kernels {tokentrail._core.isa()} / int8 "
          f"{tokentrail._core.int8_isa()}, llama-cpp-python {llama_cpp.__version__}, medians of {args.repeats}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} CPUs; "
          f"other processes used {others:.0%} of the CPUs meanwhile")
    print()
    print("| type | prefill-16 tok/s float / int8 / llama.cpp | int8 vs llama.cpp | prefill-512 tok/s float / int8 / "
          f"llama.cpp | int8 vs llama.cpp | decode step of {args.batch} ms float / int8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['type']} | {r['exact_16']:.0f} / {r['int8_16']:.0f} / {r['llama.cpp_16']:.0f} | "
              f"{r['int8_16'] / r['llama.cpp_16']:.2f}x | {r['exact_512']:.0f} / {r['int8_512']:.0f} / "
              f"{r['llama.cpp_512']:.0f} | {r['int8_512'] / r['llama.cpp_512']:.2f}x | "
              f"{r['step_exact_ms']:.1f} / {r['step_int8_ms']:.1f} ({r['step_exact_ms'] / r['step_int8_ms']:.2f}x) |")


if __name__ == "__main__":
    main()

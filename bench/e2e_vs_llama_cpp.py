"""End-to-end generation with sampling: tokentrail's `generate` next to llama-cpp-python's
`create_completion` on the same GGUF file, same options, same run.

    python bench/e2e_vs_llama_cpp.py [--shapes smollm,qwen2.5-0.5b] [--types f16,q8_0] [--threads 2]
                                     [--prompt 16] [--new 64] [--repeats 5]

What a user times: one call that takes a prompt of token ids and returns the
sampled continuation (temperature 0.8, top-k 40, top-p 0.95; no min-p, no
repetition penalty: llama-cpp-python's defaults of 0.05 and 1.1 are turned
off so that both run the same chain), prompt included, each call on a fresh
prompt (llama-cpp-python would otherwise reuse its last prompt's cache) and
its own seed. Random weights in the shape of a real model with a synthetic
tokenizer of its vocabulary size (bench/shapes.py), written once as a GGUF
file of each type that both engines read. Tokens/s = tokens generated /
wall time of the call; medians over repeats, the engines taking turns.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import numpy as np

from shapes import make_model

HERE = Path(__file__).resolve().parent
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95)


def model_file(shape: str, dtype: str, root: Path) -> Path:
    """The GGUF file of `shape` in `dtype`, written once from its random-weight checkpoint."""
    from tokentrail.loading import read_checkpoint
    from tokentrail.loading.gguf_writer import write_gguf

    hf = root / shape / "hf"
    if not (hf / "config.json").exists():
        make_model(shape, hf)
    path = root / shape / f"{shape}-{dtype}.gguf"
    if not path.exists():
        write_gguf(read_checkpoint(hf), path, dtype=dtype)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm,qwen2.5-0.5b")
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length in ids")
    ap.add_argument("--new", type=int, default=64, help="tokens asked per call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--root", default=str(HERE / "results" / "models"))
    args = ap.parse_args()

    import llama_cpp

    import tokentrail

    tokentrail._core.set_threads(args.threads)
    probe_before = tokentrail._core.probe_bandwidth(512, 3)
    load_before = os.getloadavg()[0]
    rows = []
    for shape in args.shapes.split(","):
        for dtype in args.types.split(","):
            path = model_file(shape, dtype, Path(args.root))
            ours = tokentrail.load(path, threads=args.threads)
            theirs = llama_cpp.Llama(model_path=str(path), n_ctx=args.prompt + args.new + 16,
                                     n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            vocab = ours.config.vocab_size
            rng = np.random.default_rng(0)
            prompts = [rng.integers(3, vocab - 1, args.prompt).tolist() for _ in range(2 * args.repeats + 2)]

            def ours_call(prompt, seed):
                g = ours.generate(prompt, max_new_tokens=args.new, seed=seed, **SAMPLING)
                return len(g.token_ids)

            def their_call(prompt, seed):
                theirs.reset()
                r = theirs.create_completion(prompt, max_tokens=args.new, seed=seed, min_p=0.0, repeat_penalty=1.0,
                                             **SAMPLING)
                return r["usage"]["completion_tokens"]

            rates = {"tokentrail": [], "llama.cpp": []}
            calls = [("tokentrail", ours_call), ("llama.cpp", their_call)]
            for i in range(args.repeats + 1):  # the first round warms both up and is not counted
                for name, call in (calls if i % 2 == 0 else calls[::-1]):
                    prompt = prompts[2 * i + (name == "llama.cpp")]
                    t = time.perf_counter()
                    n = call(prompt, seed=i)
                    if i:
                        rates[name].append(n / (time.perf_counter() - t))
            ours_rate, their_rate = statistics.median(rates["tokentrail"]), statistics.median(rates["llama.cpp"])
            rows.append((shape, dtype, ours_rate, their_rate))
            print(f"{shape} {dtype}: tokentrail {ours_rate:.1f} tok/s, llama.cpp {their_rate:.1f} tok/s, "
                  f"{ours_rate / their_rate:.2f}x", flush=True)
            theirs.close()
            del ours, theirs
            gc.collect()
    print(f"\n{args.threads} threads, prompt {args.prompt} ids, {args.new} new tokens, "
          f"temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}, top-p {SAMPLING['top_p']}; "
          f"kernels {tokentrail._core.isa()}, llama-cpp-python {llama_cpp.__version__}; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; read bandwidth probe "
          f"{probe_before:.1f} GB/s before, {tokentrail._core.probe_bandwidth(512, 3):.1f} after\n")
    print("| shape | type | tokentrail generate tok/s | llama-cpp-python create_completion tok/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for shape, dtype, o, t in rows:
        print(f"| {shape} | {dtype} | {o:.1f} | {t:.1f} | {o / t:.2f}x |")


if __name__ == "__main__":
    main()

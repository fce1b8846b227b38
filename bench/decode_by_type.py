"""Decode speed per weight type: tokentrail next to llama.cpp on the same weights, same run.

    python bench/decode_by_type.py [--shape gpt2|smollm] [--threads 2] [--new 64] [--repeats 5]
                                   [--types f32,q4_0,q4_k_m,...]

A random-weight model in the shape of a real one (gpt2: 124M parameters) is
converted by `tokentrail.load(dir, dtype=...)` for tokentrail and written by
`write_gguf` for llama.cpp (llama-cpp-python; the types it reads from
tokentrail's writer: f32, f16, q8_0, q4_0). The llama.cpp mixes (q4_k_m,
q5_k_m, q6_k, q5_0, q5_1, q4_1, iq4_nl) are made by llama.cpp's own quantizer from
the f32 file, and both engines read that very file. Both engines decode greedily one
token at a time from a one-token prompt with the same thread count; figures
are medians over repeats, each after a warm-up (bench/timing.py), the two
engines taking turns.

Decoding one token reads every weight matrix once, so "GB/s" is the bytes of
weights streamed per token times tokens per second: how close each engine and
type get to the machine's memory bandwidth. Embedding rows read by lookup are
not counted; a tied embedding is, once, as the unembedding.
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from shapes import make_model
from timing import timeit_median

TYPES = ("f32", "bf16", "f16", "q8_0", "q4_0", "q4_k")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")  # what tokentrail writes and llama.cpp reads
# Files llama.cpp's quantizer makes (its file type constants), read by both engines as they are.
LLAMA_MIXES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
               "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
               "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1", "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
               "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def llama_cpp_quantize(src: Path, dst: Path, mix: str, threads: int) -> Path:
    """`src` (an f32 GGUF) quantized by llama.cpp to one of LLAMA_MIXES, as llama-quantize does."""
    import ctypes
    import logging

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_MIXES[mix])
    params.nthread = threads
    # llama-cpp-python prints llama.cpp's log through this logger: the quantizer reports every
    # tensor (hundreds of lines per file); keep its errors only.
    log = logging.getLogger("llama-cpp-python")
    previous = log.level
    log.setLevel(logging.ERROR)
    try:
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0
    finally:
        log.setLevel(previous)
    if failed:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {mix}")
    return dst


def read_with_tokenizer(hf):
    """The checkpoint of a random-weight model directory (bench/shapes.py), with a placeholder
    tokenizer where it has none, as the GGUF writer needs one."""
    from tokentrail.loading import Checkpoint, read_checkpoint

    ck = read_checkpoint(hf)
    if ck.tokenizer is None:
        ck = Checkpoint(ck.config, ck.weights, placeholder_tokenizer(ck.config.vocab_size), ck.source)
    return ck


def placeholder_tokenizer(vocab_size: int):
    """A byte-level vocabulary of the model's size: GGUF readers insist on one; decoding here uses ids."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from tokentrail.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(alphabet[: vocab_size - 1])}
    vocab[alphabet[0] * 2] = len(vocab)  # one merge: llama.cpp's BPE loader wants at least one
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(alphabet[0], alphabet[0])]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    return Tokenizer(inner)


def streamed_bytes(sizes: dict[str, int], tied: bool) -> int:
    """Weight bytes one decode step reads: everything but lookup tables (positions; untied embedding)."""
    skip = {"pos_embed.weight"} | (set() if tied else {"embed.weight"})
    return sum(n for name, n in sizes.items() if name not in skip)


def gguf_sizes(path) -> dict[str, int]:
    """Tensor bytes of a GGUF file under tokentrail's tensor names (the fused GPT-2 qkv counts once)."""
    from tokentrail.loading.gguf import GGUFFile

    top = {"token_embd.weight": "embed.weight", "position_embd.weight": "pos_embed.weight"}
    return {top.get(name, name): t.nbytes for name, t in GGUFFile(path).tensors.items()}


def busy_seconds() -> tuple[float, float, float]:
    """(CPU seconds all processes have used, those this process used, wall time): to see who else ran."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fh.readline().split()[1:9])
    own = os.times()
    return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system, time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gpt2", help="gpt2 or smollm (see shapes.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64, help="tokens decoded per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()

    import llama_cpp

    import tokentrail
    from tokentrail.loading.gguf_writer import write_gguf

    tokentrail._core.set_threads(args.threads)
    probe_before = tokentrail._core.probe_bandwidth(512, 3)  # the roof of a step bound by bytes
    load_before, busy_before = os.getloadavg(), busy_seconds()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        make_model(args.shape, hf)  # only the saved files are used
        ck = read_with_tokenizer(hf)
        tied = ck.config.tied_embeddings
        steps = args.new + 1  # the prompt token is a one-token step as well

        f32_file = None
        for dtype in args.types.split(","):
            path = None
            if dtype in LLAMA_MIXES:
                if f32_file is None:
                    f32_file = write_gguf(ck, Path(tmp) / "f32-source.gguf", "f32")
                path = llama_cpp_quantize(f32_file, Path(tmp) / f"{dtype}.gguf", dtype, args.threads)
            try:
                ours = tokentrail.load(path or hf, dtype=None if path else dtype, threads=args.threads)
            except ValueError as e:  # e.g. rows that do not fill whole q4_k blocks
                print(f"{dtype}: tokentrail cannot convert this shape ({e})")
                continue
            if path:
                held = sorted({w.dtype for w in ours.weights.values()})
                print(f"{dtype}: llama.cpp's file holds {', '.join(held)}")
            n_params = ours.n_params
            our_bytes = streamed_bytes({n: w.data.nbytes for n, w in ours.weights.items()}, tied)

            def ours_decode(model=ours):
                s = model.session()
                logits = s.feed([1])
                for _ in range(args.new):
                    logits = s.feed([int(np.argmax(logits))])

            llm = their_bytes = None
            if dtype in GGUF_TYPES or path:
                path = path or write_gguf(ck, Path(tmp) / f"{dtype}.gguf", dtype)
                their_bytes = streamed_bytes(gguf_sizes(path), tied)
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(256, steps + 8), n_threads=args.threads,
                                      n_threads_batch=args.threads, logits_all=True, verbose=False)

            def their_decode(llm=llm):
                llm.reset()
                llm.eval([1])
                for _ in range(args.new):
                    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

            # The engines take turns, each sample after its own warm-up, so that other
            # work on the machine slows both alike instead of whichever ran at the time.
            our_times, their_times = [], []
            for _ in range(args.repeats):
                our_times.append(timeit_median(ours_decode, 1))
                if llm is not None:
                    their_times.append(timeit_median(their_decode, 1))
            rows.append((dtype, our_bytes, steps / np.array(our_times), their_bytes,
                         steps / np.array(their_times) if their_times else None))
            del ours
            if llm is not None:
                llm.close()
                del llm
                path.unlink()
            gc.collect()
    load_after, busy_after = os.getloadavg(), busy_seconds()
    probe_after = tokentrail._core.probe_bandwidth(512, 3)
    roof = max(probe_before, probe_after)

    print(f"shape={args.shape} params={n_params / 1e6:.1f}M threads={args.threads} decode={steps} tokens "
          f"repeats={args.repeats} isa={tokentrail._core.isa()} llama-cpp-python={llama_cpp.__version__}")
    (all0, own0, t0), (all1, own1, t1) = busy_before, busy_after
    others = max(0.0, (all1 - all0) - (own1 - own0)) / ((t1 - t0) * os.cpu_count())
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} (this run's own "
          f"threads included) on {os.cpu_count()} CPUs; other processes used {others:.0%} of the CPUs meanwhile")
    print(f"read bandwidth probe ({args.threads} threads): {probe_before:.1f} GB/s before, {probe_after:.1f} after; "
          f"roof = the higher")
    head = (f"{'type':<7}{'weights MB':>11}{'tokentrail tok/s':>18}{'llama.cpp tok/s':>17}{'ratio':>7}"
            f"{'tokentrail GB/s':>17}{'llama.cpp GB/s':>16}{'% of roof':>11}")
    print(head)
    for dtype, our_bytes, ours, their_bytes, theirs in rows:
        ot = float(np.median(ours))
        tt = float(np.median(theirs)) if theirs is not None else None
        cells = [f"{dtype:<7}", f"{our_bytes / 1e6:>11.1f}", f"{ot:>18.1f}",
                 f"{tt:>17.1f}" if tt else f"{'-':>17}", f"{ot / tt:>6.2f}x" if tt else f"{'-':>7}",
                 f"{our_bytes * ot / 1e9:>17.2f}", f"{their_bytes * tt / 1e9:>16.2f}" if tt else f"{'-':>16}",
                 f"{our_bytes * ot / 1e9 / roof:>10.0%}" + (f"/{their_bytes * tt / 1e9 / roof:.0%}" if tt else "")]
        print("".join(cells))
    print("ratio = tokentrail tok/s / llama.cpp tok/s; weights MB = bytes tokentrail streams per token; "
          "% of roof: tokentrail/llama.cpp")
    print("noise, (max - min) / median of the repeats: " + ", ".join(
        f"{d} {spread(o):.0%}" + (f"/{spread(t):.0%}" if t is not None else "") for d, _, o, _, t in rows)
        + " (tokentrail/llama.cpp)")


def spread(samples) -> float:
    return float((np.max(samples) - np.min(samples)) / np.median(samples))


if __name__ == "__main__":
    main()

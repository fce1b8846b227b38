"""Prefill and decode speed of tokentrail next to Hugging Face transformers (PyTorch, CPU), same run.

    python bench/e2e_vs_transformers.py [--shape gpt2|smollm] [--threads 2] [--prompt 128] [--new 64]

Random weights in the shape of a real model (the shapes decide the speed).
Figures are medians over repeats; both engines use the same thread count.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_model(shape: str, directory: Path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if shape == "gpt2":
        cfg = tf.GPT2Config()  # 124M: 12 layers, width 768, 12 heads, vocab 50257
    elif shape == "smollm":
        cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                             tie_word_embeddings=True)
    else:
        raise SystemExit(f"unknown shape {shape}")
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(directory)
    return model


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gpt2")
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
            tp = median_time(prefill, args.repeats)
            td = median_time(decode, args.repeats)
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

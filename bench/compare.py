"""tokentrail against llama.cpp and Hugging Face transformers, on the same weights, in one run.

    python bench/compare.py --shapes gpt2,smollm --types f32,f16,q8_0,q4_0 --repeats 3 \
        --out bench/results/compare.json

For every model shape (random weights in the shape of a real model) and
weight type, each engine runs in a fresh process (so load time and peak
memory are its own), the engines interleaved repeat by repeat, and the
medians are reported: prefill tokens/s for 16/128/512-token prompts, decode
tokens/s at context 128 and 1024, time to first token (128-token prompt),
load time and peak resident memory. tokentrail and llama.cpp keep the same
KV cache type (--kv-dtype, float32 by default). Every engine reads the same GGUF file
(tokentrail and llama.cpp) or its Hugging Face twin (transformers, float
types only); the llama.cpp mixes (q4_k_m, q5_k_m, q6_k, ... as in
bench/decode_by_type.py) are made by llama.cpp's own quantizer from the f32 file. Both roofs are measured in the same run: decode as a fraction of
the read bandwidth (weight bytes + KV bytes per token / time), prefill as a
fraction of the FMA peak.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = (16, 128, 512)
CONTEXTS = (128, 1024)
DECODE_TOKENS = 32


# ---- the worker: one engine, one model, one process ---------------------------------

def _tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


class TokentrailEngine:
    def __init__(self, path: str, threads: int, kv_dtype: str):
        import tokentrail

        self.model = tokentrail.load(path, threads=threads, context=2048, kv_dtype=kv_dtype)
        self.vocab = self.model.config.vocab_size
        self.max_ctx = self.model.context_limit

    def prefill(self, ids):
        s = self.model.session()
        s.feed(ids)
        return s

    def decode(self, state, ids):
        for t in ids:
            state.feed([t])


class LlamaCppEngine:
    GGML_TYPES = {"f32": 0, "f16": 1}  # ggml_type of the KV cache

    def __init__(self, path: str, threads: int, kv_dtype: str):
        from llama_cpp import Llama

        kv = self.GGML_TYPES[kv_dtype]
        self.llm = Llama(model_path=path, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False, type_k=kv, type_v=kv)
        self.vocab = self.llm.n_vocab()
        self.max_ctx = min(2048, self.llm._model.n_ctx_train())

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return None

    def decode(self, state, ids):
        for t in ids:
            self.llm.eval([t])


class TransformersEngine:
    def __init__(self, path: str, threads: int, dtype: str):
        import torch
        import transformers as tf

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = tf.AutoModelForCausalLM.from_pretrained(
            path, dtype={"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.bfloat16}[dtype]).eval()
        self.vocab = self.model.config.vocab_size
        self.max_ctx = min(2048, getattr(self.model.config, "max_position_embeddings", None)
                           or self.model.config.n_positions)

    def prefill(self, ids):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids]), use_cache=True).past_key_values

    def decode(self, past, ids):
        with self.torch.no_grad():
            for t in ids:
                past = self.model(self.torch.tensor([[t]]), past_key_values=past, use_cache=True).past_key_values


def _peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM starts afresh at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    from timing import timeit_median

    t0 = time.perf_counter()
    if args.engine == "tokentrail":
        eng = TokentrailEngine(args.path, args.threads, args.kv_dtype)
    elif args.engine == "llama.cpp":
        eng = LlamaCppEngine(args.path, args.threads, args.kv_dtype)
    else:
        eng = TransformersEngine(args.path, args.threads, args.dtype)
    load = time.perf_counter() - t0
    out = {"load_s": load}
    for n in PROMPTS:
        ids = _tokens(n, eng.vocab, n)
        out[f"prefill_{n}"] = n / timeit_median(lambda: eng.prefill(ids), args.inner)
    out["ttft_128_s"] = 1.0 / (out["prefill_128"] / 128)
    for ctx in CONTEXTS:
        # A model with a short context (GPT-2: 1024) decodes its last tokens there instead.
        ids = _tokens(min(ctx, eng.max_ctx - DECODE_TOKENS), eng.vocab, ctx)
        new = _tokens(DECODE_TOKENS, eng.vocab, 7)
        times = []
        for _ in range(args.inner):
            state = eng.prefill(ids)
            t = time.perf_counter()
            eng.decode(state, new)
            times.append(time.perf_counter() - t)
            del state  # one cache alive at a time: peak memory is one session's, as a user would have
        out[f"decode_{ctx}"] = DECODE_TOKENS / statistics.median(times)
    out["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(out))


# ---- the driver --------------------------------------------------------------------

def prepare(shape: str, types: list[str], root: Path) -> dict:
    """HF directory of random weights, and a GGUF file per type written by tokentrail convert."""
    sys.path.insert(0, str(HERE))
    from decode_by_type import LLAMA_MIXES, llama_cpp_quantize, read_with_tokenizer
    from shapes import make_model

    from tokentrail.loading import read_checkpoint
    from tokentrail.loading.gguf_writer import write_gguf

    hf = root / shape / "hf"
    if not (hf / "config.json").exists():
        make_model(shape, hf)
    files = {"hf": hf}
    ckpt = read_checkpoint(hf)
    for t in types:
        g = root / shape / f"{shape}-{t}.gguf"
        if not g.exists():
            if t in LLAMA_MIXES:  # llama.cpp's own quantizer, from the f32 file
                f32 = root / shape / f"{shape}-f32.gguf"
                if not f32.exists():
                    write_gguf(read_with_tokenizer(hf), f32, dtype="f32")
                llama_cpp_quantize(f32, g, t, threads=2)
            else:
                write_gguf(ckpt, g, dtype=t)
        files[t] = g
    c = ckpt.config
    files["weight_bytes"] = {t: os.path.getsize(files[t]) for t in types}
    files["kv_values_per_pos"] = 2 * c.n_layers * c.n_kv_heads * c.head_dim  # keys and values
    files["params"] = sum(int(__import__("numpy").prod(w.shape)) for w in ckpt.weights.values())
    return files


def run_worker(engine: str, path: Path, dtype: str, threads: int, inner: int, kv_dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--path", str(path), "--dtype", dtype,
           "--threads", str(threads), "--inner", str(inner), "--kv-dtype", kv_dtype]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{engine} on {path} failed:\n{p.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="tokentrail")
    ap.add_argument("--path", default="")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--shapes", default="gpt2,smollm")
    ap.add_argument("--types", default="f32,f16,q8_0,q4_0")
    ap.add_argument("--engines", default="tokentrail,llama.cpp,transformers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-dtype", default="f32", choices=["f32", "f16"],
                    help="KV cache type for tokentrail and llama.cpp alike (transformers keeps float32)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per engine, interleaved")
    ap.add_argument("--inner", type=int, default=3, help="timed repeats inside a process")
    ap.add_argument("--work", default=None, help="folder for the generated checkpoints (kept between runs)")
    ap.add_argument("--out", default=str(HERE / "results" / "compare.json"))
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(HERE))
        return worker(args)

    from tokentrail import _core

    _core.set_threads(args.threads)
    # This VM's read bandwidth moves by tens of percent from minute to minute:
    # the roof is the best of probes taken before every model and type.
    probes = [_core.probe_bandwidth(1024, 5)]
    roof = {"bandwidth_gbs": probes[0], "peak_gflops": _core.probe_flops(100_000_000),
            "isa": _core.isa(), "threads": args.threads}
    print(f"roofs: read bandwidth {roof['bandwidth_gbs']:.1f} GB/s, FMA peak {roof['peak_gflops']:.0f} GFLOP/s "
          f"({roof['isa']}, {args.threads} threads); load average {os.getloadavg()[0]:.2f}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tokentrail-compare-"))
    types = args.types.split(",")
    engines = args.engines.split(",")
    results = []
    for shape in args.shapes.split(","):
        files = prepare(shape, types, work)
        for t in types:
            probes.append(_core.probe_bandwidth(1024, 5))
            runs: dict[str, list[dict]] = {}
            for _ in range(args.repeats):
                for e in engines:
                    if e == "transformers" and t not in ("f32", "f16", "bf16"):
                        continue
                    path = files["hf"] if e == "transformers" else files[t]
                    runs.setdefault(e, []).append(run_worker(e, path, t, args.threads, args.inner, args.kv_dtype))
            probes.append(_core.probe_bandwidth(1024, 5))
            roof["bandwidth_gbs"] = max(probes)
            for e, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                wb = files["weight_bytes"][t]
                for ctx in CONTEXTS:
                    kv_bytes = 2 if e != "transformers" and args.kv_dtype == "f16" else 4
                    med[f"bytes_per_token_{ctx}"] = wb + ctx * files["kv_values_per_pos"] * kv_bytes
                    med[f"decode_{ctx}_roof"] = med[f"bytes_per_token_{ctx}"] * med[f"decode_{ctx}"] / 1e9 / roof["bandwidth_gbs"]
                med["prefill_512_roof"] = 2 * files["params"] * med["prefill_512"] / 1e9 / roof["peak_gflops"]
                results.append({"shape": shape, "type": t, "engine": e, "weight_bytes": wb,
                                "params": files["params"], **med})
                print(f"{shape:>9} {t:>5} {e:>12}: prefill 16/128/512 "
                      + "/".join(f"{med[f'prefill_{n}']:.0f}" for n in PROMPTS)
                      + " tok/s, decode@128/1024 " + "/".join(f"{med[f'decode_{c}']:.1f}" for c in CONTEXTS)
                      + f" tok/s ({med['decode_128_roof']:.0%} of the bandwidth roof so far), load {med['load_s']:.2f} s, "
                      f"peak {med['peak_rss_mb']:.0f} MB", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    roof["bandwidth_probes_gbs"] = probes
    for r in results:  # fractions of the best bandwidth seen in the whole run
        for ctx in CONTEXTS:
            r[f"decode_{ctx}_roof"] = r[f"bytes_per_token_{ctx}"] * r[f"decode_{ctx}"] / 1e9 / roof["bandwidth_gbs"]
    out.write_text(json.dumps({"roof": roof, "results": results, "kv_dtype": args.kv_dtype,
                               "date": time.strftime("%Y-%m-%d %H:%M"),
                               "machine": _machine()}, indent=1))
    print(f"wrote {out}")


def _machine() -> dict:
    info = {"cpus": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (OSError, ValueError):
        pass
    return info


if __name__ == "__main__":
    main()

"""Decode speed on a busy machine: 1 and 2 threads, idle, next to a process holding a core, and
next to numpy's BLAS threads in the same process.

    python bench/busy_machine.py [--shape smollm] [--types f32,f16,q4_0] [--threads 1,2]
                                 [--loads idle,busy,numpy] [--new 48] [--rounds 3]
                                 [--core NAME=path/to/_core.so ...] [--llama-cpp]

A random-weight model in the shape of a real one (bench/shapes.py) is written once as a GGUF
file per type. Each round runs one child process per core build (`--core`, default: the
installed one), the builds taking turns, so other work on the machine slows them alike. A
child decodes greedily from a one-token prompt for every (type, threads, load) and prints tokens/s;
the table shows the median over rounds. Loads:

- idle: nothing else of ours runs;
- busy: another process spins (`while True: pass`) for the whole measurement, holding one core;
- numpy: a thread of this process multiplies 512 x 512 float32 matrices in a loop (numpy's
  BLAS runs its own threads) while the model decodes.

Swapping builds: `--core omp=/tmp/core_openmp.so --core pool=...` loads each file as
`tokentrail._core` in its child, so two builds of the core compare in one run.
`--llama-cpp` adds llama.cpp (through llama-cpp-python, the same GGUF files and thread
counts) as one more engine taking its turn in every round.

With 1 thread and more among --threads, the read bandwidth of one thread against that of the
most threads (`_core.probe_bandwidth`) bounds what a decode bound by memory bandwidth (f32, f16,
q8_0) can keep of its idle rate while another process holds a core: about one core's share.

For builds that report it (`_core.pool_backoff()`), a last line gives what the thread pool was
doing about the load at the end of each round's measurement with 2+ threads: "fewer threads",
"sleepy workers", "none", or a trial between the two still running.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def use_core(path: str) -> None:
    """Make `path` the `tokentrail._core` that importing tokentrail picks up."""
    spec = importlib.util.spec_from_file_location("tokentrail._core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["tokentrail._core"] = module


def decode_rate(start, new: int, limit: float = 3.0) -> float:
    """Tokens/s of greedy decoding up to `new` tokens after a one-token prompt (one warm-up run
    first), stopping early after `limit` seconds (a collapsed configuration would take minutes).
    start(): a fresh sequence's feed function; feed(token) returns the next logits."""
    import numpy as np

    def run(count):
        t = time.perf_counter()
        feed = start()
        logits = feed(1)
        steps = 1
        while steps <= count and time.perf_counter() - t < limit:
            logits = feed(int(np.argmax(logits)))
            steps += 1
        return steps / (time.perf_counter() - t)

    run(4)
    return run(new)


def tokentrail_sequence(model):
    """decode_rate's start() for a tokentrail model."""
    def start():
        session = model.session()
        return lambda token: session.feed([token])
    return start


def llama_cpp_sequence(llm):
    """decode_rate's start() for a llama_cpp.Llama (logits of every position kept, as the decode
    benchmarks ask for them)."""
    def start():
        llm.reset()

        def feed(token):
            llm.eval([token])
            return llm.scores[llm.n_tokens - 1]
        return feed
    return start


class NumpyLoop:
    """A thread multiplying matrices with numpy (its BLAS threads included) until stopped."""

    def __init__(self):
        import numpy as np

        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((512, 512), dtype=np.float32)
        self.b = rng.standard_normal((512, 512), dtype=np.float32)
        self.stop = threading.Event()
        self.products = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            self.a @ self.b
            self.products += 1

    def __enter__(self):
        self.thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class SpinningProcess:
    """Another process holding one core for as long as the block lasts."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


LOADS = {"idle": contextlib.nullcontext, "busy": SpinningProcess, "numpy": NumpyLoop}


def measure_loads(rate, loads: list[str], state=lambda: None) -> dict[str, tuple]:
    """(rate(), state()) under each load; state() is read before the load ends."""
    out = {}
    for load in loads:
        with LOADS[load]():
            out[load] = (rate(), state())
    return out


def pool_state(core) -> str | None:
    """What the thread pool is doing about other processes (None for builds without the report)."""
    return core.pool_backoff()["state"] if hasattr(core, "pool_backoff") else None


def child(args) -> None:
    results = []
    loads = args.loads.split(",")
    if args.engine == "llama.cpp":
        import llama_cpp

        for dtype in args.types.split(","):
            for threads in map(int, args.threads.split(",")):
                llm = llama_cpp.Llama(model_path=str(Path(args.files) / f"{dtype}.gguf"), n_ctx=256, n_threads=threads,
                                      n_threads_batch=threads, logits_all=True, verbose=False)
                for load, (rate, _) in measure_loads(lambda: decode_rate(llama_cpp_sequence(llm), args.new), loads).items():
                    results.append({"type": dtype, "threads": threads, "load": load, "tok_s": rate})
                llm.close()
        print(json.dumps(results))
        return
    if args.core_path:
        use_core(args.core_path)
    import tokentrail
    from tokentrail import _core as core

    for dtype in args.types.split(","):
        model = tokentrail.load(Path(args.files) / f"{dtype}.gguf", threads=1)
        for threads in map(int, args.threads.split(",")):
            model.threads = threads
            measured = measure_loads(lambda: decode_rate(tokentrail_sequence(model), args.new), loads,
                                     lambda: pool_state(core))
            for load, (rate, pool) in measured.items():
                results.append({"type": dtype, "threads": threads, "load": load, "tok_s": rate, "pool": pool})
        del model
    print(json.dumps(results))


def write_models(shape: str, types: list[str], directory: Path) -> None:
    sys.path.insert(0, str(HERE))
    from decode_by_type import read_with_tokenizer
    from shapes import make_model

    from tokentrail.loading.gguf_writer import write_gguf

    hf = directory / "hf"
    make_model(shape, hf)
    ck = read_with_tokenizer(hf)
    for dtype in types:
        write_gguf(ck, directory / f"{dtype}.gguf", dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm")
    ap.add_argument("--types", default="f32,f16,q4_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--loads", default="idle,busy,numpy")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--core", action="append", default=[], help="NAME=path of a _core build (repeatable)")
    ap.add_argument("--llama-cpp", action="store_true", help="also measure llama.cpp (llama-cpp-python)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="tokentrail", choices=["tokentrail", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--core-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    unknown = set(args.loads.split(",")) - set(LOADS)
    if unknown:
        ap.error(f"unknown --loads {', '.join(sorted(unknown))}: choose from {', '.join(LOADS)}")
    if any("=" not in c for c in args.core):
        ap.error("--core takes NAME=PATH")
    # (name, engine, core path): tokentrail builds, then llama.cpp when asked for.
    cores = [(c.split("=", 1)[0], "tokentrail", c.split("=", 1)[1]) for c in args.core] or [("installed", "tokentrail", "")]
    if args.llama_cpp:
        cores.append(("llama.cpp", "llama.cpp", ""))
    load_before = os.getloadavg()
    samples: dict[tuple, list[float]] = {}
    pools: dict[tuple, list[str]] = {}  # the pool's back-off state at the end of each round's measurement
    with tempfile.TemporaryDirectory() as tmp:
        write_models(args.shape, args.types.split(","), Path(tmp))
        for _ in range(args.rounds):
            for name, engine, path in cores:
                cmd = [sys.executable, __file__, "--child", "--engine", engine, "--files", tmp, "--types", args.types,
                       "--threads", args.threads, "--loads", args.loads, "--new", str(args.new)]
                if path:
                    cmd += ["--core-path", path]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                for r in json.loads(out.strip().splitlines()[-1]):
                    samples.setdefault((name, r["type"], r["threads"], r["load"]), []).append(r["tok_s"])
                    if r.get("pool") and r["threads"] > 1 and r["load"] != "idle":
                        pools.setdefault((name, r["type"], r["threads"], r["load"]), []).append(r["pool"])
    load_after = os.getloadavg()

    import tokentrail

    print(f"shape={args.shape} decode={args.new + 1} tokens rounds={args.rounds} isa={tokentrail._core.isa()} "
          f"cpus={os.cpu_count()} load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    loads = args.loads.split(",")
    head = f"{'build':<10}{'type':<6}{'threads':>8}" + "".join(f"{load + ' tok/s':>14}" for load in loads)
    head += "".join(f"{load + '/idle':>12}" for load in loads if load != "idle")
    print(head)
    med = {k: statistics.median(v) for k, v in samples.items()}
    for name, _, _ in cores:
        for dtype in args.types.split(","):
            for threads in map(int, args.threads.split(",")):
                row = [med[(name, dtype, threads, load)] for load in loads]
                line = f"{name:<10}{dtype:<6}{threads:>8}" + "".join(f"{r:>14.1f}" for r in row)
                if "idle" in loads:
                    idle = med[(name, dtype, threads, "idle")]
                    line += "".join(f"{med[(name, dtype, threads, load)] / idle:>11.2f}x" for load in loads if load != "idle")
                print(line)
    counts = list(map(int, args.threads.split(",")))
    if "busy" in loads and "idle" in loads and 1 in counts and max(counts) > 1:
        most = max(counts)
        print(f"targets: {most} threads with a busy core >= 0.6x their idle rate and >= 1 thread with a busy core")
        for name, _, _ in cores:
            print(f"  {name}: " + ", ".join(
                f"{d} {med[(name, d, most, 'busy')] / med[(name, d, most, 'idle')]:.2f}x idle, "
                f"{med[(name, d, most, 'busy')] / med[(name, d, 1, 'busy')]:.2f}x 1 thread"
                for d in args.types.split(",")))
        # What one free core can read, against all of them: the most a type bound by memory bandwidth
        # (f32, f16, q8_0 decode) can keep of its idle rate while another process holds the other cores.
        per_threads = {}
        for t in (1, most):
            tokentrail._core.set_threads(t)
            per_threads[t] = tokentrail._core.probe_bandwidth(512, 3)
        print(f"read bandwidth (probe_bandwidth, 512 MB): 1 thread {per_threads[1]:.1f} GB/s, {most} threads "
              f"{per_threads[most]:.1f} GB/s = {per_threads[1] / per_threads[most]:.2f}x: the most a bandwidth-bound "
              f"decode can keep of its idle rate with one free core")
    if pools:
        print("the pool's back-off at the end of each round (2+ threads under load): " + "; ".join(
            f"{name} {d} {t}t {load}: {', '.join(states)}" for (name, d, t, load), states in pools.items()))
    if len(cores) > 1:
        base = cores[0][0]
        for name, _, _ in cores[1:]:
            print(f"{name} / {base}: " + ", ".join(
                f"{d} {t}t {load} {med[(name, d, t, load)] / med[(base, d, t, load)]:.2f}x"
                for d in args.types.split(",") for t in map(int, args.threads.split(",")) for load in loads))
    print("spread over rounds, (max - min) / median: " + ", ".join(
        f"{k[0]} {k[1]} {k[2]}t {k[3]} {(max(v) - min(v)) / statistics.median(v):.0%}" for k, v in samples.items()
        if len(v) > 1 and (max(v) - min(v)) / statistics.median(v) > 0.25) + " (only those above 25%)")


if __name__ == "__main__":
    main()

"""Load on `tokentrail serve`: many concurrent streaming clients on loopback.

    python bench/serve_load.py --shape smollm --dtype q8_0 --levels 1,4,16,64 --out bench/results/serve_load.json
    python bench/serve_load.py --levels 1,4,16,64 --llama-server /path/to/llama-server   # both, level by level

Starts the real server (`tokentrail serve`, a subprocess on 127.0.0.1), then
for each concurrency level runs that many asyncio clients, each sending
streaming /v1/completions requests one after another (greedy, a fixed
number of new tokens, prompts of 16-64 token ids, new ones at every level)
until the level's request count is reached or its time runs out. Reports aggregate generated tokens/s,
time to first token and inter-token latency (p50/p95), and errors; then
checks every response against the same prompt run alone through
`model.generate` in this process: no request may be lost, duplicated or
corrupted. Only loopback is used; every level is bounded in count and time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Requests per client at a level. With two, a level of 16 clients and 128 new tokens lasted about
# 5 s, and on a shared 2-core VM such a level moved by 10-20 % from one run to the next. Six make
# each level three times longer, and its last wave (fewer requests left than clients) a smaller
# share of it.
REQUESTS_PER_CLIENT = 6


def _requests_for(clients: int) -> int:
    return max(8, REQUESTS_PER_CLIENT * clients)


def _prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab - 1, int(rng.integers(16, 65))).tolist() for _ in range(count)]


async def _one(client, url: str, prompt: list[int], max_tokens: int, extra: dict | None = None) -> dict:
    """One streaming request (`extra`: more body fields): its text, token count, first-token time and
    gaps between tokens."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    start = time.perf_counter()
    arrivals, text, usage, closed = [], [], None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                usage = chunk["usage"]
            if not chunk.get("choices"):
                continue
            choice = chunk["choices"][0]
            closed = time.perf_counter()
            # A closing chunk with no text and a finish reason carries no token (llama-server sends one).
            if choice.get("text") or not choice.get("finish_reason"):
                arrivals.append(time.perf_counter())
            text.append(choice.get("text") or "")
    if not arrivals and closed is not None:  # the first token ended the response (no text)
        arrivals.append(closed)
    if not arrivals:
        return {"error": "no response"}
    tokens = usage["completion_tokens"] if usage else len(arrivals)
    return {"text": "".join(text), "tokens": tokens, "ttft": arrivals[0] - start,
            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])], "start": start, "end": arrivals[-1]}


async def _level(url: str, clients: int, prompts: list[list[int]], max_tokens: int, seconds: float) -> dict:
    import httpx

    queue = list(range(len(prompts)))
    results: dict[int, dict] = {}
    deadline = time.perf_counter() + seconds

    async def client_loop(client):
        while queue and time.perf_counter() < deadline:
            i = queue.pop(0)
            try:
                results[i] = await _one(client, url, prompts[i], max_tokens)
            except Exception as e:  # noqa: BLE001 - counted as an error of the level
                results[i] = {"error": f"{type(e).__name__}: {e}"}

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results.values() if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    ttfts = [r["ttft"] for r in ok]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "ttft_p50_ms": 1e3 * _percentile(ttfts, 50) if ttfts else None,
            "ttft_p95_ms": 1e3 * _percentile(ttfts, 95) if ttfts else None,
            "itl_p50_ms": 1e3 * _percentile(gaps, 50) if gaps else None,
            "itl_p95_ms": 1e3 * _percentile(gaps, 95) if gaps else None,
            "error_messages": sorted({r["error"] for r in results.values() if "error" in r})[:5],
            "texts": {i: r["text"] for i, r in results.items() if "error" not in r}}


ENGINE_METRICS = ("steps", "step_tokens", "forward_seconds", "step_seconds")


def _engine_metrics(url: str) -> dict[str, float]:
    """tokentrail's own step counters from /metrics (an empty dict for another server)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("tokentrail_") and name[len("tokentrail_"):] in ENGINE_METRICS:
            values[name[len("tokentrail_"):]] = float(value)
    return values if len(values) == len(ENGINE_METRICS) else {}


def _engine_share(before: dict, after: dict, wall: float) -> dict:
    """Where the engine's time went during a level: steps, rows per step, and the forward pass's share."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in ENGINE_METRICS}
    if not d["steps"]:
        return {}
    return {"steps": int(d["steps"]), "tokens_per_step": d["step_tokens"] / d["steps"],
            "forward_ms_per_step": 1e3 * d["forward_seconds"] / d["steps"],
            "other_ms_per_step": 1e3 * (d["step_seconds"] - d["forward_seconds"]) / d["steps"],
            "engine_busy": d["step_seconds"] / wall}


def _wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(cmd: list[str], env: dict, log: str | None = None) -> subprocess.Popen:
    """Start a server; its output goes to `log` (appended) if given, else nowhere."""
    if not log:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm", help="model shape from bench/shapes.py (random weights)")
    ap.add_argument("--dtype", default="q8_0")
    ap.add_argument("--model", default=None, help="a checkpoint to use instead of a random shape")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the levels this many times in turn (new prompts each time); the summary gives "
                         "each level's median and each round's ratio to its own first level")
    ap.add_argument("--requests", type=int, default=0,
                    help=f"requests per level (default: {REQUESTS_PER_CLIENT} per client, at least 8)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=300, help="time bound of each level")
    ap.add_argument("--parallel", type=int, default=16, help="the server's --parallel")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--serve-args", default="",
                    help="more flags for `tokentrail serve` (e.g. '--prefill-chunk 64'; a single flag needs the = form: "
                         "--serve-args=--no-exact); --no-exact, --no-repack and --kv-dtype apply to the reference too")
    ap.add_argument("--root", default=str(HERE / "results" / "models"))
    ap.add_argument("--server-log", default=None, help="append each server's output to PATH.<engine>")
    ap.add_argument("--llama-server", default=None,
                    help="path of llama.cpp's llama-server binary: run it too (same model as GGUF of --dtype, "
                         "--parallel slots, continuous batching), level by level back to back with tokentrail, "
                         "which goes first at odd levels and second at even ones; its responses are compared "
                         "with tokentrail's")
    ap.add_argument("--only-llama-server", action="store_true", help="with --llama-server: do not run tokentrail")
    ap.add_argument("--out", default=str(HERE / "results" / "serve_load.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import tokentrail

    if args.model:
        path = Path(args.model)
    else:
        sys.path.insert(0, str(HERE))
        from shapes import make_model

        path = Path(args.root) / args.shape / "hf"
        if not (path / "config.json").exists():
            make_model(args.shape, path)
    # The reference for the greedy check runs the server's own arithmetic (int8 activations with --no-exact,
    # the KV cache's element type with --kv-dtype).
    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--no-exact", action="store_true")
    serving.add_argument("--no-repack", action="store_true")
    serving.add_argument("--kv-dtype", default="f32")
    served, _ = serving.parse_known_args(args.serve_args.split())
    exact = not served.no_exact
    model = tokentrail.load(path, dtype=args.dtype, threads=args.threads, exact=exact,
                            repack=False if served.no_repack else None, kv_dtype=served.kv_dtype)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.requests < 0:
        raise SystemExit("--requests must be at least 1 (or 0: the default count)")
    plan = levels * args.rounds  # round after round, every level in each
    counts = [args.requests or _requests_for(c) for c in plan]
    # Each level has prompts of its own (both engines get the same ones): a prompt seen at an earlier
    # level would let a server with a prompt cache (llama-server's cache_prompt) skip its prefill.
    prompts = _prompts(sum(counts), model.config.vocab_size)
    first = [sum(counts[:k]) for k in range(len(counts))]
    env = dict(os.environ)

    commands: dict[str, list[str]] = {}
    ports: dict[str, int] = {}
    if not args.only_llama_server:
        ports["tokentrail"] = _free_port()
        commands["tokentrail"] = [
            sys.executable, "-m", "tokentrail.cli", "serve", "--model", str(path), "--dtype", args.dtype,
            "--host", "127.0.0.1", "--port", str(ports["tokentrail"]), "--parallel", str(args.parallel),
            "--max-queue", str(max(levels) * 2), "--threads", str(args.threads), *args.serve_args.split()]
    if args.llama_server:
        from tokentrail.loading import read_checkpoint
        from tokentrail.loading.gguf_writer import write_gguf

        gguf = path.parent / f"{path.parent.name}-{args.dtype}.gguf"
        if not gguf.exists():
            write_gguf(read_checkpoint(path), gguf, dtype=args.dtype)
        ctx = 2048
        ports["llama.cpp"] = _free_port()
        # -np slots share -c: give each slot the context a request needs (prompt + new tokens).
        commands["llama.cpp"] = [
            args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(ports["llama.cpp"]), "-np",
            str(args.parallel), "-c", str(ctx * args.parallel // 8), "-t", str(args.threads), "-cb"]
    if not commands:
        raise SystemExit("nothing to run: --only-llama-server needs --llama-server")
    # Both servers are up for the whole run (an idle one sleeps); each level runs on one, then the other.
    procs = {engine: _start(cmd, env, f"{args.server_log}.{engine}" if args.server_log else None)
             for engine, cmd in commands.items()}
    rows = []
    try:
        for engine, proc in procs.items():
            _wait_ready(f"http://127.0.0.1:{ports[engine]}", proc)
        for k, (clients, count, start) in enumerate(zip(plan, counts, first)):
            order = list(procs) if k % 2 == 0 else list(reversed(procs))
            for engine in order:
                load = os.getloadavg()[0]
                url = f"http://127.0.0.1:{ports[engine]}"
                before, cpu = _engine_metrics(url), _cpu_seconds(procs[engine].pid)
                row = asyncio.run(_level(url, clients, prompts[start: start + count], args.max_tokens, args.seconds))
                # Tokens per CPU-second of the server process: what the work cost, whatever else ran meanwhile.
                row["cpu_s"] = _cpu_seconds(procs[engine].pid) - cpu
                row["tokens_per_cpu_s"] = row["tokens"] / row["cpu_s"] if row["cpu_s"] else 0.0
                row["first_prompt"] = start
                row["engine_time"] = _engine_share(before, _engine_metrics(url), row["wall_s"])
                row["engine"], row["load_average"] = engine, round((load + os.getloadavg()[0]) / 2, 1)
                row["round"] = k // len(levels)
                rows.append(row)
                print(f"{engine:>10} {clients:>3} clients: {row['requests']} requests, {row['errors']} errors, "
                      f"{row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms'] or 0:.0f} ms "
                      f"p95 {row['ttft_p95_ms'] or 0:.0f} ms, ITL p50 {row['itl_p50_ms'] or 0:.1f} ms "
                      f"p95 {row['itl_p95_ms'] or 0:.1f} ms, {row['tokens_per_cpu_s']:.1f} tok/CPU-s, "
                      f"load {row['load_average']}", flush=True)
                if row["engine_time"]:
                    e = row["engine_time"]
                    print(f"{'':>10} engine: {e['steps']} steps of {e['tokens_per_step']:.1f} tokens, "
                          f"forward {e['forward_ms_per_step']:.1f} ms + other {e['other_ms_per_step']:.2f} ms "
                          f"per step, busy {100 * e['engine_busy']:.0f}% of the wall time", flush=True)
    finally:
        for proc in procs.values():
            _stop(proc)

    # Every greedy response must equal its prompt run alone (for llama.cpp: how many differ from tokentrail's).
    # With float activations the references come from one batched model.generate, whose greedy results equal
    # single runs (tests/test_batch.py). With int8 activations a product of fewer than INT8_MIN_ROWS rows
    # keeps the float path, so a row's logits depend on how many rows share its step: each prompt then
    # runs alone, and the mismatches count responses that batching changed.
    wanted = sorted({row["first_prompt"] + j for row in rows for j in row["texts"]})
    if exact:
        alone = dict(zip(wanted, (g.text for g in model.generate([prompts[i] for i in wanted],
                                                                 max_new_tokens=args.max_tokens, temperature=0))))
    else:
        alone = {i: model.generate(prompts[i], max_new_tokens=args.max_tokens, temperature=0).text for i in wanted}
    for row in rows:
        row["mismatches"] = sum(text != alone[row["first_prompt"] + j] for j, text in row.pop("texts").items())
        row["lost"] = (args.requests or _requests_for(row["clients"])) - row["requests"]
    # Each row against its engine's first level of the same round, and llama.cpp's same level of that round.
    base = {(r["engine"], r["round"]): r["tokens_per_s"] for r in rows if r["clients"] == levels[0]}
    by_level = {(r["engine"], r["clients"], r["round"]): r for r in rows}
    print("\n| engine | clients | round | requests | errors | lost | mismatches | tokens/s | x one client "
          "| x llama.cpp | tokens per CPU-s | x llama.cpp | TTFT p50 / p95 ms | ITL p50 / p95 ms | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["engine"] != "tokentrail", r["clients"], r["round"])):
        other = by_level.get(("llama.cpp", r["clients"], r["round"]))
        mine = other and r["engine"] == "tokentrail"
        vs = f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}" if mine and other["tokens_per_s"] else ""
        vs_cpu = f"{r['tokens_per_cpu_s'] / other['tokens_per_cpu_s']:.2f}" \
            if mine and other["tokens_per_cpu_s"] else ""
        print(f"| {r['engine']} | {r['clients']} | {r['round'] + 1} | {r['requests']} | {r['errors']} | {r['lost']} "
              f"| {r['mismatches']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base[r['engine'], r['round']]:.2f} "
              f"| {vs} "
              f"| {r['tokens_per_cpu_s']:.1f} | {vs_cpu} "
              f"| {r['ttft_p50_ms'] or 0:.0f} / {r['ttft_p95_ms'] or 0:.0f} "
              f"| {r['itl_p50_ms'] or 0:.1f} / {r['itl_p95_ms'] or 0:.1f} | {r['load_average']} |")
    if args.rounds > 1:
        print("\nMedians over the rounds (tokens/s: median, and the rounds' range; x one client: the median of "
              "each round's own ratio):\n")
        print("| engine | clients | tokens/s | range | x one client | range | TTFT p50 ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for engine in commands:
            for clients in levels:
                mine = [r for r in rows if r["engine"] == engine and r["clients"] == clients]
                rates = [r["tokens_per_s"] for r in mine]
                ratios = [r["tokens_per_s"] / base[engine, r["round"]] for r in mine]
                print(f"| {engine} | {clients} | {statistics.median(rates):.1f} | {min(rates):.1f}-{max(rates):.1f} "
                      f"| {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} "
                      f"| {statistics.median(r['ttft_p50_ms'] or 0 for r in mine):.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"engines": list(commands), "model": str(path), "dtype": args.dtype,
                               "parallel": args.parallel, "max_tokens": args.max_tokens, "threads": args.threads,
                               "serve_args": args.serve_args, "rounds": args.rounds, "levels": rows,
                               "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Conversations against the server: the prompt cache on and off, and llama.cpp's llama-server.

    python bench/prompt_cache.py --shape smollm --dtype q8_0 --clients 4 --turns 6
    python bench/prompt_cache.py --llama-server /path/to/llama-server      # llama.cpp's too, same GGUF

Each client holds a conversation: a system prompt shared by all clients
(`--system` token ids), then `--turns` turns, each adding a user message of
32-64 ids and asking for `--max-tokens` greedy tokens; the next turn sends
the whole history again (system prompt, every user message and reply so
far, the new message), as chat clients do. (The replies go back into the
history as the client's own ids rather than the generated ones, so a
server can reuse at most the previous turn's prompt; the same for every
server.) The configurations run one after another on the same
conversations: tokentrail with its prompt cache (`--prompt-cache`, on by
default) and without it (`--prompt-cache 0`); with `--llama-server`,
llama-server with its `cache_prompt` (on by default) and without. Reported:
time to first token by turn (p50), the whole run's wall time and
generated tokens/s (of the replies that came back), and whether each greedy
reply equals tokentrail's without the cache. Only loopback is used.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_load import _free_port, _one, _start, _stop, _wait_ready  # noqa: E402


def conversations(clients: int, turns: int, system: int, max_tokens: int, vocab: int, seed: int = 0):
    """Per client, per turn: (the user message's ids, the ids standing for the reply in the history)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shared = rng.integers(3, vocab - 1, system).tolist()
    convs = [[(rng.integers(3, vocab - 1, int(rng.integers(32, 65))).tolist(),
               rng.integers(3, vocab - 1, max_tokens).tolist()) for _ in range(turns)] for _ in range(clients)]
    return shared, convs


async def run_conversations(url: str, shared, convs, max_tokens: int, extra: dict) -> dict:
    import httpx

    turns = len(convs[0])
    ttft = [[] for _ in range(turns)]
    texts: dict[tuple[int, int], str] = {}
    errors: list[str] = []

    async def one(client, c: int):
        history = list(shared)
        for t, (user, reply) in enumerate(convs[c]):
            prompt = history + user
            try:
                r = await _one(client, url, prompt, max_tokens, extra)
            except Exception as e:  # noqa: BLE001 - counted as an error of the run
                r = {"error": f"{type(e).__name__}: {e}"}
            if "error" in r:
                errors.append(r["error"])
                return
            ttft[t].append(r["ttft"])
            texts[(c, t)] = r["text"]
            history = prompt + reply

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(convs) + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, c) for c in range(len(convs))))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens_per_s": len(texts) * max_tokens / wall,
            "ttft_p50_ms": [1e3 * statistics.median(x) if x else None for x in ttft],
            "errors": errors[:5], "texts": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm", help="model shape from bench/shapes.py (random weights)")
    ap.add_argument("--dtype", default="q8_0")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system", type=int, default=256, help="ids of the system prompt every conversation shares")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--serve-args", default="", help="more flags for `tokentrail serve`")
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server: run it too")
    ap.add_argument("--root", default=str(HERE / "results" / "models"))
    ap.add_argument("--out", default=str(HERE / "results" / "prompt_cache.json"))
    args = ap.parse_args()

    from shapes import make_model

    path = Path(args.root) / args.shape / "hf"
    if not (path / "config.json").exists():
        make_model(args.shape, path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    shared, convs = conversations(args.clients, args.turns, args.system, args.max_tokens, vocab)
    env = dict(os.environ)
    configs = []  # (name, command, port, extra request fields)
    for name, cache in (("tokentrail, prompt cache", []), ("tokentrail, no prompt cache", ["--prompt-cache", "0"])):
        port = _free_port()
        configs.append((name, [sys.executable, "-m", "tokentrail.cli", "serve", "--model", str(path), "--dtype",
                               args.dtype, "--port", str(port), "--parallel", str(args.clients), "--threads",
                               str(args.threads), *cache, *args.serve_args.split()], port, {}))
    if args.llama_server:
        from tokentrail.loading import read_checkpoint
        from tokentrail.loading.gguf_writer import write_gguf

        gguf = path.parent / f"{path.parent.name}-{args.dtype}.gguf"
        if not gguf.exists():
            write_gguf(read_checkpoint(path), gguf, dtype=args.dtype)
        ctx = args.system + args.turns * (64 + args.max_tokens) + 64
        for name, cache in (("llama-server, cache_prompt", True), ("llama-server, no cache_prompt", False)):
            port = _free_port()
            configs.append((name, [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                   "-np", str(args.clients), "-c", str(ctx * args.clients), "-t", str(args.threads),
                                   "-cb"], port, {"cache_prompt": cache}))
    rows = []
    for name, cmd, port, extra in configs:
        proc = _start(cmd, env)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, proc)
            load = os.getloadavg()[0]
            row = asyncio.run(run_conversations(url, shared, convs, args.max_tokens, extra))
            row["config"], row["load_average"] = name, round((load + os.getloadavg()[0]) / 2, 1)
        finally:
            _stop(proc)
        rows.append(row)
        print(f"{name:>30}: {row['wall_s']:.2f} s, {row['tokens_per_s']:.1f} tok/s, TTFT p50 by turn (ms) "
              + " ".join(f"{x:.0f}" if x is not None else "-" for x in row["ttft_p50_ms"])
              + (f", errors {row['errors']}" if row["errors"] else ""), flush=True)
    reference = next((r["texts"] for r in rows if r["config"] == "tokentrail, no prompt cache"), {})
    for row in rows:
        texts = row.pop("texts")
        row["replies"] = len(texts)
        row["differ_from_tokentrail_uncached"] = sum(text != reference.get(key) for key, text in texts.items())
    base = next((r for r in rows if r["config"] == "tokentrail, no prompt cache"), rows[0])
    print(f"\n{args.clients} conversations of {args.turns} turns, system prompt {args.system} ids, "
          f"{args.max_tokens} new tokens per turn; {args.shape} {args.dtype}, {args.threads} threads\n")
    # tokens/s counts the replies that came back: a server that dropped some is not credited with them.
    print("| server | wall s | tokens/s | x tokentrail uncached | TTFT p50 by turn (ms) | replies | differ | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        turns = " / ".join(f"{x:.0f}" if x is not None else "-" for x in r["ttft_p50_ms"])
        print(f"| {r['config']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} "
              f"| {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {turns} | {r['replies']} "
              f"| {r['differ_from_tokentrail_uncached']} | {r['load_average']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": args.shape, "dtype": args.dtype, "clients": args.clients,
                               "turns": args.turns, "system": args.system, "max_tokens": args.max_tokens,
                               "threads": args.threads, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M")},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Plot bench/serve_load.py results: aggregate tokens/s and time to first token against clients.

    python bench/plot_serve.py OUT.png RUN.json[=LABEL] [RUN.json[=LABEL] ...]   (pip install ".[bench]")

Each run file holds one or two engines (tokentrail, and llama.cpp's llama-server when it ran);
LABEL names the tokentrail line of that run (e.g. "tokentrail --no-exact"). Two panels share the
client axis (logarithmic): aggregate decode tokens/s, and time to first token p50 with its p95 as
a shaded band.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLORS = ["#2a7", "#c84", "#a5c", "#7b3"]  # tokentrail runs in order; llama-server is always blue
LLAMA_COLOR = "#47a"


def lines_of(path: Path, label: str | None) -> list[tuple[str, list[dict]]]:
    """(label, levels sorted by clients) for each engine of one run file."""
    data = json.loads(path.read_text())
    by_engine: dict[str, list[dict]] = {}
    for row in data["levels"]:
        by_engine.setdefault(row["engine"], []).append(row)
    out = []
    for engine, rows in by_engine.items():
        name = label if (label and engine == "tokentrail") else ("llama-server" if engine == "llama.cpp" else engine)
        # With several rounds, each level's round of median tokens/s stands for it.
        levels: dict[int, list[dict]] = {}
        for r in rows:
            levels.setdefault(r["clients"], []).append(r)
        median = [sorted(rs, key=lambda r: r["tokens_per_s"])[(len(rs) - 1) // 2] for rs in levels.values()]
        out.append((name, sorted(median, key=lambda r: r["clients"])))
    return out


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out = Path(argv[0])
    lines: dict[str, list[dict]] = {}
    for spec in argv[1:]:
        path, _, label = spec.partition("=")
        for name, rows in lines_of(Path(path), label or None):
            lines.setdefault(name, rows)  # llama-server from the first run that has it

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, ttft) = plt.subplots(1, 2, figsize=(10, 3.8))
    ours = iter(COLORS)
    for name, rows in lines.items():
        color = LLAMA_COLOR if name == "llama-server" else next(ours)
        clients = [r["clients"] for r in rows]
        rate.plot(clients, [r["tokens_per_s"] for r in rows], "o-", color=color, label=name)
        ttft.plot(clients, [r["ttft_p50_ms"] for r in rows], "o-", color=color, label=name)
        ttft.fill_between(clients, [r["ttft_p50_ms"] for r in rows], [r["ttft_p95_ms"] for r in rows],
                          color=color, alpha=0.15)
    for ax in (rate, ttft):
        ax.set_xscale("log", base=2)
        ticks = sorted({r["clients"] for rows in lines.values() for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    rate.set_ylabel("aggregate decode tokens/s")
    rate.set_title("throughput (higher is better)")
    ttft.set_yscale("log")
    ttft.set_ylabel("time to first token, ms (p50; band to p95)")
    ttft.set_title("time to first token (lower is better)")
    rate.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])

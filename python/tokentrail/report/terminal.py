"""The journey in a terminal, with rich: readable on an 80-column screen."""
from __future__ import annotations

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import thermo


def _bar(value: float, width: int = 12) -> str:
    n = int(round(max(0.0, min(1.0, value)) * width))
    return "█" * n + "·" * (width - n)


def _tok(s: str, limit: int = 12) -> str:
    r = repr(s)[1:-1]
    return r if len(r) <= limit else r[: limit - 1] + "…"


def print_journey(j, width: int | None = None, console: Console | None = None) -> None:
    console = console or Console(width=width, highlight=False)
    console.rule(f"[bold]the journey of {j.tokens[j.position]!r} (position {j.position})")
    for stage in j:
        console.print(Text(stage.title, style="bold cyan"), Text(stage.text))
        if stage.kind == "attention":
            _attention_table(console, stage)
    console.rule("logit lens")
    lens = j.logit_lens(top=3)
    t = Table(box=box.SIMPLE, show_edge=False)
    t.add_column("after")
    t.add_column("top prediction")
    t.add_column("p", justify="right")
    t.add_column(f"p({_tok(j.token(j.chosen))})", justify="right")
    for label, toks, ps, pc in zip(lens["labels"], lens["top_tokens"], lens["top_probs"], lens["chosen_prob"]):
        t.add_row(label, _tok(toks[0], 16), f"{ps[0]:.2f}", f"{pc:.2f} {_bar(pc, 8)}")
    console.print(t)
    console.rule(f"direct logit attribution of {j.token(j.chosen)!r}")
    a = j.attribution()
    parts = sorted(a["parts"], key=lambda kv: -abs(kv[1]))[:10]
    scale = max(abs(v) for _, v in parts) or 1.0
    t = Table(box=box.SIMPLE, show_edge=False)
    t.add_column("part")
    t.add_column("logit", justify="right")
    t.add_column("")
    for name, v in parts:
        t.add_row(name, f"{v:+.3f}", Text(_bar(abs(v) / scale, 20), style="green" if v >= 0 else "red"))
    console.print(t)
    console.print(f"sum of all {len(a['parts'])} parts {a['total']:+.4f} = logit {a['logit']:+.4f}")
    console.rule("geometry of the decision")
    t = Table(box=box.SIMPLE, show_edge=False)
    for col in ("token", "logit = h·u", "cos(h, u)", "|u|"):
        t.add_column(col, justify="right" if col != "token" else "left")
    for g in j.geometry():
        t.add_row(_tok(g["token"], 16), f"{g['dot']:.2f}", f"{g['cosine']:.3f}", f"{g['unembed_norm']:.2f}")
    console.print(t)


def _attention_table(console: Console, stage) -> None:
    pattern = stage.data["pattern"]          # [heads, keys]
    keys = stage.data["keys"]
    # Show the most recent keys that fit 80 columns: head label + up to 7 key columns.
    shown = list(range(max(0, len(keys) - 7), len(keys)))
    t = Table(box=box.MINIMAL, show_edge=False, padding=(0, 1))
    t.add_column("head")
    for k in shown:
        t.add_column(_tok(keys[k], 7), justify="right")
    for h, row in enumerate(pattern):
        cells = []
        for k in shown:
            v = float(row[k])
            cells.append(Text(f"{v:.2f}", style="bold" if v == row.max() else ("dim" if v < 0.1 else "")))
        t.add_row(f"{h}", *cells)
    console.print(t)


def print_temperature_table(model, logits, temperatures, top: int = 8, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    order = np.argsort(-logits, kind="stable")[:top]
    t = Table(title="next-token probabilities by temperature", box=box.SIMPLE)
    t.add_column("token")
    t.add_column("logit", justify="right")
    sweep = thermo.sweep(logits, temperatures)
    for s in sweep:
        t.add_column(f"T={s.temperature:g}", justify="right")
    for i in order:
        t.add_row(_tok(model.tokenizer.display(int(i)), 14), f"{logits[i]:.2f}",
                  *[f"{s.probs[i]:.3f}" for s in sweep])
    t.add_row("entropy (bits)", "", *[f"{s.entropy_bits + 0.0:.2f}" for s in sweep])
    t.add_row("effective choices", "", *[f"{s.effective_choices:.1f}" for s in sweep])
    console.print(t)

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


# Room for the head label column and each key column (two decimals, or a 7-character label).
_HEAD_COLUMN = 6
_KEY_COLUMN = 8
# The most recent keys every attention table keeps.
_RECENT_KEYS = 3


def print_journey(j, width: int | None = None, console: Console | None = None) -> None:
    """Print a journey's stages, attention tables, logit lens, attribution and geometry."""
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 40):
        raise ValueError(f"width: must be an integer >= 40 columns, got {width!r}")
    console = console or Console(width=width, highlight=False)
    console.rule(f"[bold]the journey of {j.tokens[j.position]!r} (position {j.position})")
    for stage in j:
        console.print(Text(stage.title, style="bold cyan"), Text(stage.text))
        if stage.kind == "attention":
            _attention_tables(console, stage)
        elif stage.kind == "choice":
            _candidates_table(console, j)
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
    if "capped_total" in a:  # the parts add up to the logit before the model's final softcap
        c = a["softcap"]
        console.print(f"sum of all {len(a['parts'])} parts {a['total']:+.4f}; after the final softcap "
                      f"{c:g}·tanh(sum/{c:g}) = {a['capped_total']:+.4f} = logit {a['logit']:+.4f}")
    else:
        console.print(f"sum of all {len(a['parts'])} parts {a['total']:+.4f} = logit {a['logit']:+.4f}")
    console.rule("geometry of the decision")
    t = Table(box=box.SIMPLE, show_edge=False)
    for col in ("token", "h·u (the logit before any softcap)" if j.config.final_softcap else "logit = h·u",
                "cos(h, u)", "|u|"):
        t.add_column(col, justify="right" if col != "token" else "left")
    for g in j.geometry():
        t.add_row(_tok(g["token"], 16), f"{g['dot']:.2f}", f"{g['cosine']:.3f}", f"{g['unembed_norm']:.2f}")
    console.print(t)


def _candidates_table(console: Console, j) -> None:
    """The top candidates under the model's distribution and under the one the token was drawn from."""
    model_p, drawn_p = j.stats.probs, j.draw.probs
    order = list(np.argsort(-model_p, kind="stable")[: j.top])
    if j.chosen not in order:
        order.append(j.chosen)
    t = Table(box=box.SIMPLE, show_edge=False)
    t.add_column("candidate")
    t.add_column("model p", justify="right")
    t.add_column("after the chain", justify="right")
    t.add_column("")
    for i in order:
        t.add_row(_tok(j.token(int(i)), 16), f"{model_p[i]:.3f}", f"{drawn_p[i]:.3f} {_bar(drawn_p[i], 10)}",
                  Text("◀ chosen", style="bold green") if i == j.chosen else "")
    console.print(t)


def attention_columns(pattern: np.ndarray, max_columns: int, recent: int = _RECENT_KEYS) -> list[int]:
    """Which key positions a table of `max_columns` keys shows, in order.

    Always the strongest key of every head and the followed token (the
    last key), then the other `recent` last keys and the first key, then the keys with the most attention in any head,
    until the table is full. (Gaps between shown keys take columns of their
    own in the printed table, so the caller counts those as well.)
    """
    n_keys = pattern.shape[1]
    must = {int(np.argmax(row)) for row in pattern} | {n_keys - 1}
    chosen = set(must)
    for k in [*range(n_keys - 1, max(-1, n_keys - 1 - recent), -1), 0]:
        if _width_of(chosen | {k}, n_keys) <= max_columns:
            chosen.add(k)
    for k in np.argsort(-pattern.max(axis=0), kind="stable"):
        if _width_of(chosen | {int(k)}, n_keys) <= max_columns:
            chosen.add(int(k))
    return sorted(chosen)


def _width_of(keys: set[int], n_keys: int) -> int:
    """Columns a table needs for these keys: one each, plus one marker per run of hidden keys."""
    shown = sorted(keys)
    gaps = sum(1 for a, b in zip([-1, *shown], [*shown, n_keys]) if b - a > 1)
    return len(shown) + gaps


def _head_groups(pattern: np.ndarray, max_columns: int) -> list[list[int]]:
    """Heads split into tables whose strongest keys fit the width together."""
    groups: list[list[int]] = []
    n_keys = pattern.shape[1]
    for h in range(pattern.shape[0]):
        if groups:
            keys = {int(np.argmax(pattern[g])) for g in groups[-1] + [h]} | {n_keys - 1}
            if _width_of(keys, n_keys) <= max_columns:
                groups[-1].append(h)
                continue
        groups.append([h])
    return groups


def _attention_tables(console: Console, stage) -> None:
    pattern = stage.data["pattern"]          # [heads, keys]
    keys = stage.data["keys"]
    max_columns = max(3, (console.width - _HEAD_COLUMN) // _KEY_COLUMN)
    for heads in _head_groups(pattern, max_columns):
        _attention_table(console, pattern, keys, heads, max_columns)


def _attention_table(console: Console, pattern: np.ndarray, keys: list[str], heads: list[int],
                     max_columns: int) -> None:
    sub = pattern[heads]
    shown = attention_columns(sub, max_columns)
    # Each run of hidden keys becomes one marker column: "…N" hidden keys, cells = their total attention.
    layout: list[int | tuple[int, int]] = []
    previous = -1
    for k in [*shown, len(keys)]:
        if k - previous > 1:
            layout.append((previous + 1, k))
        if k < len(keys):
            layout.append(k)
        previous = k
    t = Table(box=box.MINIMAL, show_edge=False, padding=(0, 1))
    t.add_column("head")
    for item in layout:
        if isinstance(item, tuple):
            t.add_column(Text(f"…{item[1] - item[0]}", style="dim italic"), justify="right")
        else:
            t.add_column(f"{_tok(keys[item], 7)}\n{item}", justify="right")
    for h, row in zip(heads, sub):
        cells = []
        strongest = int(np.argmax(row))
        for item in layout:
            if isinstance(item, tuple):
                cells.append(Text(f"{float(row[item[0]:item[1]].sum()):.2f}", style="dim italic"))
            else:
                v = float(row[item])
                cells.append(Text(f"{v:.2f}", style="bold" if item == strongest else ("dim" if v < 0.1 else "")))
        t.add_row(f"{h}", *cells)
    hidden = sum(b - a for item in layout if isinstance(item, tuple) for a, b in [item])
    if hidden:
        t.caption = f"{len(keys) - hidden} of {len(keys)} keys shown; …N columns: N hidden keys, their total attention"
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

"""The journey as one self-contained HTML page: no network at view time.

    write_report(model.journey("The storm is"), "journey.html")
    write_report(follow_generation(model, "The storm is", 8, seed=1), "journey.html")

The page carries the engine's numbers as JSON (every journey's stages, the
followed token's attention rows, the logit lens, the attribution, the sampler
chain stage by stage and the full next-token logits) plus the attention
tables of every position, packed as 16-bit (or, for very large ones, 8-bit)
fractions. The stylesheet and the script in ``static/`` are inlined, so the
file opens anywhere, offline. The sliders for temperature, top-k and top-p
recompute the distribution in the page with the rules of
tokentrail.sampling (Temperature, TopK, TopP, in generate's default order).
"""
from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

STATIC = Path(__file__).parent / "static"
# Attention tables with more entries than this are packed as 8-bit fractions, not 16-bit.
U16_ENTRIES = 8_000_000
# Top logits whose token text travels with each step (the sliders list the most likely).
LISTED_TOKENS = 60
# Attribution parts listed by name; the rest are summed into one bar.
ATTRIBUTION_PARTS = 16


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _attention_block(journeys) -> dict:
    """Every layer's and head's attention rows up to the last followed position, packed.

    Layout: for layer l, head h, each query row q (in `queries` order) holds
    keys 0..q. Values are fractions of 65535 (u16) or 255 (u8).
    """
    last = journeys[-1]
    c = last.config
    rows_per_layer = []
    queries = None
    for layer in range(c.n_layers):
        q, tables = last.attention_tables(layer)       # [heads, queries, keys]
        queries = q
        rows_per_layer.append(np.concatenate([tables[:, i, : qpos + 1] for i, qpos in enumerate(q)], axis=1))
    packed = np.stack(rows_per_layer)                  # [layers, heads, sum(q + 1)]
    wide = packed.size <= U16_ENTRIES
    scale = 65535 if wide else 255
    values = np.rint(np.clip(packed, 0.0, 1.0) * scale).astype("<u2" if wide else "u1")
    return {"encoding": "u16" if wide else "u8", "scale": scale, "queries": queries, "data": _b64(values)}


def _step_data(j) -> dict:
    c = j.config
    p = j.position
    lens = j.logit_lens()
    layers = []
    stages = list(j)
    attention = [s for s in stages if s.kind == "attention"]
    for layer in range(c.n_layers):
        row = j.attention(layer)
        layers.append({
            "heads": attention[layer].data["heads"],
            "row": np.round(row, 5).tolist(),                 # [heads, keys 0..p]
            "attn_norm": float(np.linalg.norm(j._row(f"blocks.{layer}.attn_out"))),
            "mlp_norm": float(np.linalg.norm(j._row(f"blocks.{layer}.mlp_out"))),
            "resid_norm": float(np.linalg.norm(j._row(f"blocks.{layer}.resid_post"))),
        })
    a = j.attribution()
    order = np.argsort(-j.logits, kind="stable")[:LISTED_TOKENS]
    chain = [s.data for s in stages if s.kind == "sampler"]
    for stage in chain:
        stage.pop("removed_ids", None)
    drawn = j.draw.probs
    final = list(np.argsort(-drawn, kind="stable")[: max(j.top, 10)])
    if j.chosen not in final:   # an unlikely draw is still shown
        final.append(j.chosen)
    initial = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    for proc in j.sampler_chain:
        name = getattr(proc, "name", "")
        if name == "temperature" and hasattr(proc, "temperature"):
            initial["temperature"] = float(proc.temperature)
        elif name == "top_k":
            initial["top_k"] = int(proc.k)
        elif name == "top_p":
            initial["top_p"] = float(proc.p)
    return {
        "position": p,
        "length": len(j.ids),
        "chosen": {"id": j.chosen, "text": j.token(j.chosen), "prob": float(drawn[j.chosen]),
                   "model_prob": float(j.stats.probs[j.chosen])},
        "seed": str(j.seed),
        "sampled": j.sampled,
        "stages": [{"kind": s.kind, "title": s.title, "text": s.text, "layer": s.layer} for s in stages],
        "embed_norm": float(np.linalg.norm(j._row("embed"))),
        "layers": layers,
        "lens": {"labels": lens["labels"], "top_tokens": lens["top_tokens"],
                 "top_probs": np.round(lens["top_probs"], 5).tolist(),
                 "chosen_prob": [float(x) for x in lens["chosen_prob"]],
                 "chosen_rank": [r + 1 for r in lens["chosen_rank"]]},
        "attribution": {"token": a["text"], "logit": a["logit"], "total": a["total"],
                        "parts": [[k, v] for k, v in a["parts"]],
                        # with a final logit softcap the parts add up to the logit before it
                        "softcap": a.get("softcap"), "capped_total": a.get("capped_total")},
        "final_norm": float(np.linalg.norm(j.final_hidden())),
        "entropy_bits": j.stats.entropy_bits + 0.0,
        "effective_choices": j.stats.effective_choices,
        # float32 logits, bit for bit, little-endian
        "logits": _b64(j.logits.astype("<f4")),
        "token_text": {str(int(i)): j.token(int(i)) for i in order},
        "chain": chain,
        "chain_names": [getattr(proc, "name", type(proc).__name__) for proc in j.sampler_chain],
        "final": [{"id": int(i), "token": j.token(int(i)), "model": float(j.stats.probs[i]),
                   "drawn": float(drawn[i])} for i in final],
        "initial": initial,
    }


def report_data(journeys) -> dict:
    """Everything the page shows, as JSON-ready values."""
    journeys = [journeys] if not isinstance(journeys, Sequence) else list(journeys)
    if not journeys:
        raise ValueError("journeys: give at least one journey")
    first, last = journeys[0], journeys[-1]
    c = first.config
    # The sequence the last step saw: the prompt, then the tokens generated before its own.
    ids = list(last.ids)
    tokens = [last.token(i) for i in ids]
    grid = last.lens_grid()
    model = last.model
    return {
        "model": {"source": str(getattr(model, "source", "")), "layers": c.n_layers, "heads": c.n_heads,
                  "kv_heads": c.n_kv_heads, "d_model": c.hidden_size, "vocab": c.vocab_size,
                  "norm": "RMSNorm" if c.norm == "rms" else "LayerNorm",
                  "positions": "learned" if c.position == "learned" else "rotary"},
        "tokens": tokens,
        "ids": ids,
        "prompt_length": len(first.ids),
        "generated": len(journeys) > 1,
        "attention": _attention_block(journeys) if last.full_attention else None,
        "lens_grid": {"labels": grid["labels"], "tokens": grid["tokens"],
                      "probs": np.round(np.asarray(grid["probs"]), 4).tolist()},
        "steps": [_step_data(j) for j in journeys],
    }


def write_report(journeys, path) -> Path:
    """Write one self-contained page for a Journey or a list of them (one per generated token)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output: {str(path)!r} is a directory; give a file name such as journey.html")
    data = report_data(journeys)
    steps = data["steps"]
    followed = data["tokens"][steps[0]["position"]]
    title = (f"tokentrail · the journeys of {len(steps)} tokens generated after {followed!r}" if data["generated"]
             else f"tokentrail · the journey of {followed!r}")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    page = (STATIC / "page.html").read_text(encoding="utf-8")
    page = page.replace("/*CSS*/", (STATIC / "page.css").read_text(encoding="utf-8"))
    page = page.replace("/*JS*/", (STATIC / "page.js").read_text(encoding="utf-8"))
    page = page.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    path.write_text(page, encoding="utf-8")
    return path

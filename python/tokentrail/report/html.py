"""The journey as one self-contained HTML page: no network at view time.

The page carries the real numbers as JSON (attention tables, the logit-lens
grid, the attribution, and the full next-token logit vector) and small inline
scripts that draw them. The temperature slider recomputes the softmax in the
page from the stored logits, the same formula as tokentrail.thermo.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np


def journey_data(j) -> dict:
    c = j.config
    n = len(j.ids)
    attention = []
    # Long prompts keep only the followed position's row of each table.
    query_rows = list(range(n)) if j.full_attention else [j.position]
    for layer in range(c.n_layers):
        pat = j.cache[f"blocks.{layer}.attn_pattern"]  # [query, head, key]
        attention.append(np.round(pat.transpose(1, 0, 2)[:, :, :n], 4).tolist())
    lens = j.lens_grid()
    a = j.attribution()
    parts = sorted(a["parts"], key=lambda kv: -abs(kv[1]))[:24]
    vocab_text = None
    order = np.argsort(-j.logits, kind="stable")[:200]
    vocab_text = {int(i): j.token(int(i)) for i in order}
    return {
        "prompt_tokens": j.tokens,
        "position": j.position,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "attention": attention,
        "attention_rows": query_rows,
        "lens": lens,
        "attribution": {"token": a["text"], "logit": a["logit"], "total": a["total"],
                        "parts": [[k, v] for k, v in parts], "n_parts": len(a["parts"])},
        # float32 logits written as the exact doubles they convert to
        "logits": [float(x) for x in j.logits],
        "token_text": vocab_text,
        "temperature": j.temperature,
        "chosen": {"id": j.chosen, "text": j.token(j.chosen)},
        "stages": [{"title": s.title, "text": s.text} for s in j],
        "model": {"layers": c.n_layers, "heads": c.n_heads, "d_model": c.hidden_size, "vocab": c.vocab_size},
    }


def write_report(j, path) -> Path:
    path = Path(path)
    data = journey_data(j)
    title = f"tokentrail · the journey of {j.tokens[j.position]!r}"
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    path.write_text(PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload), encoding="utf-8")
    return path


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
code,.tok{font-family:ui-monospace,monospace;background:#f3f3f3;padding:0 .25em;border-radius:3px;white-space:pre}
.stages li{margin:.15em 0}.stages b{color:#246}
.heads{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-end}.head{text-align:center;font-size:11px;cursor:pointer}
.head canvas{border:1px solid #ccc;image-rendering:pixelated}.head.sel canvas{border-color:#c00}
#big{margin-top:.6em}#bigc{border:1px solid #999}
table.lens{border-collapse:collapse;font-size:12px}table.lens td,table.lens th{border:1px solid #ddd;padding:2px 4px;text-align:center}
.bar{height:12px;display:inline-block;vertical-align:middle}.pos{background:#3a7}.neg{background:#c44}
.row{display:flex;gap:.5em;align-items:center}.row .name{width:9em;font-family:monospace}.row .val{width:5em;text-align:right}
#probs .name{width:12em}#probs .bar{background:#47a}
</style></head><body>
<h1>__TITLE__</h1>
<p id="summary"></p>
<h2>Stages</h2><ol class="stages" id="stages"></ol>
<h2>Attention, per layer and head</h2>
<p>Each square is one head's table: row = query position, column = key position; darker = more probability. Click a head to enlarge it.</p>
<div id="attention"></div><div id="big"></div>
<h2>Logit lens</h2>
<p>What each position's residual stream would predict if the model stopped after that layer (through the real final norm and unembedding).</p>
<div id="lens"></div>
<h2>Direct logit attribution</h2><p id="attr-sum"></p><div id="attr"></div>
<h2>Next token: softmax at a temperature</h2>
<p>p<sub>i</sub> = exp(l<sub>i</sub>/T) / Z, computed here from the model's stored logits (the Boltzmann distribution with energies −l<sub>i</sub>).</p>
<label>T = <output id="tval"></output> <input id="temp" type="range" min="0" max="3" step="0.05"></label>
<p id="entropy"></p><div id="probs"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const el = (tag, attrs, text) => { const e = document.createElement(tag); Object.assign(e, attrs || {}); if (text !== undefined) e.textContent = text; return e; };
const show = t => JSON.stringify(t);
document.getElementById("summary").textContent =
  `${D.model.layers} layers × ${D.model.heads} heads, width ${D.model.d_model}, vocabulary ${D.model.vocab}. ` +
  `Prompt tokens: ${D.prompt_tokens.map(show).join(" ")}. Followed: ${show(D.prompt_tokens[D.position])}; chosen next token: ${show(D.chosen.text)}.`;
const ol = document.getElementById("stages");
for (const s of D.stages) { const li = el("li"); li.append(el("b", {}, s.title + ": "), document.createTextNode(s.text)); ol.append(li); }

function drawPattern(canvas, m, cell) {
  const n = D.prompt_tokens.length, rows = D.attention_rows; canvas.width = n * cell; canvas.height = rows.length * cell;
  const g = canvas.getContext("2d");
  rows.forEach((q, r) => { for (let k = 0; k < n; k++) {
    const v = m[r][k]; g.fillStyle = k > q ? "#f4f4f4" : `rgba(20,60,160,${v})`; g.fillRect(k * cell, r * cell, cell, cell);
  } });
}
const att = document.getElementById("attention");
const n = D.prompt_tokens.length;
const small = Math.max(2, Math.min(8, Math.floor(64 / n)));
function enlarge(l, h, node) {
  document.querySelectorAll(".head.sel").forEach(x => x.classList.remove("sel")); node.classList.add("sel");
  const big = document.getElementById("big"); big.innerHTML = "";
  big.append(el("div", {}, `layer ${l}, head ${h}`));
  const m = D.attention[l][h]; const t = el("table", {className: "lens"});
  const hr = el("tr"); hr.append(el("th", {}, "query \\ key")); for (const tk of D.prompt_tokens) hr.append(el("th", {}, show(tk))); t.append(hr);
  m.forEach((row, r) => { const q = D.attention_rows[r]; const tr = el("tr"); tr.append(el("th", {}, show(D.prompt_tokens[q])));
    row.forEach((v, k) => { const td = el("td", {}, k > q ? "" : v.toFixed(2)); if (k <= q) td.style.background = `rgba(20,60,160,${v * 0.8})`; if (v > 0.5) td.style.color = "#fff"; tr.append(td); });
    t.append(tr); });
  big.append(t);
}
for (let l = 0; l < D.n_layers; l++) {
  const row = el("div", {className: "heads"}); row.append(el("span", {}, `L${l}`));
  for (let h = 0; h < D.n_heads; h++) {
    const box = el("div", {className: "head", title: `layer ${l} head ${h}`});
    const c = el("canvas"); drawPattern(c, D.attention[l][h], small); box.append(c, el("div", {}, `H${h}`));
    box.addEventListener("click", () => enlarge(l, h, box)); row.append(box);
  }
  att.append(row);
}
// Logit lens grid: rows = layers, columns = positions.
const lt = el("table", {className: "lens"}); const head = el("tr"); head.append(el("th", {}, "after"));
for (const tk of D.prompt_tokens) head.append(el("th", {}, show(tk))); lt.append(head);
D.lens.labels.forEach((lab, r) => { const tr = el("tr"); tr.append(el("th", {}, lab));
  D.lens.tokens[r].forEach((tk, c) => { const p = D.lens.probs[r][c]; const td = el("td", {title: `p=${p.toFixed(3)}`}, show(tk));
    td.style.background = `rgba(60,160,90,${p})`; tr.append(td); }); lt.append(tr); });
document.getElementById("lens").append(lt);
// Attribution bars.
const A = D.attribution; const amax = Math.max(...A.parts.map(p => Math.abs(p[1]))) || 1;
document.getElementById("attr-sum").textContent =
  `Logit of ${show(A.token)} = ${A.logit.toFixed(4)}; the ${A.n_parts} parts sum to ${A.total.toFixed(4)}. Largest parts:`;
for (const [name, v] of A.parts) { const r = el("div", {className: "row"});
  r.append(el("span", {className: "name"}, name), el("span", {className: "val"}, (v >= 0 ? "+" : "") + v.toFixed(3)));
  const b = el("span", {className: "bar " + (v >= 0 ? "pos" : "neg")}); b.style.width = (300 * Math.abs(v) / amax) + "px"; r.append(b);
  document.getElementById("attr").append(r); }
// Temperature slider: softmax of the stored logits, max subtracted first (exact at small T).
const L = D.logits; const order = L.map((v, i) => i).sort((a, b) => L[b] - L[a] || a - b).slice(0, 12);
function softmax(T) {
  const top = Math.max(...L); const V = L.length; const p = new Float64Array(V);
  if (T === 0) { let c = 0; for (let i = 0; i < V; i++) if (L[i] === top) c++; for (let i = 0; i < V; i++) p[i] = L[i] === top ? 1 / c : 0; return p; }
  let z = 0; for (let i = 0; i < V; i++) { p[i] = Math.exp((L[i] - top) / T); z += p[i]; }
  for (let i = 0; i < V; i++) p[i] /= z; return p;
}
function render(T) {
  document.getElementById("tval").textContent = T.toFixed(2);
  const p = softmax(T); let h = 0; for (const x of p) if (x > 0) h -= x * Math.log(x);
  document.getElementById("entropy").textContent = `entropy ${(h / Math.LN2).toFixed(3)} bits, effective choices ${Math.exp(h).toFixed(2)}`;
  const box = document.getElementById("probs"); box.innerHTML = "";
  for (const i of order) { const r = el("div", {className: "row"}); r.dataset.token = i;
    r.append(el("span", {className: "name"}, show(D.token_text[i])));
    const v = el("span", {className: "val prob"}, p[i].toFixed(4)); v.dataset.token = i;
    const b = el("span", {className: "bar"}); b.style.width = (400 * p[i]) + "px"; r.append(v, b); box.append(r); }
}
const slider = document.getElementById("temp"); slider.value = String(D.temperature);
slider.addEventListener("input", () => render(parseFloat(slider.value)));
render(D.temperature);
</script></body></html>
"""

"use strict";
// The journey page: everything is drawn from the JSON the engine wrote into the page.
const D = JSON.parse(document.getElementById("data").textContent);
const M = D.model;
const $ = id => document.getElementById(id);
const state = { step: 0, layer: 0, head: 0, stage: 0, lines: "head", zoom: null, scale: "sqrt" };
const S = () => D.steps[state.step];

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
const fmt = (v, d = 2) => (Math.abs(v) < 0.5 * 10 ** -d ? 0 : v).toFixed(d);

// A token as a chip: spaces, newlines and byte escapes made visible.
function tok(text, cls) {
  const s = el("span", "tok" + (cls ? " " + cls : ""));
  if (!text) s.append(el("span", "sp", "∅"));
  for (const part of String(text).split(/(<0x[0-9A-Fa-f]{2}>|[ \n\t])/)) {
    if (!part) continue;
    if (part === " ") s.append(el("span", "sp", "·"));
    else if (part === "\n") s.append(el("span", "sp", "↵"));
    else if (part === "\t") s.append(el("span", "sp", "⇥"));
    else if (part.startsWith("<0x")) s.append(el("span", "esc", part));
    else s.append(document.createTextNode(part));
  }
  s.title = JSON.stringify(text);
  return s;
}

function bytesOf(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}
// Little-endian float32 logits, widened exactly to doubles (as numpy's float64 cast does).
function float32s(b64) {
  const b = bytesOf(b64), dv = new DataView(b.buffer), out = new Float64Array(b.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = dv.getFloat32(4 * i, true);
  return out;
}

// Attention tables of every position: layer, head, query row q holds keys 0..q.
const ATT = (() => {
  const A = D.attention;
  if (!A) return null;
  const bytes = bytesOf(A.data), dv = new DataView(bytes.buffer), wide = A.encoding === "u16";
  const offsets = new Map();
  let total = 0;
  for (const q of A.queries) { offsets.set(q, total); total += q + 1; }
  return {
    has: q => offsets.has(q),
    get(l, h, q, k) {
      if (!offsets.has(q) || k > q) return NaN;
      const at = (l * M.heads + h) * total + offsets.get(q) + k;
      return (wide ? dv.getUint16(2 * at, true) : bytes[at]) / A.scale;
    },
  };
})();

// Colour scale of attention weights (and its legend): denser stops near 0, where most weights are.
const RAMP = [[0, [247, 249, 253]], [0.08, [214, 224, 247]], [0.25, [148, 172, 235]], [0.5, [85, 114, 220]],
  [0.75, [48, 62, 178]], [1, [24, 22, 96]]];
function ramp(v) {
  v = Math.max(0, Math.min(1, v));
  for (let i = 1; i < RAMP.length; i++) {
    if (v <= RAMP[i][0]) {
      const [a, ca] = RAMP[i - 1], [b, cb] = RAMP[i], t = (v - a) / (b - a);
      return `rgb(${ca.map((c, j) => Math.round(c + (cb[j] - c) * t)).join(",")})`;
    }
  }
  return "rgb(24,22,96)";
}
const RAMP_CSS = "linear-gradient(90deg," + RAMP.map(([p, c]) => `rgb(${c.join(",")}) ${p * 100}%`).join(",") + ")";
const HEAD_COLOURS = ["#3b4fd8", "#d9822b", "#138a5e", "#c0392b", "#7b3fe4", "#0e8fb3", "#b0468c", "#6b8e23",
  "#8d5524", "#1f5f8b", "#e0a800", "#5a5a5a"];
const headColour = h => HEAD_COLOURS[h % HEAD_COLOURS.length];

function strongestHead(l) {
  const heads = S().layers[l].heads;
  return heads.reduce((a, b) => (b.prob > a.prob ? b : a), heads[0]).head;
}

// ---------------------------------------------------------------- header and token strip
function renderHeader() {
  const src = M.source ? ` · ${M.source.split(/[\\/]/).slice(-2).join("/")}` : "";
  $("model-line").textContent = `${M.layers} layers · ${M.heads} attention heads (${M.kv_heads} key/value) · ` +
    `width ${M.d_model} · vocabulary ${M.vocab} · ${M.norm}, ${M.positions} positions${src}`;
  $("tokens-hint").textContent = D.generated
    ? `The prompt (${D.prompt_length} tokens), then the ${D.steps.length} tokens the model generated. ` +
      "Click a generated token to follow how it was chosen; the outlined token is the one whose vector we follow."
    : `The prompt becomes ${D.prompt_length} tokens. We follow the outlined one through the model; ` +
      "the dashed token after the arrow is what the model chose next.";
  $("step-nav").classList.toggle("single", !D.generated);
}

function renderStrip() {
  const strip = $("strip"), st = S();
  strip.innerHTML = "";
  const chips = [];
  for (let i = 0; i < D.prompt_length; i++) {
    const t = tok(D.tokens[i]);
    t.title = `position ${i} · token id ${D.ids[i]} · ${JSON.stringify(D.tokens[i])}`;
    strip.append(t);
    chips.push(t);
  }
  strip.append(el("span", "arrow", "→"));
  if (D.generated) {
    D.steps.forEach((s, k) => {
      const t = tok(s.chosen.text, "generated" + (k === state.step ? " active" : ""));
      t.title = `generated token ${k + 1} · position ${s.position + 1} · click to follow how it was chosen`;
      t.dataset.step = k;
      t.addEventListener("click", () => setStep(k));
      strip.append(t);
      chips.push(t);
    });
  } else {
    const t = tok(st.chosen.text, "next");
    t.title = "the token the model chose next";
    strip.append(t);
  }
  if (chips[st.position]) chips[st.position].classList.add("followed");
  const line = $("step-line");
  line.innerHTML = "";
  line.append(D.generated ? `step ${state.step + 1} of ${D.steps.length}: reading ` : "reading ",
    tok(D.tokens[st.position]), ` at position ${st.position}, the model chose `, tok(st.chosen.text),
    ` (p = ${fmt(st.chosen.prob, 3)})`);
  $("prev-token").disabled = state.step === 0;
  $("next-token").disabled = state.step === D.steps.length - 1;
}

// ---------------------------------------------------------------- the flow
function meter(label, value, max, colour, title) {
  const r = el("div", "row");
  r.title = title;
  const m = el("span", "meter"), fill = el("i");
  fill.style.width = `${Math.min(100, (100 * value) / max)}%`;
  fill.style.background = colour;
  m.append(fill);
  r.append(el("span", "lab", label), m, el("span", "num", fmt(value, value >= 100 ? 0 : 1)));
  return r;
}

function node(kind, id, title) {
  const n = el("div", `node ${kind}`);
  n.id = id;
  n.tabIndex = 0;
  n.setAttribute("role", "button");
  n.append(el("h4", "", title));
  return n;
}

function topLogits(st, k) {
  const L = logitsOf(st);
  const idx = [...L.keys()].sort((a, b) => L[b] - L[a] || a - b).slice(0, k);
  return idx.map(i => [i, L[i]]);
}

function renderFlow() {
  const st = S(), flow = $("flow");
  flow.innerHTML = "";
  const maxAdd = Math.max(1e-9, ...st.layers.flatMap(l => [l.attn_norm, l.mlp_norm]));
  const e = node("embed", "node-embed", "embedding");
  e.append(tok(D.tokens[st.position]));
  e.append(el("div", "readout", `id ${D.ids[st.position]} · pos ${st.position}`));
  e.append(el("div", "readout", `‖x‖ = ${fmt(st.embed_norm)}`));
  e.append(el("div", "readout", M.positions === "rotary" ? "rotary positions" : "+ position vector"));
  e.addEventListener("click", () => goto("sec-tokens"));
  flow.append(e);
  st.layers.forEach((L, l) => {
    const n = node("layer", `node-L${l}`, `layer ${l}`);
    const h = L.heads[strongestHead(l)];
    const reads = el("div", "reads");
    reads.append(`H${h.head} reads `, tok(h.token), ` ${fmt(h.prob)}`);
    n.append(reads);
    n.append(meter("attn", L.attn_norm, maxAdd, "var(--attn)", "norm of the vector the attention heads add"));
    n.append(meter("MLP", L.mlp_norm, maxAdd, "var(--mlp)", "norm of the vector the MLP adds"));
    const lens = el("div", "lens");
    lens.append("→ ", tok(st.lens.top_tokens[l + 1][0]), ` ${fmt(st.lens.top_probs[l + 1][0])}`);
    lens.title = "what the residual stream would predict after this layer (logit lens)";
    n.append(lens);
    if (l === state.layer) n.classList.add("selected");
    n.addEventListener("click", () => { selectLayer(l); goto("sec-layer"); });
    flow.append(n);
  });
  const f = node("out", "node-final", "final norm");
  f.append(el("div", "readout", `${M.norm}: ‖x‖ ${fmt(st.layers[st.layers.length - 1].resid_norm)} → ${fmt(st.final_norm)}`));
  f.addEventListener("click", () => goto("sec-lens"));
  flow.append(f);
  const g = node("out", "node-logits", "logits");
  for (const [i, v] of topLogits(st, 3)) {
    const r = el("div", "reads");
    r.append(tok(st.token_text[i] ?? `#${i}`), ` ${fmt(v)}`);
    g.append(r);
  }
  g.addEventListener("click", () => goto("sec-out"));
  flow.append(g);
  const c = node("out", "node-chain", "sampler");
  c.append(el("div", "readout", st.chain_names.length ? st.chain_names.join(" → ") : "no processors"));
  c.append(el("div", "readout", st.sampled ? `seed ${st.seed}` : "one token left: no chance involved"));
  c.addEventListener("click", () => goto("sec-out"));
  flow.append(c);
  const o = node("choice", "node-choice", "chosen");
  o.append(tok(st.chosen.text), el("div", "big", `p = ${fmt(st.chosen.prob, 3)}`));
  o.addEventListener("click", () => goto("sec-out"));
  flow.append(o);
}

// ---------------------------------------------------------------- a layer: heads, lines, pattern
function selectLayer(l, h) {
  state.layer = l;
  state.head = h ?? strongestHead(l);
  document.querySelectorAll(".node.layer").forEach(n => n.classList.toggle("selected", n.id === `node-L${l}`));
  renderLayer();
}

function weight(l, h, q, k) {
  const st = S();
  if (q === st.position) return st.layers[l].row[h][k];
  return ATT ? ATT.get(l, h, q, k) : NaN;
}

// Colour scales of a weight: square root (small weights stay visible; the default), linear,
// or each row stretched so that its largest weight is darkest.
function rowMax(l, h, q) {
  let m = 1e-12;
  for (let k = 0; k <= q; k++) m = Math.max(m, weight(l, h, q, k));
  return m;
}
const rowTop = (l, h, q) => (state.scale === "row" ? rowMax(l, h, q) : 1);
const shade = (v, top) => ramp(state.scale === "sqrt" ? Math.sqrt(v) : v / top);

function drawThumb(canvas, l, h) {
  const st = S(), n = st.length, p = st.position;
  const full = ATT && ATT.has(n - 1);
  canvas.width = n;
  canvas.height = full ? n : 1;
  const g = canvas.getContext("2d"), img = g.createImageData(canvas.width, canvas.height);
  for (let q = 0; q < canvas.height; q++) {
    const query = full ? q : p, top = rowTop(l, h, query);
    for (let k = 0; k < n; k++) {
      const v = k > query ? NaN : weight(l, h, query, k);
      const [r, gg, b] = Number.isNaN(v) ? [236, 238, 244] : shade(v, top).slice(4, -1).split(",").map(Number);
      const i = 4 * (q * n + k);
      img.data[i] = r; img.data[i + 1] = gg; img.data[i + 2] = b; img.data[i + 3] = 255;
    }
  }
  g.putImageData(img, 0, 0);
}

function renderLayer() {
  const st = S(), l = state.layer, L = st.layers[l];
  $("layer-title").textContent = `Inside layer ${l}: ${M.heads} attention heads`;
  const box = $("heads");
  box.innerHTML = "";
  L.heads.forEach(h => {
    const card = el("div", "head" + (h.head === state.head ? " sel" : ""));
    card.id = `head-${h.head}`;
    card.tabIndex = 0;
    card.setAttribute("role", "button");
    const c = el("canvas");
    drawThumb(c, l, h.head);
    const cap = el("div", "cap");
    cap.append(el("b", "", `H${h.head}`), " → ", tok(h.token), ` ${fmt(h.prob)}`);
    card.append(c, cap);
    card.title = `layer ${l}, head ${h.head}: the followed token reads position ${h.to} most (${fmt(h.prob, 4)})`;
    card.addEventListener("click", () => { state.head = h.head; renderLayer(); });
    box.append(card);
  });
  renderLines();
  renderHeat();
}

function renderLinesControls() {
  const c = $("lines-controls");
  c.innerHTML = "";
  for (const [mode, text] of [["head", "the selected head"], ["all", "every head (its 3 strongest)"]]) {
    const lab = el("label"), r = el("input");
    r.type = "radio"; r.name = "lines-mode"; r.value = mode; r.checked = state.lines === mode;
    r.addEventListener("change", () => { state.lines = mode; renderLines(); });
    lab.append(r, text);
    c.append(lab);
  }
}

function renderLines() {
  const st = S(), l = state.layer, p = st.position, box = $("lines");
  $("lines-title").textContent = state.lines === "head"
    ? `What the token reads: layer ${l}, head ${state.head}` : `What the token reads: layer ${l}, every head`;
  box.innerHTML = "";
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  box.append(svg);
  const chips = [];
  const row = st.layers[l].row;
  const tint = k => (state.lines === "head" ? row[state.head][k] : row.reduce((s, r) => s + r[k], 0) / row.length);
  for (let k = 0; k <= p; k++) {
    const t = tok(D.tokens[k], k === p ? "followed" : "");
    const w = tint(k);
    t.style.background = shade(w, 1);
    if (w > 0.45) t.style.color = "#fff";
    t.title = `position ${k}: weight ${fmt(w, 4)}`;
    box.append(t);
    chips.push(t);
  }
  if (state.lines === "all") {   // which colour is which head
    const key = el("div", "headkey");
    for (let h = 0; h < row.length; h++) {
      const sw = el("span", "swatch");
      sw.style.background = headColour(h);
      key.append(sw, `H${h} `);
    }
    $("lines-controls").querySelector(".headkey")?.remove();
    $("lines-controls").append(key);
  } else $("lines-controls").querySelector(".headkey")?.remove();
  const links = [];
  // Lines to the strongest keys (at most 12 per head, none under 0.005); thickness relative to the strongest.
  if (state.lines === "head") {
    const order = [...row[state.head].keys()].sort((a, b) => row[state.head][b] - row[state.head][a]);
    for (const k of order.slice(0, 12)) if (row[state.head][k] >= 0.005) links.push([state.head, k, row[state.head][k]]);
  } else {
    row.forEach((r, h) => {
      const order = [...r.keys()].sort((a, b) => r[b] - r[a]);
      for (const k of order.slice(0, 3)) if (r[k] >= 0.005) links.push([h, k, r[k]]);
    });
  }
  const wmax = Math.max(1e-9, ...links.map(x => x[2]));
  {  // reading offsets lays the chips out now, so the lines are drawn in the same turn
    svg.setAttribute("width", box.scrollWidth);
    svg.setAttribute("height", box.scrollHeight);
    const from = chips[p], x1 = from.offsetLeft + from.offsetWidth / 2, y1 = from.offsetTop;
    for (const [h, k, w] of links) {
      const to = chips[k], x2 = to.offsetLeft + to.offsetWidth / 2, y2 = to.offsetTop;
      const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
      let d;
      if (k === p) d = `M${x1 - 7},${y1} C${x1 - 16},${y1 - 20} ${x1 + 16},${y1 - 20} ${x1 + 7},${y1}`;
      else {
        const lift = Math.min(30, 10 + 0.08 * Math.abs(x1 - x2));
        const top = Math.min(y1, y2) - lift;
        d = `M${x1},${y1} C${x1},${top} ${x2},${top} ${x2},${y2}`;
      }
      path.setAttribute("d", d);
      path.setAttribute("fill", "none");
      path.setAttribute("stroke", state.lines === "head" ? "#3b4fd8" : headColour(h));
      path.setAttribute("stroke-width", String(1 + 6 * (w / wmax)));
      path.setAttribute("stroke-opacity", String(0.3 + 0.6 * (w / wmax)));
      path.setAttribute("stroke-linecap", "round");
      svg.append(path);
    }
    box.scrollTop = Math.max(0, from.offsetTop - box.clientHeight + 50);
    if (state.lines === "head") {
      for (const [, k, w] of links.slice(0, 6)) {
        const to = chips[k], tag = el("span", "w", fmt(w));
        tag.style.background = "#3b4fd8";
        tag.style.left = `${to.offsetLeft + to.offsetWidth / 2 - 14}px`;
        tag.style.top = `${to.offsetTop + to.offsetHeight + 1}px`;
        box.append(tag);
      }
    }
  }
}

function renderHeat() {
  const st = S(), l = state.layer, h = state.head, n = st.length, p = st.position;
  const full = ATT && ATT.has(n - 1);
  const queries = full ? [...Array(n).keys()] : [p];
  $("head-title").textContent = `Layer ${l}, head ${h}: the whole attention pattern` +
    (full ? ` (${n} × ${n})` : " (the followed token's row; the prompt is too long to keep every row)");
  const wrap = $("heat-wrap"), canvas = $("heat"), cols = $("heat-cols");
  const g = canvas.getContext("2d"), gc = cols.getContext("2d");
  const font = "12px ui-monospace, Menlo, Consolas, monospace";
  g.font = font;
  const label = k => {
    const t = JSON.stringify(D.tokens[k]).slice(1, -1);
    return (t.length > 12 ? t.slice(0, 11) + "…" : t) + ` ${k}`;
  };
  const labelW = Math.min(150, 12 + Math.max(...[...Array(n).keys()].map(k => g.measureText(label(k)).width)));
  const avail = Math.max(200, wrap.clientWidth - labelW - 16);
  if (state.zoom === null) state.zoom = Math.max(4, Math.min(40, Math.floor(avail / n)));
  $("zoom").value = String(state.zoom);
  // Canvases have a size limit: very long prompts cap the zoom.
  const cell = Math.max(1, Math.min(state.zoom, Math.floor(8000 / n))), every = Math.max(1, Math.ceil(13 / cell));
  const W = labelW + n * cell + 8, H = queries.length * cell + 4;
  const dpr = window.devicePixelRatio || 1;
  const size = (c, w, h) => {
    c.width = Math.ceil(w * dpr); c.height = Math.ceil(h * dpr);
    c.style.width = `${w}px`; c.style.height = `${h}px`;
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = font;
    ctx.textBaseline = "middle";
    return ctx;
  };
  size(canvas, W, H);
  size(cols, W, labelW);
  const x0 = labelW;
  const strongest = st.layers[l].heads[h].to;
  renderLegend();
  queries.forEach((q, r) => {
    const top = rowTop(l, h, q);
    for (let k = 0; k < n; k++) {
      const v = k > q ? NaN : weight(l, h, q, k);
      g.fillStyle = Number.isNaN(v) ? "#eceef4" : shade(v, top);
      g.fillRect(x0 + k * cell, r * cell, cell, cell);
    }
  });
  if (cell >= 6) {  // thin grid lines help counting at larger zooms
    g.strokeStyle = "rgba(255,255,255,.55)";
    g.lineWidth = 1;
    g.beginPath();
    for (let k = 0; k <= n; k++) { g.moveTo(x0 + k * cell + 0.5, 0); g.lineTo(x0 + k * cell + 0.5, queries.length * cell); }
    queries.forEach((_, r) => { g.moveTo(x0, r * cell + 0.5); g.lineTo(x0 + n * cell, r * cell + 0.5); });
    g.stroke();
  }
  g.textAlign = "right";
  const shows = (k, forced) => forced.includes(k) || (k % every === 0 && forced.every(f => Math.abs(f - k) >= every));
  queries.forEach((q, r) => {
    if (shows(q, [p]) || queries.length === 1) {
      g.fillStyle = q === p ? "#7b3fe4" : "#1d2233";
      g.fillText(label(q), x0 - 6, r * cell + cell / 2);
    }
  });
  // Key labels in their own canvas, which stays at the top while the rows scroll.
  gc.save();
  gc.translate(x0, labelW - 6);
  gc.rotate(-Math.PI / 2);
  gc.textAlign = "left";
  for (let k = 0; k < n; k++) {
    if (shows(k, [p, strongest])) {
      gc.fillStyle = k === strongest ? "#3b4fd8" : "#1d2233";
      gc.fillText(label(k), 0, k * cell + cell / 2);
    }
  }
  gc.restore();
  const r = queries.indexOf(p);
  g.strokeStyle = "#7b3fe4";
  g.lineWidth = 2;
  g.strokeRect(x0 - 1, r * cell + 1, (p + 1) * cell + 2, cell - 1);
  canvas.onmousemove = ev => {
    const b = canvas.getBoundingClientRect();
    const k = Math.floor((ev.clientX - b.left - x0) / cell), rr = Math.floor((ev.clientY - b.top) / cell);
    if (k < 0 || k >= n || rr < 0 || rr >= queries.length) return;
    const q = queries[rr], v = weight(l, h, q, k);
    $("heat-readout").textContent = k > q
      ? `query ${q} ${JSON.stringify(D.tokens[q])} cannot read the later key ${k}`
      : `query ${q} ${JSON.stringify(D.tokens[q])} reads key ${k} ${JSON.stringify(D.tokens[k])}: ${v.toFixed(4)}`;
  };
  if (r >= 0) wrap.scrollTop = Math.max(0, labelW + r * cell - wrap.clientHeight + 60);
}

function renderLegend() {
  const box = $("legend");
  box.innerHTML = "";
  const scale = el("div", "scale"), bar = el("div", "ramp"), ticks = el("div", "ticks");
  bar.style.background = RAMP_CSS;
  const marks = state.scale === "sqrt" ? [0, 0.05, 0.2, 0.5, 1] : [0, 0.25, 0.5, 0.75, 1];
  for (const v of marks) {
    const t = el("span", "", String(v));
    t.style.left = `${(state.scale === "sqrt" ? Math.sqrt(v) : v) * 100}%`;
    ticks.append(t);
  }
  scale.append(bar, ticks);
  const grey = el("span", "tok", "  ");
  grey.style.background = "#eceef4";
  const what = { sqrt: "attention weight (square-root scale)", linear: "attention weight",
    row: "attention weight ÷ the largest weight of its row" }[state.scale];
  box.append(el("span", "", what),
    scale, grey, el("span", "", "a later token (masked)"));
}

// ---------------------------------------------------------------- logit lens
function renderLadder() {
  const st = S(), lens = st.lens, box = $("ladder");
  box.innerHTML = "";
  const t = el("table", "ladder"), head = el("tr");
  head.append(el("th", "", "after"));
  lens.top_tokens[0].forEach((_, i) => head.append(el("th", "", i === 0 ? "top prediction" : `#${i + 1}`)));
  const chosenHead = el("th", "");
  chosenHead.append("p of the chosen ", tok(st.chosen.text));
  head.append(chosenHead);
  t.append(head);
  lens.labels.forEach((lab, r) => {
    const tr = el("tr", r === lens.labels.length - 1 ? "final" : "");
    tr.append(el("th", "", r === lens.labels.length - 1 ? `${lab} = output` : lab));
    lens.top_tokens[r].forEach((tk, i) => {
      const p = lens.top_probs[r][i], td = el("td");
      td.style.background = `rgba(19, 138, 94, ${Math.min(0.9, 0.08 + p)})`;
      if (p > 0.5) td.style.color = "#fff";
      td.append(tok(tk), el("span", "p", fmt(p)));
      tr.append(td);
    });
    const td = el("td", "chosen-col"), bar = el("span", "mini");
    bar.style.width = `${Math.max(1, 90 * lens.chosen_prob[r])}px`;
    td.append(bar, `${fmt(lens.chosen_prob[r], 3)} (rank ${lens.chosen_rank[r]})`);
    tr.append(td);
    t.append(tr);
  });
  box.append(t);
}

function renderGrid() {
  const G = D.lens_grid, box = $("grid"), n = G.tokens[0].length;
  box.innerHTML = "";
  const t = el("table", "grid"), thead = el("thead"), hr = el("tr");
  hr.append(el("th", "", "position"));
  for (const lab of G.labels) hr.append(el("th", "", lab === "embed" ? "embedding" : `after ${lab}`));
  thead.append(hr);
  t.append(thead);
  const body = el("tbody");
  for (let pos = 0; pos < n; pos++) {
    const tr = el("tr");
    tr.id = `grid-${pos}`;
    const th = el("th");
    th.append(el("span", "pos", String(pos)), tok(D.tokens[pos]));
    tr.append(th);
    G.labels.forEach((_, r) => {
      const tk = G.tokens[r][pos], p = G.probs[r][pos], td = el("td");
      const shown = JSON.stringify(tk).slice(1, -1);
      td.append(shown.length > 12 ? shown.slice(0, 11) + "…" : shown, el("span", "p", fmt(p)));
      td.title = `position ${pos}, after ${G.labels[r]}: ${JSON.stringify(tk)} with p = ${p}`;
      td.style.background = `rgba(19, 138, 94, ${Math.min(0.85, p * 0.85)})`;
      if (p > 0.55) td.classList.add("dark");
      if (pos + 1 < D.tokens.length && tk === D.tokens[pos + 1]) td.classList.add("hit");
      tr.append(td);
    });
    body.append(tr);
  }
  t.append(body);
  box.append(t);
}

function markGridRow() {
  document.querySelectorAll("table.grid tr.followed").forEach(r => r.classList.remove("followed"));
  const row = $(`grid-${S().position}`);
  if (!row) return;
  row.classList.add("followed");
  const box = $("grid");
  box.scrollTop = Math.max(0, row.offsetTop - box.clientHeight / 2);
}

// ---------------------------------------------------------------- attribution
function partName(name) {
  let m;
  if (name === "embed") return ["token embedding", null];
  if (name === "pos_embed") return ["position embedding", null];
  if (name === "final_norm_bias") return ["final norm bias", null];
  if ((m = name.match(/^L(\d+)\.H(\d+)$/))) return [`layer ${m[1]} · head ${m[2]}`, [+m[1], +m[2]]];
  if ((m = name.match(/^L(\d+)\.mlp$/))) return [`layer ${m[1]} · MLP`, null];
  if ((m = name.match(/^L(\d+)\.attn_bias$/))) return [`layer ${m[1]} · attention bias`, null];
  return [name, null];
}

function renderAttr() {
  const A = S().attribution, box = $("attr");
  box.innerHTML = "";
  const parts = [...A.parts].sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]));
  const shown = parts.slice(0, 16), rest = parts.slice(16);
  const restSum = rest.reduce((s, p) => s + p[1], 0);
  const max = Math.max(1e-12, ...shown.map(p => Math.abs(p[1])), Math.abs(restSum));
  const sum = $("attr-sum");
  sum.innerHTML = "";
  sum.append("The logit of ", tok(A.token), ` (${A.logit.toFixed(4)}) splits into ${A.parts.length} parts: what the ` +
    "embedding, every attention head and every MLP wrote into the residual stream, each read through the " +
    `final norm's scale and the token's unembedding row. They add up to ${A.total.toFixed(4)}` +
    (A.softcap ? ` before the final softcap, and ${A.softcap}·tanh(${A.total.toFixed(4)}/${A.softcap}) = ` +
      `${A.capped_total.toFixed(4)} is the logit. ` : ". ") +
    "Green raises the logit, red lowers it; click a head to open it.");
  const add = (label, v, cls, target) => {
    const name = el("span", "name" + (target ? " link" : "") + (cls ? " " + cls : ""), label);
    if (target) name.addEventListener("click", () => { selectLayer(target[0], target[1]); goto("sec-layer"); });
    const track = el("span", "track" + (cls ? " " + cls : "")), bar = el("span", "bar " + (v >= 0 ? "pos" : "neg"));
    const w = (50 * Math.abs(v)) / max;
    bar.style.width = `${w}%`;
    bar.style.left = v >= 0 ? "50%" : `${50 - w}%`;
    track.append(bar);
    box.append(name, track, el("span", "val" + (cls ? " " + cls : ""), (v >= 0 ? "+" : "") + v.toFixed(3)));
  };
  for (const [n, v] of shown) { const [label, target] = partName(n); add(label, v, "", target); }
  if (rest.length) add(`${rest.length} other parts`, restSum, "", null);
  box.append(el("span", "name total", A.softcap ? "sum, before the softcap" : "sum = the logit"),
    el("span", "track total"),
    el("span", "val total", (A.total >= 0 ? "+" : "") + A.total.toFixed(3)));
}

// ---------------------------------------------------------------- the sampler chain
function candRows(card, rows, key, picked) {
  const max = Math.max(1e-12, ...rows.map(r => r[key]));
  for (const r of rows) {
    const gone = r.before > 0 && r[key] === 0;
    const c = el("div", "cand" + (gone ? " gone" : "") + (r.id === picked ? " picked" : ""));
    const bar = el("div", "bar");
    bar.style.width = `${(100 * r[key]) / max}%`;
    c.append(tok(r.token), bar, el("span", "v", gone ? "cut" : fmt(r[key], 3)));
    card.append(c);
  }
}

function renderChain() {
  const st = S(), box = $("chain");
  box.innerHTML = "";
  const real = st.chain.filter(c => c.name !== null);
  const first = el("div", "stagecard");
  first.id = "chain-0";
  first.append(el("h4", "", "softmax"), el("p", "what",
    `the model's own distribution: entropy ${fmt(st.entropy_bits)} bits ≈ ${fmt(st.effective_choices, 1)} choices`));
  const modelRows = real.length
    ? real[0].candidates.map(c => ({ ...c, p: c.before, before: 0 }))
    : st.final.map(f => ({ id: f.id, token: f.token, p: f.model, before: 0 }));
  candRows(first, modelRows.slice(0, 8), "p", -1);
  box.append(first);
  real.forEach((c, i) => {
    const card = el("div", "stagecard");
    card.id = `chain-${i + 1}`;
    const what = c.removed
      ? `${c.processor}: removes ${c.removed} tokens (${fmt(c.removed_mass, 3)} of the mass); ${c.kept} remain`
      : `${c.processor}: removes none; entropy ${fmt(c.entropy_bits[0])} → ${fmt(c.entropy_bits[1])} bits`;
    card.append(el("h4", "", `${i + 1} · ${c.name.replace(/_/g, "-")}`), el("p", "what", what));
    candRows(card, c.candidates.slice(0, 8), "after", -1);
    const cut = c.removed_top.filter(r => !c.candidates.slice(0, 8).some(x => x.id === r.id)).slice(0, 3);
    if (cut.length) {
      const line = el("div", "cutline");
      line.append("cut, among others: ");
      for (const r of cut) line.append(tok(r.token), ` ${fmt(r.before, 3)} `);
      card.append(line);
    }
    box.append(card);
  });
  const drawn = el("div", "stagecard drawn");
  drawn.id = "chain-draw";
  drawn.append(el("h4", "", "the draw"), el("p", "what", st.sampled
    ? `one uniform number from seed ${st.seed} lands on ${JSON.stringify(st.chosen.text)}`
    : `only ${JSON.stringify(st.chosen.text)} is left: it is chosen`));
  const shown = st.final.slice(0, 8);
  if (!shown.some(f => f.id === st.chosen.id)) shown.push(st.final.find(f => f.id === st.chosen.id));
  candRows(drawn, shown.map(f => ({ id: f.id, token: f.token, p: f.drawn, before: 0 })), "p", st.chosen.id);
  box.append(drawn);
}

// The sliders: the rules of tokentrail.sampling's Temperature, TopK (ties kept) and TopP, in that order.
const LOGITS = new Map();
function logitsOf(st) {
  if (!LOGITS.has(st)) LOGITS.set(st, float32s(st.logits));
  return LOGITS.get(st);
}

function temperatureStage(x, T) {
  if (T === 1) return x;                       // generate leaves T = 1 out of the chain
  const out = new Float64Array(x.length);
  if (T === 0) {                               // greedy: only the first argmax survives
    let best = 0;
    for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
    out.fill(-Infinity);
    out[best] = x[best];
    return out;
  }
  let overflow = false, max = -Infinity;
  for (let i = 0; i < x.length; i++) {
    out[i] = x[i] / T;
    if (!Number.isFinite(out[i]) && Number.isFinite(x[i])) overflow = true;
    if (x[i] > max) max = x[i];
  }
  if (overflow) for (let i = 0; i < x.length; i++) out[i] = (x[i] - max) / T;
  return out;
}

function topKStage(x, k) {
  if (k === 0) return x;
  const kk = Math.max(k, 1);
  if (kk >= x.length) return x;
  const sorted = Float64Array.from(x).sort();  // ascending; the k-th largest is at n - k
  const kth = sorted[x.length - kk];
  return x.map(v => (v < kth ? -Infinity : v));
}

function topPStage(x, p) {
  if (p >= 1) return x;
  const live = [];
  for (let i = 0; i < x.length; i++) if (Number.isFinite(x[i])) live.push(i);
  live.sort((a, b) => x[b] - x[a] || a - b);
  const m = x[live[0]], e = live.map(i => Math.exp(x[i] - m));
  const z = e.reduce((s, v) => s + v, 0);
  const keep = new Uint8Array(x.length);
  let cum = 0;
  live.forEach((i, j) => {
    const pj = e[j] / z;
    cum += pj;
    if (cum - pj < p || j === 0) keep[i] = 1;
  });
  return x.map((v, i) => (keep[i] ? v : -Infinity));
}

function softmaxOf(x) {
  let m = -Infinity;
  for (const v of x) if (v > m) m = v;
  const out = new Float64Array(x.length);
  let z = 0;
  for (let i = 0; i < x.length; i++) { out[i] = x[i] === -Infinity ? 0 : Math.exp(x[i] - m); z += out[i]; }
  for (let i = 0; i < x.length; i++) out[i] /= z;
  return out;
}

function sliderDistribution(T, k, p) {
  return softmaxOf(topPStage(topKStage(temperatureStage(logitsOf(S()), T), k), p));
}

function renderSliders() {
  const T = parseFloat($("temp").value), k = parseInt($("topk").value, 10), p = parseFloat($("topp").value);
  $("temp-val").textContent = T.toFixed(2);
  $("topk-val").textContent = k === 0 ? "off" : String(k);
  $("topp-val").textContent = p >= 1 ? "off" : p.toFixed(2);
  const st = S(), L = logitsOf(st), probs = sliderDistribution(T, k, p);
  let kept = 0, h = 0;
  for (const v of probs) if (v > 0) { kept++; h -= v * Math.log2(v); }
  const order = Object.keys(st.token_text).map(Number).sort((a, b) => L[b] - L[a] || a - b).slice(0, 15);
  const chosen = st.chosen.id;
  const run = $("kept");
  run.dataset.kept = String(kept);
  run.textContent = `${kept} of ${L.length} tokens kept · entropy ${fmt(h)} bits · the run's token ` +
    `${JSON.stringify(st.chosen.text)} would have p = ${probs[chosen].toFixed(4)}`;
  const box = $("probs");
  box.innerHTML = "";
  const max = Math.max(1e-12, ...order.map(i => probs[i]));
  for (const i of order) {
    const r = el("div", "prow" + (probs[i] === 0 ? " gone" : "") + (i === chosen ? " run" : ""));
    const bar = el("div", "bar");
    bar.style.width = `${(100 * probs[i]) / max}%`;
    const v = el("span", "prob", probs[i] === 0 ? "cut" : probs[i].toFixed(4));
    v.dataset.token = String(i);
    v.dataset.p = String(probs[i]);
    r.append(tok(st.token_text[i]), bar, v);
    box.append(r);
  }
}

function resetSliders() {
  const init = S().initial;
  // Settings beyond the sliders' usual range widen the range rather than being clamped.
  if (init.top_k > +$("topk").max) $("topk").max = String(init.top_k);
  if (init.temperature > +$("temp").max) $("temp").max = String(init.temperature);
  $("temp").value = String(init.temperature);
  $("topk").value = String(init.top_k);
  $("topp").value = String(init.top_p);
  renderSliders();
}

// ---------------------------------------------------------------- step-through
function stageTarget(s, i) {
  const stages = S().stages;
  switch (s.kind) {
    case "tokenize": return [$("sec-tokens"), null];
    case "embed": case "position": return [$("node-embed"), null];
    case "attention": case "residual": case "mlp": return [$(`node-L${s.layer}`), null];
    case "final_norm": return [$("node-final"), null];
    case "logits": return [$("node-logits"), null];
    case "softmax": return [$("node-chain"), $("chain-0")];
    case "sampler": {
      const j = stages.slice(0, i + 1).filter(t => t.kind === "sampler").length;
      return [$("node-chain"), $(`chain-${j}`) || $("chain-0")];
    }
    case "choice": return [$("node-choice"), $("chain-draw")];
    default: return [null, null];
  }
}

function setStage(i, scroll) {
  const stages = S().stages;
  state.stage = Math.max(0, Math.min(stages.length - 1, i));
  const s = stages[state.stage];
  $("stage-count").textContent = `stage ${state.stage + 1} of ${stages.length} ·`;
  $("stage-title").textContent = s.title;
  $("stage-text").textContent = s.text;
  $("prev-stage").disabled = state.stage === 0;
  $("next-stage").disabled = state.stage === stages.length - 1;
  document.querySelectorAll(".current").forEach(e => e.classList.remove("current"));
  document.querySelectorAll(".current-section").forEach(e => e.classList.remove("current-section"));
  if (s.kind === "attention" && s.layer !== state.layer) selectLayer(s.layer);
  const [main, extra] = stageTarget(s, state.stage);
  for (const t of [main, extra]) if (t) t.classList.add(t.classList.contains("card") ? "current-section" : "current");
  if (scroll) {
    const target = extra || main;
    if (target) target.scrollIntoView({ block: "center", behavior: motion() });
  }
}

// Smooth scrolling, unless the reader asked for reduced motion.
const motion = () => (matchMedia("(prefers-reduced-motion: reduce)").matches ? "auto" : "smooth");

function goto(id) {
  const e = $(id);
  e.scrollIntoView({ block: "start", behavior: motion() });
  e.classList.remove("flash");
  void e.offsetWidth;
  e.classList.add("flash");
}

function setStep(k) {
  state.step = Math.max(0, Math.min(D.steps.length - 1, k));
  renderStrip();
  renderFlow();
  selectLayer(state.layer, state.head);
  renderLadder();
  markGridRow();
  renderAttr();
  renderChain();
  resetSliders();
  setStage(state.stage, false);
}

// ---------------------------------------------------------------- wiring
renderHeader();
renderLinesControls();
renderGrid();
state.layer = 0;
state.head = strongestHead(0);
$("scale").value = state.scale;
setStep(0);
$("prev-token").addEventListener("click", () => setStep(state.step - 1));
$("next-token").addEventListener("click", () => setStep(state.step + 1));
$("prev-stage").addEventListener("click", () => setStage(state.stage - 1, true));
$("next-stage").addEventListener("click", () => setStage(state.stage + 1, true));
for (const id of ["temp", "topk", "topp"]) $(id).addEventListener("input", renderSliders);
$("reset").addEventListener("click", resetSliders);
$("zoom").addEventListener("input", () => { state.zoom = parseInt($("zoom").value, 10); renderHeat(); });
$("scale").addEventListener("change", () => { state.scale = $("scale").value; renderLayer(); });
document.addEventListener("keydown", ev => {
  // Cards that act as buttons answer Enter and Space as buttons do.
  if ((ev.key === "Enter" || ev.key === " ") && ev.target.getAttribute?.("role") === "button") {
    ev.target.click();
    ev.preventDefault();
    return;
  }
  if (ev.target instanceof HTMLInputElement || ev.target instanceof HTMLButtonElement && ev.key === " ") return;
  if (ev.key === "ArrowRight") { setStage(state.stage + 1, true); ev.preventDefault(); }
  if (ev.key === "ArrowLeft") { setStage(state.stage - 1, true); ev.preventDefault(); }
});
let resizeTimer = 0;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { renderLines(); }, 120);
});
document.body.dataset.ready = "1";

"""Follow one token through the model, stage by stage, with the numbers the engine used.

    j = model.journey("The storm is")
    for stage in j:                 # tokenize, embed, position, layer 0 attention, ...
        print(stage.text)
    j.logit_lens()                  # what each layer would predict if unembedded now
    j.attribution()                 # the chosen token's logit split over heads and MLPs
    j.geometry()                    # the final hidden state against the candidates' unembeddings

Everything here is read from one forward pass of the real engine with capture
points on (attention tables for every position, the rest at the followed one);
the logit lens and the attribution reuse the model's own final norm and
unembedding weights, so the last layer of the lens is the actual logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import _core, thermo


# Prompts up to this many tokens keep every position's attention table.
FULL_ATTENTION_LIMIT = 512


@dataclass
class Stage:
    kind: str            # tokenize, embed, position, attention, residual, mlp, final_norm, logits, softmax, choice
    title: str
    text: str            # one plain-language line made from the numbers
    data: dict = field(default_factory=dict)
    layer: int | None = None

    def __str__(self) -> str:
        return f"[{self.title}] {self.text}"


def _q(tok: str) -> str:
    return repr(tok)


class Journey:
    def __init__(self, model, prompt, temperature: float = 1.0, position: int = -1, top: int = 5,
                 seed: int | None = None, chosen: int | None = None):
        self.model = model
        self.config = c = model.config
        self.ids = model.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not self.ids:
            raise ValueError("the prompt encodes to no tokens")
        n = len(self.ids)
        self.position = position % n if -n <= position < n else None
        if self.position is None:
            raise IndexError(f"position {position} outside a prompt of {n} tokens")
        self.temperature = float(temperature)
        thermo._temperature(self.temperature)
        self.top = int(top)
        tok = model.tokenizer
        self.tokens = [tok.display(i) if tok else str(i) for i in self.ids]

        # Whole attention tables (for heatmaps) only while they stay small: they
        # grow with layers x heads x n^2. Everything else at the followed position.
        self.full_attention = n <= FULL_ATTENTION_LIMIT
        hooks = model.hooks()
        hooks.capture("blocks.*.attn_pattern", positions=None if self.full_attention else [self.position])
        hooks.capture([n_ for n_ in _everything(c.n_layers) if not n_.endswith("attn_pattern")],
                      positions=[self.position])
        all_logits = model.forward(self.ids, all_positions=True, hooks=hooks)
        self.cache = hooks.cache
        self.logits = all_logits[self.position].astype(np.float32)
        self.stats = thermo.stats(self.logits, self.temperature)
        # Without a seed the journey shows the greedy choice; with one, a draw at the temperature.
        self.sampled = seed is not None and self.temperature > 0.0
        self.given = chosen is not None  # the token a generation actually produced here
        if self.given:
            if not 0 <= int(chosen) < c.vocab_size:
                raise ValueError(f"chosen: token id {chosen} is outside the vocabulary (size {c.vocab_size})")
            self.chosen = int(chosen)
        elif self.sampled:
            self.chosen = int(np.random.default_rng(seed).choice(len(self.stats.probs), p=self.stats.probs))
        else:
            self.chosen = int(np.argmax(self.logits))
        self._unembed = None
        self.stages = self._build_stages()
        self._cursor = 0

    # -- stepping --------------------------------------------------------
    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def step(self) -> Stage | None:
        """The next stage, or None at the end."""
        if self._cursor >= len(self.stages):
            return None
        self._cursor += 1
        return self.stages[self._cursor - 1]

    def _row(self, name: str) -> np.ndarray:
        return self.cache[name][0]

    def token(self, i: int) -> str:
        return self.model.tokenizer.display(i) if self.model.tokenizer else str(i)

    # -- weights the analyses need ----------------------------------------
    @property
    def unembed(self) -> np.ndarray:
        if self._unembed is None:
            w = self.model.weights.get("unembed.weight") or self.model.weights["embed.weight"]
            self._unembed = w.to_float32()
        return self._unembed

    def _final_norm(self, x: np.ndarray) -> np.ndarray:
        return final_norm(self.model, x)

    def _unembed_rows(self, h: np.ndarray) -> np.ndarray:
        """Unembed rows through the kernel path the forward pass took for this prompt.

        The core sums each output in a fixed order per path (GEMM for many rows,
        GEMV for few), so matching the path makes the lens's last row equal the
        real logits bit for bit.
        """
        w = self.model.weights.get("unembed.weight") or self.model.weights["embed.weight"]
        data = np.ascontiguousarray(w.data)
        h = np.ascontiguousarray(np.atleast_2d(h), dtype=np.float32)
        g = _core.GEMM_MIN_ROWS
        n = h.shape[0]
        if len(self.ids) >= g and n < g:   # pad to take the GEMM path too
            padded = np.zeros((g, h.shape[1]), np.float32)
            padded[:n] = h
            return _core.matmul(data, w.dtype, w.shape[0], w.shape[1], padded)[:n]
        if len(self.ids) < g and n >= g:   # one row at a time takes the GEMV path
            return np.concatenate([_core.matmul(data, w.dtype, w.shape[0], w.shape[1], h[i:i + 1])
                                   for i in range(n)])
        return _core.matmul(data, w.dtype, w.shape[0], w.shape[1], h)

    # -- analyses ---------------------------------------------------------
    def residuals(self) -> list[tuple[str, np.ndarray]]:
        """The residual stream at the followed position: before layer 0, then after each layer."""
        L = self.config.n_layers
        out = [("embeddings", self._row("blocks.0.resid_pre"))]
        out += [(f"after layer {l}", self._row(f"blocks.{l}.resid_post")) for l in range(L)]
        return out

    def logit_lens(self, top: int | None = None) -> dict:
        """Each residual, unembedded through the real final norm: logits, top tokens and probabilities.

        The last row is computed exactly as the forward pass computes the logits.
        """
        top = top or self.top
        labels, rows = zip(*self.residuals())
        logits = self._unembed_rows(self._final_norm(np.stack(rows)))
        probs = np.stack([thermo.probabilities(l) for l in logits])
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top]
        chosen_rank = [int((l > l[self.chosen]).sum()) for l in logits]
        return {"labels": list(labels), "logits": logits, "probs": probs, "top_ids": order,
                "top_tokens": [[self.token(i) for i in r] for r in order],
                "top_probs": np.take_along_axis(probs, order, 1),
                "chosen_prob": probs[:, self.chosen], "chosen_rank": chosen_rank}

    def lens_grid(self) -> dict:
        """Logit-lens top-1 token and probability for every position and layer (for the report)."""
        L = self.config.n_layers
        hooks = self.model.hooks().capture(["blocks.0.resid_pre"] + [f"blocks.{l}.resid_post" for l in range(L)])
        self.model.forward(self.ids, all_positions=False, hooks=hooks)
        rows = [hooks.cache["blocks.0.resid_pre"]] + [hooks.cache[f"blocks.{l}.resid_post"] for l in range(L)]
        grid_tok, grid_p = [], []
        for r in rows:
            logits = self._unembed_rows(self._final_norm(r))
            best = logits.argmax(1)
            p = [float(thermo.probabilities(l)[b]) for l, b in zip(logits, best)]
            grid_tok.append([self.token(int(b)) for b in best])
            grid_p.append(p)
        return {"labels": ["embed"] + [f"L{l}" for l in range(L)], "tokens": grid_tok, "probs": grid_p}

    def attribution(self, token: int | None = None) -> dict:
        """Direct logit attribution: the token's logit as a sum over embedding, each head, each MLP.

        The final norm's scale is taken from the actual final residual (as the
        forward pass applied it), which makes the logit linear in the parts.
        """
        c, w = self.config, self.model.weights
        t = self.chosen if token is None else int(token)
        L = c.n_layers
        x_final = self._row(f"blocks.{L - 1}.resid_post").astype(np.float64)
        g = w["final_norm.weight"].to_float32().astype(np.float64)
        u = self.unembed[t].astype(np.float64)
        if c.norm == "rms":
            s = 1.0 / math.sqrt(float((x_final ** 2).mean()) + c.norm_eps)

            def contrib(v):
                return float(((v * s) * g) @ u)

            const = 0.0
        else:
            s = 1.0 / math.sqrt(float(x_final.var()) + c.norm_eps)

            def contrib(v):
                return float((((v - v.mean()) * s) * g) @ u)

            b = w.get("final_norm.bias")
            const = float(b.to_float32().astype(np.float64) @ u) if b is not None else 0.0
        parts: list[tuple[str, float]] = [("embed", contrib(self._row("embed").astype(np.float64)))]
        if "pos_embed" in self.cache:
            parts.append(("pos_embed", contrib(self._row("pos_embed").astype(np.float64))))
        hd = c.head_dim
        for l in range(L):
            z = self._row(f"blocks.{l}.attn_z").astype(np.float64)
            wo = w[f"blocks.{l}.attn.o.weight"].to_float32().astype(np.float64)
            for h in range(c.n_heads):
                parts.append((f"L{l}.H{h}", contrib(wo[:, h * hd:(h + 1) * hd] @ z[h * hd:(h + 1) * hd])))
            ob = w.get(f"blocks.{l}.attn.o.bias")
            if ob is not None:
                parts.append((f"L{l}.attn_bias", contrib(ob.to_float32().astype(np.float64))))
            parts.append((f"L{l}.mlp", contrib(self._row(f"blocks.{l}.mlp_out").astype(np.float64))))
        if const:
            parts.append(("final_norm_bias", const))
        return {"token": t, "text": self.token(t), "logit": float(self.logits[t]),
                "parts": parts, "total": float(sum(v for _, v in parts))}

    def geometry(self, top: int | None = None) -> list[dict]:
        """The final hidden state against the unembedding rows of the top candidates."""
        top = top or self.top
        h = self._row("final_norm").astype(np.float64)
        order = np.argsort(-self.logits, kind="stable")[:top]
        out = []
        for i in order:
            u = self.unembed[i].astype(np.float64)
            out.append({"id": int(i), "token": self.token(int(i)), "dot": float(h @ u),
                        "cosine": float(h @ u / (np.linalg.norm(h) * np.linalg.norm(u) + 1e-30)),
                        "unembed_norm": float(np.linalg.norm(u)), "logit": float(self.logits[i])})
        return out

    def nearest_tokens(self, vector, k: int = 5, table: str = "unembed") -> list[tuple[str, float]]:
        """Tokens whose unembedding (or embedding) rows point most nearly the way `vector` does."""
        m = self.unembed if table == "unembed" else self.model.weights["embed.weight"].to_float32()
        v = np.asarray(vector, np.float64).ravel()
        if v.size != m.shape[1]:
            raise ValueError(f"vector has {v.size} values, the model width is {m.shape[1]}")
        cos = (m @ v) / (np.linalg.norm(m, axis=1) * np.linalg.norm(v) + 1e-30)
        best = np.argsort(-cos, kind="stable")[:k]
        return [(self.token(int(i)), float(cos[i])) for i in best]

    # -- the stages -------------------------------------------------------
    def _build_stages(self) -> list[Stage]:
        c = self.config
        p = self.position
        me = self.tokens[p]
        st: list[Stage] = []
        pieces = " | ".join(self.tokens)
        st.append(Stage("tokenize", "tokenize", f"the prompt becomes {len(self.ids)} tokens: {pieces}; "
                        f"we follow {_q(me)} at position {p}", {"ids": self.ids, "tokens": self.tokens}))
        e = self._row("embed")
        st.append(Stage("embed", "embed", f"{_q(me)} (id {self.ids[p]}) looks up row {self.ids[p]} of the "
                        f"embedding table: {e.size} numbers, norm {np.linalg.norm(e):.2f}", {"vector": e}))
        if c.position == "learned":
            pe = self._row("pos_embed")
            st.append(Stage("position", "position", f"position {p} adds its learned vector (norm "
                            f"{np.linalg.norm(pe):.2f}) to the token's", {"vector": pe}))
        else:
            st.append(Stage("position", "position", f"no vector is added: inside each attention layer, queries and "
                            f"keys of position {p} are rotated by angles {p}·θ_i (rotary, base {c.rope_theta:g})",
                            {"theta": c.rope_theta}))
        lens = self.logit_lens()
        resid = self._row("blocks.0.resid_pre")
        for l in range(c.n_layers):
            rows = self.cache[f"blocks.{l}.attn_pattern"]
            pattern = rows[p if self.full_attention else 0][:, : p + 1]  # [heads, keys]
            heads = []
            for h in range(c.n_heads):
                j = int(np.argmax(pattern[h]))
                heads.append({"head": h, "to": j, "token": self.tokens[j], "prob": float(pattern[h, j])})
            sharp = max(heads, key=lambda d: d["prob"])
            lines = [f"layer {l}, head {d['head']}: {_q(me)} attends {d['prob']:.2f} to {_q(d['token'])}"
                     + (f" (position {d['to']})" if self.tokens.count(d["token"]) > 1 else "") for d in heads]
            attn_out = self._row(f"blocks.{l}.attn_out")
            st.append(Stage("attention", f"layer {l} attention",
                            lines[sharp["head"]] + f"; the heads together add a vector of norm "
                            f"{np.linalg.norm(attn_out):.2f}",
                            {"pattern": pattern, "heads": heads, "lines": lines, "keys": self.tokens[: p + 1],
                             "out": attn_out}, layer=l))
            mid = self._row(f"blocks.{l}.resid_mid")
            st.append(Stage("residual", f"layer {l} residual", f"the residual stream's norm goes from "
                            f"{np.linalg.norm(resid):.2f} to {np.linalg.norm(mid):.2f}", {"vector": mid}, layer=l))
            post = self._row(f"blocks.{l}.mlp_post")
            mlp_out = self._row(f"blocks.{l}.mlp_out")
            strongest = np.argsort(-np.abs(post), kind="stable")[:3]
            units = ", ".join(f"#{int(i)} ({post[i]:+.2f})" for i in strongest)
            st.append(Stage("mlp", f"layer {l} MLP", f"the MLP adds a vector of norm {np.linalg.norm(mlp_out):.2f}; "
                            f"its strongest hidden units: {units}", {"hidden": post, "out": mlp_out}, layer=l))
            resid = self._row(f"blocks.{l}.resid_post")
            lt, lp = lens["top_tokens"][l + 1][0], lens["top_probs"][l + 1][0]
            st.append(Stage("residual", f"layer {l} output", f"residual norm {np.linalg.norm(resid):.2f}; read "
                            f"through the final norm and unembedding now, it would predict {_q(lt)} (p={lp:.2f})",
                            {"vector": resid, "lens_token": lt, "lens_prob": float(lp)}, layer=l))
        fn = self._row("final_norm")
        kind = "RMSNorm" if c.norm == "rms" else "LayerNorm"
        st.append(Stage("final_norm", "final norm", f"{kind} rescales the residual (norm {np.linalg.norm(resid):.2f})"
                        f" to norm {np.linalg.norm(fn):.2f}", {"vector": fn}))
        order = np.argsort(-self.logits, kind="stable")[: self.top]
        cands = [(self.token(int(i)), float(self.logits[i])) for i in order]
        st.append(Stage("logits", "logits", "highest logits: " + ", ".join(f"{_q(t)} {v:.2f}" for t, v in cands),
                        {"top_ids": order.tolist(), "top": cands}))
        s = self.stats
        probs = [(self.token(int(i)), float(s.probs[i])) for i in order]
        st.append(Stage("softmax", f"softmax at T={self.temperature:g}",
                        ", ".join(f"{_q(t)} {p:.2f}" for t, p in probs) + f"; entropy {s.entropy_bits:.2f} bits, "
                        f"about {s.effective_choices:.1f} effective choices", {"top": probs, "stats": s.row()}))
        t = self.chosen
        rank = int((self.logits > self.logits[t]).sum())
        if self.given:
            how = f"the token generation chose (rank {rank + 1})"
        else:
            how = f"sampled with the seed (rank {rank + 1})" if self.sampled else "the most likely token (greedy)"

        st.append(Stage("choice", "chosen token", f"{_q(self.token(t))} (id {t}, p={s.probs[t]:.2f}): {how}",
                        {"id": t, "prob": float(s.probs[t]), "rank": rank + 1}))
        return st


def final_norm(model, x: np.ndarray) -> np.ndarray:
    """The model's own final norm, through the same kernel the forward pass uses."""
    c, w = model.config, model.weights
    x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    g = w["final_norm.weight"].to_float32()
    if c.norm == "rms":
        return _core.rmsnorm(x, g, c.norm_eps)
    b = w["final_norm.bias"].to_float32() if "final_norm.bias" in w else np.zeros_like(g)
    return _core.layernorm(x, g, b, c.norm_eps)


# The capture points a generated token's journey reads (see `token_journey`).
TOKEN_JOURNEY_POINTS = ("blocks.*.attn_pattern", "blocks.0.resid_pre", "blocks.*.resid_post")


def token_journey(model, cache, position: int, context_ids, chosen: int, top: int = 5) -> dict:
    """A generated token's journey as plain data, from what a decoding step captured.

    `cache` holds TOKEN_JOURNEY_POINTS at absolute `position` (the position
    whose logits chose `chosen`); `context_ids` are the ids at positions
    0..position. Returns, per layer, each head's most attended positions, and
    the logit lens: each residual read through the final norm and unembedding,
    with its top tokens and the chosen token's probability and rank.
    """
    n_layers = model.config.n_layers
    tok = model.tokenizer

    def text(i: int) -> str:
        return tok.display(int(i)) if tok is not None else str(int(i))

    def row(name: str) -> np.ndarray:
        where = np.flatnonzero(cache.positions(name) == position)
        if where.size == 0:
            raise KeyError(f"{name} was not captured at position {position}")
        return cache[name][where[-1]]

    attention = []
    for layer in range(n_layers):
        pattern = row(f"blocks.{layer}.attn_pattern")[:, : position + 1]  # [heads, keys]
        heads = []
        for h, weights in enumerate(pattern):
            best = np.argsort(-weights, kind="stable")[:top]
            heads.append({"head": h, "top": [{"position": int(k), "token": text(context_ids[k]),
                                              "weight": float(weights[k])} for k in best]})
        attention.append({"layer": layer, "heads": heads})
    labels = ["embeddings"] + [f"after layer {layer}" for layer in range(n_layers)]
    rows = np.stack([row("blocks.0.resid_pre")] + [row(f"blocks.{layer}.resid_post") for layer in range(n_layers)])
    w = model.weights.get("unembed.weight") or model.weights["embed.weight"]
    logits = _core.matmul(np.ascontiguousarray(w.data), w.dtype, w.shape[0], w.shape[1], final_norm(model, rows))
    lens = []
    for label, lg in zip(labels, logits):
        probs = thermo.probabilities(lg)
        best = np.argsort(-lg, kind="stable")[:top]
        lens.append({"label": label, "top": [{"id": int(i), "token": text(i), "prob": float(probs[i])}
                                             for i in best],
                     "chosen_prob": float(probs[chosen]), "chosen_rank": 1 + int((lg > lg[chosen]).sum())})
    return {"position": int(position), "attention": attention, "logit_lens": lens}


def _everything(n_layers: int) -> list[str]:
    from .capture import all_names

    return all_names(n_layers)

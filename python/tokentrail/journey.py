"""Follow one token through the model, stage by stage, with the numbers the engine used.

    j = model.journey("The storm is", temperature=0.8, top_k=40, seed=3)
    for stage in j:                 # tokenize, embed, position, layer 0 attention, ..., the sampler chain
        print(stage.text)
    j.chosen                        # the token generate(..., seed=3) would produce first
    j.logit_lens()                  # what each layer would predict if unembedded now
    j.attribution()                 # the chosen token's logit split over heads and MLPs
    j.geometry()                    # the final hidden state against the candidates' unembeddings

Everything here is read from the real engine with capture points on
(attention tables for every position, the rest at the followed one). The
forward pass is the one `generate` runs (a prefill of the prompt, then one
token at a time), so the logits are the same bit for bit, and the token is
chosen by the same `Sampler` and processor chain from the same seed; each
processor's effect is recorded as a stage. The sampling options take
generate's defaults (the model's generation_config.json) through the same
`generation.make_sampler`. The logit lens and the attribution reuse the
model's own final norm, unembedding weights and final logit softcap, so the
last layer of the lens is the actual logits; the stages narrate what is
particular to the model's family (sliding-window layers, attention softcaps,
sandwich norms, parallel residual, expert routing, embedding scale).

:func:`follow_generation` gives the journeys of several generated tokens in a row.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core, thermo
from .errors import ContextFullError, InvalidArgumentError, OutOfRangeError
from .sampling import Draw, SamplingConfig, softmax

# Sequences up to this many tokens keep every position's attention table.
FULL_ATTENTION_LIMIT = 512
# Candidates listed per sampler stage (before and after it).
STAGE_CANDIDATES = 12


@dataclass
class Stage:
    """One step of the journey: a kind, a title, one plain-language line and the numbers behind it.

    kind is one of tokenize, embed, position, attention, residual, mlp,
    final_norm, logits, softmax, sampler (one per processor of the chain) and
    choice; `layer` is set for the per-layer stages.
    """

    kind: str
    title: str
    text: str
    data: dict = field(default_factory=dict)
    layer: int | None = None

    def __str__(self) -> str:
        return f"[{self.title}] {self.text}"

    def __repr__(self) -> str:
        return f"Stage({self.kind!r}, {self.title!r}: {self.text[:60]!r}{'...' if len(self.text) > 60 else ''})"


def _q(tok: str) -> str:
    return repr(tok)


def _check_top(top: Any) -> int:
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or int(top) < 1:
        raise InvalidArgumentError(f"top: the number of candidates shown must be an integer >= 1, got {top!r}")
    return int(top)


class _Trail:
    """One run of the engine as `generate` runs it, with capture points on.

    The prompt is fed in one prefill (up to the followed position, then the
    rest, when a position inside the prompt is followed); with new tokens,
    each chosen token is fed alone against the KV cache. Final-norm and logit
    captures are left off: they would make the core compute every row's
    logits, a different (and differently rounded) product from generate's.
    """

    def __init__(self, model, ids: list[int], followed: list[int], sampler, stop_ids: set[int]):
        self.model = model
        model._apply_threads()  # the journey's own kernel calls run in this thread, at the model's count
        n_final = followed[-1] + 1
        self.full_attention = max(len(ids), n_final) <= FULL_ATTENTION_LIMIT
        hooks = model.hooks()
        hooks.capture("blocks.*.attn_pattern", positions=None if self.full_attention else followed)
        rest = [name for name in _everything(model.config.n_layers)
                if not name.endswith("attn_pattern") and name not in ("final_norm", "logits")]
        hooks.capture(rest, positions=followed)
        session = model.session()
        if len(ids) > session.limit:
            raise ContextFullError.for_tokens(0, len(ids), session.limit, "prompt")
        if n_final > session.limit:
            raise ContextFullError.for_tokens(len(ids), n_final - len(ids), session.limit,
                                              "new_tokens: the tokens followed after the prompt")
        self.sampler = sampler
        self.prompt_length = len(ids)
        self.ids = list(ids)
        self.logits: list[np.ndarray] = []
        self.draws: list[Draw] = []
        self.traces: list[list[tuple[str, str, np.ndarray]]] = []
        self.followed: list[int] = []
        logits = session.feed(self.ids[: followed[0] + 1], hooks=hooks)
        for step, pos in enumerate(followed):
            trace: list[tuple[str, str, np.ndarray]] = []
            history = self.ids[: pos + 1]
            draw = sampler.step(logits, history, lambda proc, x: trace.append((_stage_name(proc), repr(proc), x)))
            self.logits.append(np.asarray(logits, np.float32))
            self.draws.append(draw)
            self.traces.append(trace)
            self.followed.append(pos)
            if step + 1 < len(followed):
                if draw.token in stop_ids:
                    break
                self.ids.append(draw.token)
                logits = session.feed([draw.token], hooks=hooks)
        if followed[0] + 1 < len(ids) and len(followed) == 1:  # the prompt's tail, for its attention rows
            session.feed(ids[followed[0] + 1:], hooks=hooks)
        self.cache = hooks.cache
        self._lens = None

    def lens_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Logit-lens top-1 token and probability at every position and layer: ([L+1, n] ids, probs)."""
        if self._lens is None:
            model, c = self.model, self.model.config
            model._apply_threads()
            names = ["blocks.0.resid_pre"] + [f"blocks.{l}.resid_post" for l in range(c.n_layers)]
            hooks = model.hooks().capture(names)
            model.forward(self.ids, all_positions=False, hooks=hooks)
            best, probs = [], []
            for name in names:
                w = model.weights.get("unembed.weight") or model.weights["embed.weight"]
                logits = _final_softcap(model, _core.matmul(np.ascontiguousarray(w.data), w.dtype, w.shape[0],
                                                            w.shape[1], _final_norm(model, hooks.cache[name])))
                b = logits.argmax(1)
                best.append(b)
                probs.append(np.exp(_log_softmax_rows(logits))[np.arange(len(b)), b])
            self._lens = (np.stack(best), np.stack(probs))
        return self._lens


def _stage_name(proc) -> str:
    return getattr(proc, "name", None) or getattr(proc, "__name__", None) or type(proc).__name__


def _log_softmax_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _final_norm(model, x: np.ndarray) -> np.ndarray:
    """The model's own final norm, through the same kernel the forward pass uses."""
    c, w = model.config, model.weights
    x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    g = w["final_norm.weight"].to_float32()
    if c.norm == "rms":
        return _core.rmsnorm(x, g, c.norm_eps)
    b = w["final_norm.bias"].to_float32() if "final_norm.bias" in w else np.zeros_like(g)
    return _core.layernorm(x, g, b, c.norm_eps)


def _final_softcap(model, logits: np.ndarray) -> np.ndarray:
    """The model's final logit softcap c·tanh(x/c) (as the core applies it), or the logits unchanged."""
    cap = model.config.final_softcap
    if not cap:
        return logits
    return (np.float32(cap) * np.tanh(logits / np.float32(cap))).astype(np.float32)


def _unembed(model, h: np.ndarray) -> np.ndarray:
    """Rows of logits from final-norm rows, through the path generate's logits take.

    generate computes one row of logits at a time (the GEMV); products of
    fewer than GEMM_MIN_ROWS rows take that same path and sum each row in the
    same order, so the lens's last row equals the real logits bit for bit
    (within a rounding of tanh when the model softcaps its logits).
    """
    w = model.weights.get("unembed.weight") or model.weights["embed.weight"]
    data = np.ascontiguousarray(w.data)
    h = np.ascontiguousarray(np.atleast_2d(h), dtype=np.float32)
    step = _core.GEMM_MIN_ROWS - 1
    return _final_softcap(model, np.concatenate([_core.matmul(data, w.dtype, w.shape[0], w.shape[1],
                                                              h[i:i + step])
                                                 for i in range(0, h.shape[0], step)]))


class Journey:
    """One token followed through the model, with the token generate would choose after it.

    Build it with ``model.journey(prompt, ...)`` (the last prompt token by
    default, or ``position=``) or :func:`follow_generation` (several
    generated tokens). The sampling options and seed are generate's: the
    same ones give ``chosen`` == the first token ``generate`` returns.

    Iterating gives the :class:`Stage` records in journey order; ``step()``
    hands them out one at a time. ``logit_lens()``, ``attribution()``,
    ``geometry()`` and ``nearest_tokens()`` analyse the recorded numbers.
    """

    def __init__(self, model, prompt, *, position: int = -1, top: int = 5, seed: int | None = None,
                 sampling: SamplingConfig | None = None, **options: Any):
        """Run `prompt` (text or ids) and follow the token at `position`.

        `seed`, `sampling` and the keyword options (temperature, top_k,
        top_p, min_p, ..., order) are those of tokentrail.generation.generate;
        `top` is how many candidates the stages list.
        """
        from .generation import _prompt_ids, make_sampler

        top = _check_top(top)
        ids = _prompt_ids(model, prompt)
        n = len(ids)
        if isinstance(position, bool) or not isinstance(position, numbers.Integral) or not -n <= position < n:
            raise OutOfRangeError(f"position {position!r} outside a prompt of {n} tokens")
        sampler = make_sampler(model, options, sampling, seed)
        trail = _Trail(model, ids, [int(position) % n], sampler, set())
        self._attach(trail, 0, top)

    @classmethod
    def _of(cls, trail: _Trail, index: int, top: int) -> "Journey":
        j = cls.__new__(cls)
        j._attach(trail, index, top)
        return j

    def _attach(self, trail: _Trail, index: int, top: int) -> None:
        self.model = model = trail.model
        self.config = model.config
        self._trail = trail
        self.index = index
        self.position = p = trail.followed[index]
        # The sequence this step saw: the whole prompt when one prompt position is followed,
        # else everything up to the followed token.
        self.ids = list(trail.ids) if len(trail.followed) == 1 else trail.ids[: p + 1]
        self.top = top
        self.tokens = [self.token(i) for i in self.ids]
        self.full_attention = trail.full_attention
        self.logits = trail.logits[index]
        self.draw = trail.draws[index]
        self.trace = trail.traces[index]
        self.seed = int(trail.sampler.seed)
        self.chosen = int(self.draw.token)
        self.stats = thermo.stats(self.logits, 1.0)
        self.sampled = int((self.draw.probs > 0).sum()) > 1
        self._unembed = None
        self.stages = self._build_stages()
        self._cursor = 0

    def __repr__(self) -> str:
        p = float(self.draw.probs[self.chosen])
        return (f"Journey({self.tokens[self.position]!r} at position {self.position} of {len(self.ids)} tokens "
                f"-> {self.token(self.chosen)!r} (p={p:.3g}), {self.config.n_layers} layers, "
                f"{len(self.stages)} stages)")

    @property
    def temperature(self) -> float:
        """The temperature the chain applied (1.0 when it has no temperature stage)."""
        for proc in self.sampler_chain:
            if _stage_name(proc) == "temperature":
                used = getattr(proc, "last_temperature", None)
                return float(proc.temperature if used is None else used)
        return 1.0

    @property
    def sampler_chain(self) -> list:
        """The processors the token went through, in order."""
        return list(self._trail.sampler.chain)

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
        """The recorded row of a capture point at the followed position."""
        where = np.flatnonzero(self.cache.positions(name) == self.position)
        return self.cache[name][int(where[0])]

    @property
    def cache(self):
        """Everything recorded during the run (an ActivationCache)."""
        return self._trail.cache

    def attention(self, layer: int) -> np.ndarray:
        """The followed token's attention in `layer`: [heads, keys 0..position]."""
        return self._row(f"blocks.{layer}.attn_pattern")[:, : self.position + 1]

    def attention_tables(self, layer: int) -> tuple[list[int], np.ndarray]:
        """(query positions, [heads, queries, keys]) of `layer` over this journey's sequence:
        every query when whole tables were kept, else the followed one."""
        name = f"blocks.{layer}.attn_pattern"
        rows, positions = self.cache[name], self.cache.positions(name)
        n = len(self.ids)
        keep = np.flatnonzero(positions < n) if self.full_attention else np.flatnonzero(positions == self.position)
        return [int(q) for q in positions[keep]], rows[keep][:, :, :n].transpose(1, 0, 2)

    def token(self, i: int) -> str:
        """How token id `i` reads (byte pieces as <0xNN> escapes)."""
        return self.model.tokenizer.display(int(i)) if self.model.tokenizer else str(int(i))

    # -- weights the analyses need ----------------------------------------
    @property
    def unembed(self) -> np.ndarray:
        """The unembedding matrix [vocab, d_model] as float32."""
        if self._unembed is None:
            w = self.model.weights.get("unembed.weight") or self.model.weights["embed.weight"]
            self._unembed = w.to_float32()
        return self._unembed

    def _final_norm(self, x: np.ndarray) -> np.ndarray:
        return _final_norm(self.model, x)

    def final_hidden(self) -> np.ndarray:
        """The final norm's output at the followed position (what the unembedding reads)."""
        return self._final_norm(self._row(f"blocks.{self.config.n_layers - 1}.resid_post"))[0]

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
        top = self.top if top is None else _check_top(top)
        labels, rows = zip(*self.residuals())
        logits = _unembed(self.model, self._final_norm(np.stack(rows)))
        probs = np.exp(_log_softmax_rows(logits))
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top]
        chosen_rank = [int((l > l[self.chosen]).sum()) for l in logits]
        return {"labels": list(labels), "logits": logits, "probs": probs, "top_ids": order,
                "top_tokens": [[self.token(i) for i in r] for r in order],
                "top_probs": np.take_along_axis(probs, order, 1),
                "chosen_prob": probs[:, self.chosen], "chosen_rank": chosen_rank}

    def lens_grid(self) -> dict:
        """Logit-lens top-1 token and probability for every position and layer (for the report)."""
        best, probs = self._trail.lens_grid()
        n = len(self.ids)
        L = self.config.n_layers
        return {"labels": ["embed"] + [f"L{l}" for l in range(L)],
                "tokens": [[self.token(int(b)) for b in row[:n]] for row in best],
                "probs": [[float(x) for x in row[:n]] for row in probs]}

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
            z = self._row(f"blocks.{l}.attn_z").astype(np.float64).reshape(-1)  # [heads, head_dim] flattened
            wo = w[f"blocks.{l}.attn.o.weight"].to_float32().astype(np.float64)
            heads = [wo[:, h * hd:(h + 1) * hd] @ z[h * hd:(h + 1) * hd] for h in range(c.n_heads)]
            ob = w.get(f"blocks.{l}.attn.o.bias")
            bias = ob.to_float32().astype(np.float64) if ob is not None else None
            if c.post_norms:
                # The output norm's scale, frozen at the value the forward pass used, keeps the sum linear.
                g_post = w[f"blocks.{l}.attn_post_norm.weight"].to_float32().astype(np.float64)
                o = sum(heads) + (bias if bias is not None else 0.0)
                scale = 1.0 / math.sqrt(float((o ** 2).mean()) + c.norm_eps)
                heads = [v * scale * g_post for v in heads]
                bias = bias * scale * g_post if bias is not None else None
            for h, v in enumerate(heads):
                parts.append((f"L{l}.H{h}", contrib(v)))
            if bias is not None:
                parts.append((f"L{l}.attn_bias", contrib(bias)))
            parts.append((f"L{l}.mlp", contrib(self._row(f"blocks.{l}.mlp_out").astype(np.float64))))
        if const:
            parts.append(("final_norm_bias", const))
        total = float(sum(v for _, v in parts))
        out = {"token": t, "text": self.token(t), "logit": float(self.logits[t]), "parts": parts, "total": total}
        if c.final_softcap:  # the parts add up to the logit before its softcap
            out["softcap"] = c.final_softcap
            out["capped_total"] = float(c.final_softcap * math.tanh(total / c.final_softcap))
        return out

    def geometry(self, top: int | None = None) -> list[dict]:
        """The final hidden state against the unembedding rows of the top candidates."""
        top = top or self.top
        h = self.final_hidden().astype(np.float64)
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
            raise InvalidArgumentError(f"vector has {v.size} values, the model width is {m.shape[1]}")
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
        generated = len(self.ids) - self._trail.prompt_length
        told = (f"the prompt ({self._trail.prompt_length} tokens) and the {generated} generated so far: "
                if generated > 0 else f"the prompt becomes {len(self.ids)} tokens: ")
        st.append(Stage("tokenize", "tokenize", f"{told}{pieces}; we follow {_q(me)} at position {p}",
                        {"ids": self.ids, "tokens": self.tokens}))
        e = self._row("embed")
        scaled = f", scaled by {c.embed_scale:.4g}" if c.embed_scale != 1.0 else ""
        st.append(Stage("embed", "embed", f"{_q(me)} (id {self.ids[p]}) looks up row {self.ids[p]} of the "
                        f"embedding table{scaled}: {e.size} numbers, norm {np.linalg.norm(e):.2f}", {"vector": e}))
        if c.position == "learned":
            pe = self._row("pos_embed")
            st.append(Stage("position", "position", f"position {p} adds its learned vector (norm "
                            f"{np.linalg.norm(pe):.2f}) to the token's", {"vector": pe}))
        else:
            st.append(Stage("position", "position", f"no vector is added: inside each attention layer, queries and "
                            f"keys of position {p} are rotated by angles {p}·θ_i (rotary, base {c.rope_theta:g})",
                            {"theta": c.rope_theta}))
        lens = self.logit_lens()
        sliding = c.sliding_layers()
        resid = self._row("blocks.0.resid_pre")
        for l in range(c.n_layers):
            pattern = self.attention(l)  # [heads, keys]
            heads = []
            for h in range(c.n_heads):
                j = int(np.argmax(pattern[h]))
                heads.append({"head": h, "to": j, "token": self.tokens[j], "prob": float(pattern[h, j])})
            sharp = max(heads, key=lambda d: d["prob"])
            lines = [f"layer {l}, head {d['head']}: {_q(me)} attends {d['prob']:.2f} to {_q(d['token'])}"
                     + (f" (position {d['to']})" if self.tokens.count(d["token"]) > 1 else "") for d in heads]
            attn_out = self._row(f"blocks.{l}.attn_out")
            notes = ""
            if sliding[l]:
                notes += f"; a sliding-window layer: only the last {c.sliding_window} positions are visible"
            if c.attn_softcap:
                notes += f"; scores are softcapped to ±{c.attn_softcap:g} (c·tanh(s/c)) before the softmax"
            if c.post_norms:
                notes += "; the output is normalised again before joining the residual (sandwich norm)"
            st.append(Stage("attention", f"layer {l} attention",
                            lines[sharp["head"]] + f"; the heads together add a vector of norm "
                            f"{np.linalg.norm(attn_out):.2f}" + notes,
                            {"pattern": pattern, "heads": heads, "lines": lines, "keys": self.tokens[: p + 1],
                             "out": attn_out}, layer=l))
            mid = self._row(f"blocks.{l}.resid_mid")
            st.append(Stage("residual", f"layer {l} residual", f"the residual stream's norm goes from "
                            f"{np.linalg.norm(resid):.2f} to {np.linalg.norm(mid):.2f}", {"vector": mid}, layer=l))
            mlp_out = self._row(f"blocks.{l}.mlp_out")
            reads = " reads the layer's input, as attention did (parallel residual), and" if c.parallel_residual \
                else ""
            if c.n_experts:
                route = self._row(f"blocks.{l}.router")
                chosen = np.argsort(-route, kind="stable")[:c.n_experts_used]
                weights = route[chosen] / route[chosen].sum() if c.renormalize_experts else route[chosen]
                st.append(Stage("mlp", f"layer {l} experts",
                                f"the router sends {_q(me)} to experts {', '.join(str(int(e)) for e in chosen)} with "
                                f"weights {' / '.join(f'{v:.2f}' for v in weights)}; their MLPs{reads} add a vector "
                                f"of norm {np.linalg.norm(mlp_out):.2f}",
                                {"router": route, "experts": chosen.tolist(), "weights": weights.tolist(),
                                 "out": mlp_out}, layer=l))
            else:
                post = self._row(f"blocks.{l}.mlp_post")
                strongest = np.argsort(-np.abs(post), kind="stable")[:3]
                units = ", ".join(f"#{int(i)} ({post[i]:+.2f})" for i in strongest)
                st.append(Stage("mlp", f"layer {l} MLP", f"the MLP{reads} adds a vector of norm "
                                f"{np.linalg.norm(mlp_out):.2f}; its strongest hidden units: {units}",
                                {"hidden": post, "out": mlp_out}, layer=l))
            resid = self._row(f"blocks.{l}.resid_post")
            lt, lp = lens["top_tokens"][l + 1][0], lens["top_probs"][l + 1][0]
            st.append(Stage("residual", f"layer {l} output", f"residual norm {np.linalg.norm(resid):.2f}; read "
                            f"through the final norm and unembedding now, it would predict {_q(lt)} (p={lp:.2f})",
                            {"vector": resid, "lens_token": lt, "lens_prob": float(lp)}, layer=l))
        fn = self.final_hidden()
        kind = "RMSNorm" if c.norm == "rms" else "LayerNorm"
        st.append(Stage("final_norm", "final norm", f"{kind} rescales the residual (norm {np.linalg.norm(resid):.2f})"
                        f" to norm {np.linalg.norm(fn):.2f}", {"vector": fn}))
        order = np.argsort(-self.logits, kind="stable")[: self.top]
        cands = [(self.token(int(i)), float(self.logits[i])) for i in order]
        capped = (f" (after softcapping: {c.final_softcap:g}·tanh(logit/{c.final_softcap:g}) keeps every logit "
                  f"within ±{c.final_softcap:g})") if c.final_softcap else ""
        st.append(Stage("logits", "logits", "highest logits: " + ", ".join(f"{_q(t)} {v:.2f}" for t, v in cands)
                        + capped,
                        {"top_ids": order.tolist(), "top": cands}))
        s = self.stats
        probs = [(self.token(int(i)), float(s.probs[i])) for i in order]
        st.append(Stage("softmax", "softmax", "the model's own distribution (T=1): "
                        + ", ".join(f"{_q(t)} {p:.2f}" for t, p in probs) + f"; entropy {s.entropy_bits + 0.0:.2f} "
                        f"bits, about {s.effective_choices:.1f} effective choices", {"top": probs, "stats": s.row()}))
        st += self._sampler_stages()
        t = self.chosen
        final = self.draw.probs
        rank = int((self.logits > self.logits[t]).sum()) + 1
        survivors = int((final > 0).sum())
        if survivors == 1:
            how = "the only token the chain left" + (" (greedy)" if rank == 1 else "")
        else:
            how = (f"drawn from {survivors} tokens with seed {self.seed}; rank {rank} under the model's own "
                   f"distribution (p={s.probs[t]:.2f})")
        st.append(Stage("choice", "chosen token", f"{_q(self.token(t))} (id {t}, p={final[t]:.2f} after the chain): "
                        f"{how}", {"id": t, "prob": float(final[t]), "model_prob": float(s.probs[t]), "rank": rank,
                                   "seed": self.seed, "survivors": survivors}))
        return st

    def _sampler_stages(self) -> list[Stage]:
        """One stage per processor of the chain: what it removed and how the distribution moved."""
        if not self.trace:
            return [Stage("sampler", "sampler", "the chain has no processors: the token is drawn from the model's "
                          "own distribution", {"name": None, "removed": 0, "kept": int(self.logits.size)})]
        out = []
        before_x = self.logits.astype(np.float64)
        before = softmax(before_x)
        for i, (name, described, after_x) in enumerate(self.trace):
            after = softmax(after_x)
            alive_before = np.isfinite(before_x)
            removed_mask = alive_before & ~np.isfinite(after_x)
            removed = np.flatnonzero(removed_mask)
            removed = removed[np.argsort(-before[removed], kind="stable")]
            kept = int(np.isfinite(after_x).sum())
            cand = np.argsort(-before, kind="stable")[:STAGE_CANDIDATES]
            h_before, h_after = _entropy_bits(before), _entropy_bits(after)
            if removed.size:
                gone = ", ".join(f"{_q(self.token(int(k)))} {before[k]:.3f}" for k in removed[: self.top])
                text = (f"removes {removed.size} of {int(alive_before.sum())} tokens (holding {before[removed].sum():.2f} "
                        f"of the mass; the likeliest: {gone}); {kept} remain")
            else:
                text = f"removes no token; {kept} remain"
            lead = int(np.argmax(after))
            text += (f"; {_q(self.token(lead))} {before[lead]:.2f} -> {after[lead]:.2f}, entropy "
                     f"{h_before:.2f} -> {h_after:.2f} bits")
            out.append(Stage("sampler", f"sampler {i + 1}: {name}", f"{described} {text}",
                             {"name": name, "processor": described, "removed": int(removed.size),
                              "removed_ids": removed.tolist(), "kept": kept,
                              "removed_top": [{"id": int(k), "token": self.token(int(k)), "before": float(before[k])}
                                              for k in removed[:STAGE_CANDIDATES]],
                              "removed_mass": float(before[removed].sum()),
                              "candidates": [{"id": int(k), "token": self.token(int(k)), "before": float(before[k]),
                                              "after": float(after[k])} for k in cand],
                              "entropy_bits": (h_before, h_after)}))
            before_x, before = after_x, after
        return out


def _entropy_bits(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log2(q)).sum()) + 0.0


def follow_generation(model, prompt, new_tokens: int = 1, *, top: int = 5, seed: int | None = None,
                      sampling: SamplingConfig | None = None, eos_token_id: int | Iterable[int] | None = None,
                      ignore_eos: bool = False, **options: Any) -> list[Journey]:
    """The journeys of `new_tokens` tokens generated from `prompt`, one per token.

    The run is generate's (a prefill, then one token at a time against the KV
    cache, one Sampler from `seed`, generate's sampling options and
    defaults), so the chosen tokens are the tokens
    ``generate(prompt, max_new_tokens=new_tokens, seed=seed, ...)`` returns;
    like it, the run ends early at an end-of-sequence token (`eos_token_id`,
    alias `eos_ids`; `ignore_eos`). Journey k follows the token before the
    k-th new one.
    """
    from .generation import _eos_ids, _prompt_ids, make_sampler, take_aliases

    ends = {"eos_token_id": eos_token_id}
    take_aliases(ends, options)
    eos_token_id = ends["eos_token_id"]
    top = _check_top(top)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, numbers.Integral) or new_tokens < 1:
        raise InvalidArgumentError(f"new_tokens: must be an integer >= 1, got {new_tokens!r}")
    ids = _prompt_ids(model, prompt)
    sampler = make_sampler(model, options, sampling, seed)
    stop = set() if ignore_eos else _eos_ids(model, eos_token_id)
    n = len(ids)
    trail = _Trail(model, ids, list(range(n - 1, n - 1 + int(new_tokens))), sampler, stop)
    return [Journey._of(trail, k, top) for k in range(len(trail.followed))]


# The capture points a generated token's journey reads (see `token_journey`).
TOKEN_JOURNEY_POINTS = ("blocks.*.attn_pattern", "blocks.0.resid_pre", "blocks.*.resid_post")


def token_journey(model, cache, position: int, context_ids, chosen: int, top: int = 5) -> dict:
    """A generated token's journey as plain data, from what a decoding step captured.

    `cache` holds TOKEN_JOURNEY_POINTS at absolute `position` (the position
    whose logits chose `chosen`); `context_ids` are the ids at positions
    0..position. Returns, per layer, each head's most attended positions, and
    the logit lens: each residual read through the final norm and unembedding
    (as :meth:`Journey.logit_lens` reads it), with its top tokens and the
    chosen token's probability and rank.
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
    logits = _unembed(model, _final_norm(model, rows))
    probs_rows = np.exp(_log_softmax_rows(logits))
    lens = []
    for label, lg, probs in zip(labels, logits, probs_rows):
        best = np.argsort(-lg, kind="stable")[:top]
        lens.append({"label": label, "top": [{"id": int(i), "token": text(i), "prob": float(probs[i])}
                                             for i in best],
                     "chosen_prob": float(probs[chosen]), "chosen_rank": 1 + int((lg > lg[chosen]).sum())})
    return {"position": int(position), "attention": attention, "logit_lens": lens}


def _everything(n_layers: int) -> list[str]:
    from .capture import all_names

    return all_names(n_layers)

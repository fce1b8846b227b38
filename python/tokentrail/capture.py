"""Capture points and interventions: one mechanism, named after the journey.

The table of points lives in the C++ core (`_core.capture_points()`), where
the forward pass uses it; this module adds the TransformerLens-style aliases,
name patterns, and the cache object that gathers what the core copied out.

    hooks = Hooks(model).capture("blocks.*.attn_pattern", positions=[-1])
    hooks.ablate_head(layer=1, head=2)
    logits = model.forward(ids, hooks=hooks)
    hooks.cache["blocks.1.attn_pattern"]          # [positions, heads, ctx]
    hooks.cache["blocks.1.attn.hook_pattern"]     # TransformerLens layout [heads, q, k]
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from . import _core
from .errors import InvalidArgumentError, OptionError, OutOfRangeError, UnknownNameError


@dataclass(frozen=True)
class Point:
    id: int
    name: str          # short name, e.g. "attn_pattern"
    per_layer: bool
    shape: str         # per captured position
    doc: str


POINTS: dict[str, Point] = {
    name: Point(i, name, per_layer, shape, doc)
    for i, (name, per_layer, shape, doc) in enumerate(_core.capture_points())
}

# TransformerLens hook name -> our short name. "{l}" stands for the layer.
TL_ALIASES = {
    "hook_embed": "embed",
    "hook_pos_embed": "pos_embed",
    "blocks.{l}.hook_resid_pre": "resid_pre",
    "blocks.{l}.ln1.hook_normalized": "attn_norm",
    "blocks.{l}.attn.hook_q": "q",
    "blocks.{l}.attn.hook_k": "k",
    "blocks.{l}.attn.hook_v": "v",
    "blocks.{l}.attn.hook_attn_scores": "attn_scores",
    "blocks.{l}.attn.hook_pattern": "attn_pattern",
    "blocks.{l}.attn.hook_z": "attn_z",
    "blocks.{l}.hook_attn_out": "attn_out",
    "blocks.{l}.hook_resid_mid": "resid_mid",
    "blocks.{l}.ln2.hook_normalized": "mlp_norm",
    "blocks.{l}.mlp.hook_pre": "mlp_pre",
    "blocks.{l}.mlp.hook_pre_linear": "mlp_pre_linear",
    "blocks.{l}.mlp.hook_post": "mlp_post",
    "blocks.{l}.hook_mlp_out": "mlp_out",
    "blocks.{l}.hook_resid_post": "resid_post",
    "ln_final.hook_normalized": "final_norm",
}
_TL_PATTERNS = [(re.compile("^" + re.escape(a).replace(r"\{l\}", r"(\d+)") + "$"), short)
                for a, short in TL_ALIASES.items()]
ATTENTION_TABLES = ("attn_scores", "attn_pattern")


def full_name(point: str, layer: int | None) -> str:
    """'blocks.L.point' for a per-layer point, the short name otherwise."""
    return f"blocks.{layer}.{point}" if layer is not None else point


def parse_name(name: str, n_layers: int) -> tuple[str, int | None, bool]:
    """(short point name, layer or None, whether the name was a TransformerLens alias)."""
    for rx, short in _TL_PATTERNS:
        m = rx.match(name)
        if m:
            layer = int(m.group(1)) if m.groups() else None
            return _checked(short, layer, n_layers, name) + (True,)
    m = re.match(r"^blocks\.(\d+)\.(\w+)$", name)
    if m:
        return _checked(m.group(2), int(m.group(1)), n_layers, name) + (False,)
    return _checked(name, None, n_layers, name) + (False,)


def _checked(short: str, layer: int | None, n_layers: int, original: str) -> tuple[str, int | None]:
    point = POINTS.get(short)
    if point is None:
        raise UnknownNameError(f"unknown capture point {original!r}; points are {sorted(POINTS)} "
                       f"(per layer as 'blocks.L.NAME') or TransformerLens hook names")
    if point.per_layer != (layer is not None):
        raise UnknownNameError(f"capture point {original!r}: {short!r} is "
                       + ("per layer, name it 'blocks.L." + short + "'" if point.per_layer else "not per layer"))
    if layer is not None and not 0 <= layer < n_layers:
        raise UnknownNameError(f"capture point {original!r}: layer {layer} outside 0..{n_layers - 1}")
    return short, layer


def all_names(n_layers: int) -> list[str]:
    """Every capture point of a model, in journey order."""
    pre = [p for p in POINTS.values() if not p.per_layer and p.name in ("embed", "pos_embed")]
    post = [p for p in POINTS.values() if not p.per_layer and p.name not in ("embed", "pos_embed")]
    names = [p.name for p in pre]
    for layer in range(n_layers):
        names += [full_name(p.name, layer) for p in POINTS.values() if p.per_layer]
    return names + [p.name for p in post]


def expand(patterns: str | Iterable[str], n_layers: int) -> list[str]:
    """Names or glob patterns ('blocks.*.attn_pattern', '*resid*') -> canonical names."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names = all_names(n_layers)
    out: list[str] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hit:
                raise UnknownNameError(f"pattern {pat!r} matches no capture point")
        else:
            short, layer, _ = parse_name(pat, n_layers)
            hit = [full_name(short, layer)]
        out += [h for h in hit if h not in out]
    return out


class ActivationCache(Mapping):
    """What a forward pass (or a whole generation) recorded, by name: a read-only mapping.

    Our names give one row per recorded position, [positions, *shape], with
    the shapes of the capture-point table (q, k, v and attn_z as
    [heads, head_dim], attention tables as [heads, keys]). TransformerLens
    aliases give its layouts: attention tables as [heads, query, key].
    `positions(name)` tells which absolute position each row is; `nbytes`
    what the records take.
    """

    def __init__(self, n_layers: int, head_shapes: Mapping[str, tuple[int, int]] | None = None):
        self.n_layers = n_layers
        # Points split into heads, by short name: (heads, head_dim).
        self._head_shapes = dict(head_shapes or {})
        self._data: dict[str, np.ndarray] = {}
        self._positions: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}: {list(v.shape)}" for k, v in list(self._data.items())[:6])
        more = f", ... {len(self._data) - 6} more" if len(self._data) > 6 else ""
        return f"ActivationCache({len(self._data)} points, {self.nbytes / 1e6:.2f} MB; {shown}{more})"

    def _put(self, name: str, chunks: list) -> None:
        if not chunks:
            return
        short = name.rsplit(".", 1)[-1]
        split = self._head_shapes.get(short)
        arrays = [np.asarray(a) for a, _ in chunks]
        if split is not None:
            arrays = [a.reshape(a.shape[0], *split) for a in arrays]
        pos = np.concatenate([np.asarray(p, dtype=np.int64) for _, p in chunks])
        if short in ATTENTION_TABLES and len({a.shape[-1] for a in arrays}) > 1:
            # Generation grows the context: pad earlier rows to the longest.
            width = max(a.shape[-1] for a in arrays)
            fill = -np.inf if short == "attn_scores" else 0.0
            arrays = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])], constant_values=fill)
                      for a in arrays]
        self._data[name] = np.concatenate(arrays)
        self._positions[name] = pos

    def _resolve(self, key: str) -> tuple[str, bool]:
        short, layer, alias = parse_name(key, self.n_layers)
        return full_name(short, layer), alias

    def __getitem__(self, key: str) -> np.ndarray:
        name, alias = self._resolve(key)
        if name not in self._data:
            raise UnknownNameError(f"{key!r} was not captured; captured: {sorted(self._data)}")
        arr = self._data[name]
        if alias and name.rsplit(".", 1)[-1] in ATTENTION_TABLES:
            return arr.transpose(1, 0, 2)
        return arr

    def positions(self, key: str) -> np.ndarray:
        """The absolute position of each row recorded under `key`."""
        name = self._resolve(key)[0]
        if name not in self._positions:
            raise UnknownNameError(f"{key!r} was not captured; captured: {sorted(self._data)}")
        return self._positions[name]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        try:
            return self._resolve(key)[0] in self._data
        except KeyError:
            return False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._data.values())


def _locked(method):
    """Run a Hooks method under its lock, so that it waits for a forward pass in another thread."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


class Hooks:
    """What to record and what to change during forward passes of one model.

    Interventions happen first (replace, then head scaling, then add), and the
    capture records the value the model then used. Positions are absolute
    positions in the sequence. Records accumulate over every forward pass that
    uses these hooks (a prompt, then each generated token) until `reset()`.

    One Hooks may be shared by threads: forward passes that use it run one at
    a time (their records are appended in the order they ran), and changing or
    reading it waits for a pass in progress.
    """

    def __init__(self, model):
        self.model = model
        self.n_layers = model.config.n_layers
        self._core = _core.Hooks(self.n_layers)
        self._sites: dict[tuple[int, int], dict] = {}
        self._cache = self._empty_cache()
        self._stale = False
        # Held by a forward pass using these hooks and by every change or read of them.
        self._lock = threading.RLock()

    def _empty_cache(self) -> ActivationCache:
        c = self.model.config
        return ActivationCache(self.n_layers, {"q": (c.n_heads, c.head_dim), "attn_z": (c.n_heads, c.head_dim),
                                               "k": (c.n_kv_heads, c.head_dim), "v": (c.n_kv_heads, c.head_dim)})

    def __repr__(self) -> str:
        captures = sum(site["capture"] for site in self._sites.values())
        changes = sum(bool(site["head_scale"] or site["add"] or site["replace"]) for site in self._sites.values())
        return f"Hooks({captures} capture points, {changes} interventions)"

    # -- building --------------------------------------------------------
    def _site(self, name: str) -> tuple[dict, str, int | None]:
        short, layer, _ = parse_name(name, self.n_layers)
        key = (POINTS[short].id, -1 if layer is None else layer)
        site = self._sites.setdefault(key, {"capture": False, "positions": [], "head_scale": [], "add": [],
                                            "replace": {}})
        return site, short, layer

    def _push(self, name: str) -> None:
        short, layer, _ = parse_name(name, self.n_layers)
        key = (POINTS[short].id, -1 if layer is None else layer)
        self._core.set(key[0], key[1], **self._sites[key])

    @_locked
    def capture(self, names: str | Iterable[str] = "*", positions: Iterable[int] | None = None) -> "Hooks":
        """Record these points (names or glob patterns), at these absolute positions (None: all).

        Positions here are absolute, since the hooks may serve a whole
        generation; model.run_with_cache also takes positions from the end (-1).
        """
        if positions is not None:
            positions = [positions] if isinstance(positions, (int, np.integer)) else list(positions)
            bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0]
            if bad:
                raise OutOfRangeError(f"positions: {bad[0]!r} is not an absolute position (an integer >= 0); "
                                 f"model.run_with_cache(..., positions=[-1]) counts from the prompt's end")
        for name in expand(names, self.n_layers):
            site, _, _ = self._site(name)
            site["capture"] = True
            site["positions"] = sorted(int(p) for p in positions) if positions is not None else []
            self._push(name)
        return self

    @_locked
    def scale_heads(self, name: str, factors) -> "Hooks":
        """Multiply each head's slice of a head-split point (q, k, v, attn_z) by a factor."""
        site, short, _ = self._site(name)
        heads = self._heads(short)
        f = np.broadcast_to(np.asarray(factors, np.float32), (heads,))
        site["head_scale"] = [float(x) for x in f]
        self._push(name)
        return self

    @_locked
    def ablate_head(self, layer: int, head: int, factor: float = 0.0) -> "Hooks":
        """Zero (or scale) one head's contribution: its weighted value mix, before the output projection."""
        name = full_name("attn_z", layer)
        site, _, _ = self._site(name)
        current = site["head_scale"] or [1.0] * self.model.config.n_heads
        if not 0 <= head < len(current):
            raise OutOfRangeError(f"head {head} outside 0..{len(current) - 1}")
        current = list(current)
        current[head] = float(factor)
        return self.scale_heads(name, current)

    @_locked
    def add(self, name: str, vector) -> "Hooks":
        """Add a vector at every position (steering when `name` is a residual point)."""
        site, short, _ = self._site(name)
        v = np.asarray(vector, np.float32).ravel()
        width = self._width(short)
        if v.size != width:
            raise InvalidArgumentError(f"vector for {name!r} has {v.size} values, expected {width}")
        site["add"] = v.tolist()
        self._push(name)
        return self

    @_locked
    def replace(self, name: str, values: Mapping[int, np.ndarray]) -> "Hooks":
        """Replace the activation at given absolute positions (activation patching)."""
        site, short, _ = self._site(name)
        if short in ATTENTION_TABLES:
            raise InvalidArgumentError(f"{name!r}: attention tables can be captured; change attention through q, k, v or attn_z")
        width = self._width(short)
        for pos, row in values.items():
            r = np.asarray(row, np.float32).ravel()
            if r.size != width:
                raise InvalidArgumentError(f"replacement for {name!r} at position {pos} has {r.size} values, expected {width}")
            site["replace"][int(pos)] = r.tolist()
        self._push(name)
        return self

    @_locked
    def clear(self) -> None:
        """Forget every capture request, intervention and record."""
        self._core.clear()
        self._sites.clear()
        self._cache = self._empty_cache()

    @_locked
    def reset(self) -> None:
        """Forget the records, keep the requests and interventions."""
        self._core.clear_captures()
        self._cache = self._empty_cache()

    # -- reading ---------------------------------------------------------
    def _core_hooks(self):
        self._stale = True
        return self._core

    @contextlib.contextmanager
    def _running(self):
        """Held around a forward pass with these hooks: a pass or change in another thread waits."""
        with self._lock:
            try:
                yield self._core
            finally:
                self._stale = True

    @property
    def cache(self) -> ActivationCache:
        """Everything recorded so far, gathered from the core when first asked for."""
        with self._lock:
            if self._stale:
                self._cache = self._collect()
                self._stale = False
            return self._cache

    def _collect(self) -> ActivationCache:
        cache = self._empty_cache()
        for (pid, layer), site in self._sites.items():
            if not site["capture"]:
                continue
            chunks = self._core.captured(pid, layer)
            name = full_name(_SHORT_BY_ID[pid], None if layer < 0 else layer)
            cache._put(name, chunks)
        return cache

    def _heads(self, short: str) -> int:
        c = self.model.config
        if short in ("q", "attn_z"):
            return c.n_heads
        if short in ("k", "v"):
            return c.n_kv_heads
        raise InvalidArgumentError(f"{short!r} is not split into heads; head scaling applies to q, k, v and attn_z")

    def _width(self, short: str) -> int:
        c = self.model.config
        return {"embed": c.hidden_size, "pos_embed": c.hidden_size, "q": c.q_size, "k": c.kv_size,
                "v": c.kv_size, "attn_z": c.q_size, "mlp_pre": c.ffn_size, "mlp_pre_linear": c.ffn_size,
                "mlp_post": c.ffn_size, "logits": c.vocab_size}.get(short, c.hidden_size)


_SHORT_BY_ID = {p.id: p.name for p in POINTS.values()}


def check_hooks(model, hooks) -> None:
    """Refuse anything but this model's Hooks, with an error that says what was passed."""
    if not isinstance(hooks, Hooks):
        raise OptionError(f"hooks: must come from model.hooks() (a tokentrail.capture.Hooks), "
                          f"got {type(hooks).__name__} {hooks!r:.60}")
    if hooks.model is not model:
        raise OptionError("hooks: were made for another model; use this model's hooks()")

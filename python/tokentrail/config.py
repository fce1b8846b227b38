"""The neutral description of a model: every family difference is a field here.

Everything after loading (the C++ forward pass, generation, the journey) reads
only a ModelConfig and a dict of named weights; no code outside `loading/`
knows which file format or which model family a checkpoint came from.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

NORMS = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu_erf", "relu")
POSITIONS = ("rope", "learned")
# "half": rotate element i with i + head_dim/2 (Hugging Face Llama, GPT-NeoX).
# "adjacent": rotate elements 2i and 2i+1 together (llama2.c, Meta's original code).
ROPE_LAYOUTS = ("half", "adjacent")
# RMSNorm of queries and keys: per head over head_dim (Qwen3, Gemma 3) or over the whole projection (OLMo 2).
QK_NORMS = ("none", "head", "full")
LAYER_TYPES = ("full", "sliding")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    max_seq_len: int
    norm: str = "rms"
    norm_eps: float = 1e-5
    activation: str = "silu"
    gated_mlp: bool = True
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_layout: str = "half"
    tied_embeddings: bool = False
    # Rotary details: how many leading elements of each head rotate (0 = all), the scaling of
    # full-attention layers ({"type": "llama3" | "linear" | "yarn" | "longrope" | "dynamic", ...},
    # see tokentrail.rope), and the own base of sliding-window layers (0 = rope_theta).
    rotary_dim: int = 0
    rope_scaling: dict | None = None
    rope_local_theta: float = 0.0
    # Block structure.
    qk_norm: str = "none"
    pre_norms: bool = True           # normalise attention's and the MLP's inputs
    post_norms: bool = False         # normalise their outputs before the residual add (Gemma 2/3, OLMo 2)
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX)
    # Attention: a window for sliding layers, which layers slide ("full"/"sliding" each; empty
    # with a window: every layer), the q.k scale (0 = 1/sqrt(head_dim)), tanh softcaps (0 = off).
    sliding_window: int = 0
    layer_types: list[str] = field(default_factory=list)
    attn_scale: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    embed_scale: float = 1.0
    # Mixture of experts: every MLP is n_experts gated MLPs of ffn_size, the router picks n_experts_used.
    n_experts: int = 0
    n_experts_used: int = 0
    renormalize_experts: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Free-form provenance, e.g. "LlamaForCausalLM" or "llama2.c"; never branched on.
    architecture: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "ffn_size", "max_seq_len"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {v!r}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.activation in ACTIVATIONS,
             f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}")
        need(self.rope_layout in ROPE_LAYOUTS,
             f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        need(self.position != "rope" or self.head_dim % 2 == 0, "rope needs an even head_dim")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        need(isinstance(self.rotary_dim, int) and 0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
             f"rotary_dim must be even and within 0..head_dim, got {self.rotary_dim!r}")
        need(self.position != "rope" or (math.isfinite(self.rope_theta) and self.rope_theta > 0),
             f"rope_theta must be a positive number, got {self.rope_theta!r}")
        need(math.isfinite(self.rope_local_theta) and self.rope_local_theta >= 0,
             f"rope_local_theta must be positive (or 0 for none), got {self.rope_local_theta!r}")
        for name in ("attn_scale", "attn_softcap", "final_softcap"):
            v = getattr(self, name)
            need(math.isfinite(v) and v >= 0, f"{name} must be a non-negative number, got {v!r}")
        need(math.isfinite(self.embed_scale) and self.embed_scale > 0,
             f"embed_scale must be a positive number, got {self.embed_scale!r}")
        need(isinstance(self.sliding_window, int) and self.sliding_window >= 0,
             f"sliding_window must be a non-negative integer, got {self.sliding_window!r}")
        need(not self.layer_types or (len(self.layer_types) == self.n_layers
                                      and all(t in LAYER_TYPES for t in self.layer_types)),
             f"layer_types must give one of {LAYER_TYPES} per layer, got {self.layer_types!r}")
        need(self.sliding_window > 0 or "sliding" not in self.layer_types,
             "sliding layers need a sliding_window")
        need(self.n_experts == 0 or 1 <= self.n_experts_used <= self.n_experts,
             f"n_experts_used must be within 1..n_experts, got {self.n_experts_used} of {self.n_experts}")
        need(self.n_experts == 0 or self.gated_mlp, "experts are gated MLPs")
        need(not self.parallel_residual or self.pre_norms, "a parallel block normalises its inputs")
        if self.rope_scaling is not None:
            from .rope import SCALING_PARAMS

            kind = self.rope_scaling.get("type") if isinstance(self.rope_scaling, dict) else None
            need(kind in SCALING_PARAMS, f"rope_scaling type must be one of {sorted(SCALING_PARAMS)}, "
                                         f"got {self.rope_scaling!r}")

    @property
    def rotary_size(self) -> int:
        """Elements of each head that rotate."""
        return self.rotary_dim or self.head_dim

    def sliding_layers(self) -> list[bool]:
        """Per layer: does it attend through the sliding window?"""
        if not self.sliding_window:
            return [False] * self.n_layers
        if not self.layer_types:
            return [True] * self.n_layers
        return [t == "sliding" for t in self.layer_types]

    def core_dict(self) -> dict:
        """The config as the C++ core takes it: these fields plus the derived rotary tables."""
        from .rope import tables

        d = self.to_dict()
        d["rotary_dim"] = self.rotary_size
        d["sliding_layers"] = self.sliding_layers()
        empty: list[float] = []
        if self.position == "rope":
            t = tables(self.rope_theta, self.rotary_size, self.rope_scaling, self.max_seq_len,
                       self.rope_local_theta)
            d.update(inv_freq=t.inv_freq.tolist(),
                     inv_freq_local=empty if t.inv_freq_local is None else t.inv_freq_local.tolist(),
                     inv_freq_long=empty if t.inv_freq_long is None else t.inv_freq_long.tolist(),
                     rope_long_after=t.long_after, rope_attn_factor=t.attn_factor)
        else:
            d.update(inv_freq=empty, inv_freq_local=empty, inv_freq_long=empty, rope_long_after=0,
                     rope_attn_factor=1.0)
        return d

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every weight the forward pass may read, by neutral name.

    Biases and the norm biases are optional (a family has them or not); the
    rest are required, except `unembed.weight` when embeddings are tied and
    `pos_embed.weight` when positions are rotary.
    """
    d, f = cfg.hidden_size, cfg.ffn_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d)}
    if cfg.position == "learned":
        shapes["pos_embed.weight"] = (cfg.max_seq_len, d)
    norms = (("attn_norm", "mlp_norm") if cfg.pre_norms else ()) + \
            (("attn_post_norm", "mlp_post_norm") if cfg.post_norms else ())
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        for norm in norms:
            shapes[p + norm + ".weight"] = (d,)
            shapes[p + norm + ".bias"] = (d,)
        shapes[p + "attn.q.weight"] = (cfg.q_size, d)
        shapes[p + "attn.q.bias"] = (cfg.q_size,)
        for kv in ("k", "v"):
            shapes[p + f"attn.{kv}.weight"] = (cfg.kv_size, d)
            shapes[p + f"attn.{kv}.bias"] = (cfg.kv_size,)
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            shapes[p + "attn.q_norm.weight"] = (cfg.head_dim if per_head else cfg.q_size,)
            shapes[p + "attn.k_norm.weight"] = (cfg.head_dim if per_head else cfg.kv_size,)
        shapes[p + "attn.o.weight"] = (d, cfg.q_size)
        shapes[p + "attn.o.bias"] = (d,)
        if cfg.n_experts:
            shapes[p + "mlp.router.weight"] = (cfg.n_experts, d)
            for e in range(cfg.n_experts):
                x = f"{p}mlp.experts.{e}."
                shapes[x + "gate.weight"] = (f, d)
                shapes[x + "up.weight"] = (f, d)
                shapes[x + "down.weight"] = (d, f)
            continue
        if cfg.gated_mlp:
            shapes[p + "mlp.gate.weight"] = (f, d)
            shapes[p + "mlp.gate.bias"] = (f,)
        shapes[p + "mlp.up.weight"] = (f, d)
        shapes[p + "mlp.up.bias"] = (f,)
        shapes[p + "mlp.down.weight"] = (d, f)
        shapes[p + "mlp.down.bias"] = (d,)
    shapes["final_norm.weight"] = (d,)
    shapes["final_norm.bias"] = (d,)
    if not cfg.tied_embeddings:
        shapes["unembed.weight"] = (cfg.vocab_size, d)
    return shapes


def is_optional(name: str) -> bool:
    return name.endswith(".bias")

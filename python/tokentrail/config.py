"""The neutral description of a model: every family difference is a field here.

Everything after loading (the C++ forward pass, generation, the journey) reads
only a ModelConfig and a dict of named weights; no code outside `loading/`
knows which file format or which model family a checkpoint came from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

NORMS = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu_erf", "relu")
POSITIONS = ("rope", "learned")
# "half": rotate element i with i + head_dim/2 (Hugging Face Llama, GPT-NeoX).
# "adjacent": rotate elements 2i and 2i+1 together (llama2.c, Meta's original code).
ROPE_LAYOUTS = ("half", "adjacent")


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
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        for norm in ("attn_norm", "mlp_norm"):
            shapes[p + norm + ".weight"] = (d,)
            shapes[p + norm + ".bias"] = (d,)
        shapes[p + "attn.q.weight"] = (cfg.q_size, d)
        shapes[p + "attn.q.bias"] = (cfg.q_size,)
        for kv in ("k", "v"):
            shapes[p + f"attn.{kv}.weight"] = (cfg.kv_size, d)
            shapes[p + f"attn.{kv}.bias"] = (cfg.kv_size,)
        shapes[p + "attn.o.weight"] = (d, cfg.q_size)
        shapes[p + "attn.o.bias"] = (d,)
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

"""The model families tokentrail reads: one record each.

A record says everything that is particular to a family: its Hugging Face
architecture names and tensor names, how its config.json maps onto
`ModelConfig`, its GGUF architecture name (as llama.cpp's converter writes it)
and the facts that a GGUF file of that architecture implies without storing.
The Hugging Face reader, the GGUF reader and the GGUF writer all read these
records; what a family computes differently is a `ModelConfig` field that the
one forward pass handles.

Neutral tensor names (`blocks.{l}.attn.q.weight`, …) are listed in
`tokentrail.config.expected_shapes`. Tensor-name patterns here use `{l}` for
the layer and `{e}` for the expert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .fields import FieldReader

# ---------------------------------------------------------------------------
# Hugging Face config.json
# ---------------------------------------------------------------------------

# Keys of config.json that never change what the forward pass computes: provenance,
# training-only settings (dropout, initialisation, auxiliary losses) and generation
# defaults (read from generation_config.json instead).
HF_HARMLESS = frozenset("""
architectures model_type transformers_version dtype torch_dtype _name_or_path use_cache initializer_range
pad_token_id bos_token_id eos_token_id sep_token_id unk_token_id decoder_start_token_id
attention_dropout hidden_dropout embd_pdrop resid_pdrop attn_pdrop classifier_dropout summary_first_dropout
output_router_logits router_aux_loss_coef router_jitter_noise router_z_loss_coef tokenizer_class is_decoder
return_dict output_hidden_states output_attentions torchscript use_bfloat16 tf_legacy_loss pruned_heads
chunk_size_feed_forward is_encoder_decoder add_cross_attention tie_encoder_decoder cross_attention_hidden_size
finetuning_task id2label label2id prefix task_specific_params problem_type auto_map
max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k
top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
begin_suppress_tokens pretraining_tp cache_implementation attention_bias mlp_bias
""".split())

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu_erf", "relu": "relu"}

# Parameters of each rope scaling type as config.json spells them.
_ROPE_KEYS = {
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"short_factor", "long_factor", "original_max_position_embeddings", "factor",
                 "attention_factor"},
}


def activation(r: FieldReader, key: str, default: str | None = None) -> str:
    name = r.str(key, default) if default is not None else r.str(key)
    if name not in ACTIVATIONS:
        raise r.error(key, f"activation {name!r} is not supported (tokentrail runs {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def rope_scaling(r: FieldReader, spec: dict | None, key: str, head_dim: int) -> dict | None:
    """A scaling dict from config.json as tokentrail.rope takes it ({"type": ..., params}), or None."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise r.error(key, f"expected an object, got {type(spec).__name__}")
    kind = spec.get("rope_type", spec.get("type", "default"))
    extra = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if kind == "default":
        unknown = set(spec) - extra
        if unknown:
            raise r.error(key, f"default rope has unexpected parameters {sorted(unknown)}")
        return None
    if kind not in _ROPE_KEYS:
        raise r.error(key, f"rope scaling type {kind!r} is not supported (tokentrail implements "
                           f"{sorted(_ROPE_KEYS)})")
    unknown = set(spec) - _ROPE_KEYS[kind] - extra
    if unknown:
        raise r.error(key, f"{kind} rope scaling has parameters tokentrail does not understand: {sorted(unknown)}")
    out: dict = {"type": kind}
    for k in _ROPE_KEYS[kind]:
        v = spec.get(k)
        if k == "original_max_position_embeddings" and v is None and r.has(k):
            v = r.int(k)  # some families keep it at the top level (Phi-3)
        if v is None:
            continue
        if k in ("short_factor", "long_factor"):
            if not isinstance(v, list) or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0
                                                  for x in v):
                raise r.error(key, f"{k} must be a list of positive numbers")
        elif k == "truncate":
            if not isinstance(v, bool):
                raise r.error(key, "truncate must be true or false")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise r.error(key, f"{k} must be a positive number, got {v!r}")
        out[k] = v
    needed = {"linear": ["factor"], "dynamic": ["factor"], "llama3": sorted(_ROPE_KEYS["llama3"]),
              "yarn": ["original_max_position_embeddings"],
              "longrope": ["short_factor", "long_factor", "original_max_position_embeddings"]}[kind]
    missing = [k for k in needed if k not in out]
    if missing:
        raise r.error(key, f"{kind} rope scaling lacks {missing}")
    if kind == "llama3" and out["high_freq_factor"] == out["low_freq_factor"]:
        raise r.error(key, "llama3 rope scaling needs high_freq_factor != low_freq_factor")
    return out


def rope_fields(r: FieldReader, head_dim: int, local: bool = False, partial_key: str = "partial_rotary_factor"
                ) -> dict:
    """rope_theta, rope_scaling, rotary_dim (and rope_local_theta) from either spelling of config.json:
    `rope_parameters` (one dict, or one per layer type) or `rope_theta` + `rope_scaling`."""
    params = r.raw("rope_parameters", None)
    theta = r.float("rope_theta", None)
    partial = r.float(partial_key, None) if partial_key else None
    scaling_spec, scaling_key = r.raw("rope_scaling", None), "rope_scaling"
    local_theta = r.float("rope_local_base_freq", None) if local else None
    if params is not None:
        if not isinstance(params, dict):
            raise r.error("rope_parameters", f"expected an object, got {type(params).__name__}")
        full = params
        if "full_attention" in params or "sliding_attention" in params:
            if not local or set(params) - {"full_attention", "sliding_attention"}:
                raise r.error("rope_parameters", "per-layer-type rope parameters are not expected here")
            full = params.get("full_attention") or {}
            sliding = params.get("sliding_attention") or {}
            if not isinstance(full, dict) or not isinstance(sliding, dict):
                raise r.error("rope_parameters", "expected objects per layer type")
            if sliding.get("rope_type", "default") != "default":
                raise r.error("rope_parameters", "scaled rope on sliding-window layers is not supported")
            if "rope_theta" in sliding:
                local_theta = _positive(r, "rope_parameters", sliding["rope_theta"], "sliding rope_theta")
        if "rope_theta" in full:
            theta = _positive(r, "rope_parameters", full["rope_theta"], "rope_theta")
        if "partial_rotary_factor" in full:
            partial = _positive(r, "rope_parameters", full["partial_rotary_factor"], "partial_rotary_factor")
        scaling_spec, scaling_key = full, "rope_parameters"
    if theta is None:
        theta = 10000.0
    if partial is not None and partial > 1:
        raise r.error(partial_key or "rope_parameters", f"partial rotary factor must be at most 1, got {partial}")
    rotary_dim = int(head_dim * partial) if partial is not None else head_dim
    if rotary_dim < 2 or rotary_dim % 2:
        raise r.error(partial_key or "rope_parameters", f"{rotary_dim} rotary dimensions: must be even and >= 2")
    out = dict(rope_theta=theta, rope_scaling=rope_scaling(r, scaling_spec, scaling_key, head_dim),
               rotary_dim=rotary_dim if rotary_dim != head_dim else 0)
    if local_theta:
        out["rope_local_theta"] = local_theta
    return out


def _positive(r: FieldReader, key: str, v, what: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise r.error(key, f"{what} must be a positive number, got {v!r}")
    return float(v)


def layer_types(r: FieldReader, n_layers: int, default: Callable[[int], str] | None = None) -> list[str]:
    """Per layer "full" or "sliding", from `layer_types` or the family's default pattern."""
    if r.has("layer_types"):
        raw = r.list("layer_types")
        names = {"full_attention": "full", "sliding_attention": "sliding"}
        if len(raw) != n_layers or any(t not in names for t in raw):
            raise r.error("layer_types", f"expected {n_layers} entries of {sorted(names)}")
        return [names[t] for t in raw]
    r.ignore("layer_types")
    return [default(i) for i in range(n_layers)] if default else []


def decoder_fields(r: FieldReader, *, act_key: str = "hidden_act", act_default: str | None = "silu",
                   eps_key: str = "rms_norm_eps", tied_default: bool = False, local_rope: bool = False) -> dict:
    """The fields every Llama-style config.json spells the same way."""
    heads = r.int("num_attention_heads")
    hidden = r.int("hidden_size")
    head_dim = r.int("head_dim", None) or hidden // heads
    if head_dim < 1:
        raise r.error("head_dim", "head size must be at least 1")
    fields = dict(
        vocab_size=r.int("vocab_size"), hidden_size=hidden, n_layers=r.int("num_hidden_layers"), n_heads=heads,
        n_kv_heads=r.int("num_key_value_heads", heads), head_dim=head_dim, ffn_size=r.int("intermediate_size"),
        max_seq_len=r.int("max_position_embeddings"), norm="rms", norm_eps=r.float(eps_key, 1e-6),
        activation=activation(r, act_key, act_default), gated_mlp=True, position="rope", rope_layout="half",
        tied_embeddings=r.bool("tie_word_embeddings", tied_default))
    fields.update(rope_fields(r, head_dim, local=local_rope))
    return fields


def sliding_everywhere(r: FieldReader, fields: dict) -> None:
    """Mistral, Mixtral, Phi-3: a `sliding_window` (when set) applies to every layer."""
    window = r.int("sliding_window", None)
    types = layer_types(r, fields["n_layers"], (lambda i: "sliding") if window else None)
    if window and window < fields["max_seq_len"]:
        fields.update(sliding_window=window, layer_types=types)


def sliding_if_enabled(r: FieldReader, fields: dict) -> None:
    """Qwen2/Qwen3: `use_sliding_window` switches a window on for layers from `max_window_layers`."""
    use = r.bool("use_sliding_window", False)
    window = r.int("sliding_window", None)
    first = r.int("max_window_layers", fields["n_layers"], minimum=0)
    types = layer_types(r, fields["n_layers"], (lambda i: "sliding" if i >= first else "full") if use else None)
    if "sliding" in types:
        if not window:
            raise r.error("sliding_window", "sliding layers need a window size")
        fields.update(sliding_window=window, layer_types=types)


def experts(r: FieldReader, fields: dict, count_key: str, renormalize: bool | None,
            ffn_key: str | None = None) -> None:
    """Mixture-of-experts fields; `renormalize` None reads `norm_topk_prob`."""
    # transformers 5 writes num_local_experts for every MoE family; older files keep their own name.
    fields["n_experts"] = r.int(count_key) if r.has(count_key) else r.int("num_local_experts")
    r.ignore(count_key, "num_local_experts")
    fields["n_experts_used"] = r.int("num_experts_per_tok")
    fields["renormalize_experts"] = r.bool("norm_topk_prob") if renormalize is None else renormalize
    if ffn_key:
        fields["ffn_size"] = r.int(ffn_key)


# ---------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------

def _llama_names(prefix: str = "model.", post_norm_names: bool = False, post_norms_only: bool = False
                 ) -> dict[str, str]:
    """Neutral -> Hugging Face names of the Llama layout (q/k/v/o, gate/up/down, two norms)."""
    p = prefix + "layers.{l}."
    names = {
        "embed.weight": prefix + "embed_tokens.weight",
        "final_norm.weight": prefix + "norm.weight",
        "unembed.weight": "lm_head.weight",
        "blocks.{l}.attn_norm.weight": p + "input_layernorm.weight",
        "blocks.{l}.mlp_norm.weight": p + "post_attention_layernorm.weight",
        "blocks.{l}.attn.q_norm.weight": p + "self_attn.q_norm.weight",
        "blocks.{l}.attn.k_norm.weight": p + "self_attn.k_norm.weight",
    }
    for proj in "qkvo":
        for kind in ("weight", "bias"):
            names[f"blocks.{{l}}.attn.{proj}.{kind}"] = p + f"self_attn.{proj}_proj.{kind}"
    for proj in ("gate", "up", "down"):
        for kind in ("weight", "bias"):
            names[f"blocks.{{l}}.mlp.{proj}.{kind}"] = p + f"mlp.{proj}_proj.{kind}"
    if post_norm_names:  # Gemma 2/3: four norms per block
        names["blocks.{l}.attn_post_norm.weight"] = p + "post_attention_layernorm.weight"
        names["blocks.{l}.mlp_norm.weight"] = p + "pre_feedforward_layernorm.weight"
        names["blocks.{l}.mlp_post_norm.weight"] = p + "post_feedforward_layernorm.weight"
    if post_norms_only:  # OLMo 2: norms on the outputs only
        del names["blocks.{l}.attn_norm.weight"], names["blocks.{l}.mlp_norm.weight"]
        names["blocks.{l}.attn_post_norm.weight"] = p + "post_attention_layernorm.weight"
        names["blocks.{l}.mlp_post_norm.weight"] = p + "post_feedforward_layernorm.weight"
    return names


def _moe_names(names: dict[str, str], block: str, router: str, expert: str, gate: str, up: str, down: str
               ) -> dict[str, str]:
    p = "model.layers.{l}." + block
    names = {k: v for k, v in names.items() if ".mlp." not in k}
    names["blocks.{l}.mlp.router.weight"] = p + router + ".weight"
    for neutral, hf in (("gate", gate), ("up", up), ("down", down)):
        names[f"blocks.{{l}}.mlp.experts.{{e}}.{neutral}.weight"] = p + f"{expert}.{{e}}.{hf}.weight"
    return names


@dataclass(frozen=True)
class Fused:
    """A Hugging Face tensor holding several neutral ones.

    `layout` "rows": the parts are consecutive row blocks of the sizes given by
    `sizes(config)`; "heads": rows are grouped per head as [head][part][head_dim]
    (GPT-NeoX); "conv1d": GPT-2's [in, out] matrix, transposed first, then rows.
    """
    hf: str
    parts: tuple[str, ...]
    sizes: Callable
    layout: str = "rows"


def _qkv_sizes(c) -> tuple[int, int, int]:
    return (c.q_size, c.kv_size, c.kv_size)


def _gate_up_sizes(c) -> tuple[int, int]:
    return (c.ffn_size, c.ffn_size)


# ---------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple[str, ...]
    hf_config: Callable[[FieldReader], dict]   # ModelConfig fields from config.json
    hf_names: dict[str, str]                   # neutral pattern -> Hugging Face pattern
    gguf_arch: str | None                      # general.architecture of llama.cpp's converter
    hf_fused: tuple[Fused, ...] = ()
    # Extra tensors of the Hugging Face layout that carry nothing (buffers saved by old exports).
    hf_skip: tuple[str, ...] = ()
    # RMSNorm weights stored as w - 1 (the model multiplies by 1 + w): added back on load.
    norm_offset: float = 0.0
    # Fields a GGUF file of this architecture implies without storing them, as llama.cpp assumes.
    gguf_fixed: Callable[[dict], dict] = field(default=lambda f: {})
    # How llama.cpp's converter orders q/k rows: "adjacent" (permuted, arch llama) or "half".
    gguf_rope_layout: str = "half"
    # GGUF stores gate and up as one ffn_up of twice the rows (Phi-3).
    gguf_fused_gate_up: bool = False
    # GGUF stores q, k and v as one attn_qkv (what llama.cpp reads for GPT-2, GPT-NeoX, Phi-3).
    gguf_fused_qkv: bool = False
    summary: str = ""


def _llama_config(r: FieldReader) -> dict:
    f = decoder_fields(r)
    sliding_everywhere(r, f)
    return f


def _qwen2_config(r: FieldReader) -> dict:
    f = decoder_fields(r)
    sliding_if_enabled(r, f)
    return f


def _qwen3_config(r: FieldReader) -> dict:
    f = _qwen2_config(r)
    f["qk_norm"] = "head"
    return f


def _qwen3_moe_config(r: FieldReader) -> dict:
    f = _qwen3_config(r)
    experts(r, f, "num_experts", None, "moe_intermediate_size")
    r.require("mlp_only_layers", ([],), [])
    r.require("decoder_sparse_step", (1,), 1)
    return f


def _mixtral_config(r: FieldReader) -> dict:
    f = _llama_config(r)
    experts(r, f, "num_local_experts", True)
    return f


def _olmoe_config(r: FieldReader) -> dict:
    f = decoder_fields(r, eps_key="rms_norm_eps")
    experts(r, f, "num_experts", None)
    f["qk_norm"] = "full"
    r.require("clip_qkv", (None,))
    return f


def _gemma_common(r: FieldReader, f: dict) -> None:
    f["embed_scale"] = math.sqrt(f["hidden_size"])
    r.require("use_bidirectional_attention", (None, False))


def _gemma_config(r: FieldReader) -> dict:
    # Gemma's activation is `hidden_activation` (older files) or `hidden_act`.
    key = "hidden_activation" if r.has("hidden_activation") else "hidden_act"
    f = decoder_fields(r, act_key=key, act_default="gelu_pytorch_tanh", tied_default=True)
    r.ignore("hidden_act", "hidden_activation")
    _gemma_common(r, f)
    return f


def _gemma2_config(r: FieldReader, version: int = 2) -> dict:
    key = "hidden_activation" if r.has("hidden_activation") else "hidden_act"
    f = decoder_fields(r, act_key=key, act_default="gelu_pytorch_tanh", tied_default=True,
                       local_rope=version == 3)
    r.ignore("hidden_act", "hidden_activation")
    _gemma_common(r, f)
    f.update(post_norms=True, attn_scale=r.float("query_pre_attn_scalar", 256.0) ** -0.5,
             attn_softcap=r.float("attn_logit_softcapping", 0.0, positive=False, minimum=0.0),
             final_softcap=r.float("final_logit_softcapping", 0.0, positive=False, minimum=0.0))
    n = f["n_layers"]
    if version == 2:
        types = layer_types(r, n, lambda i: "sliding" if i % 2 == 0 else "full")
    else:
        f["qk_norm"] = "head"
        pattern = r.int("sliding_window_pattern", None) or r.int("_sliding_window_pattern", 6)
        r.ignore("sliding_window_pattern", "_sliding_window_pattern")
        types = layer_types(r, n, lambda i: "sliding" if (i + 1) % pattern else "full")
    window = r.int("sliding_window", None)
    if "sliding" in types:
        if not window:
            raise r.error("sliding_window", "sliding layers need a window size")
        f.update(sliding_window=window, layer_types=types)
    return f


def _phi3_config(r: FieldReader) -> dict:
    f = decoder_fields(r, eps_key="rms_norm_eps")
    r.ignore("original_max_position_embeddings")  # read with the rope scaling that needs it
    sliding_everywhere(r, f)
    return f


def _neox_config(r: FieldReader) -> dict:
    heads = r.int("num_attention_heads")
    hidden = r.int("hidden_size")
    head_dim = hidden // heads
    f = dict(vocab_size=r.int("vocab_size"), hidden_size=hidden, n_layers=r.int("num_hidden_layers"),
             n_heads=heads, n_kv_heads=heads, head_dim=head_dim, ffn_size=r.int("intermediate_size"),
             max_seq_len=r.int("max_position_embeddings"), norm="layer", norm_eps=r.float("layer_norm_eps", 1e-5),
             activation=activation(r, "hidden_act", "gelu"), gated_mlp=False, position="rope",
             rope_layout="half", tied_embeddings=r.bool("tie_word_embeddings", False),
             parallel_residual=r.bool("use_parallel_residual", True))
    partial = "rotary_pct" if r.has("rotary_pct") else "partial_rotary_factor"
    f.update(rope_fields(r, head_dim, partial_key=partial))
    if r.has("rotary_emb_base"):
        f["rope_theta"] = r.float("rotary_emb_base")
    r.ignore("rotary_emb_base", "rotary_pct", "partial_rotary_factor")
    r.require("attention_bias", (True, None))
    return f


def _olmo2_config(r: FieldReader) -> dict:
    f = decoder_fields(r)
    f.update(qk_norm="full", pre_norms=False, post_norms=True)
    return f


def _gpt2_config(r: FieldReader) -> dict:
    dim = r.int("n_embd")
    heads = r.int("n_head")
    r.require("scale_attn_weights", (True,), True)
    r.require("scale_attn_by_inverse_layer_idx", (False,), False)
    r.require("add_cross_attention", (False,), False)
    r.ignore("n_ctx", "reorder_and_upcast_attn", "summary_activation", "summary_first_dropout",
             "summary_proj_to_labels", "summary_type", "summary_use_proj")
    return dict(vocab_size=r.int("vocab_size"), hidden_size=dim, n_layers=r.int("n_layer"), n_heads=heads,
                n_kv_heads=heads, head_dim=dim // heads, ffn_size=r.int("n_inner", 4 * dim),
                max_seq_len=r.int("n_positions"), norm="layer", norm_eps=r.float("layer_norm_epsilon", 1e-5),
                activation=activation(r, "activation_function", "gelu_new"), gated_mlp=False, position="learned",
                tied_embeddings=r.bool("tie_word_embeddings", True))


_GPT2_NAMES = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "final_norm.weight": "transformer.ln_f.weight",
    "final_norm.bias": "transformer.ln_f.bias",
    "unembed.weight": "lm_head.weight",
    "blocks.{l}.attn_norm.weight": "transformer.h.{l}.ln_1.weight",
    "blocks.{l}.attn_norm.bias": "transformer.h.{l}.ln_1.bias",
    "blocks.{l}.mlp_norm.weight": "transformer.h.{l}.ln_2.weight",
    "blocks.{l}.mlp_norm.bias": "transformer.h.{l}.ln_2.bias",
    # GPT-2 stores its projections as [in, out] (Conv1D); they are transposed on load.
    "blocks.{l}.attn.o.weight": "transformer.h.{l}.attn.c_proj.weight",
    "blocks.{l}.attn.o.bias": "transformer.h.{l}.attn.c_proj.bias",
    "blocks.{l}.mlp.up.weight": "transformer.h.{l}.mlp.c_fc.weight",
    "blocks.{l}.mlp.up.bias": "transformer.h.{l}.mlp.c_fc.bias",
    "blocks.{l}.mlp.down.weight": "transformer.h.{l}.mlp.c_proj.weight",
    "blocks.{l}.mlp.down.bias": "transformer.h.{l}.mlp.c_proj.bias",
}
# GPT-2's Conv1D matrices, stored [in, out]: transposed once at load.
GPT2_TRANSPOSED = ("attn.o.weight", "mlp.up.weight", "mlp.down.weight")

_NEOX_NAMES = {
    "embed.weight": "gpt_neox.embed_in.weight",
    "final_norm.weight": "gpt_neox.final_layer_norm.weight",
    "final_norm.bias": "gpt_neox.final_layer_norm.bias",
    "unembed.weight": "embed_out.weight",
    "blocks.{l}.attn_norm.weight": "gpt_neox.layers.{l}.input_layernorm.weight",
    "blocks.{l}.attn_norm.bias": "gpt_neox.layers.{l}.input_layernorm.bias",
    "blocks.{l}.mlp_norm.weight": "gpt_neox.layers.{l}.post_attention_layernorm.weight",
    "blocks.{l}.mlp_norm.bias": "gpt_neox.layers.{l}.post_attention_layernorm.bias",
    "blocks.{l}.attn.o.weight": "gpt_neox.layers.{l}.attention.dense.weight",
    "blocks.{l}.attn.o.bias": "gpt_neox.layers.{l}.attention.dense.bias",
    "blocks.{l}.mlp.up.weight": "gpt_neox.layers.{l}.mlp.dense_h_to_4h.weight",
    "blocks.{l}.mlp.up.bias": "gpt_neox.layers.{l}.mlp.dense_h_to_4h.bias",
    "blocks.{l}.mlp.down.weight": "gpt_neox.layers.{l}.mlp.dense_4h_to_h.weight",
    "blocks.{l}.mlp.down.bias": "gpt_neox.layers.{l}.mlp.dense_4h_to_h.bias",
}

_QKV = ("attn.q", "attn.k", "attn.v")


def _gemma_fixed(version: int) -> Callable[[dict], dict]:
    """What llama.cpp assumes of a Gemma GGUF: scaled embeddings, tanh GELU, tied output; Gemma 2/3 add
    post norms, alternating windows (every 2nd / 6th layer global) and the q.k scale of their sizes."""
    def fixed(c: dict) -> dict:
        out = dict(embed_scale=math.sqrt(c["hidden_size"]), activation="gelu_tanh")
        if version >= 2:
            # llama.cpp scales q.k by 1/sqrt(head_dim), except for the 27B models (hidden / heads).
            big = c["n_layers"] == (46 if version == 2 else 62)
            out["attn_scale"] = (c["hidden_size"] / c["n_heads"] if big else c["head_dim"]) ** -0.5
            out["post_norms"] = True
            period = 2 if version == 2 else 6
            if c.get("sliding_window"):
                out["layer_types"] = ["sliding" if i % period < period - 1 else "full" for i in range(c["n_layers"])]
        if version == 3:
            out["qk_norm"] = "head"
            out["rope_local_theta"] = 10000.0
        return out
    return fixed


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), _llama_config, _llama_names(), "llama",
           hf_skip=("model.layers.{l}.self_attn.rotary_emb.inv_freq",), gguf_rope_layout="adjacent",
           summary="Llama 1-3.x, SmolLM, TinyLlama (rope scaling: linear, dynamic, llama3, yarn)"),
    Family("mistral", ("MistralForCausalLM",), _llama_config, _llama_names(), "llama",
           hf_skip=("model.layers.{l}.self_attn.rotary_emb.inv_freq",), gguf_rope_layout="adjacent",
           summary="Mistral (sliding-window attention)"),
    Family("mixtral", ("MixtralForCausalLM",), _mixtral_config,
           _moe_names(_llama_names(), "block_sparse_moe.", "gate", "experts", "w1", "w3", "w2"), "llama",
           gguf_rope_layout="adjacent", summary="Mixtral (mixture of experts)"),
    Family("qwen2", ("Qwen2ForCausalLM",), _qwen2_config, _llama_names(), "qwen2",
           summary="Qwen2, Qwen2.5 (q/k/v biases)"),
    Family("qwen3", ("Qwen3ForCausalLM",), _qwen3_config, _llama_names(), "qwen3",
           summary="Qwen3 (per-head q/k RMSNorm)"),
    Family("qwen3moe", ("Qwen3MoeForCausalLM",), _qwen3_moe_config,
           _moe_names(_llama_names(), "mlp.", "gate", "experts", "gate_proj", "up_proj", "down_proj"), "qwen3moe",
           summary="Qwen3-MoE (mixture of experts, per-head q/k RMSNorm)"),
    Family("olmoe", ("OlmoeForCausalLM",), _olmoe_config,
           _moe_names(_llama_names(), "mlp.", "gate", "experts", "gate_proj", "up_proj", "down_proj"), "olmoe",
           summary="OLMoE (mixture of experts, q/k RMSNorm over the projection)"),
    Family("gemma", ("GemmaForCausalLM",), _gemma_config, _llama_names(), "gemma", norm_offset=1.0,
           gguf_fixed=_gemma_fixed(1), summary="Gemma (scaled embeddings, GeGLU, RMSNorm with 1 + w)"),
    Family("gemma2", ("Gemma2ForCausalLM",), _gemma2_config, _llama_names(post_norm_names=True), "gemma2",
           norm_offset=1.0, gguf_fixed=_gemma_fixed(2),
           summary="Gemma 2 (sandwich norms, softcapping, alternating sliding-window layers)"),
    Family("gemma3", ("Gemma3ForCausalLM",), lambda r: _gemma2_config(r, 3), _llama_names(post_norm_names=True),
           "gemma3", norm_offset=1.0, gguf_fixed=_gemma_fixed(3),
           summary="Gemma 3 text (q/k norms, 5 local : 1 global layers with their own rope bases)"),
    Family("phi3", ("Phi3ForCausalLM",), _phi3_config, _llama_names(), "phi3",
           hf_fused=(Fused("model.layers.{l}.self_attn.qkv_proj.weight", _QKV, _qkv_sizes),
                     Fused("model.layers.{l}.mlp.gate_up_proj.weight", ("mlp.gate", "mlp.up"), _gate_up_sizes)),
           gguf_fused_gate_up=True, gguf_fused_qkv=True,
           summary="Phi-3, Phi-3.5, Phi-4-mini (fused projections, partial rotary, longrope)"),
    Family("gptneox", ("GPTNeoXForCausalLM",), _neox_config, _NEOX_NAMES, "gptneox",
           hf_fused=(Fused("gpt_neox.layers.{l}.attention.query_key_value.weight", _QKV, _qkv_sizes, "heads"),
                     Fused("gpt_neox.layers.{l}.attention.query_key_value.bias", _QKV, _qkv_sizes, "heads")),
           hf_skip=("gpt_neox.layers.{l}.attention.rotary_emb.inv_freq", "gpt_neox.layers.{l}.attention.bias",
                    "gpt_neox.layers.{l}.attention.masked_bias"),
           gguf_fixed=lambda c: {"activation": "gelu_erf", "gated_mlp": False}, gguf_fused_qkv=True,
           summary="GPT-NeoX, Pythia (parallel residual, partial rotary, LayerNorm)"),
    Family("olmo2", ("Olmo2ForCausalLM",), _olmo2_config, _llama_names(post_norms_only=True), "olmo2",
           summary="OLMo 2 (norms after attention and MLP, q/k RMSNorm over the projection)"),
    Family("gpt2", ("GPT2LMHeadModel",), _gpt2_config, _GPT2_NAMES, "gpt2",
           hf_fused=(Fused("transformer.h.{l}.attn.c_attn.weight", _QKV, _qkv_sizes, "conv1d"),
                     Fused("transformer.h.{l}.attn.c_attn.bias", _QKV, _qkv_sizes)),
           hf_skip=("transformer.h.{l}.attn.bias", "transformer.h.{l}.attn.masked_bias"),
           gguf_fixed=lambda c: {"activation": "gelu_tanh", "norm": "layer", "position": "learned",
                                 "gated_mlp": False}, gguf_fused_qkv=True,
           summary="GPT-2 (learned positions, LayerNorm, biases)"),
)

BY_NAME = {f.name: f for f in FAMILIES}
BY_HF_ARCH = {a: f for f in FAMILIES for a in f.hf_architectures}
# GGUF architectures: several families share "llama" (Mistral and Mixtral are written as llama).
BY_GGUF_ARCH = {}
for _f in FAMILIES:
    BY_GGUF_ARCH.setdefault(_f.gguf_arch, _f)

# ---------------------------------------------------------------------------
# GGUF tensor names (the same for every architecture llama.cpp's converter writes)
# ---------------------------------------------------------------------------

GGUF_TOP = {"embed": "token_embd", "pos_embed": "position_embd", "final_norm": "output_norm",
            "unembed": "output"}
GGUF_BLOCK = {
    "attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn_post_norm": "post_attention_norm",
    "mlp_post_norm": "post_ffw_norm", "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v",
    "attn.o": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate",
    "mlp.up": "ffn_up", "mlp.down": "ffn_down", "mlp.router": "ffn_gate_inp",
}
# Stacked expert matrices [n_experts, rows, cols]: one per projection.
GGUF_EXPERTS = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
GGUF_QKV = "attn_qkv"
# Rotary tables stored as tensors: Llama 3's per-frequency divisors, LongRoPE's two factor lists.
GGUF_ROPE = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def gguf_name(neutral: str) -> str:
    """The GGUF name of a neutral tensor name (experts name their stacked tensor)."""
    parts = neutral.split(".")
    if parts[0] != "blocks":
        return f"{GGUF_TOP[parts[0]]}.{parts[-1]}"
    layer, rest, suffix = parts[1], ".".join(parts[2:-1]), parts[-1]
    if rest.startswith("mlp.experts."):
        return f"blk.{layer}.{GGUF_EXPERTS[parts[-2]]}.{suffix}"
    return f"blk.{layer}.{GGUF_BLOCK[rest]}.{suffix}"

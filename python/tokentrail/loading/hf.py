"""Hugging Face model directories: config.json + safetensors + tokenizer.json.

Families are described by data: a table of how each architecture's config
keys and tensor names map onto ModelConfig and the neutral weight names.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from . import Checkpoint
from .safetensors import read_safetensors
from .weights import Weight

LLAMA_LIKE = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
GPT2_LIKE = {"GPT2LMHeadModel"}

# Neutral name -> Hugging Face name, per family ("{l}" is the layer index).
LLAMA_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "unembed.weight": "lm_head.weight",
    "blocks.{l}.attn_norm.weight": "model.layers.{l}.input_layernorm.weight",
    "blocks.{l}.mlp_norm.weight": "model.layers.{l}.post_attention_layernorm.weight",
    **{f"blocks.{{l}}.attn.{p}.{kind}": f"model.layers.{{l}}.self_attn.{p}_proj.{kind}"
       for p in "qkvo" for kind in ("weight", "bias")},
    **{f"blocks.{{l}}.mlp.{p}.{kind}": f"model.layers.{{l}}.mlp.{p}_proj.{kind}"
       for p in ("gate", "up", "down") for kind in ("weight", "bias")},
}
GPT2_NAMES = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "final_norm.weight": "transformer.ln_f.weight",
    "final_norm.bias": "transformer.ln_f.bias",
    "blocks.{l}.attn_norm.weight": "transformer.h.{l}.ln_1.weight",
    "blocks.{l}.attn_norm.bias": "transformer.h.{l}.ln_1.bias",
    "blocks.{l}.mlp_norm.weight": "transformer.h.{l}.ln_2.weight",
    "blocks.{l}.mlp_norm.bias": "transformer.h.{l}.ln_2.bias",
    # GPT-2 stores its projections as [in, out] (Conv1D); they are transposed on load.
    "blocks.{l}.attn.qkv.weight": "transformer.h.{l}.attn.c_attn.weight",
    "blocks.{l}.attn.qkv.bias": "transformer.h.{l}.attn.c_attn.bias",
    "blocks.{l}.attn.o.weight": "transformer.h.{l}.attn.c_proj.weight",
    "blocks.{l}.attn.o.bias": "transformer.h.{l}.attn.c_proj.bias",
    "blocks.{l}.mlp.up.weight": "transformer.h.{l}.mlp.c_fc.weight",
    "blocks.{l}.mlp.up.bias": "transformer.h.{l}.mlp.c_fc.bias",
    "blocks.{l}.mlp.down.weight": "transformer.h.{l}.mlp.c_proj.weight",
    "blocks.{l}.mlp.down.bias": "transformer.h.{l}.mlp.c_proj.bias",
}

GELU_NAMES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
              "gelu": "gelu_erf", "silu": "silu", "swish": "silu", "relu": "relu"}


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read JSON: {e}", path=path) from None
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", path=path)
    return data


def config_from_hf(raw: dict, path: Path) -> tuple[ModelConfig, dict[str, str]]:
    archs = raw.get("architectures") or [raw.get("model_type", "?")]
    arch = archs[0]

    def get(key, *alts, default=None):
        for k in (key, *alts):
            if k in raw and raw[k] is not None:
                return raw[k]
        if default is None:
            raise CheckpointError(f"config.json lacks {key!r}", path=path)
        return default

    try:
        if arch in LLAMA_LIKE or raw.get("model_type") in ("llama", "mistral", "qwen2"):
            heads = int(get("num_attention_heads"))
            dim = int(get("hidden_size"))
            if raw.get("rope_scaling") not in (None, {}) and (raw["rope_scaling"] or {}).get("rope_type", "default") != "default":
                raise CheckpointError(f"rope_scaling {raw['rope_scaling']} is not supported yet", path=path)
            rope_theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta") or 10000.0
            cfg = ModelConfig(
                vocab_size=int(get("vocab_size")), hidden_size=dim, n_layers=int(get("num_hidden_layers")),
                n_heads=heads, n_kv_heads=int(get("num_key_value_heads", default=heads)),
                head_dim=int(get("head_dim", default=dim // heads)), ffn_size=int(get("intermediate_size")),
                max_seq_len=int(get("max_position_embeddings")), norm="rms",
                norm_eps=float(get("rms_norm_eps", default=1e-6)),
                activation=GELU_NAMES.get(get("hidden_act", default="silu"), "?"), gated_mlp=True,
                position="rope", rope_theta=float(rope_theta), rope_layout="half",
                tied_embeddings=bool(raw.get("tie_word_embeddings", False)), architecture=arch)
            names = LLAMA_NAMES
        elif arch in GPT2_LIKE or raw.get("model_type") == "gpt2":
            dim = int(get("n_embd"))
            heads = int(get("n_head"))
            cfg = ModelConfig(
                vocab_size=int(get("vocab_size")), hidden_size=dim, n_layers=int(get("n_layer")), n_heads=heads,
                n_kv_heads=heads, head_dim=dim // heads, ffn_size=int(get("n_inner", default=4 * dim)),
                max_seq_len=int(get("n_positions")), norm="layer",
                norm_eps=float(get("layer_norm_epsilon", default=1e-5)),
                activation=GELU_NAMES.get(get("activation_function", default="gelu_new"), "?"), gated_mlp=False,
                position="learned", tied_embeddings=True, architecture=arch)
            names = GPT2_NAMES
        else:
            raise CheckpointError(f"unsupported architecture {arch!r} (supported: "
                                  f"{sorted(LLAMA_LIKE | GPT2_LIKE)})", path=path)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"invalid config: {e}", path=path) from None
    bos = raw.get("bos_token_id")
    eos = raw.get("eos_token_id")
    cfg.bos_token_id = bos if isinstance(bos, int) else None
    cfg.eos_token_ids = list(eos) if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
    return cfg, names


def _read_tensors(directory: Path) -> tuple[dict[str, Weight], dict[str, Path]]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError("index has no weight_map", path=index)
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError("no model.safetensors or model.safetensors.index.json", path=directory)
    tensors, where = {}, {}
    for f in files:
        fp = directory / f
        if not fp.exists():
            raise CheckpointError("shard listed in the index is missing", path=fp)
        for name, w in read_safetensors(fp).items():
            tensors[name] = w
            where[name] = fp
    return tensors, where


def _transposed(w: Weight) -> Weight:
    """GPT-2's Conv1D [in, out] as [out, in], in the weight's own dtype (one copy, at load)."""
    return Weight(np.ascontiguousarray(np.asarray(w.data).T), w.dtype, tuple(reversed(w.shape)))


def read_hf(directory, dtype: str | None = None) -> Checkpoint:
    directory = Path(directory)
    cfg_path = directory / "config.json"
    raw = _load_json(cfg_path)
    cfg, names = config_from_hf(raw, cfg_path)
    gen_path = directory / "generation_config.json"
    if gen_path.exists():
        gen = _load_json(gen_path)
        eos = gen.get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = list(eos) if isinstance(eos, list) else [eos]
        if isinstance(gen.get("bos_token_id"), int):
            cfg.bos_token_id = gen["bos_token_id"]

    tensors, where = _read_tensors(directory)
    # Some exports drop the "transformer." / "model." prefix; accept both spellings.
    def find(hf_name: str):
        if hf_name in tensors:
            return hf_name
        short = hf_name.split(".", 1)[1]
        return short if short in tensors else None

    weights: dict[str, Weight] = {}
    for neutral, hf in names.items():
        layers = range(cfg.n_layers) if "{l}" in neutral else [None]
        for layer in layers:
            n_name = neutral.format(l=layer)
            h_name = find(hf.format(l=layer))
            if h_name is not None:
                weights[n_name] = tensors[h_name]
                weights[n_name].source = (where[h_name], h_name)
    if "unembed.weight" in weights:
        cfg.tied_embeddings = False
    elif not cfg.tied_embeddings:
        raise CheckpointError("missing tensor lm_head.weight (and tie_word_embeddings is false)",
                              path=directory, tensor="lm_head.weight")

    if "blocks.0.attn.qkv.weight" in weights:  # GPT-2: split the fused projection into row views
        for layer in range(cfg.n_layers):
            p = f"blocks.{layer}."
            for kind in ("weight", "bias"):
                fused = weights.pop(p + "attn.qkv." + kind, None)
                if fused is None:
                    continue
                if kind == "weight":
                    fused = _transposed(fused)
                if fused.shape[0] != 3 * cfg.hidden_size:
                    raise CheckpointError(f"fused qkv has shape {fused.shape}", path=where.get(names[
                        "blocks.{l}.attn.qkv." + kind].format(l=layer)), tensor=p + "attn.qkv." + kind)
                d = cfg.hidden_size
                for i, part in enumerate("qkv"):
                    shape = (d,) + fused.shape[1:]
                    weights[p + f"attn.{part}.{kind}"] = Weight(fused.data[i * d:(i + 1) * d], fused.dtype, shape)
            for proj in ("attn.o", "mlp.up", "mlp.down"):
                if p + proj + ".weight" in weights:
                    weights[p + proj + ".weight"] = _transposed(weights[p + proj + ".weight"])

    tok_path = directory / "tokenizer.json"
    tokenizer = None
    if tok_path.exists():
        tokenizer = Tokenizer.from_file(tok_path, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids)
        from ..chat import template_from_hf_directory

        tokenizer.chat_template = template_from_hf_directory(directory, tokenizer)
    ckpt = Checkpoint(cfg, weights, tokenizer, source=str(directory))
    file_names = {n.format(l=layer): h.format(l=layer) for n, h in names.items() for layer in range(cfg.n_layers)}
    check_weights(ckpt, file_names)
    return ckpt


def check_weights(ckpt: Checkpoint, file_names: dict[str, str] | None = None) -> None:
    """Every required tensor present, every present tensor of the expected shape.

    `file_names` maps neutral names to the names the file uses, for messages.
    """
    from ..config import expected_shapes, is_optional

    file_names = file_names or {}
    expected = expected_shapes(ckpt.config)
    for name, shape in expected.items():
        w = ckpt.weights.get(name)
        if w is None:
            if not is_optional(name):
                raise CheckpointError(f"missing tensor (tokentrail name {name!r})", path=ckpt.source,
                                      tensor=file_names.get(name, name))
            continue
        if tuple(w.shape) != shape:
            src = getattr(w, "source", None)
            raise CheckpointError(f"tensor has shape {list(w.shape)}, expected {list(shape)}",
                                  path=src[0] if src else ckpt.source, tensor=src[1] if src else name)

"""Tiny random models of each family, built and saved by Hugging Face transformers itself.

The parity suite loads these directories with tokentrail and compares against
transformers running the very same weights, so no logits are stored by hand.
"""
from __future__ import annotations

from pathlib import Path

# One tiny configuration per family and per feature that changes the computation; odd sizes
# (head_dim apart from hidden/heads, grouped KV heads, windows shorter than the test prompt).
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "smollm", "llama_headdim", "llama3_rope", "llama_linear_rope",
            "llama_yarn_rope", "llama_dynamic_rope", "mistral_window", "qwen3", "gemma", "gemma2", "gemma2_qpas", "gemma3", "phi3",
            "phi3_longrope", "neox", "neox_sequential", "olmo2", "mixtral", "qwen3moe", "olmoe")


def make_config(family: str):
    import transformers as tf

    common = dict(vocab_size=251, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, **common)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, **common)
    if family == "llama":
        return tf.LlamaConfig(rope_theta=10000.0, **llama_like)
    if family == "mistral":
        return tf.MistralConfig(rope_theta=1e6, sliding_window=None, **llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(rope_theta=1e6, **llama_like, tie_word_embeddings=False)
    if family == "smollm":  # tied embeddings, as SmolLM ships
        return tf.LlamaConfig(rope_theta=10000.0, tie_word_embeddings=True, **llama_like)
    if family == "llama_headdim":  # head_dim given apart from hidden_size / heads
        return tf.LlamaConfig(rope_theta=500000.0, head_dim=24, **llama_like)
    rope = lambda kind, **kw: dict(rope_type=kind, rope_theta=10000.0, **kw)  # noqa: E731
    if family == "llama3_rope":
        return tf.LlamaConfig(rope_parameters=rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=16), **llama_like)
    if family == "llama_linear_rope":
        return tf.LlamaConfig(rope_parameters=rope("linear", factor=4.0), **llama_like)
    if family == "llama_yarn_rope":
        return tf.LlamaConfig(rope_parameters=rope("yarn", factor=4.0, original_max_position_embeddings=16),
                              **llama_like)
    if family == "llama_dynamic_rope":
        return tf.LlamaConfig(rope_parameters=rope("dynamic", factor=2.0), **llama_like)
    if family == "mistral_window":  # a window shorter than the test prompt
        return tf.MistralConfig(rope_theta=1e6, sliding_window=5, **llama_like)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=24, **llama_like, tie_word_embeddings=False)
    gemma_like = dict(llama_like, head_dim=24, hidden_activation="gelu_pytorch_tanh", bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    if family == "gemma":
        return tf.GemmaConfig(**{k: v for k, v in gemma_like.items() if k != "hidden_activation"},
                              hidden_act="gelu_pytorch_tanh")
    if family in ("gemma2", "gemma2_qpas"):  # the released models scale q.k by 1/sqrt(head_dim); try another too
        return tf.Gemma2Config(**{**gemma_like, "num_hidden_layers": 3},
                               query_pre_attn_scalar=24 if family == "gemma2" else 20,
                               sliding_window=5, attn_logit_softcapping=3.0, final_logit_softcapping=2.5)
    if family == "gemma3":
        # Six layers: the released pattern of five sliding-window layers, then one global layer.
        return tf.Gemma3TextConfig(**{**gemma_like, "num_hidden_layers": 6}, query_pre_attn_scalar=24,
                                   sliding_window=5, rope_parameters={
                                       "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                                       "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})
    if family == "phi3":
        return tf.Phi3Config(**{**llama_like, "pad_token_id": 0}, partial_rotary_factor=0.75)
    if family == "phi3_longrope":
        half = 16 // 2
        return tf.Phi3Config(**{**llama_like, "pad_token_id": 0}, original_max_position_embeddings=8,
                             rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                  short_factor=[1.0 + 0.1 * i for i in range(half)],
                                                  long_factor=[1.5 + 0.5 * i for i in range(half)],
                                                  original_max_position_embeddings=8))
    neox = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0, **common)
    if family == "neox":
        return tf.GPTNeoXConfig(**neox)
    if family == "neox_sequential":
        return tf.GPTNeoXConfig(**neox, use_parallel_residual=False)
    if family == "olmo2":
        return tf.Olmo2Config(**{**llama_like, "pad_token_id": 0})
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=5, num_experts_per_tok=2, rope_theta=1e6, **llama_like)
    if family == "qwen3moe":
        return tf.Qwen3MoeConfig(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=40,
                                 norm_topk_prob=True, head_dim=24, **llama_like)
    if family == "olmoe":
        # OLMoE has as many key/value heads as query heads (llama.cpp's graph assumes it).
        return tf.OlmoeConfig(num_experts=5, num_experts_per_tok=3,
                              **{**llama_like, "pad_token_id": 0, "num_key_value_heads": 4})
    raise ValueError(family)


def build(family: str, directory: Path, dtype: str = "float32", seed: int = 0):
    """Save a random model of `family` into `directory`; return the transformers model (float32, eval)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = make_config(family)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero; give them values so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save = model.to(getattr(torch, dtype))
    save.save_pretrained(directory, safe_serialization=True)
    return tf.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()


def build_family(request, tmp_path_factory):
    """For a fixture parametrized by family: (family, directory, tokentrail model, transformers model)."""
    import tokentrail
    from conftest import require

    require("torch")
    require("transformers")
    d = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, d)
    return request.param, d, tokentrail.load(d), ref


def reference_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


# Families whose rotary table depends on how far a forward call reaches (LongRoPE switches to its
# long factors once a call passes original_max_position_embeddings): feeding a prompt in pieces
# legitimately differs from feeding it whole, so they are compared piece by piece.
CALL_DEPENDENT = ("phi3_longrope",)


def reference_logits_in_pieces(model, pieces):
    """transformers fed `pieces` (lists of ids) one call each through its KV cache; logits of all positions."""
    import numpy as np
    import torch

    past, out = None, []
    with torch.no_grad():
        for ids in pieces:
            r = model(torch.tensor([list(ids)]), **({} if past is None else {"cache": past}), use_cache=True)
            past = getattr(r, "cache", None) or r.past_key_values
            out.append(r.logits[0].float().numpy())
    return np.concatenate(out)

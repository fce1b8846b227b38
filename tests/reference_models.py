"""Tiny random models of each family, built and saved by Hugging Face transformers itself.

The parity suite loads these directories with tokentrail and compares against
transformers running the very same weights, so no logits are stored by hand.
"""
from __future__ import annotations

from pathlib import Path

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "smollm", "llama_headdim")


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


def reference_logits(model, ids) -> "np.ndarray":
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()

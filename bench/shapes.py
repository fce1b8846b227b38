"""Random-weight models in the shapes of real ones (the shapes decide the speed)."""
from __future__ import annotations

from pathlib import Path

SHAPES = {
    "gpt2": dict(family="gpt2"),  # 124M: 12 layers, width 768, 12 heads, vocabulary 50257
    "smollm": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                   tie_word_embeddings=True),
    "tinyllama": dict(family="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=2048),
}


def make_model(shape: str, directory: Path, seed: int = 0):
    """Save a transformers model of `shape` with random weights into `directory`; return it."""
    import torch
    import transformers as tf

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    torch.manual_seed(seed)
    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    cfg = tf.GPT2Config(**spec) if family == "gpt2" else tf.LlamaConfig(**spec)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(directory)
    return model

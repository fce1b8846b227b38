"""Random-weight models in the shapes of real ones (the shapes decide the speed)."""
from __future__ import annotations

from pathlib import Path

SHAPES = {
    "gpt2": dict(family="gpt2"),  # 124M: 12 layers, width 768, 12 heads, vocabulary 50257
    "smollm": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                   tie_word_embeddings=True),
    # Qwen2.5-0.5B: 24 layers, width 896, 14 heads (2 KV), vocabulary 151936 (q/k/v biases)
    "qwen2.5-0.5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=2048, rope_theta=1000000.0, tie_word_embeddings=True),
    "tinyllama": dict(family="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=2048),
}


def synthetic_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer with exactly `vocab_size` tokens, made of random merges.

    Random-weight models have no tokenizer, but GGUF readers (llama.cpp) insist
    on one; this gives every shape a valid one of the right size.
    """
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(seed)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(alphabet)}
    pieces, merges = list(alphabet), []
    target = vocab_size - 1  # one special token at the end
    while len(vocab) < target:
        a, b = rng.choice(pieces[: max(256, len(pieces) // 4)]), rng.choice(alphabet)
        if a + b not in vocab and len(a + b) <= 8:
            vocab[a + b] = len(vocab)
            pieces.append(a + b)
            merges.append((a, b))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def make_model(shape: str, directory: Path, seed: int = 0):
    """Save a transformers model of `shape` with random weights into `directory`; return it."""
    import torch
    import transformers as tf

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    torch.manual_seed(seed)
    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    config_class = {"gpt2": tf.GPT2Config, "llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family]
    cfg = config_class(**spec)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(directory)
    synthetic_tokenizer(cfg.vocab_size, seed).save(str(Path(directory) / "tokenizer.json"))
    return model

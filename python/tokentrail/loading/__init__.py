"""Checkpoint readers. Each turns one file format into a `Checkpoint`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from .weights import Weight


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, Weight]
    tokenizer: Tokenizer | None
    source: str = ""


def read_checkpoint(path) -> Checkpoint:
    """Pick the reader from what `path` is: HF directory, .gguf file, or llama2.c .bin."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError("no such checkpoint", path=p)
    if p.is_dir():
        if (p / "config.json").exists():
            from .hf import read_hf

            return read_hf(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            p = ggufs[0]
        else:
            raise CheckpointError("directory has no config.json (Hugging Face) nor a single .gguf file", path=p)
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        from .gguf import read_gguf

        return read_gguf(p)
    if p.suffix == ".bin":
        from .llama2c import read_llama2c

        return read_llama2c(p)
    raise CheckpointError("unrecognised checkpoint format (expected a Hugging Face directory, "
                          "a .gguf file or a llama2.c .bin)", path=p)

"""Checkpoint readers. Each turns one file format into a `Checkpoint`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from .fields import open_regular
from .weights import Weight, has_non_finite


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, Weight]
    tokenizer: Tokenizer | None
    source: str = ""


def read_checkpoint(path, check_finite: bool = True) -> Checkpoint:
    """Pick the reader from what `path` is: HF directory, .gguf file, or llama2.c .bin.

    `check_finite` refuses a checkpoint with a NaN or infinite weight, naming the tensor.
    """
    ckpt = _read(Path(path))
    if ckpt.tokenizer is not None:  # a malformed tokenizer fails here, not at the first encode
        if ckpt.tokenizer.source is None:
            ckpt.tokenizer.source = ckpt.source
        ckpt.tokenizer.probe()
    if check_finite:
        refuse_non_finite(ckpt)
    return ckpt


def refuse_non_finite(ckpt: Checkpoint) -> None:
    """A CheckpointError naming the first tensor that holds a NaN or an infinity."""
    for name, w in ckpt.weights.items():
        if has_non_finite(w):
            src = w.source or (ckpt.source, name)
            raise CheckpointError("tensor holds NaN or infinite values (pass check_finite=False to load "
                                  "it anyway)", path=src[0], tensor=src[1])


def _read(p: Path) -> Checkpoint:
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
    with open_regular(p, "checkpoint") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        from .gguf import read_gguf

        return read_gguf(p)
    if p.suffix == ".bin":
        from .llama2c import read_llama2c

        return read_llama2c(p)
    raise CheckpointError("unrecognised checkpoint format (expected a Hugging Face directory, "
                          "a .gguf file or a llama2.c .bin)", path=p)

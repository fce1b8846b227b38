"""Memory-mapped safetensors reading: the header is JSON, the data raw little-endian."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .weights import Weight

_DTYPES = {"F32": ("f32", np.float32), "F16": ("f16", np.float16), "BF16": ("bf16", np.uint16)}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_safetensors(path) -> dict[str, Weight]:
    """All tensors of one file as Weights viewing a single read-only memory map."""
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError("truncated safetensors file: no header length", path=path)
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"safetensors header length {n} runs past the end of the file", path=path)
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"safetensors header is not valid JSON: {e}", path=path) from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path=path)
    data_start = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    out: dict[str, Weight] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            st_dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("malformed tensor entry in safetensors header", path=path, tensor=name) from None
        if st_dtype not in _DTYPES:
            raise CheckpointError(f"unsupported tensor dtype {st_dtype}", path=path, tensor=name)
        ours, np_dtype = _DTYPES[st_dtype]
        count = int(np.prod(shape)) if shape else 1
        if not (0 <= begin <= end <= size - data_start) or end - begin != count * _ITEMSIZE[st_dtype]:
            raise CheckpointError(f"data offsets [{begin}, {end}) do not fit shape {shape} of {st_dtype} "
                                  f"inside the file", path=path, tensor=name)
        arr = mm[data_start + begin:data_start + end].view(np_dtype).reshape(shape)
        out[name] = Weight(arr, ours, tuple(shape))
    return out

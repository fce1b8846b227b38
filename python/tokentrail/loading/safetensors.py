"""Memory-mapped safetensors reading: the header is JSON, the data raw little-endian.

Every header value is checked before it is used: dtypes are known names, shapes
lists of non-negative integers whose byte size cannot overflow, offsets integers
that fit inside the file and agree with the shape. A tensor whose data is not
aligned to its element size (a header length that is not a multiple of 4) is
copied to aligned memory, since the kernels read elements through typed pointers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .fields import MAX_INT, is_count, open_regular, read_json
from .weights import Weight, aligned

_DTYPES = {"F32": ("f32", np.float32), "F16": ("f16", np.float16), "BF16": ("bf16", np.uint16)}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# The format caps its JSON header at 100 MB.
MAX_HEADER = 100 * 2**20
MAX_DIMS = 8


def read_safetensors(path) -> dict[str, Weight]:
    """All tensors of one file as Weights viewing a single read-only memory map."""
    path = Path(path)
    with open_regular(path, "safetensors file") as fh:
        size = fh.seek(0, 2)
        fh.seek(0)
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError("truncated safetensors file: no header length", path=path)
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > MAX_HEADER:
            raise CheckpointError(f"safetensors header length {n} runs past the end of the file "
                                  f"or beyond the format's 100 MB", path=path)
        raw = fh.read(n)
    header = read_json(path, "safetensors header", data=raw)
    data_start = 8 + n
    data_size = size - data_start
    mm = np.memmap(path, dtype=np.uint8, mode="r") if data_size > 0 else np.zeros(0, np.uint8)
    out: dict[str, Weight] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        st_dtype, shape, begin, end = _entry(path, name, info, data_size)
        ours, np_dtype = _DTYPES[st_dtype]
        arr = mm[data_start + begin:data_start + end].view(np_dtype).reshape(shape)
        out[name] = Weight(aligned(arr), ours, tuple(shape))
    return out


def _entry(path: Path, name: str, info, data_size: int) -> tuple[str, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, each checked."""
    def bad(message: str) -> CheckpointError:
        return CheckpointError(message, path=path, tensor=name)

    if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
        raise bad("tensor entry must be an object of dtype, shape and data_offsets")
    st_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(st_dtype, str):
        raise bad("dtype must be a string")
    if st_dtype not in _DTYPES:
        raise bad(f"unsupported tensor dtype {st_dtype[:20]!r} (tokentrail reads {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(is_count(d, 0, MAX_INT) for d in shape):
        raise bad(f"shape must be a list of at most {MAX_DIMS} integers within 0..{MAX_INT}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(is_count(o, 0, data_size) for o in offsets) or offsets[0] > offsets[1]):
        raise bad(f"data_offsets must be two integers begin <= end inside the file ({data_size} data bytes)")
    count = 1
    for d in shape:  # Python integers: the product cannot wrap
        count *= d
    begin, end = offsets
    if end - begin != count * _ITEMSIZE[st_dtype]:
        raise bad(f"data offsets [{begin}, {end}) do not hold shape {shape} of {st_dtype}")
    return st_dtype, shape, begin, end

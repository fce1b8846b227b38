"""llama2.c's legacy checkpoint (`.bin`, "version 0") and its `tokenizer.bin`.

The checkpoint is a header of seven little-endian int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) followed
by float32 arrays in a fixed order; a negative vocab_size means the classifier
is stored separately at the end, a positive one that it is tied to the
embedding. The weights are memory-mapped, never copied.

The tokenizer file holds SentencePiece BPE pieces with their scores. It becomes
a `tokenizers` BPE model whose merges are ranked by the score of the merged
piece, which is the order in which SentencePiece merges, so that both encode a
text to the same ids.
"""
from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers

from ..config import ModelConfig
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from . import Checkpoint
from .fields import open_regular
from .weights import Weight

HEADER = struct.Struct("<7i")
# llama2.c's newer exports begin with this magic ("ak42") instead of a header.
EXPORT_MAGIC = 0x616B3432
SPACE = "\u2581"  # SentencePiece's visible space, "▁"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Token kinds, named as SentencePiece names them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (
    "normal", "unknown", "control", "user_defined", "unused", "byte")


# --------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------

def read_llama2c(path, tokenizer_path=None) -> Checkpoint:
    """Read a llama2.c version-0 checkpoint and the tokenizer beside it.

    `tokenizer_path` overrides the search for `tok{vocab_size}.bin` and then
    `tokenizer.bin` in the checkpoint's folder; without either the checkpoint
    has no tokenizer.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open_regular(path, "checkpoint") as fh:
            head = fh.read(HEADER.size)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint: {e.strerror}", path=path) from None
    if size < HEADER.size or len(head) < HEADER.size:
        raise CheckpointError(f"file is {size} bytes, shorter than the {HEADER.size}-byte header",
                              path=path, tensor="header")
    if struct.unpack_from("<I", head)[0] == EXPORT_MAGIC:
        raise CheckpointError("this is a newer llama2.c export (magic 'ak42'); only the legacy "
                              "version-0 format is supported", path=path, tensor="header")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab_signed, seq_len = HEADER.unpack(head)
    vocab = abs(vocab_signed)
    tied = vocab_signed > 0

    def bad_header(msg: str) -> CheckpointError:
        return CheckpointError(f"implausible header ({msg}); dim={dim} hidden_dim={hidden} "
                               f"n_layers={n_layers} n_heads={n_heads} n_kv_heads={n_kv_heads} "
                               f"vocab_size={vocab_signed} seq_len={seq_len}", path=path, tensor="header")

    for name, v in (("dim", dim), ("hidden_dim", hidden), ("n_layers", n_layers), ("n_heads", n_heads),
                    ("n_kv_heads", n_kv_heads), ("vocab_size", vocab), ("seq_len", seq_len)):
        if v <= 0:
            raise bad_header(f"{name} must be positive")
    if dim % n_heads:
        raise bad_header("dim is not a multiple of n_heads")
    if n_heads % n_kv_heads:
        raise bad_header("n_heads is not a multiple of n_kv_heads")
    head_size = dim // n_heads
    if head_size % 2:
        raise bad_header("rotary embedding needs an even head size")
    kv_dim = head_size * n_kv_heads

    # The file's arrays in order: (section, per-layer shape or None, shape).
    L = n_layers
    layout = [
        ("token_embedding", None, (vocab, dim)),
        ("rms_att", "attn_norm.weight", (dim,)),
        ("wq", "attn.q.weight", (dim, dim)),
        ("wk", "attn.k.weight", (kv_dim, dim)),
        ("wv", "attn.v.weight", (kv_dim, dim)),
        ("wo", "attn.o.weight", (dim, dim)),
        ("rms_ffn", "mlp_norm.weight", (dim,)),
        ("w1", "mlp.gate.weight", (hidden, dim)),
        ("w2", "mlp.down.weight", (dim, hidden)),
        ("w3", "mlp.up.weight", (hidden, dim)),
        ("rms_final", None, (dim,)),
        # Precomputed rotary tables the format still carries; the engine derives its own.
        ("freq_cis_real", None, (seq_len, head_size // 2)),
        ("freq_cis_imag", None, (seq_len, head_size // 2)),
    ]
    if not tied:
        layout.append(("wcls", None, (vocab, dim)))
    neutral_single = {"token_embedding": "embed.weight", "rms_final": "final_norm.weight",
                      "wcls": "unembed.weight"}

    # Walk the sections in float32 units, checking each against the file length
    # before any view is made, so a short file names the first missing tensor.
    n_floats_in_file = (size - HEADER.size) // 4
    spans = {}
    pos = 0
    for section, per_layer, shape in layout:
        count = int(np.prod(shape, dtype=object))
        layers = L if per_layer else 1
        end = pos + count * layers
        if end > n_floats_in_file:
            if per_layer:
                first_missing = (n_floats_in_file - pos) // count if count else 0
                what = f"blocks.{min(first_missing, L - 1)}.{per_layer} ({section})"
            else:
                what = f"{neutral_single.get(section, section)} ({section})"
            raise CheckpointError(
                f"file is truncated or its header sizes are wrong: {section} needs bytes "
                f"{HEADER.size + 4 * pos}..{HEADER.size + 4 * end} but the file has {size}",
                path=path, tensor=what)
        spans[section] = (pos, end, shape, per_layer)
        pos = end
    expected = HEADER.size + 4 * pos
    if size != expected:
        hint = ""
        if tied and size - expected == 4 * vocab * dim:
            hint = " (exactly one more [vocab, dim] matrix: is vocab_size's sign wrong?)"
        raise CheckpointError(f"file has {size} bytes but its header implies {expected}{hint}",
                              path=path, tensor="header")

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    floats = mm[HEADER.size:expected].view(np.float32)
    weights: dict[str, Weight] = {}
    for section, (start, end, shape, per_layer) in spans.items():
        if section.startswith("freq_cis"):
            continue
        block = floats[start:end]
        if per_layer:
            stacked = block.reshape((L,) + shape)
            for layer in range(L):
                weights[f"blocks.{layer}.{per_layer}"] = Weight(stacked[layer], "f32", shape)
        else:
            weights[neutral_single[section]] = Weight(block.reshape(shape), "f32", shape)

    config = ModelConfig(
        vocab_size=vocab, hidden_size=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=head_size, ffn_size=hidden, max_seq_len=seq_len,
        norm="rms", norm_eps=1e-5, activation="silu", gated_mlp=True, position="rope",
        rope_theta=10000.0, rope_layout="adjacent", tied_embeddings=tied,
        bos_token_id=1, eos_token_ids=[2], architecture="llama2.c")

    if tokenizer_path is None:
        for candidate in (path.parent / f"tok{vocab}.bin", path.parent / "tokenizer.bin"):
            if candidate.is_file():
                tokenizer_path = candidate
                break
    tokenizer = read_llama2c_tokenizer(tokenizer_path, vocab) if tokenizer_path is not None else None
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=str(path))


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def read_llama2c_tokenizer(path, vocab_size: int, remove_extra_whitespaces: bool | None = None,
                           add_dummy_prefix: bool | None = None) -> Tokenizer:
    """Read llama2.c's `tokenizer.bin` with `vocab_size` entries.

    The file does not record SentencePiece's normalizer flags. They are taken
    from the SentencePiece `.model` of the same name beside it when there is
    one, else from the arguments, else SentencePiece's defaults (both on).
    """
    path = Path(path)
    with open_regular(path, "tokenizer") as fh:
        data = fh.read()
    if len(data) < 4:
        raise CheckpointError("tokenizer file is shorter than its 4-byte header", path=path)
    pos = 4  # int32 max_token_length: a buffer size for C readers, not needed here
    pieces: list[str] = []
    scores: list[float] = []
    for i in range(vocab_size):
        if pos + 8 > len(data):
            raise CheckpointError(f"tokenizer file ends at token {i} of {vocab_size}", path=path,
                                  tensor=f"token {i}")
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if not math.isfinite(score):
            raise CheckpointError(f"token {i} has a score of {score}; merges are ranked by finite scores",
                                  path=path, tensor=f"token {i}")
        if n < 0 or pos + n > len(data):
            raise CheckpointError(f"token {i} claims {n} bytes but {len(data) - pos} remain",
                                  path=path, tensor=f"token {i}")
        try:
            text = data[pos:pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"token {i} is not valid UTF-8", path=path, tensor=f"token {i}") from None
        pos += n
        pieces.append(text)
        scores.append(score)
    if pos != len(data):
        raise CheckpointError(f"tokenizer file has {len(data) - pos} bytes after {vocab_size} tokens: "
                              f"it was made for a different vocabulary size", path=path)

    # llama2.c's exporter wrote BOS/EOS as "\n<s>\n" / "\n</s>\n" and the word
    # marker as a plain space; undo both to get SentencePiece's own pieces.
    kinds = []
    for i, text in enumerate(pieces):
        if i == 0:
            kinds.append(UNKNOWN)
        elif i in (1, 2):
            kinds.append(CONTROL)
            pieces[i] = text.strip("\n")
        elif BYTE_PIECE.fullmatch(text):
            kinds.append(BYTE)
        else:
            kinds.append(NORMAL)
            pieces[i] = text.replace(" ", SPACE)

    flags = read_sentencepiece_flags(path.with_suffix(".model"))
    if remove_extra_whitespaces is None:
        remove_extra_whitespaces = flags.get("remove_extra_whitespaces", True)
    if add_dummy_prefix is None:
        add_dummy_prefix = flags.get("add_dummy_prefix", True)
    inner = sentencepiece_bpe(pieces, scores, kinds, add_dummy_prefix=add_dummy_prefix,
                              remove_extra_whitespaces=remove_extra_whitespaces,
                              nfkc=flags.get("name", "identity") not in ("identity", ""))
    return Tokenizer(inner, bos_id=1, eos_ids=[2], add_bos=True)


def sentencepiece_bpe(pieces: list[str], scores: list[float], kinds: list[str], *,
                      add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False,
                      nfkc: bool = False) -> tokenizers.Tokenizer:
    """A `tokenizers` BPE that encodes like a SentencePiece BPE model.

    SentencePiece repeatedly merges the adjacent pair whose concatenation is a
    piece with the highest score; `tokenizers` merges the pair of lowest rank.
    Listing, for every piece, each way of splitting it into two pieces, ranked
    by the piece's score, makes the two agree. Characters without a piece fall
    back to the `<0xNN>` byte pieces.
    """
    vocab: dict[str, int] = {}
    for i, p in enumerate(pieces):
        if p in vocab or p == "":
            # Two ids with one text cannot both live in a BPE vocabulary; the
            # later one keeps a placeholder so ids stay dense and decodable.
            pieces[i] = p = f"<unused_{i}>"
            kinds[i] = UNUSED
        vocab[p] = i

    # Only ordinary pieces take part in merges, as in SentencePiece.
    mergeable = {p: i for i, p in enumerate(pieces) if kinds[i] in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]

    unk = next((pieces[i] for i, k in enumerate(kinds) if k == UNKNOWN), None)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                          byte_fallback=True, fuse_unk=True))
    steps = []
    if nfkc:
        # SentencePiece's nmt_nfkc rules are NFKC plus a few tweaks; NFKC is the close match.
        steps.append(normalizers.NFKC())
    if remove_extra_whitespaces:
        # As SentencePiece does it: runs of U+0020 collapse and leading ones go;
        # at the end it trims after escaping, so a literal "▁" goes there too.
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A +"), ""),
                  normalizers.Replace(Regex(f"[ {SPACE}]+\\z"), "")]
    if add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        # Drop the dummy prefix; when whitespace runs are collapsed SentencePiece
        # drops every leading space, as encoding would never have produced them.
        dec.append(decoders.Strip(" ", 1 << 20 if remove_extra_whitespaces else 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i, k in enumerate(kinds) if k in (UNKNOWN, CONTROL)])
    user = [AddedToken(pieces[i], special=False, normalized=False)
            for i, k in enumerate(kinds) if k == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def read_sentencepiece_flags(path: Path) -> dict:
    """The normalizer settings of a SentencePiece `.model` file, or {} if absent or unreadable.

    Reads just enough of the protobuf wire format to find the NormalizerSpec
    (field 3): its name (1), add_dummy_prefix (3) and remove_extra_whitespaces (4).
    """
    if not Path(path).exists():
        return {}
    with open_regular(path, "SentencePiece model") as fh:
        data = fh.read()
    try:
        for field, value in _protobuf_fields(data):
            if field == 3 and isinstance(value, bytes):
                flags = {}
                for f, v in _protobuf_fields(value):
                    if f == 1 and isinstance(v, bytes):
                        flags["name"] = v.decode("utf-8", "replace")
                    elif f == 3 and isinstance(v, int):
                        flags["add_dummy_prefix"] = bool(v)
                    elif f == 4 and isinstance(v, int):
                        flags["remove_extra_whitespaces"] = bool(v)
                return flags
    except ValueError:
        return {}
    return {}


def _protobuf_fields(buf: bytes):
    """Yield (field number, int or bytes) for each top-level field; ValueError if malformed."""
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ValueError("bad varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire == 2:
            n = varint()
            if pos + n > end:
                raise ValueError("length past end")
            yield field, buf[pos:pos + n]
            pos += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if pos + n > end:
                raise ValueError("fixed field past end")
            pos += n
        else:
            raise ValueError(f"unsupported wire type {wire}")

"""Hugging Face model directories: config.json + safetensors + tokenizer.json.

What differs between families is data in `families.py`; this reader applies it:
every config.json field is read through a `FieldReader` (unknown fields refuse
the checkpoint), and every tensor is matched against the family's names
(an unknown tensor refuses the checkpoint, naming it).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..config import ModelConfig, expected_shapes, is_optional
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from . import Checkpoint
from .families import BY_HF_ARCH, FAMILIES, GPT2_TRANSPOSED, HF_HARMLESS, Family, Fused
from .fields import FieldReader, check_rope, read_json
from .safetensors import read_safetensors
from .weights import Weight

# Hugging Face architecture names tokentrail reads, for messages and the README.
SUPPORTED_ARCHITECTURES = tuple(a for f in FAMILIES for a in f.hf_architectures)


def _load_json(path: Path) -> dict:
    return read_json(path, path.name)


def family_of(raw: dict, path: Path) -> tuple[Family, str]:
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise CheckpointError("config.json must name the model class in 'architectures' (a list of strings)",
                              path=path, field="architectures")
    arch = archs[0]
    if arch not in BY_HF_ARCH:
        raise CheckpointError(f"unsupported architecture {arch!r} (tokentrail reads "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)})", path=path, field="architectures")
    return BY_HF_ARCH[arch], arch


# config.json keys counting layers or experts: each has tensors, so none can exceed the tensor count.
_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_local_experts", "num_experts", "num_experts_per_tok")


def config_from_hf(raw: dict, path: Path, n_tensors: int | None = None) -> tuple[ModelConfig, Family]:
    """The ModelConfig of a config.json; `n_tensors` (the checkpoint's tensor count) bounds the
    layer and expert counts before anything loops over them."""
    family, arch = family_of(raw, path)
    limits = {} if n_tensors is None else {k: (n_tensors, f"the checkpoint's {n_tensors} tensors")
                                           for k in _COUNT_KEYS}
    r = FieldReader(raw, path, limits=limits)
    fields = family.hf_config(r)
    r.ignore(*HF_HARMLESS)
    r.refuse_unused("config.json")
    bos = raw.get("bos_token_id")
    eos = raw.get("eos_token_id")
    try:
        cfg = ModelConfig(**fields, architecture=arch)
    except ValueError as e:
        raise CheckpointError(str(e), path=path) from None
    check_rope(cfg, path, "rope_parameters" if r.has("rope_parameters") else "rope_theta")
    cfg.bos_token_id = bos if _is_id(bos, cfg.vocab_size) else None
    cfg.eos_token_ids = _ids(eos, cfg.vocab_size)
    return cfg, family


def _is_id(v, vocab: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab


def _ids(v, vocab: int) -> list[int]:
    vals = v if isinstance(v, list) else [v]
    return [int(x) for x in vals if _is_id(x, vocab)]


def _read_tensors(directory: Path) -> tuple[dict[str, Weight], dict[str, Path]]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError("index has no weight_map of tensor names to file names", path=index)
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError("no model.safetensors or model.safetensors.index.json", path=directory)
    root = directory.resolve()
    tensors, where = {}, {}
    for f in files:
        fp = _inside(directory, root, f, index)
        for name, w in read_safetensors(fp).items():
            if name in tensors:
                raise CheckpointError("tensor appears in two shards", path=fp, tensor=name)
            tensors[name] = w
            where[name] = fp
    return tensors, where


def _inside(directory: Path, root: Path, name: str, index: Path) -> Path:
    """A shard named by the index, confined to the model directory and a regular file."""
    if "\0" in name:  # no file name holds one; the OS would refuse it with a ValueError
        raise CheckpointError(f"shard name {name[:80]!r} holds a NUL character", path=index)
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or not name:
        raise CheckpointError(f"shard name {name[:80]!r} points outside the model directory", path=index)
    fp = directory / candidate
    try:
        resolved = fp.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise CheckpointError("shard listed in the index is missing", path=fp) from None
    if root not in resolved.parents:
        raise CheckpointError(f"shard {name[:80]!r} resolves outside the model directory", path=index)
    if not resolved.is_file():
        raise CheckpointError("shard is not a regular file", path=fp)
    return fp


def _pattern(hf: str) -> re.Pattern:
    """A regex for a Hugging Face name pattern; the leading 'model.' (or similar) may be absent."""
    head, _, rest = hf.partition(".")
    body = re.escape(hf).replace(r"\{l\}", r"(?P<l>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    if head in ("model", "transformer", "gpt_neox") and rest:
        body = f"(?:{re.escape(head)}\\.)?" + body[len(re.escape(head)) + 2:]
    return re.compile(body + r"\Z")


def map_tensors(family: Family, cfg: ModelConfig, tensors: dict[str, Weight], where: dict[str, Path]
                ) -> dict[str, Weight]:
    """Neutral weights from the file's tensors; any tensor the family does not explain is an error."""
    direct = [(_pattern(hf), neutral) for neutral, hf in family.hf_names.items()]
    fused = [(_pattern(f.hf), f) for f in family.hf_fused]
    skip = [_pattern(s) for s in family.hf_skip]
    weights: dict[str, Weight] = {}
    origin: dict[str, str] = {}

    def put(neutral: str, w: Weight, name: str) -> None:
        if neutral in weights:
            raise CheckpointError(f"provides {neutral!r}, which {origin[neutral]!r} already provides",
                                  path=where[name], tensor=name)
        w.source = (where[name], name)
        weights[neutral], origin[neutral] = w, name

    def index(m: re.Match, name: str) -> dict:
        out = {}
        for key, limit, what in (("l", cfg.n_layers, "layers"), ("e", cfg.n_experts, "experts")):
            if key in m.groupdict():
                i = int(m.group(key))
                if i >= limit:
                    raise CheckpointError(f"index {i} is beyond the config's {limit} {what}",
                                          path=where[name], tensor=name)
                out[key] = i
        return out

    for name, w in tensors.items():
        for rx, neutral in direct:
            m = rx.match(name)
            if m:
                put(neutral.format(**index(m, name)), w, name)
                break
        else:
            for rx, f in fused:
                m = rx.match(name)
                if m:
                    prefix = f"blocks.{index(m, name)['l']}."
                    kind = name.rsplit(".", 1)[1]
                    for part, piece in zip(f.parts, _split(f, cfg, w, where[name], name)):
                        put(f"{prefix}{part}.{kind}", piece, name)
                    break
            else:
                if not any(rx.match(name) for rx in skip):
                    raise CheckpointError(f"tensor is not part of a {family.name} model as tokentrail reads it; "
                                          f"refusing rather than ignoring it", path=where[name], tensor=name)
    if family.name == "gpt2":
        for neutral in list(weights):
            if neutral.endswith(GPT2_TRANSPOSED):
                weights[neutral] = _transposed(weights[neutral])
    if family.norm_offset:
        for neutral in list(weights):
            if neutral.endswith("norm.weight"):
                w = weights[neutral]
                weights[neutral] = Weight(w.to_float32() + np.float32(family.norm_offset), "f32", w.shape,
                                          source=w.source)
    return weights


def _split(f: Fused, cfg: ModelConfig, w: Weight, path: Path, name: str) -> list[Weight]:
    """The parts of a fused tensor (row views where the layout allows, else one copy)."""
    if f.layout == "conv1d":
        w = _transposed(w) if len(w.shape) == 2 else w
    sizes = f.sizes(cfg)
    if w.shape[0] != sum(sizes):
        raise CheckpointError(f"fused tensor has {w.shape[0]} rows, expected {' + '.join(map(str, sizes))}",
                              path=path, tensor=name)
    data = w.data
    if f.layout == "heads":  # [head][part][head_dim] rows: gather each part's rows (one copy at load)
        heads, hd = cfg.n_heads, cfg.head_dim
        grouped = np.asarray(data).reshape((heads, len(sizes), hd) + tuple(w.shape[1:]))
        return [Weight(np.ascontiguousarray(grouped[:, i]).reshape((heads * hd,) + tuple(w.shape[1:])), w.dtype,
                       (heads * hd,) + tuple(w.shape[1:])) for i in range(len(sizes))]
    out, start = [], 0
    for size in sizes:
        out.append(Weight(data[start:start + size], w.dtype, (size,) + tuple(w.shape[1:])))
        start += size
    return out


def _transposed(w: Weight) -> Weight:
    """GPT-2's Conv1D [in, out] as [out, in], in the weight's own dtype (one copy, at load)."""
    return Weight(np.ascontiguousarray(np.asarray(w.data).T), w.dtype, tuple(reversed(w.shape)), source=w.source)


def read_hf(directory, dtype: str | None = None) -> Checkpoint:
    directory = Path(directory)
    cfg_path = directory / "config.json"
    raw = _load_json(cfg_path)
    family_of(raw, cfg_path)  # an unsupported architecture is named before any tensor is read
    tensors, where = _read_tensors(directory)
    cfg, family = config_from_hf(raw, cfg_path, len(tensors))
    gen_path = directory / "generation_config.json"
    if gen_path.exists():
        gen = _load_json(gen_path)
        eos = gen.get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = _ids(eos, cfg.vocab_size)
        if _is_id(gen.get("bos_token_id"), cfg.vocab_size):
            cfg.bos_token_id = gen["bos_token_id"]

    # Every block has tensors, and every expert of every block: more than the tensors present is a
    # config that cannot be right, and checking it here keeps the checks below from looping over it.
    if cfg.n_layers * max(1, cfg.n_experts) > len(tensors):
        raise CheckpointError(f"config claims {cfg.n_layers} layers of {cfg.n_experts} experts but the "
                              f"checkpoint has {len(tensors)} tensors", path=cfg_path, field="num_hidden_layers")
    weights = map_tensors(family, cfg, tensors, where)
    if "unembed.weight" in weights:
        cfg.tied_embeddings = False
    elif not cfg.tied_embeddings:
        raise CheckpointError(f"missing the output projection ({family.hf_names['unembed.weight']}) and "
                              f"tie_word_embeddings is false", path=directory,
                              tensor=family.hf_names["unembed.weight"])

    tok_path = directory / "tokenizer.json"
    tokenizer = None
    if tok_path.exists():
        tokenizer = Tokenizer.from_file(tok_path, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids)
        from ..chat import template_from_hf_directory

        tokenizer.chat_template = template_from_hf_directory(directory, tokenizer)
    ckpt = Checkpoint(cfg, weights, tokenizer, source=str(directory))
    check_weights(ckpt, {n: _file_name(family, n) for n in expected_shapes(cfg)})
    return ckpt


def _file_name(family: Family, neutral: str) -> str:
    """The Hugging Face name of a neutral tensor, for messages."""
    layer = re.match(r"blocks\.(\d+)\.", neutral)
    expert = re.search(r"experts\.(\d+)\.", neutral)
    pattern = re.sub(r"experts\.\d+\.", "experts.{e}.", re.sub(r"^blocks\.\d+\.", "blocks.{l}.", neutral))
    hf = family.hf_names.get(pattern, neutral)
    return hf.format(l=layer.group(1) if layer else "", e=expert.group(1) if expert else "")


def check_weights(ckpt: Checkpoint, file_names: dict[str, str] | None = None) -> None:
    """Every required tensor present, every present tensor of the expected shape and known.

    `file_names` maps neutral names to the names the file uses, for messages.
    """
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
    for name, w in ckpt.weights.items():
        if name not in expected:
            src = getattr(w, "source", None)
            raise CheckpointError(f"tensor {name!r} has no place in this model's configuration",
                                  path=src[0] if src else ckpt.source, tensor=src[1] if src else name)

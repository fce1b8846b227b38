"""One set of generation defaults: the model's `generation_config.json`, read as transformers reads it.

Resolution order for every option of :func:`tokentrail.generation.generate`
(and of ``tokentrail generate`` on the command line):

1. what the caller passes;
2. what the model's ``generation_config.json`` says (Hugging Face
   directories; GGUF and llama2.c checkpoints have none);
3. tokentrail's defaults: greedy decoding, :data:`DEFAULT_MAX_NEW_TOKENS`
   new tokens, the end-of-sequence ids of the config and tokenizer.
   (transformers' own last resort, max_length=20 with the prompt counted,
   is not taken: it leaves most prompts no room to continue.)

Greedy or sampling: ``do_sample`` decides when it is given (by the caller or
the file), as in transformers; otherwise a ``temperature`` above 0 from the
caller means sampling (as in llama.cpp) and 0 means greedy. When sampling was
asked for with ``do_sample=True`` and no ``top_k`` is given anywhere,
transformers' own default ``top_k=50`` applies, so a model samples as its
authors saw it sample; asked for with a temperature alone, nothing is
truncated unless asked. Sampling-only fields of the file (temperature,
top_k, top_p, min_p, typical_p, epsilon/eta cutoffs) do nothing while
decoding is greedy, the penalties (repetition_penalty,
no_repeat_ngram_size) act in both modes — again as in transformers.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# The one default length: new tokens per generate call when neither the caller nor the model says.
DEFAULT_MAX_NEW_TOKENS = 64
# transformers' top_k when sampling with do_sample=True and no top_k anywhere.
TRANSFORMERS_SAMPLING_TOP_K = 50

# Most sequences a file may ask for (num_beams, num_return_sequences): each costs a KV cache, and a
# hostile file asking for a billion would exhaust memory before anything else could fail.
MAX_FILE_SEQUENCES = 1024
# Beyond this the length term of beam scores, length ** length_penalty, leaves a double's range.
MAX_LENGTH_PENALTY = 32.0

# Fields of generation_config.json that act only when sampling.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
# Keys that never change which tokens one sequence gets (bookkeeping, outputs, caches, padding).
_INERT_KEYS = frozenset({
    "transformers_version", "_from_model_config", "bos_token_id", "pad_token_id", "decoder_start_token_id",
    "use_cache", "cache_implementation", "cache_config", "return_dict_in_generate", "output_scores",
    "output_logits", "output_attentions", "output_hidden_states", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "prompt_lookup_num_tokens",
    "max_matching_ngram_size", "assistant_early_exit", "assistant_lookahead", "compile_config",
    "disable_compile", "low_memory", "trust_remote_code", "remove_invalid_values", "is_assistant",
    "renormalize_logits", "chat_format", "user_token_id", "assistant_token_id", "max_time",
})
# transformers' values for keys tokentrail does not apply: a file that leaves them here loses nothing.
_NEUTRAL = {"min_length": 0, "min_new_tokens": None, "num_beam_groups": 1, "diversity_penalty": 0.0,
            "penalty_alpha": None, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
            "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
            "exponential_decay_length_penalty": None, "begin_suppress_tokens": None, "sequence_bias": None,
            "guidance_scale": None, "constraints": None, "force_words_ids": None, "top_h": None,
            "watermarking_config": None, "dola_layers": None, "token_healing": False, "stop_strings": None}


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's decoding defaults, from its generation_config.json or tokentrail's own.

    ``source`` is the file read (None: no file, tokentrail's defaults);
    ``ignored`` lists keys of the file that would change decoding in
    transformers but that tokentrail does not apply (a warning names them at
    load). ``max_new_tokens``/``max_length`` are None when the file sets no
    length; :meth:`new_tokens_for` turns them into a count.
    """

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    suppress_tokens: tuple[int, ...] = ()
    max_new_tokens: int | None = None
    max_length: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    num_return_sequences: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    source: str | None = None
    ignored: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy when the caller says nothing."""
        return not self.do_sample

    def new_tokens_for(self, prompt_len: int) -> int:
        """Tokens to generate after a prompt of `prompt_len` tokens when the caller gives no length."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return max(0, self.max_length - prompt_len)
        return DEFAULT_MAX_NEW_TOKENS

    def sampling_fields(self) -> dict[str, Any]:
        """The sampling-only settings the file gives (top_k=50 included when it turns sampling on)."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}

    def __str__(self) -> str:
        mode = "sampling" if self.do_sample else "greedy"
        given = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in ("source", "ignored", "do_sample") and getattr(self, f.name) not in (None, ())}
        where = f"from {self.source}" if self.source else "tokentrail's defaults (no generation_config.json)"
        extra = ", ".join(f"{k}={v}" for k, v in given.items())
        length = "" if ("max_new_tokens" in given or "max_length" in given) \
            else f", max_new_tokens={DEFAULT_MAX_NEW_TOKENS}"
        return f"{mode}{', ' + extra if extra else ''}{length} ({where})"

    def __repr__(self) -> str:
        return f"GenerationDefaults({self})"


def _check(path: Path, key: str, value: Any, kind: str) -> Any:
    """`value` of `key` if it has the expected kind, else a CheckpointError naming the file."""
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, numbers.Integral) and not isinstance(value, bool),
        "real": isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
    }[kind]
    if not ok:
        wanted = {"bool": "true or false", "int": "an integer", "real": "a finite number"}[kind]
        raise CheckpointError(f"generation_config.json: {key} must be {wanted}, got {value!r:.60}", path=path,
                              field=key)
    return value


_KINDS = {"do_sample": "bool", "temperature": "real", "top_k": "int", "top_p": "real", "min_p": "real",
          "typical_p": "real", "epsilon_cutoff": "real", "eta_cutoff": "real", "repetition_penalty": "real",
          "no_repeat_ngram_size": "int", "max_new_tokens": "int", "max_length": "int", "num_beams": "int",
          "length_penalty": "real", "num_return_sequences": "int", "pad_token_id": "int"}


# What each count of the file must be within (beyond its kind).
_COUNT_RANGES = {"top_k": (0, None), "no_repeat_ngram_size": (0, None), "max_new_tokens": (0, None),
                 "max_length": (0, None), "num_beams": (1, MAX_FILE_SEQUENCES),
                 "num_return_sequences": (1, MAX_FILE_SEQUENCES)}


def _check_values(path: Path, values: dict[str, Any], vocab_size: int | None) -> None:
    """Values of the right kind but outside their domain are refused at load, naming the file and field,
    rather than failing at the first generation as if the caller had passed them."""
    for key, (lo, hi) in _COUNT_RANGES.items():
        v = values.get(key)
        if v is not None and (v < lo or (hi is not None and v > hi)):
            within = f"within {lo}..{hi}" if hi is not None else f"at least {lo}"
            raise CheckpointError(f"generation_config.json: {key} must be {within}, got {str(v)[:24]}", path=path,
                                  field=key)
    beams, returned = values.get("num_beams") or 1, values.get("num_return_sequences") or 1
    if beams > 1 and returned > beams:
        raise CheckpointError(f"generation_config.json: num_return_sequences ({returned}) exceeds num_beams "
                              f"({beams})", path=path, field="num_return_sequences")
    lp = values.get("length_penalty")
    if lp is not None and abs(lp) > MAX_LENGTH_PENALTY:
        raise CheckpointError(f"generation_config.json: length_penalty must be within -{MAX_LENGTH_PENALTY:g}.."
                              f"{MAX_LENGTH_PENALTY:g}, got {lp}", path=path, field="length_penalty")
    for key in ("eos_token_ids", "suppress_tokens"):
        bad = [t for t in values.get(key, ()) if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            size = f" (size {vocab_size})" if vocab_size else ""
            raise CheckpointError(f"generation_config.json: {key.replace('_ids', '_id')} holds token id "
                                  f"{str(bad[0])[:24]}, outside the vocabulary{size}", path=path,
                                  field=key.replace("_ids", "_id"))
    # The sampling settings go through the sampler's own checks (the ranges a caller's values meet).
    from .errors import InvalidArgumentError
    from .sampling import SamplingConfig

    sampling = {k: values[k] for k in SAMPLING_FIELDS + ("repetition_penalty", "no_repeat_ngram_size")
                if k in values}
    if "temperature" in sampling and sampling["temperature"] == 0:
        sampling.pop("temperature")  # 0 is greedy decoding, valid here
    try:
        SamplingConfig(**sampling).build()
    except InvalidArgumentError as e:
        raise CheckpointError(f"generation_config.json: {e}", path=path) from None


def _id_list(path: Path, key: str, value: Any) -> tuple[int, ...]:
    """An id or a list of ids (suppress_tokens: a list) as a tuple of ints."""
    items = value if isinstance(value, list) else [value] if key == "eos_token_id" else None
    if items is None:
        raise CheckpointError(f"generation_config.json: {key} must be a list of token ids, got "
                              f"{type(value).__name__}", path=path, field=key)
    return tuple(_check(path, key, t, "int") for t in items)


def read_generation_config(path: str | Path, vocab_size: int | None = None) -> GenerationDefaults:
    """Read a generation_config.json (a file, or the directory holding one) as transformers reads it.

    Values outside their domain are a CheckpointError naming the file and field (token ids
    too, against `vocab_size` when it is given).

    Keys that change decoding in transformers but are not applied here are
    listed in ``ignored`` and named in a warning, never dropped silently.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "generation_config.json"
    from .loading.fields import read_json

    raw = read_json(path, "generation_config.json")
    values: dict[str, Any] = {}
    for key, kind in _KINDS.items():
        if raw.get(key) is not None:
            values[key] = _check(path, key, raw[key], kind)
    if raw.get("eos_token_id") is not None:
        values["eos_token_ids"] = _id_list(path, "eos_token_id", raw["eos_token_id"])
    if raw.get("suppress_tokens") is not None:
        values["suppress_tokens"] = _id_list(path, "suppress_tokens", raw["suppress_tokens"])
    early = raw.get("early_stopping")
    if early is not None:
        if early not in (True, False, "never"):
            raise CheckpointError(f"generation_config.json: early_stopping must be true, false or "
                                  f"\"never\", got {early!r}", path=path)
        values["early_stopping"] = early
    _check_values(path, values, vocab_size)
    if values.get("do_sample") and values.get("top_k") is None:
        values["top_k"] = TRANSFORMERS_SAMPLING_TOP_K
    known = set(_KINDS) | {"eos_token_id", "suppress_tokens", "early_stopping"} | _INERT_KEYS
    ignored = tuple(sorted(k for k, v in raw.items()
                           if k not in known and not (k in _NEUTRAL and v == _NEUTRAL[k]) and v is not None))
    if ignored:
        warnings.warn(f"{path}: tokentrail does not apply {', '.join(ignored)}; generation may differ from "
                      f"transformers' for this model", stacklevel=3)
    return GenerationDefaults(**values, source=str(path), ignored=ignored)


def defaults_for(source: str | Path | None, vocab_size: int | None = None) -> GenerationDefaults:
    """The defaults of the checkpoint at `source`: its generation_config.json if it has one."""
    if source and Path(source).is_dir() and (Path(source) / "generation_config.json").exists():
        return read_generation_config(Path(source) / "generation_config.json", vocab_size)
    return GenerationDefaults()

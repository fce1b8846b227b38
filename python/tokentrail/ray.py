"""Generation, scoring and activation capture over a Ray Dataset, on a pool of model actors.

    import ray, tokentrail.ray as ttray
    ray.init()                                          # or ray.init("ray://head:10001") for a cluster
    ds = ray.data.read_parquet("prompts.parquet")       # a "prompt" column
    ttray.generate(ds, "SmolLM2-135M", max_new_tokens=32, temperature=0).write_parquet("out/")

Each function maps the dataset's batches (`map_batches`) through `concurrency`
actors that each load the model once and keep it; rows keep their other
columns. An actor runs each batch through the batched API
(``model.generate([...])``, ``model.score([...])``, ``model.run_with_cache([...])``),
so the rows of a batch advance together, every weight read once per step
for all of them; each row's result equals the row run alone. A row's own sampling seed can come from a `seed` column. Captured
activations are fixed-shape float32 arrays per row (the last position, or
the mean over positions), which Ray writes to Parquet as tensor columns.

Needs Ray Data (`pip install "ray[data]"`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, UnknownNameError

POOLINGS = ("last", "mean")


def _dataset(data):
    import ray.data

    if isinstance(data, str):
        return ray.data.read_parquet(data)
    return data


def _objects(items: list) -> np.ndarray:
    """A 1-D object array of `items` (numpy would make equal-length lists a 2-D array)."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _texts(batch: Mapping[str, np.ndarray], column: str) -> list[str | list[int]]:
    """The batch's `column` as a list of prompts for the batched API: texts, or token ids as lists of ints."""
    if column not in batch:
        raise UnknownNameError(f"the dataset has no column {column!r} (columns: {sorted(batch)})")
    return [t if isinstance(t, str) else [int(i) for i in t] for t in batch[column]]


class _ModelActor:
    """Loads the model once per actor; each batch then runs on it."""

    def __init__(self, path, load_options: Mapping[str, Any] | None):
        import tokentrail

        self.model = tokentrail.load(path, **dict(load_options or {}))


class Generator(_ModelActor):
    def __init__(self, path, load_options, column: str, output: str, options: Mapping[str, Any]):
        super().__init__(path, load_options)
        self.column, self.output, self.options = column, output, dict(options)

    def __call__(self, batch: dict) -> dict:
        prompts = _texts(batch, self.column)
        seeds = batch.get("seed")
        per_prompt = None if seeds is None else [{"seed": int(s)} for s in seeds]
        generations = self.model.generate(prompts, per_prompt=per_prompt, **self.options) if prompts else []
        out = dict(batch)
        out[self.output] = _objects([g.text for g in generations])
        out[self.output + "_token_ids"] = _objects([[int(t) for t in g.token_ids] for g in generations])
        out["finish_reason"] = _objects([g.finish_reason for g in generations])
        return out


class Scorer(_ModelActor):
    def __init__(self, path, load_options, column: str):
        super().__init__(path, load_options)
        self.column = column

    def __call__(self, batch: dict) -> dict:
        texts = _texts(batch, self.column)
        scores = self.model.score(texts, top_n=0, progress=False) if texts else []
        out = dict(batch)
        out["sum_logprob"] = np.array([s.sum_logprob for s in scores])
        out["mean_logprob"] = np.array([s.mean_logprob for s in scores])
        out["perplexity"] = np.array([s.perplexity for s in scores])
        out["n_tokens"] = np.array([len(s.token_ids) for s in scores], dtype=np.int64)
        return out


class Capturer(_ModelActor):
    def __init__(self, path, load_options, column: str, names: Sequence[str], pooling: str):
        super().__init__(path, load_options)
        from .capture import expand

        self.column, self.pooling = column, pooling
        self.names = expand(names, self.model.config.n_layers)

    def __call__(self, batch: dict) -> dict:
        texts = _texts(batch, self.column)
        out = dict(batch)
        if not texts:
            return out
        # "last" records only each prompt's own last position (-1 counts from each prompt's end).
        positions = [-1] if self.pooling == "last" else None
        _, caches = self.model.run_with_cache(texts, names=self.names, positions=positions)
        for n in self.names:
            out[n] = np.stack([(c[n][-1] if self.pooling == "last" else c[n].mean(axis=0)).astype(np.float32)
                               for c in caches])
        return out


def _map(data, actor, args: tuple, concurrency: int, batch_size: int):
    import ray.data

    if concurrency < 1 or batch_size < 1:
        raise InvalidArgumentError("concurrency and batch_size must be at least 1")
    return _dataset(data).map_batches(actor, fn_constructor_args=args,
                                      compute=ray.data.ActorPoolStrategy(size=concurrency),
                                      batch_size=batch_size, batch_format="numpy")


def generate(data, model, *, column: str = "prompt", output: str = "text", concurrency: int = 2,
             batch_size: int = 8, load_options: Mapping[str, Any] | None = None, **options: Any):
    """Continue every row's `column` (text or token ids) with `model.generate(**options)`.

    Adds `output` (the text), `output`_token_ids and finish_reason. `data` is a
    Ray Dataset or a Parquet path; `model` a checkpoint path every actor loads
    (with `load_options`, e.g. {"dtype": "q8_0", "threads": 1}).
    """
    from .errors import unknown_options
    from .generation import GENERATE_OPTIONS
    from .sampling import SAMPLING_OPTIONS, make_chain

    # Names now, before any actor starts; each actor's generate checks the values against its model.
    unknown = set(options) - GENERATE_OPTIONS - {"eos_ids"}
    if unknown:
        raise unknown_options(unknown, GENERATE_OPTIONS | {"eos_ids"}, "sampling option")
    make_chain(**{k: v for k, v in options.items() if k in SAMPLING_OPTIONS and v is not None})
    return _map(data, Generator, (model, load_options, column, output, options), concurrency, batch_size)


def score(data, model, *, column: str = "text", concurrency: int = 2, batch_size: int = 8,
          load_options: Mapping[str, Any] | None = None):
    """Log-probability of every row's `column`: sum_logprob, mean_logprob, perplexity, n_tokens."""
    return _map(data, Scorer, (model, load_options, column), concurrency, batch_size)


def capture(data, model, names: str | Sequence[str], *, column: str = "text", pooling: str = "last",
            concurrency: int = 2, batch_size: int = 8, load_options: Mapping[str, Any] | None = None):
    """Activations of every row's `column` at the named capture points, one float32 array per row and name.

    `pooling`: "last" (the last position's row) or "mean" (the mean over positions).
    """
    if pooling not in POOLINGS:
        raise InvalidArgumentError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    names = [names] if isinstance(names, str) else list(names)
    return _map(data, Capturer, (model, load_options, column, names, pooling), concurrency, batch_size)

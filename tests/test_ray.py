"""tokentrail.ray on a real local Ray instance: each row equals the same work done alone."""
from __future__ import annotations

import numpy as np
import pytest

import tokentrail
from conftest import require

ray = require("ray")
require("pyarrow")

import tokentrail.ray as ttray  # noqa: E402

DEMO = str(tokentrail.load().source)
PROMPTS = ["The storm is", "Once upon a time", "The cat", "A small boat", "The farm was", "In the morning",
           "The sky is gray"]


@pytest.fixture(scope="module")
def local_ray():
    # Logical CPUs: two actors hold one each, and reading the data needs some too.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return tokentrail.load()


def test_generate_over_a_dataset_equals_generate_alone(local_ray, model, tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "prompts.parquet"
    seeds = list(range(len(PROMPTS)))
    ray.data.from_items([{"prompt": p, "seed": s, "id": i} for i, (p, s) in enumerate(zip(PROMPTS, seeds))]) \
        .write_parquet(str(src))
    out = ttray.generate(str(src), DEMO, max_new_tokens=12, temperature=0.8, top_k=20, concurrency=2, batch_size=3,
                         load_options={"threads": 1})
    out.write_parquet(str(tmp_path / "out"))
    table = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert sorted(r["id"] for r in table) == list(range(len(PROMPTS)))  # nothing lost or duplicated
    for r in table:
        alone = model.generate(r["prompt"], max_new_tokens=12, temperature=0.8, top_k=20, seed=r["seed"])
        assert r["text"] == alone.text
        assert list(r["text_token_ids"]) == alone.token_ids
        assert r["finish_reason"] == alone.finish_reason


def test_score_and_capture_equal_the_model_alone(local_ray, model):
    ds = ray.data.from_items([{"text": p + " near the farm."} for p in PROMPTS])
    rows = ttray.score(ds, DEMO, concurrency=2, batch_size=2).take_all()
    for r in rows:
        alone = model.score(r["text"])
        assert r["sum_logprob"] == pytest.approx(alone.sum_logprob, rel=1e-6)
        assert r["perplexity"] == pytest.approx(alone.perplexity, rel=1e-6)
        assert r["n_tokens"] == len(alone.token_ids)
    names = ["blocks.1.resid_post", "final_norm"]
    for pooling in ("last", "mean"):
        rows = ttray.capture(ds, DEMO, names, pooling=pooling, concurrency=2, batch_size=3).take_all()
        assert len(rows) == len(PROMPTS)
        for r in rows:
            _, cache = model.run_with_cache(r["text"], names=names)
            for n in names:
                expected = cache[n][-1] if pooling == "last" else cache[n].mean(axis=0)
                assert r[n].shape == (model.config.hidden_size,) and r[n].dtype == np.float32
                np.testing.assert_allclose(r[n], expected, rtol=1e-5, atol=1e-6)


def test_token_id_rows_of_different_lengths_in_one_batch(local_ray, model):
    # One batch of 7 rows of ids (greedy, per-row seeds ignored by greedy): the rows advance together
    # through model.generate([...]) / model.score([...]) and each equals the row run alone.
    ids = [model.encode(p) for p in PROMPTS]
    ds = ray.data.from_items([{"prompt": i, "id": n} for n, i in enumerate(ids)])
    rows = ttray.generate(ds, DEMO, max_new_tokens=9, temperature=0, concurrency=1, batch_size=len(ids)).take_all()
    assert sorted(r["id"] for r in rows) == list(range(len(ids)))
    for r in rows:
        alone = model.generate(ids[r["id"]], max_new_tokens=9, temperature=0)
        assert list(r["text_token_ids"]) == alone.token_ids and r["text"] == alone.text
    scored = ttray.score(ds, DEMO, column="prompt", concurrency=1, batch_size=len(ids)).take_all()
    for r in scored:
        assert r["sum_logprob"] == pytest.approx(model.score(ids[r["id"]]).sum_logprob, rel=1e-6)


def test_bad_options_fail_before_any_actor_starts():
    with pytest.raises(ValueError, match="unknown sampling option"):
        ttray.generate(ray.data.from_items([{"prompt": "x"}]), DEMO, temprature=0.5)
    with pytest.raises(ValueError, match="pooling"):
        ttray.capture(ray.data.from_items([{"text": "x"}]), DEMO, "final_norm", pooling="max")

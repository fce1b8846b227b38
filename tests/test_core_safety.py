"""The engine's own API under misuse: one exception hierarchy, sessions shared between threads,
thread counts honoured from any thread, and raw core calls with bad arguments refused."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import tokentrail
from tokentrail import _core
from tokentrail.errors import (CheckpointError, ConcurrentUseError, ContextFullError, InvalidArgumentError,
                               OptionError, OutOfRangeError, TokentrailError, UnknownNameError)


@pytest.fixture(scope="module")
def model():
    return tokentrail.load()


def test_hierarchy_is_tokentrail_and_builtin():
    for cls, builtin in ((CheckpointError, ValueError), (ContextFullError, ValueError),
                         (InvalidArgumentError, ValueError), (OptionError, TypeError),
                         (OutOfRangeError, IndexError), (UnknownNameError, KeyError),
                         (ConcurrentUseError, RuntimeError)):
        assert issubclass(cls, TokentrailError) and issubclass(cls, builtin)
    assert str(UnknownNameError("no such point")) == "no such point"


@pytest.mark.parametrize("call, error", [
    (lambda m: m.session().rewind(-1), InvalidArgumentError),
    (lambda m: m.session().rewind(5), InvalidArgumentError),
    (lambda m: m.session(limit=0), InvalidArgumentError),
    (lambda m: m.session(limit="8"), InvalidArgumentError),
    (lambda m: m.session(kv_dtype="f8"), InvalidArgumentError),
    (lambda m: m.session(limit=4).feed([1] * 5), ContextFullError),
    (lambda m: m.generate([1] * (m.context_limit + 1), max_new_tokens=1), ContextFullError),
    (lambda m: m.session().feed([10**9]), InvalidArgumentError),
    (lambda m: m.run_with_cache([1, 2], positions=[5]), OutOfRangeError),
    (lambda m: m.run_with_cache([1, 2], names="no_such_point"), UnknownNameError),
    (lambda m: setattr(m, "threads", 10**10), InvalidArgumentError),
    (lambda m: setattr(m, "threads", 0), InvalidArgumentError),
    (lambda m: m.forward_batch([m.session(), m.session()], [[1], [10**9]]), InvalidArgumentError),
    (lambda m: m.forward_batch([m.session()], [[1]], logits="first"), InvalidArgumentError),
    (lambda m: m.forward_batch([m.session(limit=2)], [[1, 2, 3]]), ContextFullError),
    (lambda m: m.forward_batch(["x"], [[1]]), OptionError),
    (lambda m: m.generate(["a", "b"], per_prompt=[{}]), InvalidArgumentError),
    (lambda m: m.run_with_cache([[1, 2], [3, 4]], positions=[5]), OutOfRangeError),
    (lambda m: m.score([[1, 2], [3]]), InvalidArgumentError),
    (lambda m: m.journey([1, 2], position=7), OutOfRangeError),
])
def test_entry_points_raise_the_hierarchy(model, call, error):
    with pytest.raises(error):
        call(model)


@pytest.mark.parametrize("kwargs", [dict(threads=10**10), dict(threads=True), dict(threads=0), dict(context=0),
                                    dict(context=2**40), dict(dtype="q3"), dict(kv_dtype=None),
                                    dict(check_finite="yes")])
def test_load_arguments(kwargs):
    with pytest.raises(InvalidArgumentError):
        tokentrail.load(**kwargs)


def test_session_model_is_fixed(model):
    s = model.session()
    with pytest.raises(AttributeError):
        s.model = tokentrail.load()


def test_threads_honoured_from_another_python_thread():
    """OpenMP's count is per OS thread: a model of 1 thread runs 1 from any thread."""
    m = tokentrail.load(threads=1)
    seen = []

    def work():
        m.session().feed([1, 2, 3])
        seen.append(_core.get_threads())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [1]
    m.threads = 2
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [1, 2]
    default = tokentrail.load()  # threads=None: the process default, not what the other model set
    default.session().feed([1])
    assert _core.get_threads() == tokentrail.model.DEFAULT_THREADS


def test_one_session_fed_from_two_threads_serialises(model):
    """Two threads feeding one session never corrupt it: the result equals feeding the same tokens in turn."""
    shared = model.session()
    shared.feed([1])
    errors = []

    def work(token):
        try:
            for _ in range(20):
                shared.feed([token])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in (5, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert shared.pos == 41 and shared.tokens == [1] + [5] * 40
    alone = model.session()
    expected = alone.feed([1] + [5] * 40)
    np.testing.assert_allclose(shared.feed([7]), alone.feed([7]), rtol=1e-4, atol=1e-4)
    assert expected.shape == (model.config.vocab_size,)


def test_core_refuses_a_cache_of_another_model(model):
    other = tokentrail.load(tokentrail.model.DEMO_MODEL)
    cache = _core.KVCache(other._core, 8)
    # Same shapes but other weights: the cache records the model it was made for, so even a twin is refused.
    with pytest.raises(ValueError, match="another model"):
        model._core.forward(cache, np.array([1], np.int32))
    assert cache.length == 0
    from tokentrail.config import ModelConfig
    from tokentrail.loading import Checkpoint
    from tokentrail.loading.weights import Weight

    cfg = ModelConfig(vocab_size=8, hidden_size=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, ffn_size=8,
                      max_seq_len=8)
    rng = np.random.default_rng(0)
    from tokentrail.config import expected_shapes

    weights = {n: Weight(rng.standard_normal(s).astype(np.float32), "f32", s)
               for n, s in expected_shapes(cfg).items() if not n.endswith(".bias")}
    small = tokentrail.Model(Checkpoint(cfg, weights, None))
    with pytest.raises(ValueError, match="another model"):
        model._core.forward(_core.KVCache(small._core, 8), np.array([1], np.int32))


@pytest.mark.parametrize("call", [
    lambda: _core.attention(np.zeros((1, 2, 4), np.float32), np.zeros((0, 1, 4), np.float32),
                            np.zeros((0, 1, 4), np.float32), 0, 0.5),
    lambda: _core.attention(np.zeros((1, 2, 4), np.float32), np.zeros((1, 1, 4), np.float32),
                            np.zeros((1, 1, 4), np.float32), -1, 0.5),
    lambda: _core.attention(np.zeros((1, 0, 4), np.float32), np.zeros((1, 1, 4), np.float32),
                            np.zeros((1, 1, 4), np.float32), 0, 0.5),
    lambda: _core.matmul(np.zeros(34, np.uint8), "q8_0", -1, -32, np.zeros((1, 1), np.float32)),
    lambda: _core.matmul(np.zeros(4, np.float32), "f32", 0, 4, np.zeros((1, 4), np.float32)),
    lambda: _core.row_to_f32(np.zeros(34, np.uint8), "q8_0", -1, -32),
    lambda: _core.rmsnorm(np.zeros((1, 0), np.float32), np.zeros(0, np.float32), 1e-5),
    lambda: _core.rmsnorm(np.zeros((1, 4), np.float32), np.ones(4, np.float32), 0.0),
    lambda: _core.rope(np.zeros((1, 0), np.float32), np.zeros(1, np.int32), 0, 4, np.ones(2, np.float32), False),
    lambda: _core.Hooks(-2),
    lambda: _core.set_threads(0),
    lambda: _core.set_threads(10**6),
    lambda: _core.probe_bandwidth(-1.0, 1),
])
def test_raw_core_calls_check_their_arguments(call):
    with pytest.raises(ValueError):
        call()


def misaligned(shape, dtype=np.float32):
    """A C-contiguous array whose data starts one byte past an aligned address."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(n + 1, np.uint8)[1:]
    return raw.view(dtype).reshape(shape)


def test_raw_core_refuses_misaligned_data():
    w = misaligned((4, 4))
    assert w.ctypes.data % 4
    with pytest.raises(ValueError, match="not aligned"):
        _core.matmul(w, "f32", 4, 4, np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="not aligned"):
        _core.rmsnorm(np.ones((1, 4), np.float32), misaligned((4,)), 1e-5)


def test_raw_cache_used_by_two_threads_raises(model):
    """Below Session's lock, the core's cache refuses a second thread instead of racing it."""
    seen = []
    for _ in range(50):
        cache = _core.KVCache(model._core, 256)
        done = threading.Event()

        def work():
            model._core.forward(cache, np.arange(200, dtype=np.int32) % 50, "none")
            done.set()

        t = threading.Thread(target=work)
        t.start()
        while not done.is_set():
            try:
                cache.clone()
            except ConcurrentUseError as e:
                seen.append(e)
                break
        t.join()
        assert cache.length == 200  # the forward pass completed untouched
        if seen:
            break
    assert seen and "another thread" in str(seen[0])


def test_a_batch_refuses_a_cache_busy_in_another_thread(model):
    """forward_batch guards every cache it runs: one busy elsewhere refuses the batch, and the others stay as they were."""
    seen = []
    one = [np.array([1], np.int32)] * 2
    for _ in range(50):
        busy, idle = _core.KVCache(model._core, 256), _core.KVCache(model._core, 8)
        done = threading.Event()

        def work():
            while True:  # the probing clone below may hold the cache for a moment
                try:
                    model._core.forward(busy, np.arange(200, dtype=np.int32) % 50, "none")
                    break
                except ConcurrentUseError:
                    continue
            done.set()

        t = threading.Thread(target=work)
        t.start()
        batched = 0
        while not done.is_set():
            try:
                busy.clone()
                continue
            except ConcurrentUseError:
                pass  # the other thread is inside: now the batch
            try:
                model._core.forward_batch([idle, busy], one, ["last"] * 2, [None, None])
                batched = 1  # the other thread finished in between
            except ConcurrentUseError as e:
                seen.append(e)
            break
        t.join()
        assert busy.length == 200 + batched
        if seen:
            assert idle.length == 0  # refused before anything ran
            break
    assert seen and "another thread" in str(seen[0])


def test_forward_batch_and_feed_share_a_session_safely(model):
    """A session advanced by forward_batch in one thread and fed in another: the steps take turns."""
    shared, other = model.session(), model.session()
    errors = []

    def batch():
        try:
            for _ in range(20):
                model.forward_batch([other, shared], [[3], [5]])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def feed():
        try:
            for _ in range(20):
                shared.feed([5])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=batch), threading.Thread(target=feed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert shared.pos == 40 and shared.tokens == [5] * 40 and other.tokens == [3] * 20
    np.testing.assert_allclose(shared.feed([7]), model.session().feed([5] * 40 + [7]), rtol=1e-4, atol=1e-4)


def test_hooks_shared_by_two_threads_serialise(model):
    """One Hooks (a capture and a steering vector) used by two threads' sessions at once, and read by a
    third: every pass is recorded whole, with the intervention applied, exactly as run one at a time."""
    layer = model.config.n_layers - 1
    steer = np.linspace(-1, 1, model.config.hidden_size, dtype=np.float32)

    def hooks():
        return model.hooks().capture(f"blocks.{layer}.resid_post").add("blocks.0.resid_pre", steer)

    def alone(token):
        h, s = hooks(), model.session()
        logits = [s.feed([token], hooks=h) for _ in range(20)]
        return logits, h.cache[f"blocks.{layer}.resid_post"]

    expected = {token: alone(token) for token in (5, 9)}
    shared = hooks()
    sessions = {token: model.session() for token in (5, 9)}
    logits, errors, reads = {5: [], 9: []}, [], []
    finished = threading.Event()

    def work(token):
        try:
            for _ in range(20):
                logits[token].append(sessions[token].feed([token], hooks=shared))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def read():
        try:
            while not finished.is_set():
                reads.append(len(shared.cache[f"blocks.{layer}.resid_post"]) if len(shared.cache) else 0)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in (5, 9)]
    reader = threading.Thread(target=read)
    for t in workers + [reader]:
        t.start()
    for t in workers:
        t.join()
    finished.set()
    reader.join()
    assert not errors
    rows, positions = shared.cache[f"blocks.{layer}.resid_post"], shared.cache.positions(f"blocks.{layer}.resid_post")
    assert rows.shape[0] == 40 and sorted(positions.tolist()) == sorted(list(range(20)) * 2)
    assert reads and all(0 <= n <= 40 for n in reads)
    for token in (5, 9):
        want_logits, want_rows = expected[token]
        np.testing.assert_allclose(np.array(logits[token]), np.array(want_logits), rtol=1e-5, atol=1e-5)
        for pos in range(20):  # each thread's row at each position is among the shared records
            here = rows[positions == pos]
            assert min(np.abs(r - want_rows[pos]).max() for r in here) < 1e-5


def test_raw_core_hooks_used_by_two_threads_raise(model):
    """Below the Hooks lock, the core's hooks refuse a second thread (a read, another pass) during a pass."""
    capture = tokentrail.capture.POINTS["resid_post"].id
    seen = []
    for _ in range(50):
        hooks = _core.Hooks(model.config.n_layers)
        hooks.set(capture, 0, capture=True)
        done = threading.Event()

        def work():
            while True:  # the probing read below may hold the hooks for a moment
                try:
                    model._core.forward(_core.KVCache(model._core, 256), np.arange(200, dtype=np.int32) % 50,
                                        "none", hooks)
                    break
                except ConcurrentUseError:
                    continue
            done.set()

        t = threading.Thread(target=work)
        t.start()
        second = 0
        while not done.is_set():
            try:
                hooks.captured(capture, 0)
                continue
            except ConcurrentUseError as e:
                seen.append(e)  # the other thread is inside: now a pass of this one
            try:
                model._core.forward(_core.KVCache(model._core, 8), np.array([1], np.int32), "none", hooks)
                second = 1  # the other thread finished in between
            except ConcurrentUseError as e:
                seen.append(e)
            break
        t.join()
        records = hooks.captured(capture, 0)
        assert sum(len(positions) for _, positions in records) == 200 + second
        assert any(positions == list(range(200)) for _, positions in records)  # the pass's record is whole
        if seen:
            break
    assert seen and all("another thread" in str(e) for e in seen)
    with pytest.raises(ValueError, match="same hooks"):
        model._core.forward_batch([_core.KVCache(model._core, 8), _core.KVCache(model._core, 8)],
                                  [np.array([1], np.int32)] * 2, ["last"] * 2, [hooks, hooks])

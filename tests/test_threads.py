"""The core's thread pool: every threaded kernel gives the same bits on any thread count and agrees
with numpy at sizes large enough to be split; the pool works when several Python threads call it at
once and in a forked child; a model's logits do not depend on its thread count."""
from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import check_attention, random_blocks, require_stories
from tokentrail import _core

THREAD_COUNTS = (1, 2, 3, 5)


@pytest.fixture
def restore_threads():
    before = _core.get_threads()
    yield
    _core.set_threads(before)


def on_each_thread_count(fn):
    """fn() under every count of THREAD_COUNTS: the results, which must be bitwise equal."""
    results = []
    for t in THREAD_COUNTS:
        _core.set_threads(t)
        results.append(fn())
    def arrays(r):
        return r if isinstance(r, tuple) else (r,)

    for t, r in zip(THREAD_COUNTS[1:], results[1:]):
        for got, want in zip(arrays(r), arrays(results[0])):
            assert np.array_equal(got, want), f"{t} threads differ from 1"
    return results[0]


@pytest.mark.parametrize("n", [1, 4, _core.GEMM_MIN_ROWS + 5])
@pytest.mark.parametrize("dtype", ["f32", "f16", "q4_0", "q4_k", "q6_k"])
def test_threaded_matmul_same_bits_and_right(restore_threads, dtype, n):
    """Sizes past the threshold where products split over threads (rows x cols x n > 200000),
    with a row count that leaves a partial block of rows at the end."""
    from tokentrail.loading.quant import dequantize

    rows, cols = 1037, 512
    rng = np.random.default_rng(n)
    if dtype in ("f32", "f16"):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        stored = w.astype(np.float16) if dtype == "f16" else w
        exact = stored.astype(np.float64)
    else:
        stored = random_blocks(rng, dtype, rows, cols, scale=0.05)
        exact = dequantize(stored, dtype, (rows, cols)).astype(np.float64)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    got = on_each_thread_count(lambda: _core.matmul(stored, dtype, rows, cols, x))
    np.testing.assert_allclose(got, x @ exact.T, rtol=1e-5, atol=1e-4 * math.sqrt(cols))


def test_threaded_norms_activations_and_attention(restore_threads):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 700)).astype(np.float32)  # rows x width > 65536: split over threads
    w = rng.standard_normal(700).astype(np.float32)
    b = rng.standard_normal(700).astype(np.float32)
    xd = x.astype(np.float64)
    rms = on_each_thread_count(lambda: _core.rmsnorm(x, w, 1e-5))
    np.testing.assert_allclose(rms, xd / np.sqrt((xd ** 2).mean(1, keepdims=True) + 1e-5) * w, rtol=1e-5, atol=1e-6)
    ln = on_each_thread_count(lambda: _core.layernorm(x, w, b, 1e-5))
    centred = xd - xd.mean(1, keepdims=True)
    np.testing.assert_allclose(ln, centred / np.sqrt((centred ** 2).mean(1, keepdims=True) + 1e-5) * w + b,
                               rtol=1e-5, atol=1e-5)
    big = x.ravel()[:200_003]
    silu = on_each_thread_count(lambda: _core.silu(big))
    bd = big.astype(np.float64)
    np.testing.assert_allclose(silu, bd / (1 + np.exp(-bd)), atol=1e-6, rtol=1e-6)

    # queries x heads x keys x head_dim well past the size that runs on one thread
    n, heads, kv, hd, pos0 = 40, 4, 2, 32, 60
    q = rng.standard_normal((n, heads, hd)).astype(np.float32)
    k = rng.standard_normal((kv, pos0 + n, hd)).astype(np.float32)
    v = rng.standard_normal((kv, pos0 + n, hd)).astype(np.float32)
    z, pattern = on_each_thread_count(lambda: _core.attention(q, k, v, pos0, 1 / math.sqrt(hd)))
    check_attention(q, k, v, pos0, 1 / math.sqrt(hd), z, pattern)


@pytest.mark.parametrize("n,pos0,heads,kv,hd", [(300, 10, 6, 2, 16),  # query blocks of 128, 128 and 44
                                                (1, 700, 6, 2, 64),   # one query: a run of items per thread
                                                (1, 900, 9, 3, 64)])  # SmolLM2's heads: 3 per KV head, 2 + 1
def test_threaded_attention_orders(restore_threads, n, pos0, heads, kv, hd):
    # The threads take a prompt's items in blocks of queries, KV head by KV head, and a single query's
    # items in one run per thread; every query and head is computed once, the same on any thread count.
    rng = np.random.default_rng(n + pos0)
    q = rng.standard_normal((n, heads, hd)).astype(np.float32)
    k = rng.standard_normal((kv, pos0 + n, hd)).astype(np.float32)
    v = rng.standard_normal((kv, pos0 + n, hd)).astype(np.float32)
    z, pattern = on_each_thread_count(lambda: _core.attention(q, k, v, pos0, 1 / math.sqrt(hd)))
    check_attention(q, k, v, pos0, 1 / math.sqrt(hd), z, pattern)


def test_many_python_threads_calling_at_once(restore_threads):
    """Calls from several OS threads at the same time: each either gets the pool or runs alone; all
    finish, all right."""
    rng = np.random.default_rng(2)
    rows, cols = 900, 384
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    xs = [rng.standard_normal((3, cols)).astype(np.float32) for _ in range(6)]
    want = [x.astype(np.float64) @ w.astype(np.float64).T for x in xs]
    errors = []

    def work(i):
        try:
            _core.set_threads(2 + i % 2)
            for _ in range(40):
                got = _core.matmul(w, "f32", rows, cols, xs[i])
                np.testing.assert_allclose(got, want[i], rtol=1e-5, atol=1e-3)
        except Exception as e:  # reported below, from the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    assert not errors, errors[0]


def _product_in_child(queue):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((800, 300)).astype(np.float32)
    x = rng.standard_normal((2, 300)).astype(np.float32)
    _core.set_threads(2)
    got = _core.matmul(w, "f32", 800, 300, x)
    queue.put(float(np.abs(got - x.astype(np.float64) @ w.astype(np.float64).T).max()))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_forked_child_runs_threaded_products(restore_threads):
    """The parent's workers do not exist in a forked child: the child starts its own and finishes."""
    _core.set_threads(2)
    w = np.ones((800, 300), np.float32)
    _core.matmul(w, "f32", 800, 300, np.ones((2, 300), np.float32))  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_product_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked child did not finish"
    assert queue.get(timeout=5) < 1e-3


def test_model_logits_do_not_depend_on_thread_count():
    """Prefill long enough for the packed GEMM and threaded attention, then decode steps: the logits
    are bitwise equal for every thread count."""
    import tokentrail

    model = tokentrail.load(require_stories() / "stories260K.bin", threads=1)
    prompt = [1] + [(7 * i) % 500 + 3 for i in range(_core.GEMM_MIN_ROWS + 30)]
    runs = []
    for t in THREAD_COUNTS:
        model.threads = t
        s = model.session()
        steps = [s.feed(prompt, all_logits=True)]
        steps.append(s.feed([int(np.argmax(steps[0][-1]))]))
        for _ in range(3):
            steps.append(s.feed([int(np.argmax(steps[-1]))]))
        runs.append(steps)
    for t, steps in zip(THREAD_COUNTS[1:], runs[1:]):
        for got, want in zip(steps, runs[0]):
            assert np.array_equal(got, want), f"{t} threads differ from 1"


@pytest.mark.parametrize("split", ["guided", "even"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,grain", [(0, 1), (1, 1), (2, 1), (7, 1), (36, 1), (100, 4), (1000, 1), (1000, 64), (65, 64)])
def test_pool_runs_every_item_once(split, threads, n, grain):
    chunks = _core.pool_chunks(n, grain, split, threads, work_us=0.5)
    spans = sorted((b, e) for b, e, _ in chunks)
    assert sum(e - b for b, e in spans) == n
    at = 0
    for b, e in spans:  # the chunks tile [0, n): none lost, none run twice
        assert b == at and e > b
        assert e - b >= grain or e == n
        at = e
    assert at == n
    if n == 0:
        assert chunks == []
    if threads == 1 or n <= grain:
        assert [(b, e) for b, e, _ in chunks] == ([(0, n)] if n else [])


@pytest.mark.parametrize("n", [36, 256, 1000])
def test_pool_guided_caller_streams_half_and_the_worker_the_rest(n):
    # On 2 threads the first guided claim takes half of the items when the caller makes it and a
    # quarter when the worker does. While the caller runs its half (long enough here for the
    # worker to wake), the worker's claims follow one another from the middle.
    for _ in range(20):
        for _ in range(3):  # short loops first, so that the worker is awake and on its own core
            _core.pool_chunks(64, 1, "even", 2, work_us=1.0)
        chunks = _core.pool_chunks(n, 1, "guided", 2, work_us=5000.0 / n)
        if any(not mine for _, _, mine in chunks):
            break
    else:
        pytest.skip("the worker never took part (the pool backed off to one thread on a busy machine)")
    first = next((b, e, mine) for b, e, mine in chunks if b == 0)
    assert first[1] == (n // 2 if first[2] else n // 4)
    worker = sorted((b, e) for b, e, mine in chunks if not mine)
    if first[2] and worker[0][0] == n // 2:  # the worker came while the caller ran its half
        assert worker[0][1] - worker[0][0] == n // 8
        # Up to the caller's next claim (it may come early where the scheduler set the worker
        # aside for a while), the worker's claims follow one another.
        caller_next = min((b for b, _, mine in chunks if mine and b != 0), default=n)
        before = [(b, e) for b, e in worker if b < caller_next]
        assert all(b == e0 for (_, e0), (b, _) in zip(before, before[1:3]))


needs_proc_stat = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")


@needs_proc_stat
def test_other_load_sees_another_process_on_our_cpus():
    # The pool's back-off stays on while other processes hold the CPUs its threads would need: the
    # reading it relies on must see a process spinning on one of our CPUs as one busy CPU.
    cpus, _ = _core.other_load(0.1)
    assert 1 <= cpus <= len(os.sched_getaffinity(0))  # (CPUs offline have no line in /proc/stat)
    cpu = min(os.sched_getaffinity(0))
    spin = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # started and spinning
        _, busy = _core.other_load(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.7, f"a spinning process showed as {busy:.2f} busy CPUs"


@needs_proc_stat
def test_other_load_leaves_out_our_own_threads(restore_threads):
    # This process's own threads (its pool at work) are not other processes: counting them would
    # keep the pool backed off by its own work.
    _, quiet = _core.other_load(0.3)
    if quiet > 0.3:
        pytest.skip(f"other processes already keep {quiet:.2f} CPUs busy")
    threads = min(2, len(os.sched_getaffinity(0)))
    work = threading.Thread(target=_core.pool_chunks, args=(800, 1, "even", threads), kwargs={"work_us": 1000.0})
    work.start()  # 0.8 s of busy work spread over our threads
    try:
        time.sleep(0.05)
        _, busy = _core.other_load(0.3)
    finally:
        work.join()
    assert busy < quiet + 0.5, f"our own threads showed as {busy:.2f} busy CPUs of other processes"


def test_other_load_checks_its_argument():
    for seconds in (0.0, 0.01, 11.0, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            _core.other_load(seconds)


def test_pool_chunks_checks_its_arguments():
    with pytest.raises(ValueError, match="split"):
        _core.pool_chunks(10, 1, "sideways", 2)
    with pytest.raises(ValueError, match="grain"):
        _core.pool_chunks(10, 0, "even", 2)


@needs_proc_stat
def test_pool_backs_off_by_trial_next_to_busy_cpus_and_returns(restore_threads):
    # With every CPU of ours held by another process, the pool's callers wait for workers the
    # scheduler set aside: it must back off, first timing sleepy workers and then fewer threads, and
    # keep the faster of the two; once the CPUs are free again it must go back to every thread.
    cpus = sorted(os.sched_getaffinity(0))
    if not 2 <= len(cpus) <= 8:
        pytest.skip("needs 2-8 CPUs to hold")
    _core.set_threads(2)

    def jobs_until(done, seconds):
        seen = []
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            _core.pool_chunks(64, 1, "guided", 2, work_us=20.0)
            state = _core.pool_backoff()
            if not seen or seen[-1]["state"] != state["state"]:
                seen.append(state)
            if done(seen):
                break
        return seen

    spinners = [subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{c}}})\nwhile True: pass"])
                for c in cpus]
    try:
        time.sleep(0.3)
        settled = ("sleepy workers", "fewer threads")
        seen = jobs_until(lambda s: any(x["state"].startswith("trial") for x in s) and s[-1]["state"] in settled, 6.0)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    states = [x["state"] for x in seen]
    assert "trial: sleepy workers" in states and "trial: fewer threads" in states, states
    assert states.index("trial: sleepy workers") < states.index("trial: fewer threads"), states
    last = seen[-1]
    assert last["state"] in settled, states
    assert last["sleepy_us_per_job"] > 0 and last["fewer_us_per_job"] > 0, last
    # The faster way is kept (ties go to every thread, sleepy).
    faster = "fewer threads" if last["fewer_us_per_job"] < last["sleepy_us_per_job"] else "sleepy workers"
    assert last["state"] == faster, last

    after = jobs_until(lambda s: s[-1]["state"] == "none", 6.0)
    assert after[-1]["state"] == "none", [x["state"] for x in after]

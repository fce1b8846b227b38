// The core's own thread pool: every parallel loop of the kernels and the forward pass runs here.
//
// Why not OpenMP: its regions end in a barrier that waits for every thread, and its idle
// threads spin for long stretches. On a machine where another process holds a core, a
// thread descheduled inside a region holds everyone up, and spinning threads take time
// from whoever else runs (numpy's BLAS threads, other processes). Here:
//  - work is split into chunks claimed from one atomic counter; the calling thread
//    takes part, and a thread that arrives late (or not at all) claims nothing, so only a
//    chunk already in progress is ever waited for;
//  - idle workers spin briefly (the next region of a forward pass follows within
//    microseconds), then sleep on a futex, so an idle pool burns no core;
//  - the caller, once no chunk is left to claim, also spins briefly and then sleeps, which
//    frees its core for the scheduler to run a straggler there;
//  - when the callers keep waiting for threads the scheduler set aside, the pool backs off for
//    a while: its workers sleep between jobs instead of polling (so that each is woken for its
//    share and runs at once, instead of sharing a core in whole time slices), or it asks fewer
//    threads, whichever a short trial of both timed faster; it goes back to polling with every
//    thread only once /proc/stat shows that other processes have left it the CPUs for them.
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace tokentrail {

// Thread count for every parallel loop of core calls made from the calling OS thread
// (each OS thread keeps its own, so a model's count holds whichever thread runs it).
void set_threads(int n);
int get_threads();
// The process default: OMP_NUM_THREADS or TOKENTRAIL_THREADS when set, else the CPUs this
// process may run on.
int default_threads();

// The CPUs this process may run on, and how many of them other processes kept busy on average
// over `seconds` (from /proc/stat, less this process's own CPU time); cpus = 0 where that cannot
// be read. The pool's back-off asks the same question.
struct OtherLoad {
  int cpus = 0;
  double busy_cpus = 0.0;
};
OtherLoad measure_other_load(double seconds);

// What the pool is doing about other processes that hold its CPUs: state "none", "sleepy workers",
// "fewer threads", or one of the two halves of the trial that chooses between those ("trial: sleepy
// workers", "trial: fewer threads"); the microseconds per job each half of the last trial took, on the
// kinds of job both halves ran (0 for fewer threads when the trial ended after its first half); and
// how many trials the pool has begun.
struct PoolBackoff {
  std::string state;
  double sleepy_us_per_job = 0.0, fewer_us_per_job = 0.0;
  int64_t trials = 0;
};
PoolBackoff pool_backoff();

// How a range is cut into chunks.
enum class Split {
  // Equal chunks of at least `grain` items, several per thread, handed out in turn.
  Even,
  // Shrinking chunks: each claim takes a share of what is left (never below `grain`): the
  // caller 1/threads of it, a worker half that. The caller starts with one long contiguous run,
  // a worker's claims follow one another while the caller is busy, and the small chunks at the
  // end even out the finish. For streaming products, where a long run keeps one prefetched stream.
  Guided,
};

namespace detail {
using ChunkFn = void (*)(void* ctx, int64_t begin, int64_t end);
void run_parallel(int64_t n, int64_t grain, Split split, int threads, ChunkFn fn, void* ctx);
}  // namespace detail

// Calls body(begin, end) over chunks covering [0, n) exactly once, on up to `threads`
// threads (the caller is one of them), and returns when every chunk is done. Runs inline
// on the caller when threads <= 1, n is one chunk, or the caller is already inside a
// parallel loop (nested loops run serially) or another OS thread holds the pool.
template <class F>
void parallel_for(int64_t n, int64_t grain, Split split, int threads, F&& body) {
  if (n <= 0) return;
  auto call = [](void* ctx, int64_t begin, int64_t end) { (*static_cast<std::remove_reference_t<F>*>(ctx))(begin, end); };
  detail::run_parallel(n, grain < 1 ? 1 : grain, split, threads, call, const_cast<void*>(static_cast<const void*>(&body)));
}

// The common case: the calling thread's count, or one thread when `parallel` is false.
template <class F>
void parallel_for_if(bool parallel, int64_t n, int64_t grain, Split split, F&& body) {
  parallel_for(n, grain, split, parallel ? get_threads() : 1, std::forward<F>(body));
}

}  // namespace tokentrail

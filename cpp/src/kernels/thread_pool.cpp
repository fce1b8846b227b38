// The thread pool behind parallel_for (thread_pool.h says why it is not OpenMP).
//
// One job at a time. The job's claim counter and its generation share one 64-bit word
// (`ticket_`), so a claim made with a stale generation fails instead of taking items of
// the next job; a job is complete when the items finished (`done_`) reach its size, and
// only then may the caller write the next one.
#include "tokentrail/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <mutex>
#include <string>
#include <stdexcept>
#include <thread>

#ifdef __linux__
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tokentrail {
namespace {

// How long an idle worker polls for the next job before it sleeps: the regions of one
// forward pass follow each other within microseconds, the gap between tokens is longer.
// (While the pool backs off, workers sleep at once: see account().)
constexpr auto WORKER_SPIN = std::chrono::microseconds(200);
// How long the caller polls for a chunk still running on another thread before it sleeps
// (which lets the scheduler run that thread on the caller's core, if it was descheduled).
constexpr auto CALLER_SPIN = std::chrono::microseconds(50);
// Callers that, over a window of WINDOW, waited for chunks in progress elsewhere longer than
// half the time their own chunks took were held up by threads the scheduler had set aside:
// the pool then backs off for a while and tries again after (MIN_BACKOFF at first, twice the
// last backoff when the contention is back in the first window after it, up to MAX_BACKOFF).
// A single wait of LONG_STALL, over half the job, is a whole time slice of the scheduler given
// to another process that keeps a core busy: the pool backs off for MAX_BACKOFF at once. Short,
// scattered waits (a server's own HTTP threads taking a core for a millisecond now and then)
// cost less than a backoff would and leave every thread at work. Measured on 2 cores: next to
// a spinning process stalls last 3-4 ms; under a 16-client server's HTTP threads, 1-2 ms.
//
// Backing off is one of two things. Sleepy workers: every thread stays, but workers sleep as soon
// as they run out of chunks instead of polling for the next job. A worker that keeps polling is
// always runnable, shares its core with the other process in whole time slices and is set aside
// in the middle of a chunk, while one that sleeps between jobs is woken for each and, having used
// little of its share, runs at once and finishes its chunks. Or fewer threads (half, the workers
// still sleepy). Which is faster depends on the jobs: a wake per job costs the caller a system call
// and the worker a few microseconds before it starts, which short jobs do not repay (SmolLM2-shaped
// decode next to a spinning process, 2 cores: sleepy workers 1.06-1.12x one thread in one run,
// 0.86-0.89x for Q4_0 in another). So a backoff begins with a trial: TRIAL of sleepy workers,
// timing every job; then, if /proc/stat shows other processes on the CPUs the threads need,
// TRIAL of fewer threads, and the pool keeps the one whose jobs took less time, compared kind of
// job by kind of job (time_trial); if not, the wait was a passing burst: back to every thread. It
// tries again when a backoff is extended RETRIAL or more after the last trial.
constexpr auto WINDOW = std::chrono::milliseconds(20);
constexpr auto STALL = std::chrono::microseconds(250);  // less waiting in a window is never a reason
constexpr auto LONG_STALL = std::chrono::microseconds(2500);
constexpr auto MIN_BACKOFF = std::chrono::milliseconds(5);
constexpr auto MAX_BACKOFF = std::chrono::milliseconds(100);
constexpr auto TRIAL = std::chrono::milliseconds(60);
constexpr auto RETRIAL = std::chrono::seconds(1);
// A guided claim takes this fraction of the remaining items per thread: the caller's 1/threads,
// the workers' half that. The caller, already running, takes one long stretch (on 2 threads,
// half the product) and a worker streams the rest in shrinking claims that follow one another
// in memory: fewer restarted weight streams per product than equal shares of 1/(2 threads)
// (measured on 2 cores, SmolLM2-shaped decode: Q8_0 1.19x, Q4_0 1.12x, f16 and f32 1.03x), while a
// worker set aside by the scheduler holds up at most a quarter, as before.
constexpr int GUIDED_DIVISOR_CALLER = 1, GUIDED_DIVISOR_WORKER = 2;
// Even splits: chunks per thread, so that a slow thread leaves its share to the others.
constexpr int EVEN_CHUNKS_PER_THREAD = 4;
constexpr uint32_t CLOSED = 0xFFFFFFFFu;  // a ticket's item index meaning "nothing to claim"

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Sleep while *word == expected (returns early on a wake or a change); wake sleepers on it.
void wait_on(std::atomic<uint32_t>& word, uint32_t expected) {
#ifdef __linux__
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
#else
  if (word.load() == expected) std::this_thread::sleep_for(std::chrono::microseconds(50));
#endif
}

void wake_on(std::atomic<uint32_t>& word, int count) {
#ifdef __linux__
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
#else
  (void)word;
  (void)count;
#endif
}

// Polls `ready` for `limit`, checking the clock only every 64 polls.
template <class Ready>
bool spin_until(Ready ready, std::chrono::microseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (int i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() >= deadline) return ready();
  }
}

// What the CPUs this process may run on did: their busy time (from /proc/stat, in seconds) and
// this process's own CPU time, at one moment. Between two readings, the difference is the CPU
// time that other processes took on our CPUs. It lets a backed-off pool see whether the process
// that held a core is still running, instead of trying every thread again to find out.
struct CpuUse {
  bool valid = false;
  int cpus = 0;          // CPUs in this process's affinity set
  double busy = 0.0;     // their busy time, all processes (user, system, interrupts, steal)
  double own = 0.0;      // this process's CPU time, all threads
  std::chrono::steady_clock::time_point at;
};

CpuUse read_cpu_use() {
  CpuUse use;
#ifdef __linux__
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return use;
  static const double tick = [] {
    const long hz = sysconf(_SC_CLK_TCK);
    return hz > 0 ? 1.0 / double(hz) : 0.01;
  }();
  std::ifstream stat("/proc/stat");
  std::string line;
  // "cpuN user nice system idle iowait irq softirq steal ..." (ticks); the per-CPU lines come
  // first, after the total's "cpu " line: stop at the first line that is neither.
  while (std::getline(stat, line) && line.compare(0, 3, "cpu") == 0) {
    if (line.size() < 4 || line[3] == ' ') continue;
    char* rest = nullptr;
    const long cpu = std::strtol(line.c_str() + 3, &rest, 10);
    if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(int(cpu), &allowed)) continue;
    unsigned long long field[8] = {};
    for (auto& f : field) f = std::strtoull(rest, &rest, 10);
    const unsigned long long busy = field[0] + field[1] + field[2] + field[5] + field[6] + field[7];
    use.busy += double(busy) * tick;
    ++use.cpus;
  }
  timespec own{};
  if (use.cpus == 0 || clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &own) != 0) return use;
  use.own = double(own.tv_sec) + 1e-9 * double(own.tv_nsec);
  use.at = std::chrono::steady_clock::now();
  use.valid = true;
#endif
  return use;
}

// CPUs (on average) that other processes kept busy from `before` to `after`; negative when the
// two readings cannot tell (unreadable, the affinity changed, or under `min_seconds` apart).
double others_busy(const CpuUse& before, const CpuUse& after, double min_seconds = 0.0) {
  const double seconds = std::chrono::duration<double>(after.at - before.at).count();
  if (!before.valid || !after.valid || before.cpus != after.cpus || seconds <= 0.0 || seconds < min_seconds)
    return -1.0;
  return std::max(0.0, (after.busy - before.busy) - (after.own - before.own)) / seconds;
}

// Whether, from `before` to `after`, other processes kept so many of our CPUs busy that fewer
// than `threads` were left to this process (with half a CPU to spare for rounding: /proc/stat
// counts in ticks of 10 ms, so readings under 50 ms apart cannot tell).
constexpr double CPU_USE_MIN_SECONDS = 0.05;
bool cpus_taken(const CpuUse& before, const CpuUse& after, int threads) {
  const double others = others_busy(before, after, CPU_USE_MIN_SECONDS);
  return others >= 0.0 && double(after.cpus) - others < double(threads) - 0.5;
}

// Whether the two readings are valid but too close together for /proc/stat to tell.
bool too_soon_to_tell(const CpuUse& before, const CpuUse& after) {
  return before.valid && after.valid && before.cpus == after.cpus &&
         std::chrono::duration<double>(after.at - before.at).count() < CPU_USE_MIN_SECONDS;
}

thread_local bool tls_in_parallel = false;  // inside a chunk: nested loops run inline
thread_local int tls_threads = 0;           // 0: the process default

class Pool {
 public:
  void run(int64_t n, int64_t grain, Split split, int threads, detail::ChunkFn fn, void* ctx) {
    std::unique_lock<std::mutex> hold(busy_, std::try_to_lock);
    if (!hold.owns_lock()) return fn(ctx, 0, n);  // another OS thread's job is running: no waiting for it
    const Clock::time_point start = Clock::now();
    if (!trial_ && backing_off() && start >= backoff_until_) {
      // Other processes still hold the CPUs the other threads would need: back off again
      // without trying them (a try costs a hold-up of a whole time slice).
      const CpuUse now = read_cpu_use();
      if (too_soon_to_tell(backoff_use_, now)) {  // keep backing off; the next look spans a longer time
        backoff_until_ = start + backoff_length_;
      } else if (cpus_taken(backoff_use_, now, threads)) {
        if (start - last_trial_ >= RETRIAL) {
          begin_trial(start, threads);
        } else {
          backoff_until_ = start + backoff_length_;
          backoff_use_ = now;
        }
      } else {
        stop_backing_off(start);
      }
    }
    if (backoff_threads_) threads = std::min(threads, backoff_threads_);
    if (threads <= 1) {  // backing off: the caller alone, still marked as inside (the pool is held)
      tls_in_parallel = true;
      try {
        fn(ctx, 0, n);
      } catch (...) {
        tls_in_parallel = false;
        throw;
      }
      tls_in_parallel = false;
      time_trial(start, Clock::now(), fn, n);
      return;
    }
    grow(threads - 1);
    const uint32_t gen = ++generation_;
    // Close the ticket under the new generation before the fields change: a worker still
    // holding the previous ticket can no longer claim with it.
    ticket_.store(uint64_t(gen) << 32 | CLOSED);
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    grain_.store(grain, std::memory_order_relaxed);
    split_.store(split, std::memory_order_relaxed);
    threads_.store(threads, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    ticket_.store(uint64_t(gen) << 32, std::memory_order_release);
    job_word_.store(gen);
    if (sleepers_.load() > 0) wake_on(job_word_, INT_MAX);

    tls_in_parallel = true;
    work(gen, GUIDED_DIVISOR_CALLER);
    tls_in_parallel = false;
    const uint32_t total = uint32_t(n);
    const Clock::time_point own_done = Clock::now();
    if (!spin_until([&] { return done_.load(std::memory_order_acquire) == total; }, CALLER_SPIN)) {
      caller_sleeping_.store(1);
      for (uint32_t d; (d = done_.load()) != total;) wait_on(done_, d);
      caller_sleeping_.store(0);
    }
    account(start, own_done, Clock::now(), threads, fn, n);
    if (error_) {
      std::exception_ptr e = nullptr;
      std::swap(e, error_);
      std::rethrow_exception(e);
    }
  }

  // What the pool is doing about other processes, read between jobs (the caller's lock held).
  PoolBackoff backoff() {
    std::lock_guard<std::mutex> hold(busy_);
    PoolBackoff b;
    b.state = trial_ == 1              ? "trial: sleepy workers"
              : trial_ == 2            ? "trial: fewer threads"
              : backoff_threads_ > 0   ? "fewer threads"
              : sleepy_workers_.load() ? "sleepy workers"
                                       : "none";
    b.sleepy_us_per_job = 1e6 * sleepy_per_job_;
    b.fewer_us_per_job = 1e6 * fewer_per_job_;
    b.trials = trials_;
    return b;
  }

 private:
  using Clock = std::chrono::steady_clock;

  // Adds one job's own work and waiting to the window; at the window's end, backs off if the
  // waiting outweighed the gain of the other threads.
  void account(Clock::time_point start, Clock::time_point own_done, Clock::time_point finish, int threads,
               detail::ChunkFn fn, int64_t n) {
    const Clock::duration own = own_done - start, waited = finish - own_done;
    time_trial(start, finish, fn, n);
    if (backing_off()) return;  // the trial chose how; the next look at the CPUs decides how long
    window_own_ += own;
    window_waited_ += waited;
    // One wait as long as a scheduler's time slice: a thread was set aside, no need to wait for the window.
    const bool set_aside = waited > LONG_STALL && waited > own / 2;
    if (!set_aside && finish - window_start_ < WINDOW) return;
    if (set_aside || (window_waited_ > STALL && window_waited_ > window_own_ / 2)) {
      // Back within the first window after the last backoff ended: the contention persists.
      const bool again = backoff_length_.count() > 0 && finish - backoff_until_ < WINDOW + backoff_length_;
      backoff_length_ = set_aside ? std::chrono::microseconds(MAX_BACKOFF)
                        : again   ? std::min<std::chrono::microseconds>(2 * backoff_length_, MAX_BACKOFF)
                                  : std::chrono::microseconds(MIN_BACKOFF);
      begin_trial(finish, threads);
    }
    new_window(finish);
  }

  // A new window of accounting from `now`.
  void new_window(Clock::time_point now) {
    window_start_ = now;
    window_own_ = window_waited_ = Clock::duration::zero();
  }

  // Back to every thread, polling: a new window.
  void stop_backing_off(Clock::time_point now) {
    backoff_threads_ = 0;
    set_sleepy_workers(false);
    new_window(now);
  }

  // Backs off with sleepy workers first, timing jobs for TRIAL, then with fewer threads; see time_trial.
  void begin_trial(Clock::time_point now, int threads) {
    trial_ = 1;
    ++trials_;
    trial_threads_ = threads;
    trial_use_ = read_cpu_use();
    backoff_threads_ = 0;
    set_sleepy_workers(true);
    trial_start_ = now;
    trial_time_ = Clock::duration::zero();
    trial_jobs_ = 0;
    for (JobKind& k : kinds_) k = JobKind{};
  }

  // The kind of a job (its loop and its item count), so that the trial's halves are compared on the
  // same work: a half's jobs are a different mix of short and long ones (60 ms is a few tokens of
  // decode, and a token's last job, the unembedding, is its longest), which alone moved per-job
  // means by 10 % or more.
  struct JobKind {
    detail::ChunkFn fn = nullptr;
    int64_t n = 0;
    double seconds[2] = {0.0, 0.0};
    int64_t count[2] = {0, 0};
  };
  static constexpr int TRIAL_KINDS = 64;

  void add_to_kind(int half, detail::ChunkFn fn, int64_t n, double seconds) {
    const size_t h = (reinterpret_cast<uintptr_t>(fn) >> 4) * 31u + size_t(n) * 0x9E3779B97F4A7C15ull;
    for (int probe = 0; probe < TRIAL_KINDS; ++probe) {
      JobKind& k = kinds_[(h + size_t(probe)) % TRIAL_KINDS];
      if (k.fn == nullptr) {
        k.fn = fn;
        k.n = n;
      }
      if (k.fn == fn && k.n == n) {
        k.seconds[half] += seconds;
        ++k.count[half];
        return;
      }
    }  // a full table leaves the job out
  }

  // Adds a job to the running trial. At the end of the first half: if /proc/stat shows that other
  // processes left this one its CPUs (the waiting was a passing burst, or the hypervisor's), the
  // backoff ends there; else on to fewer threads. At the end of the second, the faster of the two is
  // kept for backoff_length_.
  void time_trial(Clock::time_point start, Clock::time_point finish, detail::ChunkFn fn, int64_t n) {
    if (!trial_) return;
    trial_time_ += finish - start;
    ++trial_jobs_;
    add_to_kind(trial_ - 1, fn, n, std::chrono::duration<double>(finish - start).count());
    if (finish - trial_start_ < TRIAL) return;
    const double per_job = std::chrono::duration<double>(trial_time_).count() / double(trial_jobs_);
    trial_start_ = finish;
    trial_time_ = Clock::duration::zero();
    trial_jobs_ = 0;
    if (trial_ == 1) {
      sleepy_per_job_ = per_job;
      fewer_per_job_ = 0.0;
      const CpuUse now = read_cpu_use();
      if (others_busy(trial_use_, now, CPU_USE_MIN_SECONDS) >= 0.0 && !cpus_taken(trial_use_, now, trial_threads_)) {
        trial_ = 0;
        stop_backing_off(finish);
        return;
      }
      trial_ = 2;
      backoff_threads_ = std::max(1, trial_threads_ / 2);
      return;
    }
    // Both ways on the kinds of job both halves ran, each kind weighted by how often it ran.
    double sleepy = 0.0, fewer = 0.0, weight = 0.0;
    for (const JobKind& k : kinds_)
      if (k.count[0] > 0 && k.count[1] > 0) {
        const double w = double(k.count[0] + k.count[1]);
        sleepy += w * k.seconds[0] / double(k.count[0]);
        fewer += w * k.seconds[1] / double(k.count[1]);
        weight += w;
      }
    if (weight > 0.0) {
      sleepy_per_job_ = sleepy / weight;
      fewer_per_job_ = fewer / weight;
    } else {  // no kind of job in both halves: their plain means
      fewer_per_job_ = per_job;
    }
    if (fewer_per_job_ >= sleepy_per_job_) backoff_threads_ = 0;  // sleepy workers were as fast: every thread
    trial_ = 0;
    last_trial_ = finish;
    backoff_until_ = finish + backoff_length_;
    backoff_use_ = read_cpu_use();
  }

  // Claims and runs chunks of generation `gen` until none is left.
  void work(uint32_t gen, int guided_divisor) {
    int64_t begin, end;
    while (claim(gen, guided_divisor, begin, end)) {
      const uint32_t total = uint32_t(n_.load(std::memory_order_relaxed));  // read while the job is still open
      try {
        fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), begin, end);
      } catch (...) {  // kept for the caller to rethrow; the chunk still counts as done
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      // Sequentially consistent, with the caller's caller_sleeping_ store and done_ load: one of
      // the two sides always sees the other, so a sleeping caller is always woken.
      const uint32_t d = done_.fetch_add(uint32_t(end - begin)) + uint32_t(end - begin);
      if (d == total && caller_sleeping_.load()) wake_on(done_, 1);
    }
  }

  bool claim(uint32_t gen, int guided_divisor, int64_t& begin, int64_t& end) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      if (uint32_t(t >> 32) != gen) return false;
      const int64_t next = int64_t(uint32_t(t)), n = n_.load(std::memory_order_relaxed);
      if (uint32_t(t) == CLOSED || next >= n) return false;
      const int64_t grain = grain_.load(std::memory_order_relaxed);
      const int threads = threads_.load(std::memory_order_relaxed);
      int64_t size;
      if (split_.load(std::memory_order_relaxed) == Split::Guided)
        size = std::max(grain, (n - next) / (int64_t(threads) * guided_divisor));
      else
        size = std::max(grain, (n + int64_t(threads) * EVEN_CHUNKS_PER_THREAD - 1) /
                                   (int64_t(threads) * EVEN_CHUNKS_PER_THREAD));
      const int64_t stop = std::min(n, next + size);
      if (ticket_.compare_exchange_weak(t, uint64_t(gen) << 32 | uint64_t(stop), std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        begin = next;
        end = stop;
        return true;
      }
    }
  }

  bool backing_off() const { return backoff_threads_ > 0 || sleepy_workers_.load(std::memory_order_relaxed); }

  void set_sleepy_workers(bool sleepy) { sleepy_workers_.store(sleepy, std::memory_order_relaxed); }

  void worker_main(int index) {
    uint32_t seen = job_word_.load();
    for (;;) {
      const auto spin = sleepy_workers_.load(std::memory_order_relaxed) ? std::chrono::microseconds(0) : WORKER_SPIN;
      if (!spin_until([&] { return job_word_.load(std::memory_order_acquire) != seen; }, spin)) {
        sleepers_.fetch_add(1);
        while (job_word_.load() == seen) wait_on(job_word_, seen);
        sleepers_.fetch_sub(1);
      }
      seen = job_word_.load(std::memory_order_acquire);
      if (index + 1 >= threads_.load(std::memory_order_relaxed)) continue;  // not asked to help with this one
      tls_in_parallel = true;
      work(seen, GUIDED_DIVISOR_WORKER);
      tls_in_parallel = false;
    }
  }

  // Workers start on first need and live as long as the process (they sleep when idle).
  void grow(int workers) {
#ifdef __linux__
    // Workers block every signal (a new thread inherits the creator's mask), so that Ctrl-C and
    // the like reach the Python main thread, which alone runs the handlers, and interrupt
    // whatever it is blocked in (a read of stdin) instead of landing on a sleeping worker.
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &previous);
#endif
    while (started_ < workers) {
      const int index = started_++;
      std::thread([this, index] { worker_main(index); }).detach();
    }
#ifdef __linux__
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
#endif
  }

  std::mutex error_mutex_;
  std::exception_ptr error_ = nullptr;  // the first exception a chunk of the running job threw
  std::mutex busy_;  // held by the caller of the running job
  int backoff_threads_ = 0;  // > 0: at most this many threads until backoff_until_
  std::atomic<bool> sleepy_workers_{false};  // workers sleep between jobs (no polling) until backoff_until_
  std::chrono::steady_clock::time_point backoff_until_;
  std::chrono::microseconds backoff_length_{0};  // the last backoff's (0: none yet)
  CpuUse backoff_use_;  // the CPUs' use when the backoff began (or was last extended)
  int trial_ = 0;        // 0: none running; 1: timing sleepy workers; 2: timing fewer threads
  int trial_threads_ = 1;  // the threads asked for when the trial began
  Clock::time_point trial_start_, last_trial_;
  Clock::duration trial_time_{};  // the jobs of the trial's current half
  CpuUse trial_use_;              // the CPUs' use when the trial began
  int64_t trial_jobs_ = 0;
  int64_t trials_ = 0;  // trials begun since the pool started
  double sleepy_per_job_ = 0.0, fewer_per_job_ = 0.0;  // seconds per job in each half of the last trial
  JobKind kinds_[TRIAL_KINDS];  // the running trial's jobs by kind
  Clock::time_point window_start_;
  Clock::duration window_own_{}, window_waited_{};  // the callers' own work and waiting in the window
  uint32_t generation_ = 0;
  int started_ = 0;
  std::atomic<uint64_t> ticket_{CLOSED};  // generation << 32 | next item to claim
  std::atomic<uint32_t> done_{0};         // items finished in the current job
  std::atomic<uint32_t> job_word_{0};     // the latest generation: workers sleep on it
  std::atomic<uint32_t> caller_sleeping_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<detail::ChunkFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> n_{0}, grain_{1};
  std::atomic<Split> split_{Split::Even};
  std::atomic<int> threads_{1};
};

Pool* g_pool = nullptr;
std::once_flag g_pool_once;

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool();  // never destroyed: workers may still be asleep in it at exit
#ifdef __linux__
    // A forked child has none of the parent's workers: it starts a pool of its own.
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool(); });
#endif
  });
  return *g_pool;
}

int env_threads(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return 0;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  return (end && *end == '\0' && n >= 1 && n <= 1024) ? int(n) : 0;  // a malformed value is ignored
}

}  // namespace

int default_threads() {
  static const int count = [] {
    for (const char* name : {"TOKENTRAIL_THREADS", "OMP_NUM_THREADS"})
      if (const int n = env_threads(name)) return n;
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return int(CPU_COUNT(&set));
#endif
    return int(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return count;
}

OtherLoad measure_other_load(double seconds) {
  const CpuUse before = read_cpu_use();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  const CpuUse after = read_cpu_use();
  OtherLoad load;
  const double others = others_busy(before, after);
  if (others >= 0.0) load = OtherLoad{after.cpus, others};
  return load;
}

PoolBackoff pool_backoff() { return pool().backoff(); }

void set_threads(int n) {
  if (n < 1) throw std::invalid_argument("threads must be at least 1");
  tls_threads = n;
}

int get_threads() { return tls_threads > 0 ? tls_threads : default_threads(); }

namespace detail {

void run_parallel(int64_t n, int64_t grain, Split split, int threads, ChunkFn fn, void* ctx) {
  if (threads <= 1 || n <= grain || tls_in_parallel || n >= int64_t(CLOSED >> 1)) return fn(ctx, 0, n);
  pool().run(n, grain, split, threads, fn, ctx);
}

}  // namespace detail
}  // namespace tokentrail

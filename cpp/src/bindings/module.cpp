// tokentrail._core: thin bindings. Arrays come in as views (never copied),
// the GIL is released while the core computes, and every size is checked here
// so that a bad weight raises a Python error instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <memory>
#include <mutex>
#include <optional>
#include <new>
#include <set>
#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif
#include <string>
#include <thread>
#include <tuple>

#include "tokentrail/kernels.h"
#include "tokentrail/model.h"
#include "tokentrail/sampler.h"
#include "tokentrail/thread_pool.h"

namespace py = pybind11;
using namespace tokentrail;

namespace {

// Copies of weights are aligned to 2 MiB, the size of a transparent huge page: read once per
// token, hundreds of MB of them would otherwise walk the page tables every 4 KiB (measured: a
// 30 MB matrix streamed at a third of the rate of the same bytes in huge pages).
constexpr size_t COPY_ALIGN = size_t(2) << 20;

// Frees memory taken with COPY_ALIGN alignment.
struct AlignedFree {
  void operator()(uint8_t* p) const { ::operator delete[](p, std::align_val_t(COPY_ALIGN)); }
};
using AlignedBytes = std::unique_ptr<uint8_t[], AlignedFree>;

// Whether the copies go into transparent huge pages: yes, unless TOKENTRAIL_HUGE_PAGES=0. Some
// VMs back memory the first time a guest touches it, and a fresh 2 MiB page there costs far more
// than 512 pages of 4 KiB that the guest already used (an Intel Xeon VM: 3.3-9.5 s per GiB against
// 0.65-0.71 s), while huge pages decode about 10 % faster on the same VM: 0 trades that for a
// quick load.
bool copies_in_huge_pages() {
  const char* v = std::getenv("TOKENTRAIL_HUGE_PAGES");
  if (v == nullptr || std::string(v).empty() || std::string(v) == "1") return true;
  if (std::string(v) == "0") return false;
  throw py::value_error("TOKENTRAIL_HUGE_PAGES must be 0 (4 KiB pages for the weights' copies) or 1 (huge "
                        "pages, the default), not '" + std::string(v) + "'");
}

AlignedBytes huge_page_bytes(size_t bytes) {
  const bool huge = copies_in_huge_pages();
  const size_t rounded = (bytes + COPY_ALIGN - 1) / COPY_ALIGN * COPY_ALIGN;
  AlignedBytes p(static_cast<uint8_t*>(::operator new[](rounded, std::align_val_t(COPY_ALIGN))));
#ifdef __linux__
  madvise(p.get(), rounded, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);  // advice: where declined, pages still work
#else
  (void)huge;
#endif
  return p;
}

struct ModelHandle {
  std::unique_ptr<Model> model;
  std::vector<py::object> keep_alive;  // the arrays the weight views point into
  AlignedBytes row_lane_copies;        // what the views' row_lanes point into, one after another
  size_t row_lane_matrices = 0;        // how many views have a copy there
  std::set<std::string> file_backed;   // names of weights in read-only file mappings
  std::set<const void*> in_files;      // their data, as matrix() meets them
};

// Gives the views that can have one their row-lane copies, which the AVX-512 kernels load as they
// lie: all of them in one allocation, each at a 4 KiB boundary, so that small matrices share huge
// pages (one 2 MiB-aligned block each took SmolLM2-135M's 77 MB of Q4_0 to 499 MB). A view in a
// read-only file mapping hands its pages back once copied (the products read the copy; the few
// rows an embedding lookup reads come back from the file).
void add_row_lanes(ModelHandle& h, const std::vector<WeightView*>& views) {
  constexpr size_t PLACE = 4096;
  std::vector<size_t> offsets;
  size_t total = 0;
  for (const WeightView* v : views) {
    offsets.push_back(total);
    total += (row_lane_bytes(*v) + PLACE - 1) / PLACE * PLACE;
  }
  if (total == 0) return;
  if (h.row_lane_copies) throw std::logic_error("a model's row-lane copies are made once");  // views point into it
  h.row_lane_copies = huge_page_bytes(total);
  for (size_t i = 0; i < views.size(); ++i) {
    WeightView& v = *views[i];
    if (!row_lane_bytes(v)) continue;
    uint8_t* copy = h.row_lane_copies.get() + offsets[i];
    pack_row_lanes(v, copy);
    v.row_lanes = copy;
    ++h.row_lane_matrices;
#ifdef __linux__
    if (h.in_files.count(v.data)) {
      const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
      const uintptr_t begin = (reinterpret_cast<uintptr_t>(v.data) + page - 1) / page * page;
      const uintptr_t end = (reinterpret_cast<uintptr_t>(v.data) + size_t(v.rows) * v.row_bytes) / page * page;
      if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);  // advice: failure is harmless
    }
#endif
  }
}

// Largest side of a matrix the bindings accept: sizes are ints in the core.
constexpr int64_t MAX_SIDE = (int64_t(1) << 31) - 1;
constexpr int64_t MAX_THREADS = 1024;

// Bytes an element of `t` must be aligned to: the kernels read float32 and 16-bit floats through
// typed pointers; block types read their scales with memcpy.
size_t alignment_of(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16:
    case DType::BF16: return 2;
    default: return 1;
  }
}

void check_aligned(const void* p, size_t align, const std::string& name) {
  if (reinterpret_cast<uintptr_t>(p) % align)
    throw py::value_error("tensor '" + name + "' is not aligned to " + std::to_string(align) +
                          " bytes; pass an aligned copy (numpy.ascontiguousarray of a copy)");
}

size_t row_bytes_for(DType t, int64_t cols, const std::string& name) {
  const BlockLayout bl = block_layout(t);
  if (cols % bl.values)
    throw py::value_error("tensor '" + name + "': " + std::to_string(cols) + " columns is not a multiple of the " +
                          dtype_name(t) + " block size " + std::to_string(bl.values));
  return size_t(cols / bl.values) * bl.bytes;
}

// weights[name] = (array, dtype_name); the logical shape is what the config implies.
WeightView matrix(ModelHandle& h, const py::dict& weights, const std::string& name, int64_t rows, int64_t cols,
                  bool required = true) {
  if (!weights.contains(name)) {
    if (required) throw py::value_error("missing tensor '" + name + "'");
    return {};
  }
  auto entry = weights[py::str(name)].cast<py::tuple>();
  py::array arr = entry[0].cast<py::array>();
  const DType t = dtype_from_name(entry[1].cast<std::string>());
  if (rows < 1 || cols < 1 || rows > MAX_SIDE || cols > MAX_SIDE)
    throw py::value_error("tensor '" + name + "': [" + std::to_string(rows) + ", " + std::to_string(cols) +
                          "] is not a valid matrix shape");
  if (!(arr.flags() & py::array::c_style)) throw py::value_error("tensor '" + name + "' is not C-contiguous");
  check_aligned(arr.data(), alignment_of(t), name);
  const size_t rb = row_bytes_for(t, cols, name);
  const size_t need = rb * size_t(rows);
  const size_t have = size_t(arr.nbytes());
  if (have != need)
    throw py::value_error("tensor '" + name + "' holds " + std::to_string(have) + " bytes, but [" +
                          std::to_string(rows) + ", " + std::to_string(cols) + "] of " + dtype_name(t) + " needs " +
                          std::to_string(need));
  h.keep_alive.push_back(arr);
  if (h.file_backed.count(name)) h.in_files.insert(arr.data());
  return WeightView{arr.data(), t, rows, cols, rb};
}

const float* vec(ModelHandle& h, const py::dict& weights, const std::string& name, int64_t n, bool required) {
  if (!weights.contains(name)) {
    if (required) throw py::value_error("missing tensor '" + name + "'");
    return nullptr;
  }
  auto entry = weights[py::str(name)].cast<py::tuple>();
  if (entry[1].cast<std::string>() != "f32") throw py::value_error("vector tensor '" + name + "' must be f32");
  py::array_t<float, py::array::c_style> arr = entry[0].cast<py::array_t<float, py::array::c_style>>();
  if (arr.size() != n)
    throw py::value_error("tensor '" + name + "' has " + std::to_string(arr.size()) + " values, expected " +
                          std::to_string(n));
  check_aligned(arr.data(), alignof(float), name);
  h.keep_alive.push_back(arr);
  return arr.data();
}

Config config_from(const py::dict& d) {
  Config c;
  auto geti = [&](const char* k) { return d[k].cast<int>(); };
  c.vocab = geti("vocab_size");
  c.dim = geti("hidden_size");
  c.n_layers = geti("n_layers");
  c.n_heads = geti("n_heads");
  c.n_kv_heads = geti("n_kv_heads");
  c.head_dim = geti("head_dim");
  c.ffn = geti("ffn_size");
  c.max_seq = geti("max_seq_len");
  if (c.vocab <= 0 || c.dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0 ||
      c.ffn <= 0 || c.max_seq <= 0 || c.n_heads % c.n_kv_heads)
    throw py::value_error("invalid model config sizes");
  const std::string norm = d["norm"].cast<std::string>();
  c.norm = norm == "rms" ? Norm::RMS : Norm::Layer;
  c.norm_eps = d["norm_eps"].cast<float>();
  const std::string act = d["activation"].cast<std::string>();
  if (act == "silu") c.act = Activation::SiLU;
  else if (act == "gelu_tanh") c.act = Activation::GeluTanh;
  else if (act == "gelu_erf") c.act = Activation::GeluErf;
  else if (act == "relu") c.act = Activation::ReLU;
  else throw py::value_error("unknown activation '" + act + "'");
  c.gated_mlp = d["gated_mlp"].cast<bool>();
  c.learned_positions = d["position"].cast<std::string>() == "learned";
  c.rope_adjacent = d["rope_layout"].cast<std::string>() == "adjacent";
  // Derived by the Python config (tokentrail.rope): the frequency tables the rotary layers use.
  c.rotary_dim = d["rotary_dim"].cast<int>();
  c.inv_freq = d["inv_freq"].cast<std::vector<float>>();
  c.inv_freq_local = d["inv_freq_local"].cast<std::vector<float>>();
  c.rope_attn_factor = d["rope_attn_factor"].cast<float>();
  c.inv_freq_long = d["inv_freq_long"].cast<std::vector<float>>();
  c.rope_long_after = d["rope_long_after"].cast<int>();
  if (!c.learned_positions) {
    if (c.rotary_dim <= 0 || c.rotary_dim > c.head_dim || c.rotary_dim % 2)
      throw py::value_error("rotary_dim must be even and within 1..head_dim");
    if (c.inv_freq.size() != size_t(c.rotary_dim / 2) ||
        (!c.inv_freq_local.empty() && c.inv_freq_local.size() != c.inv_freq.size()) ||
        (!c.inv_freq_long.empty() && c.inv_freq_long.size() != c.inv_freq.size()))
      throw py::value_error("rotary frequency tables must have rotary_dim / 2 entries");
  }
  const std::string qk = d["qk_norm"].cast<std::string>();
  if (qk == "none") c.qk_norm = QKNorm::None;
  else if (qk == "head") c.qk_norm = QKNorm::Head;
  else if (qk == "full") c.qk_norm = QKNorm::Full;
  else throw py::value_error("unknown qk_norm '" + qk + "'");
  c.pre_norms = d["pre_norms"].cast<bool>();
  c.post_norms = d["post_norms"].cast<bool>();
  c.parallel_residual = d["parallel_residual"].cast<bool>();
  c.sliding_window = d["sliding_window"].cast<int>();
  for (bool b : d["sliding_layers"].cast<std::vector<bool>>()) c.sliding.push_back(b ? 1 : 0);
  if (!c.sliding.empty() && c.sliding.size() != size_t(c.n_layers))
    throw py::value_error("sliding_layers must have one entry per layer");
  c.attn_scale = d["attn_scale"].cast<float>();
  c.attn_softcap = d["attn_softcap"].cast<float>();
  c.final_softcap = d["final_softcap"].cast<float>();
  c.embed_scale = d["embed_scale"].cast<float>();
  c.n_experts = d["n_experts"].cast<int>();
  c.n_experts_used = d["n_experts_used"].cast<int>();
  c.renormalize_experts = d["renormalize_experts"].cast<bool>();
  if (c.sliding_window < 0 || c.n_experts < 0 || (c.n_experts > 0 && (c.n_experts_used < 1 || c.n_experts_used > c.n_experts)))
    throw py::value_error("invalid sliding window or expert counts");
  if (!(c.attn_scale >= 0.0f) || !(c.attn_softcap >= 0.0f) || !(c.final_softcap >= 0.0f) || !std::isfinite(c.embed_scale) ||
      !(c.rope_attn_factor > 0.0f) || !(c.norm_eps > 0.0f))
    throw py::value_error("invalid attention scale, softcap, embedding scale, rope factor or norm epsilon");
  return c;
}

// int8_activations: products of block-quantized weights round the activations to int8 (see
// WeightView::int8_activations). repack: Q8_0 and Q4_0 matrices get their row-lane copies
// (add_row_lanes); file_backed names the weights that lie in read-only file mappings.
std::unique_ptr<ModelHandle> make_model(const py::dict& cfgd, const py::dict& wd, bool int8_activations,
                                        bool repack, const std::vector<std::string>& file_backed) {
  auto h = std::make_unique<ModelHandle>();
  for (const std::string& name : file_backed) {
    if (!wd.contains(name)) throw py::value_error("file_backed names '" + name + "', which is not among the weights");
    h->file_backed.insert(name);
  }
  Config c = config_from(cfgd);
  Weights w;
  const int d = c.dim, qs = c.n_heads * c.head_dim, kvs = c.n_kv_heads * c.head_dim, f = c.ffn;
  w.embed = matrix(*h, wd, "embed.weight", c.vocab, d);
  if (c.learned_positions) w.pos_embed = matrix(*h, wd, "pos_embed.weight", c.max_seq, d);
  w.unembed = matrix(*h, wd, "unembed.weight", c.vocab, d, false);
  w.final_norm_w = vec(*h, wd, "final_norm.weight", d, true);
  w.final_norm_b = vec(*h, wd, "final_norm.bias", d, false);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    LayerWeights L;
    const bool pre = c.pre_norms, post = c.post_norms;
    L.attn_norm_w = vec(*h, wd, p + "attn_norm.weight", d, pre);
    L.attn_norm_b = vec(*h, wd, p + "attn_norm.bias", d, false);
    L.mlp_norm_w = vec(*h, wd, p + "mlp_norm.weight", d, pre);
    L.mlp_norm_b = vec(*h, wd, p + "mlp_norm.bias", d, false);
    L.attn_post_norm_w = vec(*h, wd, p + "attn_post_norm.weight", d, post);
    L.attn_post_norm_b = vec(*h, wd, p + "attn_post_norm.bias", d, false);
    L.mlp_post_norm_w = vec(*h, wd, p + "mlp_post_norm.weight", d, post);
    L.mlp_post_norm_b = vec(*h, wd, p + "mlp_post_norm.bias", d, false);
    if (c.qk_norm != QKNorm::None) {
      const bool per_head = c.qk_norm == QKNorm::Head;
      L.q_norm_w = vec(*h, wd, p + "attn.q_norm.weight", per_head ? c.head_dim : qs, true);
      L.k_norm_w = vec(*h, wd, p + "attn.k_norm.weight", per_head ? c.head_dim : kvs, true);
    }
    L.q = matrix(*h, wd, p + "attn.q.weight", qs, d);
    L.k = matrix(*h, wd, p + "attn.k.weight", kvs, d);
    L.v = matrix(*h, wd, p + "attn.v.weight", kvs, d);
    L.o = matrix(*h, wd, p + "attn.o.weight", d, qs);
    L.q_b = vec(*h, wd, p + "attn.q.bias", qs, false);
    L.k_b = vec(*h, wd, p + "attn.k.bias", kvs, false);
    L.v_b = vec(*h, wd, p + "attn.v.bias", kvs, false);
    L.o_b = vec(*h, wd, p + "attn.o.bias", d, false);
    if (c.n_experts > 0) {
      L.router = matrix(*h, wd, p + "mlp.router.weight", c.n_experts, d);
      for (int e = 0; e < c.n_experts; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        L.expert_gate.push_back(matrix(*h, wd, x + "gate.weight", f, d));
        L.expert_up.push_back(matrix(*h, wd, x + "up.weight", f, d));
        L.expert_down.push_back(matrix(*h, wd, x + "down.weight", d, f));
      }
      w.layers.push_back(L);
      continue;
    }
    if (c.gated_mlp) {
      L.gate = matrix(*h, wd, p + "mlp.gate.weight", f, d);
      L.gate_b = vec(*h, wd, p + "mlp.gate.bias", f, false);
    }
    L.up = matrix(*h, wd, p + "mlp.up.weight", f, d);
    L.up_b = vec(*h, wd, p + "mlp.up.bias", f, false);
    L.down = matrix(*h, wd, p + "mlp.down.weight", d, f);
    L.down_b = vec(*h, wd, p + "mlp.down.bias", d, false);
    w.layers.push_back(L);
  }
  if (int8_activations || repack) {
    if (repack && !int8_kernels().every_row_count(DType::Q8_0))
      throw py::value_error("repacking needs the row-lane kernels (AVX-512 VNNI), which this CPU or kernel "
                            "variant lacks");
    // Every matrix a token's hidden state meets: the unembedding (the embedding itself when
    // tied; its lookups read rows of the original and ignore the mark and the copy).
    std::vector<WeightView*> products;
    products.push_back(w.unembed.empty() ? &w.embed : &w.unembed);
    for (LayerWeights& L : w.layers) {
      for (WeightView* v : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down, &L.router}) products.push_back(v);
      for (auto* group : {&L.expert_gate, &L.expert_up, &L.expert_down})
        for (WeightView& v : *group) products.push_back(&v);
    }
    for (WeightView* v : products)
      if (int8_activations) v->int8_activations = int8_supported(v->type);
    if (repack) add_row_lanes(*h, products);
  }
  h->model = std::make_unique<Model>(c, std::move(w));
  return h;
}

// A KV cache as Python holds it: the core's cache (which records the model it was made for, so
// that forward refuses another model's) plus a busy flag, so that two threads never run through
// one cache at once (the forward pass releases the GIL).
struct GuardedCache : KVCache {
  GuardedCache(const Config& c, int limit, DType t, const void* owner) : KVCache(c, limit, t, owner) {}
  explicit GuardedCache(KVCache&& from) : KVCache(std::move(from)) {}
  std::atomic<bool> busy{false};
};

// Hooks as Python holds them, with the same busy flag: a forward pass appends to their records,
// so two threads must not run with one Hooks, nor change or read it while a pass runs.
struct GuardedHooks : Hooks {
  explicit GuardedHooks(int n_layers) : Hooks(n_layers) {}
  std::atomic<bool> busy{false};
};

// Marks a cache (or hooks) busy for one call; a second thread arriving meanwhile gets an error, not a race.
template <class Guarded>
class InUse {
 public:
  InUse(Guarded& g, const char* message) : g_(g) {
    if (g_.busy.exchange(true)) {
      // tokentrail.errors.ConcurrentUseError (a RuntimeError); the GIL is held here.
      static py::object* error = new py::object(py::module_::import("tokentrail.errors").attr("ConcurrentUseError"));
      PyErr_SetString(error->ptr(), message);
      throw py::error_already_set();
    }
  }
  ~InUse() { g_.busy = false; }
  InUse(const InUse&) = delete;
  InUse& operator=(const InUse&) = delete;

 private:
  Guarded& g_;
};

struct CacheInUse : InUse<GuardedCache> {
  explicit CacheInUse(GuardedCache& c)
      : InUse(c, "this KV cache is in use by another thread; give each thread its own session") {}
};

struct HooksInUse : InUse<GuardedHooks> {
  explicit HooksInUse(GuardedHooks& h)
      : InUse(h,
              "these Hooks are in use by a forward pass in another thread; give each thread its own model.hooks()") {}
};

py::array_t<float> to_numpy(std::vector<float>&& v, std::vector<int64_t> shape) {
  auto* heap = new std::vector<float>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<float>*>(p); });
  return py::array_t<float>(shape, heap->data(), owner);
}

LogitsMode logits_mode(const std::string& mode) {
  if (mode == "all") return LogitsMode::All;
  if (mode == "last") return LogitsMode::Last;
  if (mode == "none") return LogitsMode::None;
  throw py::value_error("logits mode must be all, last or none, not '" + mode + "'");
}

// A forward call's logits as numpy: [n, vocab] for all positions, [vocab] for the last, [0] for none.
py::array_t<float> logits_array(std::vector<float>&& logits, LogitsMode mode, int n, int vocab) {
  if (mode == LogitsMode::All) return to_numpy(std::move(logits), {n, vocab});
  if (mode == LogitsMode::Last) return to_numpy(std::move(logits), {vocab});
  return to_numpy(std::move(logits), {0});
}

const float* f32_ptr(const py::array_t<float, py::array::c_style | py::array::forcecast>& a) { return a.data(); }

// float32 values rounded to IEEE half bit patterns, as the f16 KV cache stores them.
std::vector<uint16_t> f16_bits(const py::array_t<float, py::array::c_style | py::array::forcecast>& a) {
  std::vector<uint16_t> out(size_t(a.size()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = f32_to_f16(a.data()[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "tokentrail's C++ core: kernels, forward pass, KV cache and capture points";

  m.def("available_isas", &available_isas, "Kernel variants this binary has and this CPU runs");
  m.def("set_isa", &set_isa, py::arg("name"));
  m.def("isa", []() { return std::string(kernels().name); });
  m.def("set_threads", [](int64_t n) {
    if (n < 1 || n > MAX_THREADS) throw py::value_error("threads must be within 1.." + std::to_string(MAX_THREADS));
    set_threads(int(n));
  }, py::arg("n"), "The thread count of core calls made from the calling OS thread (each OS thread keeps its own)");
  m.def("pool_chunks", [](int64_t n, int64_t grain, const std::string& split, int64_t threads, double work_us) {
    // The chunks one parallel loop of the pool ran, in the order they started: (begin, end, by
    // the calling thread). Each chunk busy-waits work_us per item, so that the threads overlap.
    if (n < 0 || n > (1 << 20) || grain < 1 || threads < 1 || threads > MAX_THREADS || !(work_us >= 0.0 && work_us <= 1000.0))
      throw py::value_error("pool_chunks needs 0 <= n <= 2^20, grain >= 1, 1 <= threads <= " +
                            std::to_string(MAX_THREADS) + " and 0 <= work_us <= 1000");
    if (split != "even" && split != "guided") throw py::value_error("split must be 'even' or 'guided'");
    std::mutex lock;
    std::vector<std::tuple<int64_t, int64_t, bool>> chunks;
    const std::thread::id caller = std::this_thread::get_id();
    {
      py::gil_scoped_release nogil;
      parallel_for(n, grain, split == "even" ? Split::Even : Split::Guided, int(threads), [&](int64_t b, int64_t e) {
        {
          std::lock_guard<std::mutex> hold(lock);
          chunks.emplace_back(b, e, std::this_thread::get_id() == caller);
        }
        const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double, std::micro>(work_us * double(e - b));
        while (std::chrono::steady_clock::now() < until) {
        }
      });
    }
    return chunks;
  }, py::arg("n"), py::arg("grain") = 1, py::arg("split") = "guided", py::arg("threads") = 2, py::arg("work_us") = 0.0,
     "For tests: the chunks (begin, end, on the calling thread) one parallel loop of the pool ran");
  m.def("other_load", [](double seconds) {
    if (!(seconds >= 0.06 && seconds <= 10.0)) throw py::value_error("other_load needs 0.06 <= seconds <= 10");
    OtherLoad load;
    {
      py::gil_scoped_release nogil;
      load = measure_other_load(seconds);
    }
    return py::make_tuple(load.cpus, load.busy_cpus);
  }, py::arg("seconds") = 0.5,
     "(CPUs this process may use, how many of them other processes kept busy on average over `seconds`), "
     "as the thread pool's back-off reads them from /proc/stat; (0, 0.0) where that cannot be read");
  m.def("pool_backoff", [] {
    PoolBackoff b;
    {
      py::gil_scoped_release nogil;  // waits for a job another Python thread runs
      b = pool_backoff();
    }
    py::dict d;
    d["state"] = b.state;
    d["sleepy_us_per_job"] = b.sleepy_us_per_job;
    d["fewer_us_per_job"] = b.fewer_us_per_job;
    d["trials"] = b.trials;
    return d;
  }, "What the thread pool is doing about other processes holding its CPUs: {'state': 'none', 'sleepy workers', "
     "'fewer threads' or 'trial: ...', the microseconds per job of each half of its last trial, and 'trials': how "
     "many it has begun}");
  m.attr("GEMM_MIN_ROWS") = GEMM_MIN_ROWS;
  m.attr("ATTENTION_PARALLEL_WORK") = ATTENTION_PARALLEL_WORK;
  m.attr("INT8_MIN_ROWS") = INT8_MIN_ROWS;
  m.def("get_threads", &get_threads);

  m.def("probe_bandwidth", [](double megabytes, int repeats) {
    // GB/s of a read-only sweep over a buffer far larger than the caches, all threads.
    if (!(megabytes >= 1.0 && megabytes <= 65536.0) || repeats < 1 || repeats > 1000)
      throw py::value_error("probe_bandwidth needs 1..65536 megabytes and 1..1000 repeats");
    const size_t n = size_t(megabytes * 1e6 / 4);
    std::vector<float> buf(n, 1.0f);
    py::gil_scoped_release nogil;
    kernels().probe_read(buf.data(), n);  // warm: pages mapped
    double best = 0.0;
    for (int r = 0; r < repeats; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      volatile double sink = kernels().probe_read(buf.data(), n);
      (void)sink;
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, n * 4.0 / s / 1e9);
    }
    return best;
  }, py::arg("megabytes") = 1024.0, py::arg("repeats") = 5);
  m.def("probe_flops", [](long long iters) {
    if (iters < 10 || iters > (1LL << 40)) throw py::value_error("probe_flops needs 10..2^40 iterations");
    // GFLOP/s of FMAs on registers, all threads (2 FLOP per lane per FMA).
    py::gil_scoped_release nogil;
    kernels().probe_fma(iters / 10);
    const auto t0 = std::chrono::steady_clock::now();
    volatile double sink = kernels().probe_fma(iters);
    (void)sink;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return double(iters) * 12 * kernels().lanes * 2 * get_threads() / s / 1e9;
  }, py::arg("iters") = 50000000LL);

  m.def("capture_points", []() {
    py::list out;
    for (int p = 0; p < P_COUNT; ++p) {
      const PointInfo& i = point_info(p);
      out.append(py::make_tuple(i.name, i.per_layer, i.shape, i.doc));
    }
    return out;
  });

  // Kernels, exposed for tests and benchmarks against numpy.
  m.def("matmul", [](py::array w, const std::string& dtype, int64_t rows, int64_t cols,
                     py::array_t<float, py::array::c_style | py::array::forcecast> x,
                     std::optional<py::array_t<float, py::array::c_style | py::array::forcecast>> bias,
                     bool int8_activations, bool row_lanes, int repeats) {
    if (repeats < 1) throw py::value_error("repeats must be at least 1");
    ModelHandle keep;
    py::dict wd;
    wd["w"] = py::make_tuple(w, dtype);
    WeightView view = matrix(keep, wd, "w", rows, cols);
    if (int8_activations && !int8_supported(view.type))
      throw py::value_error("int8 activations need a block-quantized weight type, not " + dtype);
    if (row_lanes) {
      WeightView as_used = view;  // the copy a model would make for these products
      as_used.int8_activations = int8_activations;
      if (!row_lane_bytes(as_used) || (int8_activations && !row_lanes_serve_int8(as_used)))
        throw py::value_error("row_lanes needs Q8_0 rows in whole groups of 16 and the int8 row-lane kernel "
                              "(AVX-512 VNNI), or rows of another block type in whole groups of 16 (k-quants: of whole "
                              "super-blocks), float activations and the AVX-512 kernels");
      add_row_lanes(keep, {&view});
    }
    if (x.ndim() != 2 || x.shape(1) != cols) throw py::value_error("x must be [n, cols]");
    if (bias && bias->size() != rows) throw py::value_error("bias must have one value per row");
    check_aligned(x.data(), 4, "x");
    if (bias) check_aligned(bias->data(), 4, "bias");
    const int n = int(x.shape(0));
    std::vector<float> y(size_t(n) * rows);
    const float* b = bias ? bias->data() : nullptr;
    {
      py::gil_scoped_release nogil;
      for (int i = 0; i < repeats; ++i) {
        if (int8_activations) {  // the int8 kernel itself, whatever n (a model uses it from INT8_MIN_ROWS)
          int8_kernels().matmul(view, x.data(), n, y.data());
          for (int t = 0; b && t < n; ++t)
            for (int64_t r = 0; r < rows; ++r) y[size_t(t) * rows + r] += b[r];
        } else {
          kernels().matmul(view, x.data(), n, y.data(), b);
        }
      }
    }
    return to_numpy(std::move(y), {n, rows});
  }, py::arg("w"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("x"), py::arg("bias") = py::none(),
     py::arg("int8_activations") = false, py::arg("row_lanes") = false, py::arg("repeats") = 1,
     "y = x . w^T (+ bias). int8_activations: the int8 kernel at any n; row_lanes: a block type through the "
     "row-lane copy a model keeps; repeats: the product that many times "
     "(for benchmarks: the weight's preparation once)");
  m.def("float_row_lanes", []() { return kernels().float_row_lanes; },
        "Whether the current kernel variant reads Q8_0 and Q4_0 row-lane copies in float products (AVX-512)");
  m.def("int8_row_lanes", []() { return int8_kernels().every_row_count(DType::Q8_0); },
        "Whether the current int8 variant streams Q8_0 through row lanes (models may then keep a row-lane "
        "copy of each Q8_0 matrix: load(repack=...))");

  m.def("matmul_group", [](py::list weights, int64_t cols,
                           py::array_t<float, py::array::c_style | py::array::forcecast> x, bool int8_activations,
                           bool row_lanes) {
    // Several products of one x in one call, as the forward pass runs q/k/v and gate/up.
    const size_t count = weights.size();
    if (count < 1 || count > 8) throw py::value_error("matmul_group takes 1..8 weights");
    if (x.ndim() != 2 || x.shape(1) != cols) throw py::value_error("x must be [n, cols]");
    check_aligned(x.data(), 4, "x");
    const int n = int(x.shape(0));
    ModelHandle keep;
    std::vector<WeightView> views(count);
    std::vector<std::vector<float>> ys(count);
    std::vector<MatmulJob> jobs(count);
    for (size_t j = 0; j < count; ++j) {
      const py::tuple t = weights[j].cast<py::tuple>();
      if (t.size() != 3) throw py::value_error("each weight is (array, dtype, rows)");
      py::dict wd;
      const std::string name = "w" + std::to_string(j);
      wd[name.c_str()] = py::make_tuple(t[0], t[1]);
      views[j] = matrix(keep, wd, name, t[2].cast<int64_t>(), cols);
      views[j].int8_activations = int8_activations && int8_supported(views[j].type);
      ys[j].resize(size_t(n) * views[j].rows);
      jobs[j] = MatmulJob{&views[j], ys[j].data(), nullptr};
    }
    if (row_lanes) {  // every weight's copy, as a model makes them
      std::vector<WeightView*> copied;
      for (auto& v : views) {
        if (!row_lane_bytes(v))
          throw py::value_error("row_lanes needs weights that have a row-lane copy on this CPU (see matmul)");
        copied.push_back(&v);
      }
      add_row_lanes(keep, copied);
    }
    {
      py::gil_scoped_release nogil;
      kernels().matmul_group(jobs.data(), int(count), x.data(), n);
    }
    py::list out;
    for (size_t j = 0; j < count; ++j) out.append(to_numpy(std::move(ys[j]), {n, views[j].rows}));
    return out;
  }, py::arg("weights"), py::arg("cols"), py::arg("x"), py::arg("int8_activations") = false,
     py::arg("row_lanes") = false,
     "Each weight's x . w^T, the products in one call as the forward pass groups q/k/v and gate/up; "
     "row_lanes: every weight reads its row-lane copy (refused for a weight that cannot have one)");

  m.def("int8_quantize", [](py::array_t<float, py::array::c_style | py::array::forcecast> x, int block) {
    if (block != 32 && block != 256) throw py::value_error("block must be 32 or 256");
    if (x.ndim() != 2 || x.shape(1) % block) throw py::value_error("x must be [n, K] with K a multiple of the block");
    const int n = int(x.shape(0)), K = int(x.shape(1));
    py::array_t<int8_t> q({n, K});
    py::array_t<float> scales({n, K / block});
    {
      py::gil_scoped_release nogil;
      int8_kernels().quantize(x.data(), n, K, block, q.mutable_data(), scales.mutable_data());
    }
    return py::make_tuple(q, scales);
  }, py::arg("x"), py::arg("block") = 32);
  m.def("int8_isa", []() { return std::string(int8_kernels().name); });
  m.def("available_int8_isas", &available_int8_isas,
        "Int8-activation variants that go with the current kernel variant on this CPU, the default first");
  m.def("set_int8_isa", &set_int8_isa, py::arg("name"));
  m.def("int8_every_row_count", [](const std::string& dtype) {
    const DType t = dtype_from_name(dtype);
    return int8_supported(t) && int8_kernels().every_row_count(t);
  }, py::arg("dtype"),
     "Whether products of this weight type with int8 activations use them at every number of tokens "
     "(results independent of the batch), not only from INT8_MIN_ROWS; depends on the int8 kernel variant");

  m.def("softmax", [](py::array_t<float, py::array::c_style | py::array::forcecast> x, float temperature) {
    if (!(temperature > 0)) throw py::value_error("temperature must be positive");
    check_aligned(x.data(), 4, "x");
    py::array_t<float> y(x.request().shape);
    std::copy(x.data(), x.data() + x.size(), y.mutable_data());
    const int n = x.ndim() ? int(x.shape(x.ndim() - 1)) : 1;
    kernels().softmax(y.mutable_data(), n ? int(x.size() / n) : 0, n, temperature);
    return y;
  }, py::arg("x"), py::arg("temperature") = 1.0f);

  m.def("rmsnorm", [](py::array_t<float, py::array::c_style | py::array::forcecast> x,
                      py::array_t<float, py::array::c_style | py::array::forcecast> w, float eps) {
    const int n = int(w.size());
    if (x.ndim() != 2 || x.shape(1) != n) throw py::value_error("x must be [rows, len(w)]");
    if (n < 1 || !(eps > 0.0f)) throw py::value_error("rmsnorm needs at least one weight and a positive eps");
    check_aligned(x.data(), 4, "x");
    check_aligned(w.data(), 4, "w");
    py::array_t<float> y(x.request().shape);
    kernels().rmsnorm(x.data(), w.data(), int(x.shape(0)), n, eps, y.mutable_data());
    return y;
  });
  m.def("layernorm", [](py::array_t<float, py::array::c_style | py::array::forcecast> x,
                        py::array_t<float, py::array::c_style | py::array::forcecast> w,
                        py::array_t<float, py::array::c_style | py::array::forcecast> b, float eps) {
    const int n = int(w.size());
    if (x.ndim() != 2 || x.shape(1) != n || b.size() != n) throw py::value_error("x must be [rows, len(w)]");
    if (n < 1 || !(eps > 0.0f)) throw py::value_error("layernorm needs at least one weight and a positive eps");
    check_aligned(x.data(), 4, "x");
    check_aligned(w.data(), 4, "w");
    check_aligned(b.data(), 4, "b");
    py::array_t<float> y(x.request().shape);
    kernels().layernorm(x.data(), w.data(), b.data(), int(x.shape(0)), n, eps, y.mutable_data());
    return y;
  });
  m.def("rope", [](py::array_t<float, py::array::c_style | py::array::forcecast> x, py::array_t<int> positions,
                   int heads, int head_dim, py::array_t<float, py::array::c_style | py::array::forcecast> inv_freq,
                   bool adjacent, float attn_factor) {
    const int rotary_dim = int(inv_freq.size()) * 2;
    if (heads < 1 || head_dim < 1 || x.ndim() != 2 || x.shape(1) != int64_t(heads) * head_dim ||
        positions.ndim() != 1 || positions.size() != x.shape(0) || rotary_dim == 0 || rotary_dim > head_dim)
      throw py::value_error("x must be [n, heads*head_dim] with one position per row and 1..head_dim/2 frequencies");
    py::array_t<float> y(x.request().shape);
    std::copy(x.data(), x.data() + x.size(), y.mutable_data());
    py::array_t<int, py::array::c_style | py::array::forcecast> pos(positions);
    check_aligned(pos.data(), alignof(int), "positions");
    check_aligned(inv_freq.data(), 4, "inv_freq");
    kernels().rope(y.mutable_data(), int(x.shape(0)), heads, head_dim, rotary_dim, pos.data(), inv_freq.data(),
                   attn_factor, adjacent);
    return y;
  }, py::arg("x"), py::arg("positions"), py::arg("heads"), py::arg("head_dim"), py::arg("inv_freq"),
     py::arg("adjacent"), py::arg("attn_factor") = 1.0f);
  auto elementwise = [&m](const char* name, void (*KernelTable::*fn)(float*, size_t)) {
    m.def(name, [fn](py::array_t<float, py::array::c_style | py::array::forcecast> x) {
      check_aligned(x.data(), 4, "x");
      py::array_t<float> y(x.request().shape);
      std::copy(x.data(), x.data() + x.size(), y.mutable_data());
      (kernels().*fn)(y.mutable_data(), size_t(x.size()));
      return y;
    });
  };
  elementwise("gelu_tanh", &KernelTable::gelu_tanh);
  elementwise("gelu_erf", &KernelTable::gelu_erf);
  elementwise("silu", &KernelTable::silu);
  elementwise("relu", &KernelTable::relu);
  m.def("attention", [](py::array_t<float, py::array::c_style | py::array::forcecast> q,
                        py::array_t<float, py::array::c_style | py::array::forcecast> k,
                        py::array_t<float, py::array::c_style | py::array::forcecast> v, int pos0, float scale,
                        const std::string& kv_dtype, int window, float softcap) {
    // q: [n, heads, hd]; k, v: [kv_heads, ctx, hd] with ctx = pos0 + n. Returns (z, pattern).
    if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3) throw py::value_error("q, k, v must be 3-D");
    AttentionShape a;
    a.n = int(q.shape(0));
    a.n_heads = int(q.shape(1));
    a.head_dim = int(q.shape(2));
    a.n_kv = int(k.shape(0));
    a.cap = int(k.shape(1));
    a.pos0 = pos0;
    a.scale = scale;
    a.window = window;
    a.softcap = softcap;
    const int n = a.n, heads = a.n_heads, hd = a.head_dim, kvh = a.n_kv, ctx = a.cap;
    if (n < 1 || heads < 1 || kvh < 1 || hd < 1 || pos0 < 0 || ctx != pos0 + n || k.shape(2) != hd || v.shape(0) != kvh ||
        v.shape(1) != ctx || v.shape(2) != hd || heads % kvh || window < 0 || !(softcap >= 0.0f) ||
        !std::isfinite(scale))
      throw py::value_error("attention shapes do not agree");
    check_aligned(q.data(), 4, "q");
    check_aligned(k.data(), 4, "k");
    check_aligned(v.data(), 4, "v");
    std::vector<float> z(size_t(n) * heads * hd), pattern(size_t(n) * heads * ctx);
    AttentionCapture cap;
    cap.pattern = pattern.data();
    const DType type = dtype_from_name(kv_dtype);
    if (type == DType::F16) {  // the cache's rounding, then the f16 kernel
      const std::vector<uint16_t> kh = f16_bits(k), vh = f16_bits(v);
      kernels().attention(q.data(), kh.data(), vh.data(), type, a, z.data(), &cap);
    } else if (type == DType::F32) {
      kernels().attention(q.data(), k.data(), v.data(), type, a, z.data(), &cap);
    } else {
      throw py::value_error("attention reads a float32 or f16 cache");
    }
    return py::make_tuple(to_numpy(std::move(z), {n, heads, hd}), to_numpy(std::move(pattern), {n, heads, ctx}));
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pos0"), py::arg("scale"), py::arg("kv_dtype") = "f32",
     py::arg("window") = 0, py::arg("softcap") = 0.0f);
  m.def("f16_bits", [](py::array_t<float, py::array::c_style | py::array::forcecast> x) {
    check_aligned(x.data(), 4, "x");
    std::vector<uint16_t> bits = f16_bits(x);
    return py::array_t<uint16_t>(py::ssize_t(bits.size()), bits.data());
  }, "float32 to IEEE half bit patterns, as the f16 KV cache stores them");
  m.def("weight_types", [] {
    py::list out;
    for (const WeightTypeInfo& t : WEIGHT_TYPES)
      out.append(py::make_tuple(t.name, t.ggml_id, t.values, t.bytes, t.half_scales_at, t.half_scales));
    return out;
  }, "Every weight type the kernels read: (name, GGML type id, values per block, bytes per block, byte offset of "
     "a block's half-precision scales, how many)");
  m.def("copies_in_huge_pages", &copies_in_huge_pages,
        "Whether the weights' row-lane copies made now go into transparent huge pages (TOKENTRAIL_HUGE_PAGES: "
        "1 or unset yes, 0 no; anything else is refused)");
  m.def("has_non_finite", [](py::array data, const std::string& dtype) {
    if (!(data.flags() & py::array::c_style)) throw py::value_error("has_non_finite reads a C-contiguous array");
    const DType t = dtype_from_name(dtype);
    const void* p = data.data();
    const size_t bytes = size_t(data.nbytes());
    py::gil_scoped_release nogil;
    return has_non_finite(p, bytes, t);  // std::invalid_argument (not whole blocks) reaches Python as ValueError
  }, py::arg("data"), py::arg("dtype"),
     "Whether the array's bytes, weights of type `dtype`, hold a NaN or an infinity (block types: in a block's "
     "half-precision scales; their other bytes are integers), read by all threads at the memory's speed");
  m.def("row_to_f32", [](py::array w, const std::string& dtype, int64_t rows, int64_t cols) {
    ModelHandle keep;
    py::dict wd;
    wd["w"] = py::make_tuple(w, dtype);
    WeightView view = matrix(keep, wd, "w", rows, cols);
    std::vector<float> out(size_t(rows) * cols);
    for (int64_t r = 0; r < rows; ++r) row_to_f32(view, r, out.data() + r * cols);
    return to_numpy(std::move(out), {rows, cols});
  });

  py::class_<ModelHandle>(m, "Model")
      .def(py::init(&make_model), py::arg("config"), py::arg("weights"), py::arg("int8_activations") = false,
           py::arg("repack") = false, py::arg("file_backed") = std::vector<std::string>{})
      .def_property_readonly("n_layers", [](const ModelHandle& h) { return h.model->config().n_layers; })
      .def_property_readonly("row_lane_copies", [](const ModelHandle& h) { return h.row_lane_matrices; },
                             "How many matrices carry a row-lane copy")
      .def("forward", [](const ModelHandle& h, GuardedCache& cache, py::array_t<int, py::array::c_style | py::array::forcecast> tokens,
                         const std::string& mode, GuardedHooks* hooks) {
        const LogitsMode lm = logits_mode(mode);
        CacheInUse in_use(cache);
        std::unique_ptr<HooksInUse> hooks_in_use(hooks ? new HooksInUse(*hooks) : nullptr);
        const int n = int(tokens.size());
        std::vector<float> logits;
        {
          py::gil_scoped_release nogil;
          h.model->forward(cache, tokens.data(), n, lm, hooks, logits);
        }
        return logits_array(std::move(logits), lm, n, h.model->config().vocab);
      }, py::arg("cache"), py::arg("tokens"), py::arg("logits") = "last", py::arg("hooks") = nullptr)
      .def("forward_batch", [](const ModelHandle& h, const py::sequence& caches, const py::sequence& tokens,
                               const py::sequence& modes, const py::sequence& hooks) {
        // One step of several sequences: caches[i] runs tokens[i], logits per modes[i], with hooks[i] (or None).
        const size_t count = caches.size();
        if (count == 0) throw py::value_error("forward_batch needs at least one sequence");
        if (tokens.size() != count || modes.size() != count || hooks.size() != count)
          throw py::value_error("forward_batch needs one token array, logits mode and hooks entry (or None) per cache");
        using IntArray = py::array_t<int, py::array::c_style | py::array::forcecast>;
        std::vector<IntArray> ids(count);
        std::vector<std::vector<float>> logits(count);
        std::vector<SequenceStep> batch(count);
        std::vector<GuardedHooks*> guarded_hooks(count, nullptr);
        for (size_t i = 0; i < count; ++i) {
          const std::string who = "sequence " + std::to_string(i) + ": ";
          if (!py::isinstance<GuardedCache>(caches[i])) throw py::type_error(who + "expected a KVCache");
          if (!hooks[i].is_none() && !py::isinstance<GuardedHooks>(hooks[i]))
            throw py::type_error(who + "hooks must be Hooks or None");
          ids[i] = IntArray::ensure(tokens[i]);
          if (!ids[i] || ids[i].ndim() != 1) throw py::value_error(who + "tokens must be a 1-D array of token ids");
          batch[i].cache = caches[i].cast<GuardedCache*>();
          for (size_t j = 0; j < i; ++j)
            if (batch[j].cache == batch[i].cache)
              throw py::value_error(who + "uses the same KV cache as sequence " + std::to_string(j));
          batch[i].tokens = ids[i].data();
          batch[i].n = int(ids[i].size());
          batch[i].mode = logits_mode(modes[i].cast<std::string>());
          guarded_hooks[i] = hooks[i].is_none() ? nullptr : hooks[i].cast<GuardedHooks*>();
          batch[i].hooks = guarded_hooks[i];
          for (size_t j = 0; j < i && batch[i].hooks; ++j)
            if (batch[j].hooks == batch[i].hooks)
              throw py::value_error(who + "uses the same hooks as sequence " + std::to_string(j));
          batch[i].logits = &logits[i];
        }
        // Every cache is held for the whole step; a cache busy in another thread refuses the batch
        // (the guards taken so far are released as the error unwinds).
        std::vector<std::unique_ptr<CacheInUse>> in_use;
        in_use.reserve(count);
        for (size_t i = 0; i < count; ++i)
          in_use.push_back(std::make_unique<CacheInUse>(*static_cast<GuardedCache*>(batch[i].cache)));
        std::vector<std::unique_ptr<HooksInUse>> hooks_in_use;
        for (size_t i = 0; i < count; ++i)
          if (guarded_hooks[i]) hooks_in_use.push_back(std::make_unique<HooksInUse>(*guarded_hooks[i]));
        {
          py::gil_scoped_release nogil;
          h.model->forward(batch.data(), int(count));
        }
        py::list out;
        for (size_t i = 0; i < count; ++i)
          out.append(logits_array(std::move(logits[i]), batch[i].mode, batch[i].n, h.model->config().vocab));
        return out;
      }, py::arg("caches"), py::arg("tokens"), py::arg("logits"), py::arg("hooks"),
         "Advance several sequences in one step; returns each one's logits as its mode asks.");

  py::class_<GuardedCache>(m, "KVCache")
      .def(py::init([](const ModelHandle& h, int limit, const std::string& dtype) {
             return std::make_unique<GuardedCache>(h.model->config(), limit, dtype_from_name(dtype), h.model.get());
           }),
           py::arg("model"), py::arg("limit"), py::arg("dtype") = "f32")
      .def_property_readonly("dtype", [](const GuardedCache& c) { return std::string(dtype_name(c.type())); })
      .def_property_readonly("length", [](const GuardedCache& c) { return c.length(); })
      .def_property_readonly("capacity", [](const GuardedCache& c) { return c.capacity(); })
      .def_property_readonly("limit", [](const GuardedCache& c) { return c.limit(); })
      .def_property_readonly("scratch_bytes", [](const GuardedCache& c) { return c.scratch_bytes(); },
                             "Bytes of forward-pass scratch this cache holds (a batch's, when it led one).")
      .def("release_scratch", [](GuardedCache& c) {
        CacheInUse in_use(c);
        c.release_scratch();
      }, "Let go of the forward-pass scratch (it is made again when needed).")
      .def("truncate", [](GuardedCache& c, int positions) {
        CacheInUse in_use(c);
        c.truncate(positions);
      }, py::arg("positions"))
      .def("clone", [](GuardedCache& c, std::optional<int> positions) {
        CacheInUse in_use(c);
        if (positions && (*positions < 0 || *positions > c.length()))
          throw py::value_error("clone: positions must be within 0.." + std::to_string(c.length()) + ", got " +
                                std::to_string(*positions));
        return std::make_unique<GuardedCache>(std::move(*c.clone(positions ? *positions : -1)));
      }, py::arg("positions") = py::none(), "A copy of the first `positions` positions (default: all filled).");

  py::class_<GuardedHooks>(m, "Hooks")
      .def(py::init([](int n_layers) {
             if (n_layers < 1 || n_layers > 1000000) throw py::value_error("Hooks needs a layer count within 1..1000000");
             return std::make_unique<GuardedHooks>(n_layers);
           }), py::arg("n_layers"))
      .def("set", [](GuardedHooks& hk, int point, int layer, bool capture, std::vector<int> positions,
                     std::vector<float> head_scale, std::vector<float> add,
                     std::unordered_map<int, std::vector<float>> replace) {
        HooksInUse in_use(hk);
        Site& s = hk.at(point, layer);
        s.capture = capture;
        s.positions = std::move(positions);
        s.head_scale = std::move(head_scale);
        s.add = std::move(add);
        s.replace = std::move(replace);
      }, py::arg("point"), py::arg("layer"), py::arg("capture") = false, py::arg("positions") = std::vector<int>{},
         py::arg("head_scale") = std::vector<float>{}, py::arg("add") = std::vector<float>{},
         py::arg("replace") = std::unordered_map<int, std::vector<float>>{})
      .def("clear", [](GuardedHooks& hk) { HooksInUse in_use(hk); hk.clear(); })
      .def("clear_captures", [](GuardedHooks& hk) { HooksInUse in_use(hk); hk.clear_captures(); })
      .def("captured", [](GuardedHooks& hk, int point, int layer) {
        // List of (array, positions), one per forward call that captured here.
        HooksInUse in_use(hk);
        py::list out;
        Site* s = hk.find(point, layer);
        if (!s) return out;
        for (Captured& c : s->captured)
          out.append(py::make_tuple(to_numpy(std::vector<float>(c.data), c.shape), c.positions));
        return out;
      });

  // ---- sampling: the hot stages of the sampler chain (tokentrail/sampler.h) ------------------
  // The Python layer (tokentrail.sampling.core) compiles an eligible chain into these stages;
  // every argument is checked here as well, so a direct call cannot crash the process.
  py::class_<SamplerChain>(m, "SamplerChain")
      .def(py::init([](const std::vector<std::tuple<int, double, double, int64_t, int64_t, int64_t, bool>>& spec) {
             std::vector<SamplerStage> stages;
             for (const auto& t : spec) {
               const int kind = std::get<0>(t);
               if (kind < 0 || kind > static_cast<int>(StageKind::kMinP))
                 throw py::value_error("unknown sampler stage kind " + std::to_string(kind));
               SamplerStage s;
               s.kind = static_cast<StageKind>(kind);
               s.a = std::get<1>(t);
               s.b = std::get<2>(t);
               s.k = std::get<3>(t);
               s.min_keep = std::get<4>(t);
               s.window = std::get<5>(t);
               s.flag = std::get<6>(t);
               stages.push_back(s);
             }
             return std::make_unique<SamplerChain>(std::move(stages));  // validates the parameters
           }),
           py::arg("stages"),
           "Stages as (kind, a, b, k, min_keep, window, flag) tuples; see tokentrail/sampler.h")
      .def("keep", [](const SamplerChain& chain, py::array logits,
                      py::array_t<int64_t, py::array::c_style | py::array::forcecast> history) {
        if (!logits.dtype().is(py::dtype::of<float>()))
          throw py::type_error("logits must be a float32 array, got " + std::string(py::str(logits.dtype())));
        if (logits.ndim() != 1 || logits.shape(0) < 1)
          throw py::value_error("logits must be a non-empty 1-D array over the vocabulary");
        if (!(logits.flags() & py::array::c_style)) throw py::value_error("logits must be C-contiguous");
        if (history.ndim() != 1) throw py::value_error("history must be a 1-D array of token ids");
        const float* x = static_cast<const float*>(logits.data());
        const int64_t n_vocab = logits.shape(0);
        const int64_t* h = history.data();
        const int64_t n_history = history.shape(0);
        KeptTokens r;
        {
          py::gil_scoped_release release;
          r = chain.keep(x, n_vocab, h, n_history);
        }
        switch (r.problem) {
          case LogitsProblem::kNaN: throw py::value_error("logits contain NaN");
          case LogitsProblem::kPosInf: throw py::value_error("logits contain +inf");
          case LogitsProblem::kAllMasked: throw py::value_error("every token is masked (-inf)");
          default: break;
        }
        auto as_array = [](auto&& v) {  // hands the vector's buffer to numpy without copying it
          using V = std::decay_t<decltype(v)>;
          auto* owned = new V(std::move(v));
          py::capsule free_when_done(owned, [](void* p) { delete static_cast<V*>(p); });
          return py::array_t<typename V::value_type>(static_cast<py::ssize_t>(owned->size()), owned->data(),
                                                     free_when_done);
        };
        return py::make_tuple(as_array(std::move(r.ids)), as_array(std::move(r.logits)), as_array(std::move(r.probs)));
      }, py::arg("logits"), py::arg("history"),
         "(kept ids ascending, their logits after the chain, their probabilities) for one logit vector");
  m.def("draw_token", [](py::array_t<int64_t, py::array::c_style | py::array::forcecast> ids,
                         py::array_t<double, py::array::c_style | py::array::forcecast> probs, double u) {
    if (ids.ndim() != 1 || probs.ndim() != 1 || ids.shape(0) != probs.shape(0) || ids.shape(0) < 1)
      throw py::value_error("draw_token needs 1-D ids and probabilities of the same non-zero length");
    return draw_token(ids.data(), probs.data(), ids.shape(0), u);
  }, py::arg("ids"), py::arg("probs"), py::arg("u"),
     "The token at u (in [0, 1)) of the cumulative distribution, summed in the given order");
  // ---- end of sampling ------------------------------------------------------------------------
}

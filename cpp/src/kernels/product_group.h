// A group of products sharing one input (kernels.h, MatmulJob), cut into blocks of weight
// rows numbered across all the weights, so that one parallel loop covers the whole group.
// Used by the float GEMV and the int8 products alike.
#pragma once
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "tokentrail/kernels.h"

namespace tokentrail {

// Most products one group may hold (q, k, v; gate, up).
constexpr int MAX_PRODUCT_GROUP = 8;

class ProductGroup {
 public:
  // Checks the group (1..MAX_PRODUCT_GROUP weights, all of x's width) and numbers its blocks.
  ProductGroup(const MatmulJob* jobs, int count, int block_rows, int n) : jobs_(jobs), rows_(block_rows) {
    if (count < 1 || count > MAX_PRODUCT_GROUP) throw std::invalid_argument("product group of 1..8 weights");
    K_ = int(jobs[0].w->cols);
    for (int j = 0; j < count; ++j) {
      const WeightView& w = *jobs[j].w;
      if (int(w.cols) != K_) throw std::invalid_argument("a product group needs weights of one input width");
      first_[j + 1] = first_[j] + int((w.rows + block_rows - 1) / block_rows);
      work_ += double(w.rows) * K_ * n;
    }
    blocks_ = first_[count];
  }
  int K() const { return K_; }
  int blocks() const { return blocks_; }
  double work() const { return work_; }  // multiply-adds of the whole group
  // fn(job, r0, r1) for every block in [b0, b1), in order, or until fn returns false.
  template <class Fn>
  void for_blocks(int64_t b0, int64_t b1, Fn fn) const {
    int j = 0;
    for (int b = int(b0); b < int(b1); ++b) {
      while (b >= first_[j + 1]) ++j;
      const int r0 = (b - first_[j]) * rows_;
      if constexpr (std::is_same_v<decltype(fn(jobs_[j], r0, r0)), bool>) {
        if (!fn(jobs_[j], r0, std::min(int(jobs_[j].w->rows), r0 + rows_))) return;
      } else {
        fn(jobs_[j], r0, std::min(int(jobs_[j].w->rows), r0 + rows_));
      }
    }
  }

 private:
  const MatmulJob* jobs_;
  int rows_, K_ = 0, blocks_ = 0;
  int first_[MAX_PRODUCT_GROUP + 1] = {0};
  double work_ = 0.0;
};

}  // namespace tokentrail

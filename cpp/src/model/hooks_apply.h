#pragma once
#include "tokentrail/model.h"

namespace tokentrail {
// Interventions then capture at (point, layer) over rows [n][width] at positions pos0...
// `heads` > 0 when the width is split into that many head segments.
void apply_site(Hooks* hooks, int point, int layer, float* data, int n, int width, int pos0, int heads);
// Copy rows (each `row_size` floats, reported with `row_shape`) of the wanted positions.
void capture_rows(Site* site, const float* data, int n, int row_size, int pos0, std::vector<int64_t> row_shape);
}  // namespace tokentrail

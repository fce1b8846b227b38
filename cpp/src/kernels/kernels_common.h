// Headers every kernel variant needs, included before its namespace opens.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "block_formats.h"
#include "product_group.h"
#include "tokentrail/kernels.h"
#include "tokentrail/thread_pool.h"

// Headers every kernel variant needs, included before its namespace opens.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "block_formats.h"
#include "tokentrail/kernels.h"

// Int8-activation products with AVX-512 VNNI and AMX (Intel Xeon, Sapphire Rapids and later):
// the Q8_0 row-lane kernel multiplies a block of 16 rows and 16 tokens per AMX tile product
// (int8_impl.h, "AMX tiles"); every other product is the VNNI variant's. The integer sums are
// exact either way and the float steps the same, so results equal the VNNI variant's bit for bit.
#include <immintrin.h>

#include <atomic>

#include "avx512_transpose.h"
#include "int8_x86.h"
#include "kernels_common.h"

namespace tokentrail {
namespace int8_avx512amx {

#include "int8_avx512vnni_iv.h"

#include "int8_impl.h"

const Int8KernelTable table = make_int8_table("avx512amx");

}  // namespace int8_avx512amx
}  // namespace tokentrail

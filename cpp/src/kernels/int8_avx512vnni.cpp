// Int8-activation products with AVX-512 VNNI: vpdpbusd multiplies four u8
// activation bytes by four s8 weights and adds them into each int32 lane.
#include <immintrin.h>

#include "avx512_transpose.h"
#include "int8_x86.h"
#include "kernels_common.h"

namespace tokentrail {
namespace int8_avx512vnni {

#include "int8_avx512vnni_iv.h"

#include "int8_impl.h"

const Int8KernelTable table = make_int8_table("avx512vnni");

}  // namespace int8_avx512vnni
}  // namespace tokentrail

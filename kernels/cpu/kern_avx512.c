/* speed_cpu_kernels_avx512: kern_impl.h for avx512 — compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c; used only when speed_cpu_isa_detect() >= SPEED_CPU_ISA_AVX512. */
#define KERN_ISA      2
#define KERN_ISA_ENUM SPEED_CPU_ISA_AVX512
#define KERN_SUFFIX   avx512
#include "kern_impl.h"

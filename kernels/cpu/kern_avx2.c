/* speed_cpu_kernels_avx2: kern_impl.h for avx2 — compiled with -mavx2 -mfma -mf16c; used only when speed_cpu_isa_detect() >= SPEED_CPU_ISA_AVX2. */
#define KERN_ISA      1
#define KERN_ISA_ENUM SPEED_CPU_ISA_AVX2
#define KERN_SUFFIX   avx2
#include "kern_impl.h"

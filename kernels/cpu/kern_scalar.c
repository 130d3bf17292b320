/* speed_cpu_kernels_scalar: kern_impl.h for scalar — portable C, no ISA flags: the fallback for any machine. */
#define KERN_ISA      0
#define KERN_ISA_ENUM SPEED_CPU_ISA_SCALAR
#define KERN_SUFFIX   scalar
#include "kern_impl.h"

// SPDX-License-Identifier: MIT
// Build-time probe (CMake try_run): prints the best instruction-set level this machine can run:
// "avx512" (F, BW, DQ, VL, BF16 + the AVX2 set), "avx2" (AVX2, FMA, F16C, BMI2) or "none".
// Compiled without any -m flag so that it runs everywhere; __builtin_cpu_supports also checks that the
// OS saves the wide registers. Clang 14 does not know the "f16c" feature string, so F16C is read from CPUID.
#include <cstdio>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static bool has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  return (ecx & bit_F16C) != 0;
}

int main() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && has_f16c();
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bf16");
  std::printf("%s", avx512 ? "avx512" : (avx2 ? "avx2" : "none"));
  return 0;
}
#else
int main() {
  std::printf("none");
  return 0;
}
#endif

// SPDX-License-Identifier: MIT
// ODR test driver: links odr_a.cpp and odr_b.cpp into one program and checks that both compute the same thing.
#include <cmath>
#include <cstdio>

double memoryformer_odr_a();
double memoryformer_odr_b();
bool memoryformer_odr_b_shape_error_thrown();

int main() {
  const double a = memoryformer_odr_a();
  const double b = memoryformer_odr_b();
  if (!(std::abs(a - b) <= 1e-12 * (1.0 + std::abs(b)))) {
    std::fprintf(stderr, "odr: TU a computed %.17g, TU b computed %.17g\n", a, b);
    return 1;
  }
  if (!memoryformer_odr_b_shape_error_thrown()) {
    std::fprintf(stderr, "odr: check_shape did not throw ShapeError\n");
    return 1;
  }
  std::printf("odr: ok (%.17g)\n", a);
  return 0;
}

// SPDX-License-Identifier: MIT
// Consumer test (every project under tests/cmake/ builds this one file): a program using memoryformer the way a user would, with its own checks.
#include <cmath>
#include <cstdio>
#include <span>

#include <memoryformer/random.hpp>
#include <memoryformer/types.hpp>

int main() {
  using memoryformer::Index;
  memoryformer::Matrix<float> m(3, 4);
  memoryformer::Rng rng(42);
  rng.fill_normal(std::span<float>(m.data(), static_cast<std::size_t>(m.size())), 0.0, 1.0);

  // Row-major: element (0, 1) is the second float in memory.
  if (m.data()[1] != m(0, 1)) {
    std::fprintf(stderr, "consumer: Matrix is not row-major\n");
    return 1;
  }
  // The same seed gives the same numbers.
  memoryformer::Rng again(42);
  if (static_cast<float>(again.normal(0.0, 1.0)) != m(0, 0)) {
    std::fprintf(stderr, "consumer: Rng is not reproducible\n");
    return 1;
  }
  // The mean of many N(0, 1) draws is near 0 (4 sigma at n = 10000 is 0.04).
  double sum = 0.0;
  const Index n = 10000;
  for (Index i = 0; i < n; ++i) sum += rng.normal();
  const double mean = sum / static_cast<double>(n);
  if (!(std::abs(mean) < 0.04)) {
    std::fprintf(stderr, "consumer: mean of normals = %g\n", mean);
    return 1;
  }
  std::printf("consumer: ok (m(0,0) = %g, mean = %g)\n", static_cast<double>(m(0, 0)), mean);
  return 0;
}

// SPDX-License-Identifier: MIT
// ODR test, first TU: includes the umbrella header and instantiates library templates that
// odr_b.cpp instantiates too, so the link step sees every inline/template definition twice.
#include <memoryformer/memoryformer.hpp>

#include <span>

double memoryformer_odr_a() {
  memoryformer::Matrix<double> m(5, 3);  // [5, 3]
  memoryformer::Rng rng(7);
  rng.fill_normal(std::span<double>(m.data(), static_cast<std::size_t>(m.size())), 0.0, 1.0);
  memoryformer::detail::check_shape("memoryformer_odr_a", "m", m.rows(), m.cols(), 5, 3);
  return m.sum();
}

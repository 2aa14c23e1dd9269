// SPDX-License-Identifier: MIT
// ODR test, second TU: the same umbrella header and the same draws as odr_a.cpp, computed with a plain loop,
// plus a shape check that must throw.
#include <memoryformer/memoryformer.hpp>

#include <span>

double memoryformer_odr_b() {
  memoryformer::Rng rng(7);
  double sum = 0.0;
  for (int i = 0; i < 15; ++i) sum += rng.normal(0.0, 1.0);
  return sum;
}

bool memoryformer_odr_b_shape_error_thrown() {
  memoryformer::Matrix<float> m(2, 2);  // [2, 2]
  try {
    memoryformer::detail::check_shape("memoryformer_odr_b", "m", m.rows(), m.cols(), 3, 2);
  } catch (const memoryformer::ShapeError&) {
    return true;
  }
  return false;
}

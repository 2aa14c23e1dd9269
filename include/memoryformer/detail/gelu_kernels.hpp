// SPDX-License-Identifier: MIT
// GeLU in float without a libm call (design §7.4, optional GeLU): y = x·Φ(x) and GeLU'(x) = Φ(x) + x·φ(x), with the
// normal CDF Φ(x) = ½·erfc(−x/√2) and density φ(x) = e^(−x²/2)/√(2π), element-wise over rows of floats.
//   |z| < ½ (z = x/√2): Φ = ½ + ½·erf(z), erf by its Taylor series to z^13 (truncation < 1e-9 relative);
//   |z| ≥ ½:           ½·erfc(|z|) = ½·t·exp(−z² + P(t)), t = 1/(1 + |z|/2), P the degree-9 Chebyshev fit of
//                      Press et al., Numerical Recipes, §6.2 (relative error < 1.2e-7), and Φ = 1 − ½·erfc(z)
//                      for z > 0, ½·erfc(|z|) for z < 0, so the small tail of Φ keeps its relative accuracy;
// the exponentials through fast_exp.hpp's exp2 (≤ 2^-22), zero below e^-87. The scalar and vector versions are the
// same operations in the same order (explicit fused multiply-adds, both branches computed and selected per lane),
// so they agree bit for bit; double keeps std::erf (nn/gelu.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <numbers>

#include "../types.hpp"
#include "fast_exp.hpp"
#include "simd.hpp"
#include "vector_ops.hpp"

namespace memoryformer::detail {

namespace gelu_constants {
inline constexpr float inv_sqrt2 = float(1.0 / std::numbers::sqrt2);
inline constexpr float inv_sqrt_2pi = float(std::numbers::inv_sqrtpi / std::numbers::sqrt2);
/// Below this |z| the Taylor series of erf, from it the erfc fit.
inline constexpr float split = 0.5f;
/// erf(z) = z·Σ_k taylor[k]·z^(2k), taylor[k] = (2/√π)·(−1)^k / (k!·(2k + 1)).
inline constexpr std::array<float, 7> taylor = [] {
  std::array<float, 7> c{};
  double factorial = 1;
  for (int k = 0; k < 7; ++k) {
    if (k > 0) factorial *= k;
    c[std::size_t(k)] = float(2 * std::numbers::inv_sqrtpi * (k % 2 ? -1 : 1) / (factorial * (2 * k + 1)));
  }
  return c;
}();
/// P(t) = Σ_k erfc_fit[k]·t^k of the erfc fit.
inline constexpr std::array<float, 10> erfc_fit = {-1.26551223f, 1.00002368f, 0.37409196f, 0.09678418f,
                                                   -0.18628806f, 0.27886807f, -1.13520398f, 1.48851587f,
                                                   -0.82215223f, 0.17087277f};
}  // namespace gelu_constants

/// e^a for a ≤ 0, 0 below min_natural_exponent (where exp_clamped would clamp).
inline float gelu_exp(float a) { return a < min_natural_exponent ? 0.0f : exp_clamped(a); }

/// Φ(x), the normal CDF, in float.
inline float normal_cdf(float x) {
  using namespace gelu_constants;
  const float z = x * inv_sqrt2, a = std::abs(z);
  if (a < split) {
    const float z2 = z * z;
    float r = taylor[6];
    for (int k = 5; k >= 0; --k) r = madd(r, z2, taylor[std::size_t(k)]);
    return madd(0.5f, z * r, 0.5f);
  }
  const float t = 1.0f / madd(0.5f, a, 1.0f);
  float p = erfc_fit[9];
  for (int k = 8; k >= 0; --k) p = madd(p, t, erfc_fit[std::size_t(k)]);
  const float half_t = 0.5f * t, e = gelu_exp(madd(-a, a, p));
  return z > 0.0f ? madd(-half_t, e, 1.0f) : half_t * e;
}

/// φ(x), the normal density, in float.
inline float normal_pdf(float x) {
  const float z = x * gelu_constants::inv_sqrt2;
  return gelu_constants::inv_sqrt_2pi * gelu_exp(-(z * z));
}

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
/// The vector version of gelu_exp.
template <Isa I>
MEMORYFORMER_ALWAYS_INLINE typename VectorOps<I>::V gelu_exp(typename VectorOps<I>::V a) {
  using O = VectorOps<I>;
  return O::select_if_less(a, O::set1(min_natural_exponent), O::zero(), exp_clamped<I>(a));
}

/// The vector version of normal_cdf: both branches on every lane, then selected.
template <Isa I>
MEMORYFORMER_ALWAYS_INLINE typename VectorOps<I>::V normal_cdf(typename VectorOps<I>::V x) {
  using O = VectorOps<I>;
  using namespace gelu_constants;
  const auto z = O::mul(x, O::set1(inv_sqrt2)), a = O::abs(z), half = O::set1(0.5f), one = O::set1(1.0f);
  const auto z2 = O::mul(z, z);
  auto r = O::set1(taylor[6]);
  for (int k = 5; k >= 0; --k) r = O::fmadd(r, z2, O::set1(taylor[std::size_t(k)]));
  const auto small = O::fmadd(half, O::mul(z, r), half);
  const auto t = O::div(one, O::fmadd(half, a, one));
  auto p = O::set1(erfc_fit[9]);
  for (int k = 8; k >= 0; --k) p = O::fmadd(p, t, O::set1(erfc_fit[std::size_t(k)]));
  // −a·a + p = −(a·a − p): negating a rounded result is exact, so this is madd(−a, a, p) of the scalar version.
  const auto half_t = O::mul(half, t), e = gelu_exp<I>(O::sub(O::zero(), O::fmsub(a, a, p)));
  const auto upper = O::sub(O::zero(), O::fmsub(half_t, e, one)), lower = O::mul(half_t, e);
  return O::select_if_less(a, O::set1(split), small, O::select_if_less(O::zero(), z, upper, lower));
}

/// The vector version of normal_pdf.
template <Isa I>
MEMORYFORMER_ALWAYS_INLINE typename VectorOps<I>::V normal_pdf(typename VectorOps<I>::V x) {
  using O = VectorOps<I>;
  const auto z = O::mul(x, O::set1(gelu_constants::inv_sqrt2));
  return O::mul(O::set1(gelu_constants::inv_sqrt_2pi), gelu_exp<I>(O::sub(O::zero(), O::mul(z, z))));
}
MEMORYFORMER_SIMD_WARNINGS_END
#endif

/// GeLU of a row: forward (Backward = false) out[j] = x[j]·Φ(x[j]); backward out[j] = dy[j]·(Φ(x[j]) + x[j]·φ(x[j]))
/// for j < n. out may be x or dy.
template <Isa I, bool Backward>
void gelu_row(float* out, const float* x, const float* dy, Index n) {
  Index j = 0;
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
  if constexpr (I != Isa::Scalar) {
    using O = VectorOps<I>;
    for (; j + O::n <= n; j += O::n) {
      const auto v = O::load(x + j);
      if constexpr (Backward)
        O::store(out + j, O::mul(O::load(dy + j), O::fmadd(v, normal_pdf<I>(v), normal_cdf<I>(v))));
      else
        O::store(out + j, O::mul(v, normal_cdf<I>(v)));
    }
  }
#endif
  for (; j < n; ++j)
    out[j] = Backward ? dy[j] * madd(x[j], normal_pdf(x[j]), normal_cdf(x[j])) : x[j] * normal_cdf(x[j]);
}

/// y[j] = x[j]·Φ(x[j]) for j < n; y may be x.
template <Isa I>
void gelu_forward_row(float* y, const float* x, Index n) {
  gelu_row<I, false>(y, x, nullptr, n);
}

/// dx[j] = dy[j]·(Φ(x[j]) + x[j]·φ(x[j])) for j < n; dx may be x or dy.
template <Isa I>
void gelu_backward_row(float* dx, const float* x, const float* dy, Index n) {
  gelu_row<I, true>(dx, x, dy, n);
}

}  // namespace memoryformer::detail

// SPDX-License-Identifier: MIT
// AdamW with decoupled weight decay, per-kind learning-rate groups and a lazy row-sparse mode for bucket tables and
// embeddings; the optimiser of the training recipe (design §3.3: β = (0.9, 0.95), eps 1e-8, weight decay 0.1;
// §9.1–9.2).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <type_traits>
#include <string_view>
#include <utility>
#include <vector>

#include "../detail/checked_size.hpp"
#include "../detail/checks.hpp"
#if defined(__AVX512F__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

#include "../detail/half.hpp"
#include "../detail/parallel.hpp"
#include "../detail/scratch.hpp"
#include "../error.hpp"
#include "../parameter.hpp"
#include "../types.hpp"
#include "clip.hpp"

namespace memoryformer {

/// Learning-rate multipliers per ParameterKind ("lr groups"): a parameter's rate is lr · multiplier(kind).
struct LrMultipliers {
  double table = 1.0;
  double dense = 1.0;
  double embedding = 1.0;
  double bias = 1.0;
  double norm = 1.0;

  /// The multiplier of `kind`.
  double operator()(ParameterKind kind) const {
    switch (kind) {
      case ParameterKind::Table: return table;
      case ParameterKind::Dense: return dense;
      case ParameterKind::Embedding: return embedding;
      case ParameterKind::Bias: return bias;
      case ParameterKind::Norm: return norm;
    }
    return 1.0;
  }
};

/// How AdamW updates the sparse kinds (Table, Embedding). Other kinds are always updated densely.
enum class SparseUpdate {
  /// Every row, every step: exactly torch.optim.AdamW. Rows without gradient still move (their moments decay,
  /// their momentum keeps pushing, weight decay shrinks them).
  Dense,
  /// Only rows whose touched_rows flag is set; see AdamW for the exact rule.
  RowSparse,
};

/// How AdamW stores its two moments (the parameters themselves keep their own type).
enum class MomentStorage {
  Native,    ///< the parameters' Scalar (float32 for float models): the default
  BFloat16,  ///< bfloat16, rounded to nearest even: half the moment memory and traffic of float32
};

/// Hyper-parameters of AdamW. The defaults are the paper's recipe (design §3.3).
struct AdamWOptions {
  double beta1 = 0.9;           ///< first-moment decay, in [0, 1)
  double beta2 = 0.95;          ///< second-moment decay, in [0, 1)
  double eps = 1e-8;            ///< added to sqrt(v̂), > 0
  double weight_decay = 0.1;    ///< decoupled decay, applied only where decays(kind) (not biases or norms)
  LrMultipliers lr_multipliers; ///< per-kind rate multipliers, all 1 by default
  SparseUpdate sparse_update = SparseUpdate::Dense;
  MomentStorage moments = MomentStorage::Native;  ///< storage of m and v; see AdamW
};

/// A named view of one buffer of optimiser state, for checkpoints. Shape is row-major.
template <std::floating_point Scalar>
struct OptimizerStateTensor {
  std::string name;
  std::vector<Index> shape;
  std::span<Scalar> values;
};

namespace detail::adamw {

inline std::size_t checked_parameter_size(std::string_view where, const std::string& name,
                                          const std::vector<Index>& shape, std::size_t value_size,
                                          std::size_t grad_size) {
  Index n = 1;
  for (Index d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) {
      n = -1;
      break;
    }
  }
  if (n < 0 || std::size_t(n) != value_size || grad_size != value_size)
    throw ShapeError(std::string(where) + ": parameter '" + name + "' has " + std::to_string(value_size) +
                     " values and " + std::to_string(grad_size) + " gradients, its shape needs " +
                     (n < 0 ? std::string("an invalid count") : std::to_string(n)));
  return value_size;
}

inline bool is_sparse_kind(ParameterKind kind) {
  return kind == ParameterKind::Table || kind == ParameterKind::Embedding;
}

/// v = n zeros, on huge pages where the kernel agrees: every step streams all moments, and with 4 KB pages a few
/// hundred MB of them would also stream through the TLB. The advice comes before the zeros are written, so the
/// pages are huge from their first touch.
template <class T>
void assign_zeros_on_huge_pages(std::vector<T>& v, std::size_t n) {
  v.reserve(n);
  advise_huge_pages(v.data(), n * sizeof(T));
  v.assign(n, T(0));
}


/// The constants of one update range: the parameter's rate and decay, β, the bias corrections of its count, and
/// the clip scale (applied as the separate clip_grad_norm pass does: g ← Scalar(g · scale)).
struct Coefficients {
  double b1 = 0, b2 = 0, one_minus_b1 = 0, one_minus_b2 = 0;
  double bc1 = 1, bc2 = 1;  // 1 − β1^t, 1 − β2^t
  double eps = 0, eta = 0, lambda = 0;
  double scale = 1;
  bool scaled = false;
};

/// Moment storage: the parameter type itself, or bfloat16 bits.
template <class M>
inline double load_moment(M x) {
  if constexpr (std::is_same_v<M, std::uint16_t>) return double(bf16_to_float(x));
  else return double(x);
}
template <class M>
inline M store_moment(double x) {
  if constexpr (std::is_same_v<M, std::uint16_t>) return float_to_bf16(float(x));
  else return M(x);
}

/// The scalar kernel: AdamW on elements [0, n) (moments m, v of type M), then g ← 0 when `zero_grad`. Every
/// multiply-add is an explicit fma so that the SIMD kernel, which uses the same fmas, gives the same bits.
template <class Scalar, class M>
inline void update_scalar(Scalar* theta, Scalar* grad, M* m_, M* v_, std::size_t n, const Coefficients& c,
                          bool zero_grad) {
  for (std::size_t i = 0; i < n; ++i) {
    double g = double(grad[i]);
    if (c.scaled) g = double(Scalar(g * c.scale));
    const double m = std::fma(c.b1, load_moment(m_[i]), c.one_minus_b1 * g);
    const double v = std::fma(c.b2, load_moment(v_[i]), (c.one_minus_b2 * g) * g);
    m_[i] = store_moment<M>(m);
    v_[i] = store_moment<M>(v);
    const double th = double(theta[i]);
    const double u = std::fma(c.lambda, th, (m / c.bc1) / (std::sqrt(v / c.bc2) + c.eps));
    theta[i] = Scalar(std::fma(-c.eta, u, th));
    if (zero_grad) grad[i] = Scalar(0);
  }
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
inline __m512d load8_moment(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
inline __m512d load8_moment(const std::uint16_t* p) {
  const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return _mm512_cvtps_pd(_mm256_castsi256_ps(bits));
}
inline void store8_moment(float* p, __m512d x) { _mm256_storeu_ps(p, _mm512_cvtpd_ps(x)); }
/// float_to_bf16 on 8 lanes: round to nearest even, NaN kept quiet.
inline void store8_moment(std::uint16_t* p, __m512d x) {
  const __m256i u = _mm256_castps_si256(_mm512_cvtpd_ps(x));
  const __m256i high = _mm256_srli_epi32(u, 16);
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                               _mm256_and_si256(high, _mm256_set1_epi32(1)))), 16);
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                            _mm256_set1_epi32(0x7f800000));
  const __m256i bits = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), is_nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtepi32_epi16(bits));
}

/// The AVX-512 kernel for float parameters: update_scalar on 8 elements at a time, in double, with the same fmas.
template <class M>
inline void update_avx512(float* theta, float* grad, M* m_, M* v_, std::size_t n, const Coefficients& c,
                          bool zero_grad) {
  const __m512d b1 = _mm512_set1_pd(c.b1), b2 = _mm512_set1_pd(c.b2);
  const __m512d omb1 = _mm512_set1_pd(c.one_minus_b1), omb2 = _mm512_set1_pd(c.one_minus_b2);
  const __m512d bc1 = _mm512_set1_pd(c.bc1), bc2 = _mm512_set1_pd(c.bc2), eps = _mm512_set1_pd(c.eps);
  const __m512d eta = _mm512_set1_pd(c.eta), lambda = _mm512_set1_pd(c.lambda), scale = _mm512_set1_pd(c.scale);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m512d g = _mm512_cvtps_pd(_mm256_loadu_ps(grad + i));
    if (c.scaled) g = _mm512_cvtps_pd(_mm512_cvtpd_ps(_mm512_mul_pd(g, scale)));
    const __m512d m = _mm512_fmadd_pd(b1, load8_moment(m_ + i), _mm512_mul_pd(omb1, g));
    const __m512d v = _mm512_fmadd_pd(b2, load8_moment(v_ + i), _mm512_mul_pd(_mm512_mul_pd(omb2, g), g));
    store8_moment(m_ + i, m);
    store8_moment(v_ + i, v);
    const __m512d th = _mm512_cvtps_pd(_mm256_loadu_ps(theta + i));
    const __m512d q = _mm512_div_pd(_mm512_div_pd(m, bc1), _mm512_add_pd(_mm512_sqrt_pd(_mm512_div_pd(v, bc2)), eps));
    const __m512d u = _mm512_fmadd_pd(lambda, th, q);
    _mm256_storeu_ps(theta + i, _mm512_cvtpd_ps(_mm512_fnmadd_pd(eta, u, th)));
    if (zero_grad) _mm256_storeu_ps(grad + i, _mm256_setzero_ps());
  }
  update_scalar(theta + i, grad + i, m_ + i, v_ + i, n - i, c, zero_grad);
}
#endif

/// True when `update` takes the SIMD kernel for Scalar (float on an AVX-512 build).
template <class Scalar>
constexpr bool has_simd_update() {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  return std::is_same_v<Scalar, float>;
#else
  return false;
#endif
}

/// AdamW on [0, n): the SIMD kernel when `simd` and available, else the scalar one (same bits).
template <class Scalar, class M>
inline void update(Scalar* theta, Scalar* grad, M* m, M* v, std::size_t n, const Coefficients& c, bool zero_grad,
                   bool simd = true) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<Scalar, float>) {
    if (simd) {
      update_avx512(theta, grad, m, v, n, c, zero_grad);
      return;
    }
  }
#endif
  (void)simd;
  update_scalar(theta, grad, m, v, n, c, zero_grad);
}

}  // namespace detail::adamw

/**
 * @brief AdamW (Loshchilov & Hutter) over a list of ParameterViews, with the paper's defaults.
 *
 * For every element θ with gradient g, at count t (see below), with η = lr · lr_multipliers(kind) and
 * λ = weight_decay if decays(kind) else 0 (biases and norms are not decayed):
 *
 *     m ← β1·m + (1 − β1)·g
 *     v ← β2·v + (1 − β2)·g²
 *     m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
 *     θ ← θ − η·(λ·θ + m̂ / (sqrt(v̂) + eps))
 *
 * which is torch.optim.AdamW's update (decoupled decay η·λ·θ; the same rounding aside). Arithmetic is in double
 * per element, with the three multiply-adds (β1·m + …, β2·v + …, θ − η·(λ·θ + …)) each rounded once (fma), so the
 * vectorised kernel and the scalar one give the same bits. Moments are stored as Scalar, or as bfloat16 with
 * MomentStorage::BFloat16 (rounded to float, then to nearest-even bfloat16; the step itself uses the unrounded m, v).
 *
 * **Counts.** A global count t, incremented by every step, is used by every parameter except the sparse kinds
 * (Table, Embedding) under SparseUpdate::RowSparse. There, each row r has its own count t_r:
 *   - a row is *touched* in a step if it is listed in touched_list, or else `(*touched_rows)[r] != 0`
 *     (touched_rows == nullptr: every row is touched);
 *   - a touched row does t_r ← t_r + 1 and then the update above with t = t_r, on every element of the row
 *     (also elements whose gradient is 0);
 *   - an untouched row is left bit-identical: value, m, v and t_r. Its moments do not decay and no weight decay
 *     applies while it is untouched ("lazy" moments).
 * So a row evolves exactly as dense AdamW run only on the steps in which it was touched. This differs from
 * torch.optim.SparseAdam and TF's LazyAdam, which also skip untouched rows but bias-correct with the global step
 * count; with per-row counts a row's first update is a full-size Adam step however late it comes, which suits
 * bucket tables whose rows are hit rarely. Only the listed rows are visited: the cost follows the rows touched.
 *
 * Counts are stored as Scalar so that they export as checkpoint tensors with the moments. In float they are exact up
 * to 2^24 = 16,777,216 steps and then stop increasing, which changes nothing: for β ≤ 1 − 1e-5, β^(2^24) is below
 * double precision, so both bias corrections are exactly 1 from there on.
 *
 * **Two entry points.** step(lr) reads gradients and touched rows and never clears them: call it after backward and
 * before the layers' zero_grad(). step_fused(lr, max_norm) is what the Trainer uses: one pass computes the global
 * gradient norm (as global_grad_norm), a second applies the clip scale (as clip_grad_norm would), the update, and
 * zeroes each gradient it read, then clears the touched flags and lists — so afterwards the gradients are in the
 * state zero_grad() leaves, and zero_grad() has nothing left to clear of them.
 *
 * **Memory traffic.** Per parameter value visited, step_fused reads θ, g, m, v and writes θ, m, v and g = 0: with
 * float parameters and float moments 16 bytes read + 16 written = 32 bytes (bfloat16 moments: 24); step(lr) does
 * not write g (28 bytes; 20 with bfloat16 moments). The norm pass reads g once more (4 bytes). A view with
 * ParameterView::values_written is told of every range right after its update, while the range is still in cache
 * (a Memory Layer's packed copy then costs one more write per value instead of a pass of its own).
 *
 * **Threads.** Both passes run on OpenMP threads over pieces of work cut from the parameters alone (never from the
 * thread count); each element's update depends on nothing else and the norm's piece sums are added in piece order,
 * so results have the same bits for any thread count. The views must stay valid (and their sizes unchanged) for the
 * optimiser's lifetime.
 *
 * @tparam Scalar float or double (the parameters' type).
 */
template <std::floating_point Scalar>
class AdamW {
 public:
  /**
   * @brief Allocates zero moments for `params` (the count starts at 0).
   * @throws ConfigError for β outside [0, 1), eps ≤ 0, negative weight decay or multiplier, non-finite values,
   *         duplicate parameter names, (RowSparse) a sparse-kind parameter whose row_size does not divide its size, or
   *         moments that cannot be allocated; ShapeError when a parameter's value/grad sizes disagree with its shape.
   */
  explicit AdamW(std::vector<ParameterView<Scalar>> params, AdamWOptions options = {})
      : params_(std::move(params)), options_(options) {
    constexpr std::string_view where = "AdamW";
    auto finite_nonneg = [](double x) { return std::isfinite(x) && x >= 0.0; };
    detail::check_config(finite_nonneg(options_.beta1) && options_.beta1 < 1.0, where,
                         "beta1 = " + std::to_string(options_.beta1) + " is outside [0, 1)");
    detail::check_config(finite_nonneg(options_.beta2) && options_.beta2 < 1.0, where,
                         "beta2 = " + std::to_string(options_.beta2) + " is outside [0, 1)");
    detail::check_config(std::isfinite(options_.eps) && options_.eps > 0.0, where,
                         "eps = " + std::to_string(options_.eps) + " must be positive");
    detail::check_config(finite_nonneg(options_.weight_decay), where,
                         "weight_decay = " + std::to_string(options_.weight_decay) + " must be ≥ 0");
    for (ParameterKind k : {ParameterKind::Table, ParameterKind::Dense, ParameterKind::Embedding,
                            ParameterKind::Bias, ParameterKind::Norm})
      detail::check_config(finite_nonneg(options_.lr_multipliers(k)), where,
                           "a learning-rate multiplier is " + std::to_string(options_.lr_multipliers(k)) +
                               ", must be ≥ 0");
    detail::check_config(options_.moments == MomentStorage::Native || options_.moments == MomentStorage::BFloat16,
                         where, "unknown moment storage " + std::to_string(int(options_.moments)));
    state_.reserve(params_.size());
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      for (std::size_t j = 0; j < i; ++j)
        detail::check_config(params_[j].name != p.name, where, "two parameters are named '" + p.name + "'");
      const std::size_t n = detail::adamw::checked_parameter_size(where, p.name, p.shape, p.value.size(), p.grad.size());
      ParamState s;
      const Index moment_bytes = 2 * Index(n) * Index(bf16_moments() ? 2 : sizeof(Scalar));
      detail::allocating(where, "the moments of parameter '" + p.name + "' (" + std::to_string(n) + " values each)",
                         moment_bytes, [&] {
                           if (bf16_moments()) {
                             detail::adamw::assign_zeros_on_huge_pages(s.m16, n);
                             detail::adamw::assign_zeros_on_huge_pages(s.v16, n);
                           } else {
                             detail::adamw::assign_zeros_on_huge_pages(s.m, n);
                             detail::adamw::assign_zeros_on_huge_pages(s.v, n);
                           }
                         });
      if (row_sparse(p)) {
        detail::check_config(p.row_size > 0 && n % std::size_t(p.row_size) == 0, where,
                             "parameter '" + p.name + "' has row_size " + std::to_string(p.row_size) +
                                 ", which does not divide its " + std::to_string(n) + " values");
        s.row_steps.assign(n / std::size_t(p.row_size), Scalar(0));
      }
      state_.push_back(std::move(s));
    }
    if (std::any_of(params_.begin(), params_.end(), [](const auto& p) { return p.sharded; }))
      for (const auto& p : params_) (p.sharded ? sharded_ : whole_).push_back(p);
  }

  /**
   * @brief One update of every parameter from its current gradient, with base learning rate `lr`. Reads the
   *        gradients and touched rows, changes neither.
   * @throws ConfigError for a negative or non-finite lr; ShapeError when a touched_rows vector (RowSparse) does not
   *         have one flag per row or a touched list names a row past the end. All are checked before any parameter
   *         changes.
   */
  void step(double lr) {
    check_step("AdamW::step", lr);
    // step_fused gets the same check from its norm pass (live_pieces), before it changes anything.
    for (const auto& p : params_) detail::clip::check_touched(p, "AdamW::step");
    apply(lr, 1.0, false);
  }

  /**
   * @brief Clip and step in two passes (see the class comment): the global gradient norm N (as global_grad_norm),
   *        then every parameter updated from its gradient scaled by max_norm / N when N > max_norm (as
   *        clip_grad_norm then step(lr) would), each gradient read zeroed, and the touched flags and lists cleared.
   * @param max_norm clipping threshold; 0 disables clipping
   * @return N, the norm before clipping. When N is not finite nothing changes (no update, gradients kept, count not
   *         advanced), so the caller can report it.
   * @throws ConfigError for a negative or non-finite lr or max_norm; ShapeError as step(). Checked before any change.
   */
  double step_fused(double lr, double max_norm) {
    detail::check_config(std::isfinite(max_norm) && max_norm >= 0.0, "AdamW::step_fused",
                         "max_norm = " + std::to_string(max_norm) + " must be ≥ 0 (0: no clipping)");
    check_step("AdamW::step_fused", lr);
    const double norm = grad_norm(max_norm > 0.0);
    if (!std::isfinite(norm)) return norm;
    const double scale = max_norm > 0.0 && norm > max_norm ? max_norm / norm : 1.0;
    apply(lr, scale, true);
    for (const auto& p : params_) {
      if (p.touched_rows == nullptr) continue;
      if (p.touched_list != nullptr) {
        for (Index r : *p.touched_list) (*p.touched_rows)[std::size_t(r)] = 0;
        p.touched_list->clear();
      } else {
        std::fill(p.touched_rows->begin(), p.touched_rows->end(), std::uint8_t(0));
      }
    }
    return norm;
  }

  /**
   * @brief Table parallelism: the parameters marked sharded are this rank's parts of parameters split across ranks,
   *        so the global gradient norm that step_fused clips by needs the sum of their squares over all ranks.
   *        `sum_over_ranks` gets this rank's sum of squares of its sharded gradients and returns the sum over the
   *        ranks, the same value on every rank (e.g. all_reduce_sum on the Communicator; collective then); the whole
   *        parameters count once. Without it, step_fused refuses to clip when sharded parameters exist (each rank
   *        would clip by another norm and the replicas would drift apart).
   */
  void set_sharded_norm_sum(std::function<double(double)> sum_over_ranks) { sharded_norm_sum_ = std::move(sum_over_ranks); }

  /// Number of steps since construction, reset() or the loaded state (the global count t).
  std::uint64_t steps() const { return std::uint64_t(step_[0]); }

  /// Back to the freshly constructed state: zero moments and counts.
  void reset() {
    step_[0] = Scalar(0);
    for (auto& s : state_) {
      std::fill(s.m.begin(), s.m.end(), Scalar(0));
      std::fill(s.v.begin(), s.v.end(), Scalar(0));
      std::fill(s.m16.begin(), s.m16.end(), std::uint16_t(0));
      std::fill(s.v16.begin(), s.v16.end(), std::uint16_t(0));
      std::fill(s.row_steps.begin(), s.row_steps.end(), Scalar(0));
    }
    release_expanded();
  }

  const AdamWOptions& options() const { return options_; }
  const std::vector<ParameterView<Scalar>>& parameters() const { return params_; }

  /**
   * @brief Writable views of the whole state, for checkpoints, named
   *   "<prefix>step" [1]                       the global count t,
   *   "<prefix>m.<param>", "<prefix>v.<param>"  moments, with the parameter's shape,
   *   "<prefix>row_step.<param>" [rows]        per-row counts (RowSparse sparse-kind parameters only).
   * With bfloat16 moments, m and v are handed out expanded (exactly) into Scalar buffers under the same names, so a
   * checkpoint does not depend on the moment storage; load_state() rounds them back (to nearest even) and the next
   * step frees the buffers. Writing into those spans changes the state only through load_state().
   * With native moments the spans stay valid for the optimiser's lifetime; with bfloat16 moments until the next
   * step, reset() or load_state(). To save:
   * `for (auto& s : opt.state_tensors()) ckpt.add_tensor(s.name, s.shape, s.values);`
   */
  std::vector<OptimizerStateTensor<Scalar>> state_tensors(std::string_view prefix = "adamw.") {
    const std::string pre(prefix);
    std::vector<OptimizerStateTensor<Scalar>> out;
    out.push_back({pre + "step", {1}, std::span<Scalar>(step_)});
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      auto& s = state_[i];
      if (bf16_moments()) {
        s.m.resize(s.m16.size());
        s.v.resize(s.v16.size());
        for (std::size_t j = 0; j < s.m16.size(); ++j) s.m[j] = Scalar(detail::bf16_to_float(s.m16[j]));
        for (std::size_t j = 0; j < s.v16.size(); ++j) s.v[j] = Scalar(detail::bf16_to_float(s.v16[j]));
      }
      out.push_back({pre + "m." + p.name, p.shape, std::span<Scalar>(s.m)});
      out.push_back({pre + "v." + p.name, p.shape, std::span<Scalar>(s.v)});
      if (row_sparse(p))
        out.push_back({pre + "row_step." + p.name, {Index(s.row_steps.size())}, std::span<Scalar>(s.row_steps)});
    }
    return out;
  }

  /**
   * @brief Loads the state from `fill(const std::string& name, const std::vector<Index>& shape, std::span<Scalar> out)`,
   *        called once per tensor of state_tensors(prefix), which must fill `out` or throw. With a Checkpoint:
   *        `opt.load_state([&](const auto& name, const auto& shape, auto out) { ckpt.copy_tensor(name, shape, out); });`
   * Then checks that counts are non-negative integers with every row count ≤ the global count, that first moments
   * are finite and second moments finite and not negative. With bfloat16 moments the loaded values are rounded to
   * bfloat16 (nearest even).
   * @throws FormatError for invalid loaded values, or whatever `fill` throws; on any exception the optimiser is
   *         reset() (a half-loaded state is never kept).
   */
  template <class Fill>
  void load_state(Fill&& fill, std::string_view prefix = "adamw.") {
    try {
      for (auto& t : state_tensors(prefix)) fill(std::as_const(t.name), std::as_const(t.shape), t.values);
      auto is_count = [](Scalar c) { return std::isfinite(c) && c >= Scalar(0) && c == std::floor(c); };
      if (!is_count(step_[0]))
        throw FormatError("AdamW::load_state: step count " + std::to_string(double(step_[0])) +
                          " is not a non-negative integer");
      for (std::size_t i = 0; i < params_.size(); ++i) {
        const auto& s = state_[i];
        for (Scalar c : s.row_steps)
          if (!is_count(c) || c > step_[0])
            throw FormatError("AdamW::load_state: parameter '" + params_[i].name + "' has a row count " +
                              std::to_string(double(c)) + ", expected an integer in [0, " +
                              std::to_string(double(step_[0])) + "]");
        for (std::size_t j = 0; j < s.m.size(); ++j)
          if (!std::isfinite(s.m[j]))
            throw FormatError("AdamW::load_state: parameter '" + params_[i].name + "' has a non-finite first moment " +
                              std::to_string(double(s.m[j])) + " at element " + std::to_string(j));
        for (std::size_t j = 0; j < s.v.size(); ++j)
          if (!(s.v[j] >= Scalar(0)) || !std::isfinite(s.v[j]))
            throw FormatError("AdamW::load_state: parameter '" + params_[i].name + "' has a second moment " +
                              std::to_string(double(s.v[j])) + " at element " + std::to_string(j) +
                              ", expected a finite value ≥ 0");
      }
      if (bf16_moments()) {
        for (auto& s : state_) {
          for (std::size_t j = 0; j < s.m.size(); ++j) s.m16[j] = detail::float_to_bf16(float(s.m[j]));
          for (std::size_t j = 0; j < s.v.size(); ++j) s.v16[j] = detail::float_to_bf16(float(s.v[j]));
        }
        release_expanded();
      }
    } catch (...) {
      reset();
      throw;
    }
  }

 private:
  /// The global gradient norm: as global_grad_norm, or with sharded parameters, whole ones once plus the sharded
  /// ones' sum over the ranks.
  double grad_norm(bool clipping) const {
    if (sharded_.empty()) return global_grad_norm(params_);
    if (!sharded_norm_sum_) {
      detail::check_config(!clipping, "AdamW::step_fused",
                           "parameter '" + sharded_.front().name +
                               "' is sharded across ranks: set_sharded_norm_sum first, so that every rank clips by the "
                               "same global norm");
      return global_grad_norm(params_);
    }
    const double own = detail::clip::sum_of_squares(whole_, detail::clip::live_pieces(whole_, "AdamW::step_fused"));
    const double parts =
        detail::clip::sum_of_squares(sharded_, detail::clip::live_pieces(sharded_, "AdamW::step_fused"));
    return std::sqrt(own + sharded_norm_sum_(parts));
  }

  struct ParamState {
    std::vector<Scalar> m;               // [size of the parameter], first moments (bf16: expanded for checkpoints)
    std::vector<Scalar> v;               // [size of the parameter], second moments (bf16: expanded for checkpoints)
    std::vector<std::uint16_t> m16;      // [size of the parameter], bfloat16 first moments (BFloat16 only)
    std::vector<std::uint16_t> v16;      // [size of the parameter], bfloat16 second moments (BFloat16 only)
    std::vector<Scalar> row_steps;       // [rows], RowSparse sparse kinds only
  };

  bool bf16_moments() const { return options_.moments == MomentStorage::BFloat16; }

  std::function<double(double)> sharded_norm_sum_;  // see set_sharded_norm_sum
  // The views split by ParameterView::sharded, once (the views are fixed for the optimiser's lifetime); both empty
  // unless some parameter is sharded.
  std::vector<ParameterView<Scalar>> whole_, sharded_;

  bool row_sparse(const ParameterView<Scalar>& p) const {
    return options_.sparse_update == SparseUpdate::RowSparse && detail::adamw::is_sparse_kind(p.kind);
  }

  void release_expanded() {
    if (!bf16_moments()) return;
    for (auto& s : state_) {
      std::vector<Scalar>().swap(s.m);
      std::vector<Scalar>().swap(s.v);
    }
  }

  void check_step(const char* where, double lr) const {
    detail::check_config(std::isfinite(lr) && lr >= 0.0, where, "lr = " + std::to_string(lr) + " must be ≥ 0");
    for (const auto& p : params_) {
      if (row_sparse(p) && p.touched_rows != nullptr && p.touched_rows->size() != p.value.size() / std::size_t(p.row_size))
        throw ShapeError(std::string(where) + ": parameter '" + p.name + "' has " +
                         std::to_string(p.touched_rows->size()) + " touched-row flags, expected " +
                         std::to_string(p.value.size() / std::size_t(p.row_size)) + " (one per row of " +
                         std::to_string(p.row_size) + ")");
    }
  }

  detail::adamw::Coefficients coefficients(const ParameterView<Scalar>& p, double lr, double scale) const {
    detail::adamw::Coefficients c;
    c.b1 = options_.beta1;
    c.b2 = options_.beta2;
    c.one_minus_b1 = 1.0 - options_.beta1;
    c.one_minus_b2 = 1.0 - options_.beta2;
    c.eps = options_.eps;
    c.eta = lr * options_.lr_multipliers(p.kind);
    c.lambda = decays(p.kind) ? options_.weight_decay : 0.0;
    c.scale = scale;
    c.scaled = scale != 1.0;
    return c;
  }

  void set_count(detail::adamw::Coefficients& c, double t) const {
    c.bc1 = 1.0 - std::pow(options_.beta1, t);
    c.bc2 = 1.0 - std::pow(options_.beta2, t);
  }

  /// The update of every parameter (gradients scaled by `scale`, zeroed when `zero_grad`), over fixed pieces.
  void apply(double lr, double scale, bool zero_grad) {
    release_expanded();
    step_[0] += Scalar(1);
    const double t = double(step_[0]);
    std::vector<detail::clip::Piece> pieces;
    for (std::size_t i = 0; i < params_.size(); ++i) detail::clip::append_pieces(pieces, params_[i], i, row_sparse(params_[i]));
    detail::parallel_streams(Index(pieces.size()), [&](detail::StreamQueue::Claims& claims) {
      for (Index k = claims.claim(); k >= 0; k = claims.claim()) {
        const auto& piece = pieces[std::size_t(k)];
        const auto& p = params_[piece.param];
        auto& s = state_[piece.param];
        auto c = coefficients(p, lr, scale);
        if (piece.mode == detail::clip::PieceMode::Elements) {
          set_count(c, t);
          update_range(p, s, piece.begin, piece.end, c, zero_grad);
          if (p.values_written != nullptr) p.values_written(p.values_owner, piece.begin, piece.end);
          continue;
        }
        // Rows with their own counts; the bias corrections are recomputed only when the count changes.
        double last = -1.0;
        detail::clip::for_each_range(p, piece, [&](std::size_t b, std::size_t e) {
          const std::size_t r = b / std::size_t(p.row_size);
          s.row_steps[r] += Scalar(1);
          const double tr = double(s.row_steps[r]);
          if (tr != last) {
            set_count(c, tr);
            last = tr;
          }
          update_range(p, s, b, e, c, zero_grad);
          // Reported while the row is still in L1, for the owner's copy.
          if (p.values_written != nullptr) p.values_written(p.values_owner, b, e);
        });
      }
      fence_values_written();  // once per thread, after its last range
    });
  }

  void update_range(const ParameterView<Scalar>& p, ParamState& s, std::size_t b, std::size_t e,
                    const detail::adamw::Coefficients& c, bool zero_grad) const {
    if (bf16_moments())
      detail::adamw::update(p.value.data() + b, p.grad.data() + b, s.m16.data() + b, s.v16.data() + b, e - b, c,
                            zero_grad);
    else
      detail::adamw::update(p.value.data() + b, p.grad.data() + b, s.m.data() + b, s.v.data() + b, e - b, c,
                            zero_grad);
  }

  std::vector<ParameterView<Scalar>> params_;
  AdamWOptions options_;
  std::vector<Scalar> step_ = std::vector<Scalar>(1, Scalar(0));  // [1], the global count t
  std::vector<ParamState> state_;                                // one per parameter
};

}  // namespace memoryformer

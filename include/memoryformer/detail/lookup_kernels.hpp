// SPDX-License-Identifier: MIT
// The table side of a Memory Layer (design §1.5 and §1.6): the weighted gather-sum forward and its backward
// (scores' gradient and the scatter-add into the table gradient).
//
// Two kinds of kernels live behind the same entry points:
//  - reference kernels (Isa::Scalar, and every MEMORYFORMER_DISABLE_SIMD build): clear, exact, Eigen row
//    operations in the order of the formulas;
//  - fast kernels (float, Isa::Avx2 / Isa::Avx512): gather_kernels.hpp (forward) and
//    table_gradient_kernels.hpp (backward). They compute the same sums with fused multiply-adds and, in the
//    backward and the scores' gradient, a different summation order, so they agree with the reference to float
//    rounding (bounds in tests/isa/lookup_isa_test.cpp), and give the same bits for any thread count.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../storage_type.hpp"
#include "../types.hpp"
#include "dispatch.hpp"
#include "gather_kernels.hpp"
#include "parallel.hpp"
#include "simd.hpp"
#include "sorted_contributions.hpp"
#include "table_gradient_kernels.hpp"

namespace memoryformer::detail {

MEMORYFORMER_SIMD_WARNINGS_BEGIN

template <class Scalar>
using RowMap = Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>;
template <class Scalar>
using ConstRowMap = Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>;

/// Reference: y[n] = bias + Σ_k scores[n,k] · T[k, codes[n,k]] for n in [begin, end). Token-major: a token's output
/// row stays in L1 while its K table rows stream past it.
template <class Scalar>
void gather_sum(Scalar* y, Index y_stride, const Scalar* tables, int tau, Index width, const std::int32_t* codes,
                const Scalar* scores, Index tables_per_row, const Scalar* bias, Index begin, Index end) {
  const Index rows_per_table = Index(1) << tau;
  for (Index n = begin; n < end; ++n) {
    RowMap<Scalar> out(y + n * y_stride, width);
    if (bias != nullptr) {
      out = ConstRowMap<Scalar>(bias, width);
    } else {
      out.setZero();
    }
    const std::int32_t* c = codes + n * tables_per_row;
    const Scalar* s = scores + n * tables_per_row;
    for (Index k = 0; k < tables_per_row; ++k) {
      out.noalias() += s[k] * ConstRowMap<Scalar>(tables + (k * rows_per_table + c[k]) * width, width);
    }
  }
}

/// Reference over packed storage: the same sums, each stored value decoded to float first.
inline void gather_sum_packed(float* y, Index y_stride, const PanelLayout& l, const std::byte* data,
                              const std::int32_t* codes, const float* scores, const float* bias, Index begin,
                              Index end) {
  const Index K = l.tables;
  for (Index n = begin; n < end; ++n) {
    float* out = y + n * y_stride;
    for (Index c = 0; c < l.width; ++c) out[c] = bias != nullptr ? bias[c] : 0.0f;
    for (Index k = 0; k < K; ++k) {
      const float s = scores[n * K + k];
      for (Index cb = 0; cb < l.column_blocks; ++cb) {
        const std::byte* chunk = data + l.chunk_offset(cb, k, codes[n * K + k]);
        const Index cols = l.block_columns(cb);
        for (Index i = 0; i < cols; ++i) out[cb * l.cv + i] += s * decode_value(chunk, i, l.storage);  // any layout
      }
    }
  }
}

/// Reference: dscores[n,k] += ⟨dy[n], T[k, codes[n,k]]⟩ for n in [begin, end).
template <class Scalar>
void score_gradient(Scalar* dscores, Index dscores_stride, const Scalar* dy, Index dy_stride, const Scalar* tables,
                    int tau, Index width, const std::int32_t* codes, Index tables_per_row, Index begin, Index end) {
  const Index rows_per_table = Index(1) << tau;
  for (Index n = begin; n < end; ++n) {
    ConstRowMap<Scalar> g(dy + n * dy_stride, width);
    const std::int32_t* c = codes + n * tables_per_row;
    for (Index k = 0; k < tables_per_row; ++k) {
      dscores[n * dscores_stride + k] += g.dot(ConstRowMap<Scalar>(tables + (k * rows_per_table + c[k]) * width, width));
    }
  }
}

/// Reference: dT[k, codes[n,k]] += scores[n,k] · dy[n] for tables k in [k_begin, k_end) and every token n, in token
/// order. Splitting by table (not by token) lets threads write disjoint rows: no atomics, and the same sum order —
/// hence the same bits — for any thread count. touched[k·2^τ + code] is set for every row written.
template <class Scalar>
void scatter_table_gradient(Scalar* dtables, std::uint8_t* touched, const Scalar* dy, Index dy_stride, int tau,
                            Index width, const std::int32_t* codes, const Scalar* scores, Index tables_per_row,
                            Index rows, Index k_begin, Index k_end) {
  const Index rows_per_table = Index(1) << tau;
  for (Index k = k_begin; k < k_end; ++k) {
    for (Index n = 0; n < rows; ++n) {
      const Index row = k * rows_per_table + codes[n * tables_per_row + k];
      RowMap<Scalar>(dtables + row * width, width).noalias() +=
          scores[n * tables_per_row + k] * ConstRowMap<Scalar>(dy + n * dy_stride, width);
      touched[row] = 1;
    }
  }
}

MEMORYFORMER_SIMD_WARNINGS_END

/// True when `isa` selects a fast kernel for Scalar (float and a compiled SIMD path).
template <class Scalar>
constexpr bool use_fast_kernels(Isa isa) {
  if constexpr (!std::is_same_v<Scalar, float>) {
    (void)isa;
    return false;
  } else {
    return isa != Isa::Scalar && isa_available(isa);
  }
}

/// Calls f(StorageTypeConstant) for a runtime storage type.
template <StorageType S>
using StorageConstant = std::integral_constant<StorageType, S>;
template <class F>
void dispatch_storage(StorageType s, F&& f) {
  switch (s) {
    case StorageType::BF16: return f(StorageConstant<StorageType::BF16>{});
    case StorageType::F16: return f(StorageConstant<StorageType::F16>{});
    default: return f(StorageConstant<StorageType::F32>{});
  }
}

/**
 * y [rows, width] (row stride y_stride) = bias + Σ_k s · T_k[code_k] over row-major tables [K, 2^τ, width]:
 * the reference kernel on Isa::Scalar or for double, else the fast decode or prefill loop.
 */
template <class Scalar>
void lookup_forward(Isa isa, Scalar* y, Index y_stride, const Scalar* tables, int tau, Index width, Index num_tables,
                    const std::int32_t* codes, const Scalar* scores, const Scalar* bias, Index rows,
                    Index min_rows_per_thread = 16) {
  if (rows == 0) return;
  if constexpr (std::is_same_v<Scalar, float>) {
#if defined(MEMORYFORMER_HAVE_SIMD_KERNELS)
    if (use_fast_kernels<Scalar>(isa)) {
      dispatch_simd(isa, [&]<Isa I>() {
        if (rows >= rowmajor_prefill_min_tokens(tau)) {
          rowmajor_prefill<I>(y, y_stride, tables, tau, width, num_tables, codes, scores, bias, rows);
        } else if (rows >= table_order_min_tokens(tau) &&
                   rows * width <= table_order_max_output_bytes / Index(sizeof(float)) &&
                   contributions_fit_int32(rows, num_tables, tau)) {
          rowmajor_table_order<I>(y, y_stride, tables, tau, width, num_tables, codes, scores, bias, rows);
        } else {
          rowmajor_decode<I>(y, y_stride, tables, tau, width, num_tables, codes, scores, bias, rows);
        }
      });
      return;
    }
#endif
  }
  (void)isa;
  parallel_rows(rows, min_rows_per_thread, [&](Index begin, Index end) {
    gather_sum(y, y_stride, tables, tau, width, codes, scores, num_tables, bias, begin, end);
  });
}

/// The same over packed storage (PanelLayout), float activations.
inline void lookup_forward_packed(Isa isa, float* y, Index y_stride, const PanelLayout& l, const std::byte* data,
                                  const std::int32_t* codes, const float* scores, const float* bias, Index rows) {
  if (rows == 0) return;
#if defined(MEMORYFORMER_HAVE_SIMD_KERNELS)
  if (use_fast_kernels<float>(isa)) {
    dispatch_simd(isa, [&]<Isa I>() {
      dispatch_storage(l.storage, [&](auto storage) {
        constexpr StorageType S = decltype(storage)::value;
        if (l.rows_contiguous()) {
          packed_rows_decode<I, S>(y, y_stride, l, data, codes, scores, bias, rows);
        } else if (rows >= prefill_min_tokens(int(std::countr_zero(std::uint64_t(l.rows))))) {
          packed_prefill<I, S>(y, y_stride, l, data, codes, scores, bias, rows);
        } else {
          packed_decode<I, S>(y, y_stride, l, data, codes, scores, bias, rows);
        }
      });
    });
    return;
  }
#endif
  (void)isa;
  parallel_rows(rows, 16, [&](Index begin, Index end) {
    gather_sum_packed(y, y_stride, l, data, codes, scores, bias, begin, end);
  });
}

/// True when lookup_backward takes the sorted fast kernel for these sizes (the one that a presorted buffer serves).
template <class Scalar>
bool lookup_backward_sorts(Isa isa, Index rows, Index num_tables, int tau) {
#if defined(MEMORYFORMER_HAVE_SIMD_KERNELS)
  return std::is_same_v<Scalar, float> && use_fast_kernels<Scalar>(isa) && rows > 0 &&
         contributions_fit_int32(rows, num_tables, tau);
#else
  (void)isa, (void)rows, (void)num_tables, (void)tau;
  return false;
#endif
}

/**
 * Backward of the lookup over row-major tables: dtables[row] += Σ s·dy (touched rows flagged) and
 * dscores[n,k] += ⟨dy[n], T_k[code_k]⟩ — the reference kernels on Isa::Scalar or for double, else the sorted fast
 * kernel (over `presorted`, the pairs of codes/scores already sorted, when not nullptr; in `order`, the same bits in
 * either). With `new_rows`, the rows it writes that are not flagged yet are first appended to it and flagged
 * detail::fresh_row (list_new_rows: in row order from the sort, else in order of first appearance; its capacity must
 * cover them). dbias is the caller's.
 */
template <class Scalar>
void lookup_backward(Isa isa, Scalar* dscores, Index ds_stride, const Scalar* dy, Index dy_stride, const Scalar* tables,
                     Scalar* dtables, std::uint8_t* touched, int tau, Index width, Index num_tables,
                     const std::int32_t* codes, const Scalar* scores, Index rows,
                     const SortedContributions* presorted = nullptr, std::vector<Index>* new_rows = nullptr,
                     GradientOrder order = GradientOrder::automatic) {
  if (rows == 0) return;
  if constexpr (std::is_same_v<Scalar, float>) {
#if defined(MEMORYFORMER_HAVE_SIMD_KERNELS)
    if (lookup_backward_sorts<Scalar>(isa, rows, num_tables, tau)) {
      dispatch_simd(isa, [&]<Isa I>() {
        lookup_backward_fast<I>(dscores, ds_stride, dy, dy_stride, tables, dtables, touched, tau, width, num_tables,
                                codes, scores, rows, presorted, new_rows, order);
      });
      return;
    }
#endif
  }
  (void)isa, (void)presorted, (void)order;
  if (new_rows != nullptr) list_new_rows(*new_rows, touched, codes, rows, num_tables, tau);
  parallel_rows(rows, 16, [&](Index begin, Index end) {
    score_gradient(dscores, ds_stride, dy, dy_stride, tables, tau, width, codes, num_tables, begin, end);
  });
  parallel_rows(num_tables, 1, [&](Index k_begin, Index k_end) {
    scatter_table_gradient(dtables, touched, dy, dy_stride, tau, width, codes, scores, num_tables, rows, k_begin,
                           k_end);
  });
}

}  // namespace memoryformer::detail

// SPDX-License-Identifier: MIT
// Analytic FLOP counts and table/parameter storage of Transformer and MemoryFormer blocks (design §1.7, §2, §3, §4).
//
// Two conventions are provided and always named in the function:
//  - `_paper`: the paper's own accounting (design §4). One multiply-add = ONE FLOP; softmax, norms, rotary and
//    hashing are not counted; the MemoryFormer block uses the paper's rounded coefficient 6·K·s·d.
//  - `_literal`: the multiply-adds of the architecture this library builds (design §3: three Q/K/V memory layers
//    sharing one hash, ML1 → LayerNorm → ML2, no W_O unless asked for), with the hashing work in its own field.
// Storage sizes are in bytes; `megabytes()` divides by 1e6, which is the convention that reproduces the paper's
// Table 5 (33.6 / 52.4 / 88.1 / 157.3 MB); in MiB the same tables are 32 / 50 / 84 / 150.
#pragma once

#include <array>
#include <string_view>

#include "detail/flops_checks.hpp"
#include "error.hpp"
#include "storage_type.hpp"

namespace memoryformer {

/// Bytes → decimal megabytes (1 MB = 1e6 bytes), the unit of the paper's memory columns.
constexpr double megabytes(double bytes) noexcept { return bytes / 1e6; }

/// Bytes → binary mebibytes (1 MiB = 2^20 bytes).
constexpr double mebibytes(double bytes) noexcept { return bytes / 1048576.0; }

// ---------------------------------------------------------------------------------------------------------------
// Paper convention (design §4): one multiply-add = one FLOP; softmax, norms, rotary and hashing are not counted.
// ---------------------------------------------------------------------------------------------------------------

/// Attention score and mixing FLOPs of one block, 2·s²·d (QKᵀ and AV), paper convention.
/// @throws ConfigError if s < 0 or d <= 0.
constexpr double attention_flops_paper(double s, double d) {
  detail::require_nonnegative("attention_flops_paper", "s", s);
  detail::require_positive("attention_flops_paper", "d", d);
  return 2.0 * s * s * d;
}

/// Dense layer y = xW (+ b) on s tokens: s·d_in·d_out multiply-adds (the bias add is not counted).
/// @throws ConfigError on negative s or non-positive sizes.
constexpr double dense_layer_flops_paper(double s, double d_in, double d_out) {
  detail::require_nonnegative("dense_layer_flops_paper", "s", s);
  detail::require_positive("dense_layer_flops_paper", "d_in", d_in);
  detail::require_positive("dense_layer_flops_paper", "d_out", d_out);
  return s * d_in * d_out;
}

/// Transformer block without attention: 12·s·d² (Q, K, V, O: 4sd²; FFN d→4d→d: 8sd²), paper convention.
/// @throws ConfigError if s < 0 or d <= 0.
constexpr double transformer_block_flops_paper_no_attention(double s, double d) {
  detail::require_nonnegative("transformer_block_flops_paper_no_attention", "s", s);
  detail::require_positive("transformer_block_flops_paper_no_attention", "d", d);
  return 12.0 * s * d * d;
}

/// Transformer block: 2·s²·d + 12·s·d², paper convention.
/// @throws ConfigError if s < 0 or d <= 0.
constexpr double transformer_block_flops_paper(double s, double d) {
  return attention_flops_paper(s, d) + transformer_block_flops_paper_no_attention(s, d);
}

/// MemoryFormer block without attention: 6·K·s·d with K = d/τ (the paper's rounded coefficient).
/// @throws ConfigError if s < 0, d <= 0 or τ outside 1..30.
constexpr double memoryformer_block_flops_paper_no_attention(double s, double d, int tau) {
  detail::require_nonnegative("memoryformer_block_flops_paper_no_attention", "s", s);
  detail::require_positive("memoryformer_block_flops_paper_no_attention", "d", d);
  detail::require_bits("memoryformer_block_flops_paper_no_attention", "tau", tau, 1);
  const double k = d / tau;
  return 6.0 * k * s * d;
}

/// MemoryFormer block: 2·s²·d + 6·K·s·d with K = d/τ, paper convention.
/// @throws ConfigError if s < 0, d <= 0 or τ outside 1..30.
constexpr double memoryformer_block_flops_paper(double s, double d, int tau) {
  return attention_flops_paper(s, d) + memoryformer_block_flops_paper_no_attention(s, d, tau);
}

/// One Memory Layer d_in → d_out on s tokens: s·K·(τ + d_out) with K = d_in/τ, paper convention.
/// @throws ConfigError if s < 0, sizes <= 0 or τ outside 1..30.
constexpr double memory_layer_flops_paper(double s, double d_in, double d_out, int tau) {
  detail::require_nonnegative("memory_layer_flops_paper", "s", s);
  detail::require_positive("memory_layer_flops_paper", "d_in", d_in);
  detail::require_positive("memory_layer_flops_paper", "d_out", d_out);
  detail::require_bits("memory_layer_flops_paper", "tau", tau, 1);
  return s * (d_in / tau) * (tau + d_out);
}

/// Whole stack of `layers` Transformer blocks (embedding and LM head excluded), paper convention.
/// Note: the paper's Table 1 prints FLOPs of ONE block at s = 2048, not of the stack.
/// @throws ConfigError on invalid sizes.
constexpr double transformer_model_flops_paper(double layers, double s, double d) {
  detail::require_nonnegative("transformer_model_flops_paper", "layers", layers);
  return layers * transformer_block_flops_paper(s, d);
}

/// Whole stack of `layers` Transformer blocks without attention, paper convention.
/// @throws ConfigError on invalid sizes.
constexpr double transformer_model_flops_paper_no_attention(double layers, double s, double d) {
  detail::require_nonnegative("transformer_model_flops_paper_no_attention", "layers", layers);
  return layers * transformer_block_flops_paper_no_attention(s, d);
}

/// Whole stack of `layers` MemoryFormer blocks (embedding and LM head excluded), paper convention.
/// @throws ConfigError on invalid sizes.
constexpr double memoryformer_model_flops_paper(double layers, double s, double d, int tau) {
  detail::require_nonnegative("memoryformer_model_flops_paper", "layers", layers);
  return layers * memoryformer_block_flops_paper(s, d, tau);
}

/// Whole stack of `layers` MemoryFormer blocks without attention, paper convention.
/// @throws ConfigError on invalid sizes.
constexpr double memoryformer_model_flops_paper_no_attention(double layers, double s, double d, int tau) {
  detail::require_nonnegative("memoryformer_model_flops_paper_no_attention", "layers", layers);
  return layers * memoryformer_block_flops_paper_no_attention(s, d, tau);
}

// ---------------------------------------------------------------------------------------------------------------
// Dense (Pythia-style) block, broken down.
// ---------------------------------------------------------------------------------------------------------------

/// Multiply-adds of one Pythia-style block on s tokens (LayerNorm, Q/K/V/O d→d, FFN d→4d→d; norms, softmax,
/// GeLU and bias adds not counted).
struct DenseBlockFlops {
  double qkv = 0;                 ///< 3·s·d²
  double output_projection = 0;   ///< s·d²
  double ffn = 0;                 ///< 8·s·d² (d→4d and 4d→d)
  double attention = 0;           ///< 2·s²·d
  double total_no_attention = 0;  ///< 12·s·d²
  double total = 0;               ///< 2·s²·d + 12·s·d²
};

/// Breakdown of a Pythia-style block; `total` equals transformer_block_flops_paper(s, d).
/// @throws ConfigError if s < 0 or d <= 0.
constexpr DenseBlockFlops pythia_block_flops(double s, double d) {
  detail::require_nonnegative("pythia_block_flops", "s", s);
  detail::require_positive("pythia_block_flops", "d", d);
  DenseBlockFlops f;
  f.qkv = 3.0 * s * d * d;
  f.output_projection = s * d * d;
  f.ffn = 8.0 * s * d * d;
  f.attention = 2.0 * s * s * d;
  f.total_no_attention = f.qkv + f.output_projection + f.ffn;
  f.total = f.total_no_attention + f.attention;
  return f;
}

// ---------------------------------------------------------------------------------------------------------------
// Literal count of the MemoryFormer block this library builds (design §2, §3, §4 last paragraph).
// ---------------------------------------------------------------------------------------------------------------

/// Shape of one MemoryFormer block, as built (design §3).
struct MemoryFormerBlockShape {
  double d = 512;                  ///< model width; must be a multiple of tau
  double heads = 8;                ///< attention heads (does not change the counts; kept for reporting)
  int tau = 8;                     ///< code bits per chunk; K = d/τ tables per Q/K/V layer and in ML1
  int expand_bits = 2;             ///< e: ML1 emits K·(τ+e) features, ML2 has tables of 2^(τ+e) rows
  bool output_projection = false;  ///< add a dense W_O d→d (the authors' block has none)
  bool extra_table = false;        ///< authors' alternative Memory Block: ML1 d→2d, ML2 with 2K τ-bit tables
};

/// Literal multiply-add count of one MemoryFormer block on s tokens. A table lookup that adds s_k·T_k[code_k]
/// into an output of width w counts w multiply-adds. Hashing (sign bits and Σ|z_j|: adds and compares, no
/// multiplies) is kept separate in `hashing` and is NOT part of `total`.
struct MemoryFormerBlockFlops {
  double qkv = 0;                  ///< 3·s·K·d: three layers summing K rows of d values each
  double ml1 = 0;                  ///< s·K·K(τ+e) (extra_table: s·K·2d)
  double ml2 = 0;                  ///< s·K·d (extra_table: s·2K·d)
  double memory_block = 0;         ///< ml1 + ml2
  double attention = 0;            ///< 2·s²·d
  double output_projection = 0;    ///< s·d² when enabled, else 0
  double hashing = 0;              ///< s·(d [shared Q/K/V hash] + d [ML1] + width of ML2's input)
  double total_no_attention = 0;   ///< qkv + memory_block + output_projection
  double total = 0;                ///< total_no_attention + attention
  double total_with_hashing = 0;   ///< total + hashing
};

/// Literal count for `shape` at sequence length s (label it "literal" when printed).
/// @throws ConfigError if d is not a multiple of τ, τ outside 1..30, e outside 0..30 or τ+e > 30.
constexpr MemoryFormerBlockFlops memoryformer_block_flops_literal(double s, const MemoryFormerBlockShape& shape) {
  constexpr std::string_view where = "memoryformer_block_flops_literal";
  detail::require_nonnegative(where, "s", s);
  detail::require_positive(where, "d", shape.d);
  detail::require_bits(where, "tau", shape.tau, 1);
  detail::require_bits(where, "expand_bits", shape.expand_bits, 0);
  detail::require_bits(where, "tau + expand_bits", shape.tau + shape.expand_bits, 1);
  detail::require_divisible(where, shape.d, shape.tau);
  const double d = shape.d;
  const double k = d / shape.tau;
  MemoryFormerBlockFlops f;
  f.qkv = 3.0 * s * k * d;
  if (shape.extra_table) {
    f.ml1 = s * k * (2.0 * d);
    f.ml2 = s * (2.0 * k) * d;
  } else {
    f.ml1 = s * k * (k * (shape.tau + shape.expand_bits));
    f.ml2 = s * k * d;
  }
  f.memory_block = f.ml1 + f.ml2;
  f.attention = 2.0 * s * s * d;
  f.output_projection = shape.output_projection ? s * d * d : 0.0;
  // Q/K/V share ONE hash of the normed input (design §3), so it is counted once.
  const double ml2_input = shape.extra_table ? 2.0 * d : k * (shape.tau + shape.expand_bits);
  f.hashing = s * (d + d + ml2_input);
  f.total_no_attention = f.qkv + f.memory_block + f.output_projection;
  f.total = f.total_no_attention + f.attention;
  f.total_with_hashing = f.total + f.hashing;
  return f;
}

/// Literal count of one Memory Layer d_in → d_out on s tokens.
struct MemoryLayerFlops {
  double lookups = 0;  ///< s·K·d_out multiply-adds (weighted sum of K retrieved rows)
  double hashing = 0;  ///< s·d_in (sign bit and |z| accumulation per input value)
  double total = 0;    ///< lookups + hashing
};

/// Literal count of one Memory Layer (the work MemoryLayer::forward does; the score's sigmoids not counted).
/// @throws ConfigError if d_in is not a multiple of τ or τ outside 1..30.
constexpr MemoryLayerFlops memory_layer_flops_literal(double s, double d_in, double d_out, int tau) {
  constexpr std::string_view where = "memory_layer_flops_literal";
  detail::require_nonnegative(where, "s", s);
  detail::require_positive(where, "d_in", d_in);
  detail::require_positive(where, "d_out", d_out);
  detail::require_bits(where, "tau", tau, 1);
  detail::require_divisible(where, d_in, tau);
  MemoryLayerFlops f;
  f.lookups = s * (d_in / tau) * d_out;
  f.hashing = s * d_in;
  f.total = f.lookups + f.hashing;
  return f;
}

// ---------------------------------------------------------------------------------------------------------------
// Storage.
// ---------------------------------------------------------------------------------------------------------------

/// Table values of one Memory Layer: K·2^τ·d_out with K = d_in/τ (design §1: tables [K, 2^τ, d_out]).
/// @throws ConfigError if d_in is not a multiple of τ or τ outside 1..30.
constexpr double memory_layer_table_values(double d_in, double d_out, int tau) {
  detail::require_positive("memory_layer_table_values", "d_in", d_in);
  detail::require_positive("memory_layer_table_values", "d_out", d_out);
  detail::require_bits("memory_layer_table_values", "tau", tau, 1);
  detail::require_divisible("memory_layer_table_values", d_in, tau);
  return (d_in / tau) * detail::pow2(tau) * d_out;
}

/// Table bytes of one Memory Layer: K·2^τ·d_out·bytes_per_value (16.8 MB in fp16 at 512→512, τ = 8).
/// @throws ConfigError as memory_layer_table_values.
constexpr double memory_layer_table_bytes(double d_in, double d_out, int tau, StorageType type) {
  return memory_layer_table_values(d_in, d_out, tau) * bytes_per_value(type);
}

/// Table bytes of one Memory Block (design §2): ML1 K·2^τ·K(τ+e) + ML2 K·2^(τ+e)·d values, K = d/τ.
/// With extra_table: ML1 K·2^τ·2d + ML2 2K·2^τ·d. Biases and LayerNorm parameters are not included.
/// @throws ConfigError if d is not a multiple of τ, τ outside 1..30, e outside 0..30 or τ+e > 30.
constexpr double memory_block_table_bytes(double d, int tau, int expand_bits, StorageType type,
                                          bool extra_table = false) {
  constexpr std::string_view where = "memory_block_table_bytes";
  detail::require_positive(where, "d", d);
  detail::require_bits(where, "tau", tau, 1);
  detail::require_bits(where, "expand_bits", expand_bits, 0);
  detail::require_bits(where, "tau + expand_bits", tau + expand_bits, 1);
  detail::require_divisible(where, d, tau);
  const double k = d / tau;
  double values = 0;
  if (extra_table) {
    values = k * detail::pow2(tau) * (2.0 * d) + (2.0 * k) * detail::pow2(tau) * d;
  } else {
    values = k * detail::pow2(tau) * (k * (tau + expand_bits)) + k * detail::pow2(tau + expand_bits) * d;
  }
  return values * bytes_per_value(type);
}

/// Table bytes of one MemoryFormer block: three Q/K/V layers (K·2^τ·d each) + its Memory Block, plus the dense
/// W_O (d² values) when shape.output_projection is set. Biases and norm gains are not included.
/// @throws ConfigError as memory_block_table_bytes.
constexpr double memoryformer_block_table_bytes(const MemoryFormerBlockShape& shape, StorageType type) {
  const double qkv = 3.0 * memory_layer_table_bytes(shape.d, shape.d, shape.tau, type);
  const double block = memory_block_table_bytes(shape.d, shape.tau, shape.expand_bits, type, shape.extra_table);
  const double wo = shape.output_projection ? shape.d * shape.d * bytes_per_value(type) : 0.0;
  return qkv + block + wo;
}

/// Parameters of one Pythia-style block: Q/K/V/O weights 4d² and biases 4d, FFN 8d² and biases 5d, two
/// LayerNorms 4d: 12d² + 13d. (Pythia-70M: 6 blocks at d = 512 plus a final LayerNorm = 18,915,328.)
/// @throws ConfigError if d <= 0.
constexpr double dense_block_parameters(double d) {
  detail::require_positive("dense_block_parameters", "d", d);
  return 12.0 * d * d + 13.0 * d;
}

/// Bytes of one Pythia-style block's parameters at the given precision.
/// @throws ConfigError if d <= 0.
constexpr double dense_block_parameter_bytes(double d, StorageType type) {
  return dense_block_parameters(d) * bytes_per_value(type);
}

/// Non-embedding parameters of a Pythia-style model: layers blocks plus the final LayerNorm (2d).
/// @throws ConfigError on invalid sizes.
constexpr double dense_model_nonembedding_parameters(double layers, double d) {
  detail::require_nonnegative("dense_model_nonembedding_parameters", "layers", layers);
  return layers * dense_block_parameters(d) + 2.0 * d;
}

// ---------------------------------------------------------------------------------------------------------------
// The paper's model sizes (Table 1; design §3).
// ---------------------------------------------------------------------------------------------------------------

/// One row of the paper's Table 1: a Pythia baseline or a MemoryFormer model (τ = 8 for the latter).
struct PaperModel {
  std::string_view name;  ///< "Pythia-70M", "MemoryFormer-tiny", ...
  int layers;             ///< number of blocks
  int d;                  ///< hidden size
  bool memoryformer;      ///< true for MemoryFormer rows
  int tau;                ///< code bits (MemoryFormer rows), 0 for dense rows
};

/// The six models of Table 1, pairs in order: (Pythia-70M, tiny), (Pythia-160M, small), (Pythia-410M, base).
inline constexpr std::array<PaperModel, 6> paper_table1_models{{
    {"Pythia-70M", 6, 512, false, 0},
    {"MemoryFormer-tiny", 6, 512, true, 8},
    {"Pythia-160M", 12, 768, false, 0},
    {"MemoryFormer-small", 12, 768, true, 8},
    {"Pythia-410M", 24, 1024, false, 0},
    {"MemoryFormer-base", 24, 1024, true, 8},
}};

/// Paper-convention FLOPs of ONE block of `m` at sequence length s (what Table 1 prints at s = 2048).
/// @throws ConfigError on invalid sizes.
constexpr double paper_model_block_flops(const PaperModel& m, double s, bool with_attention) {
  if (m.memoryformer)
    return with_attention ? memoryformer_block_flops_paper(s, m.d, m.tau)
                          : memoryformer_block_flops_paper_no_attention(s, m.d, m.tau);
  return with_attention ? transformer_block_flops_paper(s, m.d) : transformer_block_flops_paper_no_attention(s, m.d);
}

}  // namespace memoryformer

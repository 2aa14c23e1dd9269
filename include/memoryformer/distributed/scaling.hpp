// SPDX-License-Identifier: MIT
// The scale model of distributed training: what a rank sends per optimizer step in data-parallel and
// table-parallel training, how much model state it holds, and a projected step time on a given link.
// Pure arithmetic on model shapes (no MPI, no I/O); sizes are doubles because they are projections.
#pragma once

#include <array>
#include <cmath>
#include <string>
#include <string_view>

#include "../detail/checks.hpp"
#include "../error.hpp"
#include "../flops.hpp"

namespace memoryformer {

/// How the ranks of a distributed training run split the work.
enum class ParallelMode {
  Data,   ///< every rank holds the whole model and T/R tokens; gradients are summed across ranks
  Table,  ///< every rank holds T/R tokens and K/R tables of every Memory Layer; the rest is replicated
};

/// "data" or "table".
constexpr std::string_view parallel_mode_name(ParallelMode mode) noexcept {
  return mode == ParallelMode::Data ? "data" : "table";
}

/// Latency α of one message in the alpha-beta model, in seconds: an assumed constant of the model, not a
/// measurement; communication_seconds takes another.
inline constexpr double default_message_latency_seconds = 5e-6;

/// Multiply-adds per second of one rank assumed by default: an input of the projection, not a measurement.
inline constexpr double default_multiply_adds_per_second = 50e9;

/// Link speed in Gbit/s → bytes per second (10 Gbit/s = 1.25e9 B/s).
constexpr double link_bytes_per_second(double gbit_per_second) { return gbit_per_second * 1e9 / 8.0; }

/// Bytes and messages one rank sends.
struct ExchangeCost {
  double bytes = 0;     ///< bytes sent by the rank
  double messages = 0;  ///< point-to-point messages sent by the rank

  ExchangeCost& operator+=(const ExchangeCost& o) noexcept {
    bytes += o.bytes;
    messages += o.messages;
    return *this;
  }
  friend ExchangeCost operator+(ExchangeCost a, const ExchangeCost& b) noexcept { return a += b; }
  friend ExchangeCost operator*(double n, ExchangeCost c) noexcept { return {n * c.bytes, n * c.messages}; }
};

/// Shape of one Memory Layer's tables: `tables` tables of `rows_per_table` rows of `d_out` values.
struct MemoryLayerTableShape {
  double tables = 0;          ///< K
  double rows_per_table = 0;  ///< 2^τ
  double d_out = 0;           ///< values per row (the layer's output width)

  double rows() const noexcept { return tables * rows_per_table; }  ///< K·2^τ
  double values() const noexcept { return rows() * d_out; }         ///< K·2^τ·d_out
};

/// Parameter counts of a language model of this library (LanguageModel with vocab, the final RMSNorm and an LM
/// head without bias) built from a PaperModel shape: MemoryFormerBlock with the default config (RMS norms,
/// biases, no W_O, e expansion bits) or TransformerBlock (FFN 4d, biases).
struct ModelParameterCounts {
  double tables = 0;     ///< bucket-table values (LanguageModel::num_table_parameters())
  double embedding = 0;  ///< vocab·d
  double dense = 0;      ///< everything else: dense weights, biases, norms, the LM head

  double total() const noexcept { return tables + embedding + dense; }  ///< LanguageModel::num_parameters()
};

/// Settings of one projection. Defaults: float32 values, byte vocabulary, e = 2, dense fallback at half the rows,
/// sequences of 2048 tokens, one micro-batch per step, 50e9 multiply-adds per second per rank.
struct ScaleInputs {
  double tokens_per_step = 16384;        ///< T: tokens of one optimizer step over all ranks
  int ranks = 1;                         ///< R
  ParallelMode mode = ParallelMode::Data;
  double bytes_per_value = 4;            ///< of parameters, gradients, moments and activations (4: float32)
  double vocab = 256;                    ///< embedding and head rows (256: byte tokens)
  int expand_bits = 2;                   ///< e of the Memory Block (the library default)
  double dense_fallback_fraction = 0.3;  ///< f: a sparse parameter is summed densely when its union of touched
                                         ///< rows exceeds f·rows
  double sequence_length = 2048;         ///< s: sets the attention work per token (2·s·d per block)
  double micro_batches = 1;              ///< table-parallel exchanges happen once per micro-batch (messages only)
  double multiply_adds_per_second = default_multiply_adds_per_second;  ///< compute rate of one rank

  /// @throws ConfigError naming the offending value.
  void validate(std::string_view where = "ScaleInputs") const {
    using detail::check_config;
    const auto finite = [](double v) { return std::isfinite(v); };
    check_config(finite(tokens_per_step) && tokens_per_step >= 1, where,
                 "tokens_per_step = " + std::to_string(tokens_per_step) + " must be finite and >= 1");
    check_config(ranks >= 1, where, "ranks = " + std::to_string(ranks) + " must be >= 1");
    check_config(finite(bytes_per_value) && bytes_per_value > 0, where,
                 "bytes_per_value = " + std::to_string(bytes_per_value) + " must be finite and > 0");
    check_config(finite(vocab) && vocab >= 1 && vocab == std::floor(vocab), where,
                 "vocab = " + std::to_string(vocab) + " must be a whole number >= 1");
    check_config(expand_bits >= 0 && expand_bits <= 16, where,
                 "expand_bits = " + std::to_string(expand_bits) + " is outside 0..16");
    check_config(dense_fallback_fraction >= 0 && dense_fallback_fraction <= 1, where,
                 "dense_fallback_fraction = " + std::to_string(dense_fallback_fraction) + " is outside [0, 1]");
    check_config(finite(sequence_length) && sequence_length >= 1, where,
                 "sequence_length = " + std::to_string(sequence_length) + " must be finite and >= 1");
    check_config(finite(micro_batches) && micro_batches >= 1, where,
                 "micro_batches = " + std::to_string(micro_batches) + " must be finite and >= 1");
    check_config(finite(multiply_adds_per_second) && multiply_adds_per_second > 0, where,
                 "multiply_adds_per_second = " + std::to_string(multiply_adds_per_second) + " must be finite and > 0");
  }
};

/**
 * @brief Per-rank cost of one optimizer step. Bytes and messages are what one rank sends; in Table mode the
 *        state is that of the rank owning the most tables (⌈K/R⌉ of every Memory Layer).
 *
 * Model state is parameters + gradients + the two AdamW moments (4 values of bytes_per_value each: 16 bytes per
 * parameter in float32). Activations, caches and communication buffers are NOT included.
 */
struct ScaleEstimate {
  ParallelMode mode = ParallelMode::Data;
  int ranks = 1;
  double tokens_per_step = 0;
  ModelParameterCounts parameters;    ///< of the whole model
  ExchangeCost dense_allreduce;       ///< dense weights, biases, norms, LM head: one bucketed allreduce
  ExchangeCost sparse_rows;           ///< tables (Data mode only) and embedding: row ids, then rows or dense fallback
  ExchangeCost table_activations;     ///< Table mode: codes, scores, partial outputs, dy, score gradients, counts
  int dense_fallbacks = 0;            ///< sparse parameters summed densely because their union exceeded f·rows
  double table_state_bytes = 0;       ///< this rank's share of the bucket tables' state
  double replicated_state_bytes = 0;  ///< state of every other parameter (held by every rank)
  double training_multiply_adds = 0;  ///< forward + backward multiply-adds of this rank's T/R tokens
  double compute_seconds = 0;         ///< training_multiply_adds / multiply_adds_per_second

  double bytes_sent() const noexcept { return dense_allreduce.bytes + sparse_rows.bytes + table_activations.bytes; }
  double messages() const noexcept {
    return dense_allreduce.messages + sparse_rows.messages + table_activations.messages;
  }
  double state_bytes() const noexcept { return table_state_bytes + replicated_state_bytes; }
};

namespace detail::scaling {

inline void check_model(std::string_view where, const PaperModel& m, int expand_bits) {
  check_config(m.layers >= 1, where, "layers = " + std::to_string(m.layers) + " must be >= 1");
  check_config(m.d >= 1, where, "d = " + std::to_string(m.d) + " must be >= 1");
  if (!m.memoryformer) return;
  check_config(m.tau >= 1 && m.tau <= 16, where, "tau = " + std::to_string(m.tau) + " is outside 1..16");
  check_config(m.d % m.tau == 0, where,
               "d = " + std::to_string(m.d) + " is not a multiple of tau = " + std::to_string(m.tau));
  check_config(expand_bits >= 0 && expand_bits <= 16, where,
               "expand_bits = " + std::to_string(expand_bits) + " is outside 0..16");
}

inline void check_ranks(std::string_view where, int ranks) {
  check_config(ranks >= 1, where, "ranks = " + std::to_string(ranks) + " must be >= 1");
}

}  // namespace detail::scaling

/**
 * @brief The five Memory Layers of one MemoryFormer block (design §3): Q, K, V (d → d, K = d/τ tables of 2^τ
 *        rows), ML1 (d → H with H = K·(τ+e), K tables of 2^τ rows) and ML2 (H → d, H/(τ+e) tables of 2^(τ+e) rows).
 * @throws ConfigError for a dense model or an invalid shape.
 */
inline std::array<MemoryLayerTableShape, 5> memoryformer_block_table_shapes(const PaperModel& m, int expand_bits = 2) {
  constexpr std::string_view where = "memoryformer_block_table_shapes";
  detail::check_config(m.memoryformer, where, std::string(m.name) + " is not a MemoryFormer model");
  detail::scaling::check_model(where, m, expand_bits);
  const double d = m.d, k = double(m.d / m.tau), h = k * (m.tau + expand_bits);
  const MemoryLayerTableShape qkv{k, detail::pow2(m.tau), d};
  return {qkv, qkv, qkv, MemoryLayerTableShape{k, detail::pow2(m.tau), h},
          MemoryLayerTableShape{h / (m.tau + expand_bits), detail::pow2(m.tau + expand_bits), d}};
}

/**
 * @brief Parameter counts of the LanguageModel this library builds for `m` (see ModelParameterCounts).
 *        MemoryFormer block: RMSNorm d, Q/K/V tables + biases d, RMSNorm d, ML1 tables + bias H, LayerNorm 2H,
 *        ML2 tables + bias d. Transformer block: 12d² + 13d. Model: embedding vocab·d, final RMSNorm d, head d·vocab.
 * @throws ConfigError for an invalid shape or vocab < 1.
 */
inline ModelParameterCounts model_parameter_counts(const PaperModel& m, double vocab = 256, int expand_bits = 2) {
  constexpr std::string_view where = "model_parameter_counts";
  detail::scaling::check_model(where, m, expand_bits);
  detail::check_config(std::isfinite(vocab) && vocab >= 1, where, "vocab = " + std::to_string(vocab) + " must be >= 1");
  const double d = m.d, layers = m.layers;
  ModelParameterCounts c;
  c.embedding = vocab * d;
  c.dense = d + d * vocab;  // final RMSNorm, LM head
  if (m.memoryformer) {
    const auto shapes = memoryformer_block_table_shapes(m, expand_bits);
    const double h = shapes[3].d_out;
    double tables = 0, biases = 0;
    for (const auto& s : shapes) tables += s.values(), biases += s.d_out;
    c.tables = layers * tables;
    c.dense += layers * (2.0 * d + biases + 2.0 * h);  // two RMSNorms, five biases, the Memory Block's LayerNorm
  } else {
    c.dense += layers * dense_block_parameters(d);
  }
  return c;
}

/**
 * @brief Expected number of distinct rows of one table of `rows` rows hit by `tokens` tokens under a uniform hash:
 *        M·(1 − (1 − 1/M)^t). 1 for t = 1, rising to M as t grows. Fractional t is allowed (T/R tokens per rank).
 * @throws ConfigError if rows < 1 or tokens < 0.
 */
inline double expected_distinct_rows(double rows, double tokens) {
  constexpr std::string_view where = "expected_distinct_rows";
  detail::check_config(std::isfinite(rows) && rows >= 1, where, "rows = " + std::to_string(rows) + " must be >= 1");
  detail::check_config(tokens >= 0 && !std::isnan(tokens), where,
                       "tokens = " + std::to_string(tokens) + " must be >= 0");
  if (tokens == 0) return 0;
  if (rows == 1) return 1;
  // (1 − 1/M)^t through log1p/expm1: the direct power loses every digit when 1/M is tiny and t small.
  return rows * -std::expm1(tokens * std::log1p(-1.0 / rows));
}

/// Expected distinct embedding rows hit by `tokens` tokens: all `vocab` rows once tokens ≥ 4·vocab (byte text
/// uses every byte value by then), else expected_distinct_rows(vocab, tokens).
/// @throws ConfigError as expected_distinct_rows.
inline double expected_distinct_embedding_rows(double vocab, double tokens) {
  const double all = expected_distinct_rows(vocab, tokens);  // validates
  return tokens >= 4.0 * vocab ? vocab : all;
}

/**
 * @brief Deterministic allreduce of `values` values over `ranks` ranks, done as an all-to-all of R segments and an
 *        allgather of the reduced segments: 2·(R−1)/R·values·bytes_per_value bytes and 2·(R−1) messages per rank
 *        (nothing for R = 1).
 * @throws ConfigError if ranks < 1, values < 0 or bytes_per_value <= 0.
 */
inline ExchangeCost allreduce_exchange(double values, int ranks, double bytes_per_value) {
  constexpr std::string_view where = "allreduce_exchange";
  detail::scaling::check_ranks(where, ranks);
  detail::check_config(values >= 0 && std::isfinite(values), where,
                       "values = " + std::to_string(values) + " must be finite and >= 0");
  detail::check_config(bytes_per_value > 0, where, "bytes_per_value must be > 0");
  const double r = ranks;
  return {2.0 * (r - 1.0) / r * values * bytes_per_value, 2.0 * (r - 1.0)};
}

/// One sparse parameter's exchange in Data mode (see sparse_rows_exchange).
struct SparseExchange {
  ExchangeCost row_ids;       ///< row-count allgather + row-id allgather
  ExchangeCost values;        ///< allreduce of the union's rows, or of the whole parameter
  bool dense_fallback = false;  ///< the union exceeded f·rows: the whole parameter was allreduced
  ExchangeCost total() const noexcept { return row_ids + values; }
};

/**
 * @brief Data-mode exchange of one sparse parameter (a Memory Layer's tables or the embedding) of `rows` rows of
 *        `row_values` values: each rank allgathers its row count (8 bytes) and its `rank_rows` touched row ids
 *        (8 bytes each): (R−1)·(8 + 8·rank_rows) bytes, 2·(R−1) messages; then allreduces the `union_rows` touched
 *        rows packed contiguously, or, when union_rows > fraction·rows, the whole parameter.
 * @throws ConfigError for ranks < 1, negative or non-finite sizes, union_rows > rows, fraction outside [0, 1].
 */
inline SparseExchange sparse_rows_exchange(double rows, double row_values, double union_rows, double rank_rows,
                                           int ranks, double fraction, double bytes_per_value) {
  constexpr std::string_view where = "sparse_rows_exchange";
  detail::scaling::check_ranks(where, ranks);
  const auto ok = [](double v) { return std::isfinite(v) && v >= 0; };
  detail::check_config(ok(rows) && ok(row_values) && ok(union_rows) && ok(rank_rows), where,
                       "rows, row_values, union_rows and rank_rows must be finite and >= 0");
  detail::check_config(union_rows <= rows && rank_rows <= union_rows, where,
                       "rank_rows = " + std::to_string(rank_rows) + " <= union_rows = " + std::to_string(union_rows) +
                           " <= rows = " + std::to_string(rows) + " does not hold");
  detail::check_config(fraction >= 0 && fraction <= 1, where,
                       "fraction = " + std::to_string(fraction) + " is outside [0, 1]");
  SparseExchange x;
  if (ranks == 1) return x;
  const double others = ranks - 1.0;
  x.row_ids = {others * (8.0 + 8.0 * rank_rows), 2.0 * others};
  x.dense_fallback = union_rows > fraction * rows;
  x.values = allreduce_exchange((x.dense_fallback ? rows : union_rows) * row_values, ranks, bytes_per_value);
  return x;
}

/**
 * @brief Table-mode exchange of one Memory Layer per step, per rank, with T_r = T/R tokens per rank and the
 *        layer's K tables spread over the R ranks. Codes and scores travel as 4 + bytes_per_value bytes (int32
 *        code, score), outputs and gradients as bytes_per_value:
 *          forward:  codes + scores to the tables' owners T_r·(K − K/R)·(4 + b); partial outputs back (a
 *                    reduce-scatter done as an all-to-all) (R−1)·T_r·d_out·b;
 *          backward: codes + scores again T_r·(K − K/R)·(4 + b); dy allgather (R−1)·T_r·d_out·b; score
 *                    gradients back (R−1)·T_r·(K/R)·b;
 *        each of the 5 exchanges preceded by an allgather of row counts (8 bytes to each rank). Messages: R−1 per
 *        exchange and per count allgather, per micro-batch: 10·(R−1)·micro_batches.
 * @throws ConfigError for ranks < 1, micro_batches < 1 or non-finite / negative sizes.
 */
inline ExchangeCost table_parallel_exchange(const MemoryLayerTableShape& layer, double tokens_per_step, int ranks,
                                            double bytes_per_value, double micro_batches = 1) {
  constexpr std::string_view where = "table_parallel_exchange";
  detail::scaling::check_ranks(where, ranks);
  detail::check_config(std::isfinite(tokens_per_step) && tokens_per_step >= 0 && std::isfinite(layer.tables) &&
                           layer.tables >= 1 && std::isfinite(layer.d_out) && layer.d_out >= 1,
                       where, "tokens_per_step >= 0, tables >= 1 and d_out >= 1 must hold");
  detail::check_config(bytes_per_value > 0 && micro_batches >= 1, where,
                       "bytes_per_value must be > 0 and micro_batches >= 1");
  if (ranks == 1) return {};
  const double r = ranks, others = r - 1.0, t_r = tokens_per_step / r, b = bytes_per_value;
  const double k = layer.tables, k_own = k / r;
  const double codes = t_r * (k - k_own) * (4.0 + b);
  const double outputs = others * t_r * layer.d_out * b;
  const double score_grads = others * t_r * k_own * b;
  const double counts = 5.0 * others * 8.0;
  return {2.0 * codes + 2.0 * outputs + score_grads + counts, 10.0 * others * micro_batches};
}

/**
 * @brief Forward multiply-adds per token of the whole model (blocks + LM head; the embedding lookup has none) at
 *        sequence length s: MemoryFormer blocks as built by this library (memoryformer_block_flops_literal, hashing
 *        not counted), Transformer blocks as transformer_block_flops_paper; attention 2·s·d per token and block, as
 *        the paper counts it (no causal halving); head d·vocab.
 * @throws ConfigError for an invalid shape, sequence_length < 1 or vocab < 1.
 */
inline double forward_multiply_adds_per_token(const PaperModel& m, double sequence_length, double vocab = 256,
                                              int expand_bits = 2) {
  constexpr std::string_view where = "forward_multiply_adds_per_token";
  detail::scaling::check_model(where, m, expand_bits);
  detail::check_config(std::isfinite(sequence_length) && sequence_length >= 1, where,
                       "sequence_length = " + std::to_string(sequence_length) + " must be finite and >= 1");
  detail::check_config(std::isfinite(vocab) && vocab >= 1, where, "vocab = " + std::to_string(vocab) + " must be >= 1");
  const double s = sequence_length;
  double block = 0;
  if (m.memoryformer) {
    const MemoryFormerBlockShape shape{.d = double(m.d), .heads = 1, .tau = m.tau, .expand_bits = expand_bits};
    block = memoryformer_block_flops_literal(s, shape).total / s;
  } else {
    block = transformer_block_flops_paper(s, m.d) / s;
  }
  return m.layers * block + dense_layer_flops_paper(1, m.d, vocab);
}

/**
 * @brief Per-rank exchange, model state and compute of one optimizer step of `model` under `in` (see ScaleEstimate).
 *
 * Data mode: the dense parameters in one allreduce_exchange; every Memory Layer's tables (rows of d_out values) and
 * the embedding (rows of d) through sparse_rows_exchange, with the expected union U = K·expected_distinct_rows(2^τ,
 * T) and per-rank rows K·expected_distinct_rows(2^τ, T/R) (the K tables of a layer are hit independently).
 * Table mode: the same for the dense parameters and the embedding; the tables are not exchanged, every Memory
 * Layer costs table_parallel_exchange instead, and a rank holds ⌈K/R⌉ tables of each. Compute: 3 × the forward
 * multiply-adds (forward + backward) of the rank's T/R tokens, the same in both modes (in Table mode a rank looks up
 * its tables for all T tokens, K/R of the K tables each).
 *
 * @throws ConfigError for invalid inputs, or Table mode for a dense model.
 */
inline ScaleEstimate estimate_scale(const PaperModel& model, const ScaleInputs& in) {
  constexpr std::string_view where = "estimate_scale";
  in.validate(where);
  detail::scaling::check_model(where, model, in.expand_bits);
  detail::check_config(model.memoryformer || in.mode == ParallelMode::Data, where,
                       std::string(model.name) + " has no tables: Table mode needs a MemoryFormer model");
  ScaleEstimate e;
  e.mode = in.mode;
  e.ranks = in.ranks;
  e.tokens_per_step = in.tokens_per_step;
  e.parameters = model_parameter_counts(model, in.vocab, in.expand_bits);
  const double r = in.ranks, t = in.tokens_per_step, t_r = t / r, b = in.bytes_per_value;
  const double state_per_value = 4.0 * b;  // value, gradient, two AdamW moments

  e.dense_allreduce = allreduce_exchange(e.parameters.dense, in.ranks, b);
  const auto add_sparse = [&](double rows, double row_values, double union_rows, double rank_rows) {
    const SparseExchange x = sparse_rows_exchange(rows, row_values, union_rows, rank_rows, in.ranks,
                                                  in.dense_fallback_fraction, b);
    e.sparse_rows += x.total();
    e.dense_fallbacks += x.dense_fallback ? 1 : 0;
  };
  add_sparse(in.vocab, model.d, expected_distinct_embedding_rows(in.vocab, t),
             expected_distinct_embedding_rows(in.vocab, t_r));

  double own_table_values = 0;
  if (model.memoryformer) {
    for (const auto& layer : memoryformer_block_table_shapes(model, in.expand_bits)) {
      if (in.mode == ParallelMode::Data) {
        own_table_values += layer.values();
        for (int i = 0; i < model.layers; ++i)
          add_sparse(layer.rows(), layer.d_out, layer.tables * expected_distinct_rows(layer.rows_per_table, t),
                     layer.tables * expected_distinct_rows(layer.rows_per_table, t_r));
      } else {
        own_table_values += std::ceil(layer.tables / r) * layer.rows_per_table * layer.d_out;
        e.table_activations += model.layers * table_parallel_exchange(layer, t, in.ranks, b, in.micro_batches);
      }
    }
    own_table_values *= model.layers;
  }
  e.table_state_bytes = own_table_values * state_per_value;
  e.replicated_state_bytes = (e.parameters.dense + e.parameters.embedding) * state_per_value;

  e.training_multiply_adds =
      3.0 * forward_multiply_adds_per_token(model, in.sequence_length, in.vocab, in.expand_bits) * t_r;
  e.compute_seconds = e.training_multiply_adds / in.multiply_adds_per_second;
  return e;
}

/**
 * @brief Alpha-beta communication time of one step: messages·α + bytes/β, with β the link's bytes per second and
 *        α the latency of one message. Messages are assumed sequential (no pipelining across them).
 * @throws ConfigError if the link speed is not > 0 or the latency is negative.
 */
inline double communication_seconds(const ScaleEstimate& e, double link_bytes_per_second,
                                    double latency_seconds = default_message_latency_seconds) {
  constexpr std::string_view where = "communication_seconds";
  detail::check_config(std::isfinite(link_bytes_per_second) && link_bytes_per_second > 0, where,
                       "link_bytes_per_second = " + std::to_string(link_bytes_per_second) + " must be finite and > 0");
  detail::check_config(std::isfinite(latency_seconds) && latency_seconds >= 0, where,
                       "latency_seconds = " + std::to_string(latency_seconds) + " must be finite and >= 0");
  return e.messages() * latency_seconds + e.bytes_sent() / link_bytes_per_second;
}

/**
 * @brief Projected step time: compute + communication, with NO overlap between them assumed (an upper bound for
 *        an implementation that overlaps the allreduce with the backward pass).
 * @throws ConfigError as communication_seconds.
 */
inline double projected_step_seconds(const ScaleEstimate& e, double link_bytes_per_second,
                                     double latency_seconds = default_message_latency_seconds) {
  return e.compute_seconds + communication_seconds(e, link_bytes_per_second, latency_seconds);
}

}  // namespace memoryformer

// SPDX-License-Identifier: MIT
// Tests of the distributed-training scale model (distributed/scaling.hpp): parameter counts against the model
// classes, each exchange formula against hand-computed values, and the limits of the expected-distinct-rows formula.
//
// Hand-computed values are written out as arithmetic on the formulas; the distinct-row counts were evaluated as
// M·(1 − (1 − 1/M)^t) with a direct power, independently of the log1p/expm1 form the header uses.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include <gtest/gtest.h>

#include <memoryformer/distributed/scaling.hpp>
#include <memoryformer/model.hpp>

namespace mf = memoryformer;

namespace {

// A small MemoryFormer shape: d = 32, τ = 4 → K = 8; with e = 2, H = 48 and ML2 has 8 tables of 64 rows.
constexpr mf::PaperModel small_mf{"test-mf", 1, 32, true, 4};
constexpr mf::PaperModel small_dense{"test-dense", 1, 32, false, 0};

const mf::PaperModel& paper(std::string_view name) {
  for (const auto& m : mf::paper_table1_models)
    if (m.name == name) return m;
  throw std::runtime_error("no paper model " + std::string(name));
}

// Direct-power form of the expected number of distinct rows, independent of the header's log1p/expm1 form.
double distinct_direct(double rows, double tokens) { return rows * (1.0 - std::pow(1.0 - 1.0 / rows, tokens)); }

template <class Model>
double kind_count(Model& model, mf::ParameterKind kind) {
  double n = 0;
  for (const auto& p : model.parameters())
    if (p.kind == kind) n += double(p.value.size());
  return n;
}

void expect_counts_match_memoryformer(int layers, int d, int tau, int e, int vocab) {
  mf::MemoryFormerLM<float>::Config c;
  c.vocab = vocab;
  c.layers = layers;
  c.block.d = d;
  c.block.heads = 2;
  c.block.tau = tau;
  c.block.expand_bits = e;
  mf::MemoryFormerLM<float> model(c, 7);
  const mf::PaperModel shape{"mf", layers, d, true, tau};
  const auto counts = mf::model_parameter_counts(shape, vocab, e);
  SCOPED_TRACE("layers " + std::to_string(layers) + " d " + std::to_string(d) + " tau " + std::to_string(tau) +
               " e " + std::to_string(e) + " vocab " + std::to_string(vocab));
  EXPECT_EQ(counts.total(), double(model.num_parameters()));
  EXPECT_EQ(counts.tables, double(model.num_table_parameters()));
  EXPECT_EQ(counts.embedding, kind_count(model, mf::ParameterKind::Embedding));
  EXPECT_EQ(counts.dense, kind_count(model, mf::ParameterKind::Dense) + kind_count(model, mf::ParameterKind::Bias) +
                              kind_count(model, mf::ParameterKind::Norm));
}

}  // namespace

// ------------------------------------------------------------------------------------------------ parameter counts

TEST(ScaleParameterCounts, MemoryFormerMatchesTheModelClass) {
  expect_counts_match_memoryformer(2, 32, 4, 2, 256);
  expect_counts_match_memoryformer(1, 8, 4, 1, 7);
  expect_counts_match_memoryformer(3, 24, 6, 0, 50);
  expect_counts_match_memoryformer(1, 16, 8, 3, 256);
}

TEST(ScaleParameterCounts, TransformerMatchesTheModelClass) {
  for (int d : {16, 32}) {
    mf::TransformerLM<float>::Config c;
    c.vocab = 256;
    c.layers = 2;
    c.block.d = d;
    c.block.heads = 2;
    mf::TransformerLM<float> model(c, 3);
    const auto counts = mf::model_parameter_counts({"dense", 2, d, false, 0}, 256);
    EXPECT_EQ(counts.total(), double(model.num_parameters())) << "d " << d;
    EXPECT_EQ(counts.tables, 0.0);
    EXPECT_EQ(double(model.num_table_parameters()), 0.0);
    EXPECT_EQ(counts.embedding, 256.0 * d);
  }
}

TEST(ScaleParameterCounts, SmallShapeByHand) {
  // Tables: Q/K/V 3·8·16·32 = 12288, ML1 8·16·48 = 6144, ML2 8·64·32 = 16384 → 34816.
  // Dense: final RMSNorm 32 + head 32·256 = 8192; block: 2 RMSNorms 64, biases 3·32 + 48 + 32 = 176, LayerNorm 96.
  const auto c = mf::model_parameter_counts(small_mf);
  EXPECT_EQ(c.tables, 34816.0);
  EXPECT_EQ(c.embedding, 8192.0);
  EXPECT_EQ(c.dense, 32.0 + 8192.0 + 64.0 + 176.0 + 96.0);
}

// ------------------------------------------------------------------------------------------------ distinct rows

TEST(ScaleDistinctRows, LimitsAndMonotonicity) {
  for (double m : {1.0, 2.0, 16.0, 256.0, 1024.0, 1073741824.0}) {
    EXPECT_NEAR(mf::expected_distinct_rows(m, 1), 1.0, 1e-12) << "M " << m;  // one token hits one row
    EXPECT_EQ(mf::expected_distinct_rows(m, 0), 0.0);
    EXPECT_EQ(mf::expected_distinct_rows(m, std::numeric_limits<double>::infinity()), m);
    EXPECT_NEAR(mf::expected_distinct_rows(m, 1e6 * m), m, 1e-9 * m);
    double previous = 0;
    for (double t = 0.5; t < 64 * m && t < 1e7; t *= 1.7) {
      const double u = mf::expected_distinct_rows(m, t);
      if (m > 1) {
        EXPECT_GE(u, previous) << "M " << m << " t " << t;
        if (previous < m * (1 - 1e-9)) {  // strictly increasing until it reaches M in doubles
          EXPECT_GT(u, previous) << "M " << m << " t " << t;
        }
      } else {
        EXPECT_EQ(u, 1.0);  // one row: hit by the first token already
      }
      EXPECT_LE(u, m);
      EXPECT_LE(u, std::max(t, 1.0) + 1e-9);  // never more rows than tokens
      previous = u;
    }
  }
  // Against the direct power where it is accurate.
  EXPECT_NEAR(mf::expected_distinct_rows(16, 64), 15.742793658384757, 1e-12);
  EXPECT_NEAR(mf::expected_distinct_rows(256, 64), 56.72458000500663, 1e-11);
  EXPECT_NEAR(mf::expected_distinct_rows(256, 1000), distinct_direct(256, 1000), 1e-10);
  // Huge tables, few tokens: almost every token hits its own row (the direct power loses these digits).
  EXPECT_NEAR(mf::expected_distinct_rows(1e15, 10), 10.0 - 45.0 / 1e15, 1e-9);
}

TEST(ScaleDistinctRows, EmbeddingAllRowsFromFourTokensPerRow) {
  EXPECT_EQ(mf::expected_distinct_embedding_rows(256, 1024), 256.0);
  EXPECT_EQ(mf::expected_distinct_embedding_rows(256, 1e6), 256.0);
  EXPECT_NEAR(mf::expected_distinct_embedding_rows(256, 1023), distinct_direct(256, 1023), 1e-9);
  EXPECT_LT(mf::expected_distinct_embedding_rows(256, 1023), 256.0);
  EXPECT_NEAR(mf::expected_distinct_embedding_rows(256, 32), 30.136086284864206, 1e-11);
}

// ------------------------------------------------------------------------------------------------ exchanges

TEST(ScaleExchange, AllreduceByHand) {
  // 2·(R−1)/R·n·4 bytes, 2·(R−1) messages.
  const auto a = mf::allreduce_exchange(1000, 4, 4);
  EXPECT_DOUBLE_EQ(a.bytes, 2.0 * 3.0 / 4.0 * 1000.0 * 4.0);
  EXPECT_EQ(a.messages, 6.0);
  const auto one = mf::allreduce_exchange(1000, 1, 4);
  EXPECT_EQ(one.bytes, 0.0);
  EXPECT_EQ(one.messages, 0.0);
}

TEST(ScaleExchange, SparseRowsSwitchToDenseExactlyAboveTheFraction) {
  // 100 rows of 10 values, R = 2, f = 0.5; each rank touched 30 rows.
  const auto at = mf::sparse_rows_exchange(100, 10, 50, 30, 2, 0.5, 4);
  EXPECT_FALSE(at.dense_fallback);
  EXPECT_DOUBLE_EQ(at.values.bytes, 50.0 * 10.0 * 4.0);  // 2·(1/2)·50·10·4
  EXPECT_DOUBLE_EQ(at.row_ids.bytes, 8.0 + 8.0 * 30.0);  // count + ids to the one other rank
  EXPECT_EQ(at.row_ids.messages, 2.0);
  EXPECT_EQ(at.values.messages, 2.0);
  const auto above = mf::sparse_rows_exchange(100, 10, std::nextafter(50.0, 100.0), 30, 2, 0.5, 4);
  EXPECT_TRUE(above.dense_fallback);
  EXPECT_DOUBLE_EQ(above.values.bytes, 100.0 * 10.0 * 4.0);
  EXPECT_DOUBLE_EQ(above.row_ids.bytes, at.row_ids.bytes);  // ids are gathered either way: U decides
  // f = 0: dense as soon as anything is touched; f = 1: never.
  EXPECT_TRUE(mf::sparse_rows_exchange(100, 10, 1, 1, 2, 0.0, 4).dense_fallback);
  EXPECT_FALSE(mf::sparse_rows_exchange(100, 10, 100, 100, 2, 1.0, 4).dense_fallback);
  // R = 1: nothing.
  EXPECT_EQ(mf::sparse_rows_exchange(100, 10, 50, 50, 1, 0.5, 4).total().bytes, 0.0);
  EXPECT_EQ(mf::sparse_rows_exchange(100, 10, 50, 50, 1, 0.5, 4).total().messages, 0.0);
}

TEST(ScaleExchange, TableParallelLayerByHand) {
  // Q layer of d = 32, τ = 4: K = 8 tables, d_out = 32; T = 64, R = 2 → T_r = 32, K/R = 4.
  //   codes + scores 32·(8−4)·8 = 1024 (twice), partial outputs and dy 1·32·32·4 = 4096 each,
  //   score gradients 1·32·4·4 = 512, row counts 5·1·8 = 40; messages 5 exchanges + 5 count allgathers.
  const mf::MemoryLayerTableShape q{8, 16, 32};
  const auto x = mf::table_parallel_exchange(q, 64, 2, 4);
  EXPECT_DOUBLE_EQ(x.bytes, 2 * 1024.0 + 2 * 4096.0 + 512.0 + 40.0);
  EXPECT_EQ(x.messages, 10.0);
  EXPECT_EQ(mf::table_parallel_exchange(q, 64, 2, 4, 3).messages, 30.0);  // once per micro-batch
  EXPECT_DOUBLE_EQ(mf::table_parallel_exchange(q, 64, 2, 4, 3).bytes, x.bytes);
  // ML1 (d_out = H = 48): outputs and dy 32·48·4 = 6144.
  const auto ml1 = mf::table_parallel_exchange({8, 16, 48}, 64, 2, 4);
  EXPECT_DOUBLE_EQ(ml1.bytes, 2 * 1024.0 + 2 * 6144.0 + 512.0 + 40.0);
  // R = 1 sends nothing.
  EXPECT_EQ(mf::table_parallel_exchange(q, 64, 1, 4).bytes, 0.0);
  EXPECT_EQ(mf::table_parallel_exchange(q, 64, 1, 4).messages, 0.0);
}

// ------------------------------------------------------------------------------------------------ whole estimate

TEST(ScaleEstimate, DataModeSmallModelByHand) {
  mf::ScaleInputs in;
  in.tokens_per_step = 64;
  in.ranks = 2;
  in.sequence_length = 64;
  const auto e = mf::estimate_scale(small_mf, in);
  // Dense parameters 8560 in one allreduce: 2·(1/2)·8560·4.
  EXPECT_DOUBLE_EQ(e.dense_allreduce.bytes, 8560.0 * 4.0);
  EXPECT_EQ(e.dense_allreduce.messages, 2.0);
  // Embedding (T = 64 < 1024): U = 56.7246 of 256 rows (sparse), u_r = 30.1361; rows of 32.
  const double embedding = (8.0 + 8.0 * 30.136086284864206) + 56.72458000500663 * 32.0 * 4.0;
  // Q/K/V and ML1: U = 8·15.7428 = 125.9 > 64 of 128 rows → dense; u_r = 8·13.9714.
  const double ids_16 = 8.0 + 8.0 * 8.0 * 13.971379417967995;
  const double qkv = 3.0 * (ids_16 + 128.0 * 32.0 * 4.0);
  const double ml1 = ids_16 + 128.0 * 48.0 * 4.0;
  // ML2: 8 tables of 64 rows: U = 8·40.6409 = 325.1 > 256 of 512 rows → dense; u_r = 8·25.3350.
  const double ml2 = (8.0 + 8.0 * 8.0 * 25.334966658451663) + 512.0 * 32.0 * 4.0;
  EXPECT_NEAR(e.sparse_rows.bytes, embedding + qkv + ml1 + ml2, 1e-9 * e.sparse_rows.bytes);
  EXPECT_EQ(e.sparse_rows.messages, 6 * 4.0);  // 6 sparse parameters: counts, ids, allreduce (2)
  EXPECT_EQ(e.dense_fallbacks, 5);
  EXPECT_EQ(e.table_activations.bytes, 0.0);
  EXPECT_DOUBLE_EQ(e.bytes_sent(), e.dense_allreduce.bytes + e.sparse_rows.bytes);
  // State: every value, 16 bytes.
  EXPECT_EQ(e.table_state_bytes, 34816.0 * 16.0);
  EXPECT_EQ(e.replicated_state_bytes, (8192.0 + 8560.0) * 16.0);
  // Compute per token: QKV 3·8·32 + ML1 8·48 + ML2 8·32 + attention 2·64·32 + head 32·256 = 13696; × 3 × 32 tokens.
  EXPECT_DOUBLE_EQ(e.training_multiply_adds, 3.0 * 13696.0 * 32.0);
  EXPECT_DOUBLE_EQ(e.compute_seconds, e.training_multiply_adds / 50e9);
}

TEST(ScaleEstimate, TableModeSmallModelByHand) {
  mf::ScaleInputs in;
  in.tokens_per_step = 64;
  in.ranks = 2;
  in.mode = mf::ParallelMode::Table;
  in.sequence_length = 64;
  const auto e = mf::estimate_scale(small_mf, in);
  const double embedding = (8.0 + 8.0 * 30.136086284864206) + 56.72458000500663 * 32.0 * 4.0;
  EXPECT_DOUBLE_EQ(e.dense_allreduce.bytes, 8560.0 * 4.0);
  EXPECT_NEAR(e.sparse_rows.bytes, embedding, 1e-9 * embedding);  // only the embedding
  EXPECT_EQ(e.sparse_rows.messages, 4.0);
  EXPECT_EQ(e.dense_fallbacks, 0);
  // Q, K, V, ML2: 10792 each; ML1: 14888 (see TableParallelLayerByHand).
  EXPECT_DOUBLE_EQ(e.table_activations.bytes, 4 * 10792.0 + 14888.0);
  EXPECT_EQ(e.table_activations.messages, 50.0);
  // ⌈8/2⌉ = 4 tables of each layer: 3·4·16·32 + 4·16·48 + 4·64·32 = 17408 values.
  EXPECT_EQ(e.table_state_bytes, 17408.0 * 16.0);
  EXPECT_EQ(e.replicated_state_bytes, (8192.0 + 8560.0) * 16.0);
  EXPECT_DOUBLE_EQ(e.training_multiply_adds, 3.0 * 13696.0 * 32.0);  // same work per rank as Data mode
}

TEST(ScaleEstimate, OneRankSendsNothing) {
  for (const auto& m : mf::paper_table1_models)
    for (auto mode : {mf::ParallelMode::Data, mf::ParallelMode::Table}) {
      if (mode == mf::ParallelMode::Table && !m.memoryformer) continue;
      mf::ScaleInputs in;
      in.mode = mode;
      const auto e = mf::estimate_scale(m, in);
      EXPECT_EQ(e.bytes_sent(), 0.0) << m.name;
      EXPECT_EQ(e.messages(), 0.0) << m.name;
      EXPECT_EQ(mf::communication_seconds(e, mf::link_bytes_per_second(10)), 0.0);
      EXPECT_EQ(mf::projected_step_seconds(e, mf::link_bytes_per_second(10)), e.compute_seconds);
      EXPECT_EQ(e.state_bytes(), 16.0 * e.parameters.total()) << m.name;
    }
}

TEST(ScaleEstimate, PaperModelsTableStateAtOneRank) {
  // 16 bytes per table value: tiny 415,236,096 values, small 1,868,562,432, base 6,643,777,536.
  mf::ScaleInputs in;
  EXPECT_EQ(mf::estimate_scale(paper("MemoryFormer-tiny"), in).table_state_bytes, 415236096.0 * 16.0);
  EXPECT_EQ(mf::estimate_scale(paper("MemoryFormer-small"), in).table_state_bytes, 1868562432.0 * 16.0);
  EXPECT_EQ(mf::estimate_scale(paper("MemoryFormer-base"), in).table_state_bytes, 6643777536.0 * 16.0);
  EXPECT_NEAR(mf::estimate_scale(paper("MemoryFormer-tiny"), in).table_state_bytes / 1e9, 6.6, 0.05);
  EXPECT_NEAR(mf::estimate_scale(paper("MemoryFormer-small"), in).table_state_bytes / 1e9, 29.9, 0.05);
  EXPECT_NEAR(mf::estimate_scale(paper("MemoryFormer-base"), in).table_state_bytes / 1e9, 106.3, 0.05);
}

TEST(ScaleEstimate, TableStatePerRankFallsAsOneOverR) {
  for (std::string_view name : {"MemoryFormer-tiny", "MemoryFormer-small", "MemoryFormer-base"}) {
    mf::ScaleInputs in;
    in.mode = mf::ParallelMode::Table;
    const double one = mf::estimate_scale(paper(name), in).table_state_bytes;
    const double replicated = mf::estimate_scale(paper(name), in).replicated_state_bytes;
    for (int r : {2, 4, 8, 16, 32}) {  // K = 64, 96, 128: divisible by each
      in.ranks = r;
      const auto e = mf::estimate_scale(paper(name), in);
      EXPECT_DOUBLE_EQ(e.table_state_bytes, one / r) << name << " R " << r;
      EXPECT_EQ(e.replicated_state_bytes, replicated) << name << " R " << r;
    }
  }
  // K = 8 over 3 ranks: the largest rank owns ⌈8/3⌉ = 3 tables of each layer.
  mf::ScaleInputs in;
  in.mode = mf::ParallelMode::Table;
  in.ranks = 3;
  EXPECT_EQ(mf::estimate_scale(small_mf, in).table_state_bytes, 34816.0 * 3.0 / 8.0 * 16.0);
  // Data mode replicates the tables.
  in.mode = mf::ParallelMode::Data;
  EXPECT_EQ(mf::estimate_scale(small_mf, in).table_state_bytes, 34816.0 * 16.0);
}

TEST(ScaleEstimate, DenseModelHasOnlyDenseAndEmbeddingTraffic) {
  mf::ScaleInputs in;
  in.ranks = 4;
  in.tokens_per_step = 4096;
  const auto e = mf::estimate_scale(small_dense, in);
  // 32·256 + 32 + 12·32² + 13·32 dense values.
  const double dense = 8192.0 + 32.0 + 12288.0 + 416.0;
  EXPECT_DOUBLE_EQ(e.dense_allreduce.bytes, 2.0 * 3.0 / 4.0 * dense * 4.0);
  // Embedding: T = 4096 ≥ 1024 → all 256 rows > 128 → dense; each rank's 1024 tokens touch all 256 rows too.
  EXPECT_DOUBLE_EQ(e.sparse_rows.bytes, 3.0 * (8.0 + 8.0 * 256.0) + 2.0 * 3.0 / 4.0 * 8192.0 * 4.0);
  EXPECT_EQ(e.dense_fallbacks, 1);
  EXPECT_EQ(e.table_state_bytes, 0.0);
}

TEST(ScaleEstimate, TrafficGrowsWithRanksAndSaturates) {
  for (auto mode : {mf::ParallelMode::Data, mf::ParallelMode::Table}) {
    double previous = -1, at32 = 0;
    for (int r : {1, 2, 4, 8, 16, 32, 64}) {
      mf::ScaleInputs in;
      in.mode = mode;
      in.ranks = r;
      const auto e = mf::estimate_scale(paper("MemoryFormer-tiny"), in);
      EXPECT_GT(e.bytes_sent(), previous) << "R " << r;
      if (r == 32) at32 = e.bytes_sent();
      previous = e.bytes_sent();
    }
    // Allreduces send 2·(R−1)/R·n and the table-parallel exchanges (R−1)/R of the step's activations: both
    // approach a constant, so doubling 32 → 64 ranks adds little per rank.
    EXPECT_LT(previous / at32, 1.1) << mf::parallel_mode_name(mode);
  }
}

TEST(ScaleEstimate, AlphaBetaTime) {
  mf::ScaleEstimate e;
  e.dense_allreduce = {1.25e9, 2};
  e.table_activations = {1.25e9, 8};
  e.compute_seconds = 0.5;
  EXPECT_DOUBLE_EQ(mf::communication_seconds(e, mf::link_bytes_per_second(10)), 2.0 + 10 * 5e-6);
  EXPECT_DOUBLE_EQ(mf::communication_seconds(e, mf::link_bytes_per_second(100)), 0.2 + 10 * 5e-6);
  EXPECT_DOUBLE_EQ(mf::projected_step_seconds(e, mf::link_bytes_per_second(100), 1e-3), 0.5 + 0.2 + 10e-3);
  EXPECT_THROW((void)mf::communication_seconds(e, 0), mf::ConfigError);
  EXPECT_THROW((void)mf::communication_seconds(e, 1e9, -1), mf::ConfigError);
}

TEST(ScaleEstimate, RejectsBadInputs) {
  const auto bad = [](auto change) {
    mf::ScaleInputs in;
    change(in);
    return in;
  };
  EXPECT_THROW((void)mf::estimate_scale(small_mf, bad([](auto& in) { in.ranks = 0; })), mf::ConfigError);
  EXPECT_THROW((void)mf::estimate_scale(small_mf, bad([](auto& in) { in.tokens_per_step = 0.5; })), mf::ConfigError);
  EXPECT_THROW((void)mf::estimate_scale(small_mf, bad([](auto& in) { in.tokens_per_step = std::nan(""); })),
               mf::ConfigError);
  EXPECT_THROW((void)mf::estimate_scale(small_mf, bad([](auto& in) { in.dense_fallback_fraction = 1.5; })),
               mf::ConfigError);
  EXPECT_THROW((void)mf::estimate_scale(small_mf, bad([](auto& in) { in.dense_fallback_fraction = -0.1; })),
               mf::ConfigError);
  EXPECT_THROW((void)mf::estimate_scale(small_mf, bad([](auto& in) { in.multiply_adds_per_second = 0; })),
               mf::ConfigError);
  EXPECT_THROW((void)mf::estimate_scale(small_mf, bad([](auto& in) { in.bytes_per_value = 0; })), mf::ConfigError);
  EXPECT_THROW((void)mf::estimate_scale(small_mf, bad([](auto& in) { in.micro_batches = 0; })), mf::ConfigError);
  EXPECT_THROW((void)mf::estimate_scale(small_dense, bad([](auto& in) { in.mode = mf::ParallelMode::Table; })),
               mf::ConfigError);
  EXPECT_THROW((void)mf::estimate_scale({"bad", 1, 30, true, 4}, mf::ScaleInputs{}), mf::ConfigError);  // 30 % 4
  EXPECT_THROW((void)mf::estimate_scale(small_mf, bad([](auto& in) { in.sequence_length = 0; })), mf::ConfigError);
  EXPECT_THROW((void)mf::forward_multiply_adds_per_token(small_mf, 0), mf::ConfigError);
  EXPECT_THROW((void)mf::table_parallel_exchange({0, 16, 32}, 64, 2, 4), mf::ConfigError);
  EXPECT_THROW((void)mf::allreduce_exchange(-1, 2, 4), mf::ConfigError);
  EXPECT_THROW((void)mf::expected_distinct_rows(0, 5), mf::ConfigError);
  EXPECT_THROW((void)mf::expected_distinct_rows(16, -1), mf::ConfigError);
  EXPECT_THROW((void)mf::sparse_rows_exchange(100, 10, 101, 5, 2, 0.5, 4), mf::ConfigError);
  try {
    (void)mf::estimate_scale(small_mf, bad([](auto& in) { in.ranks = -3; }));
    FAIL() << "no exception";
  } catch (const mf::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("ranks = -3"), std::string::npos) << e.what();
  }
}

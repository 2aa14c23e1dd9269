// SPDX-License-Identifier: MIT
// Thread-count independence of the dense layers' threaded loops (RMSNorm, LayerNorm, cross-entropy, Linear, GeLU,
// softmax, rotary, embedding) and of a whole model's forward and backward: 1, 2 and 3 OpenMP threads must give the
// same bits, including the reductions over rows (norm-scale gradients, weight gradients, bias gradients' column sums),
// which sum in fixed chunks.

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <memoryformer/detail/column_sums.hpp>
#include <memoryformer/model.hpp>
#include <memoryformer/nn/cross_entropy.hpp>
#include <memoryformer/nn/embedding.hpp>
#include <memoryformer/nn/gelu.hpp>
#include <memoryformer/nn/layer_norm.hpp>
#include <memoryformer/nn/linear.hpp>
#include <memoryformer/nn/rms_norm.hpp>
#include <memoryformer/nn/rope.hpp>
#include <memoryformer/nn/softmax.hpp>

#include "support/test_helpers.hpp"
#include "support/thread_setting.hpp"

namespace mf = memoryformer;
using mf::Index;

namespace {

using memoryformer::testing_support::random_tokens;
using memoryformer::testing_support::ThreadSetting;

mf::Matrix<float> float_matrix(Index rows, Index cols, std::uint64_t seed) {
  mf::Rng rng(seed);
  mf::Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(rng.normal());
  return m;
}

/// Appends the bytes of an Eigen object.
template <class M>
void append(std::vector<float>& out, const M& m) {
  out.insert(out.end(), m.data(), m.data() + m.size());
}

/// run(out) for 1, 2 and 3 threads: every run must append the same bits.
template <class Run>
void expect_same_bits_for_1_2_3_threads(Run&& run) {
  ThreadSetting threads;
  std::vector<float> results[3];
  for (int n = 1; n <= 3; ++n) {
    threads.set(n);
    run(results[n - 1]);
  }
  ASSERT_FALSE(results[0].empty());
  for (int n = 2; n <= 3; ++n) {
    ASSERT_EQ(results[0].size(), results[n - 1].size());
    EXPECT_EQ(0, std::memcmp(results[0].data(), results[n - 1].data(), results[0].size() * sizeof(float)))
        << n << " threads";
  }
}

// Enough rows for several threads at every layer's minimum work per thread and several reduction chunks. One named
// constant, so that generic names (rows, d, vocab) stay out of the files compiled after this one in a unity batch.
constexpr struct {
  Index rows, d, vocab;
} thread_test_shape{1100, 48, 200};

}  // namespace

TEST(ThreadCount, RotaryForwardBackwardSameBits) {
  const Index rows = thread_test_shape.rows, d = thread_test_shape.d;
  // One head with 19 rotated pairs (a whole piece of 16 and a partial one) and a pass-through tail.
  const auto x = float_matrix(rows, d, 21);
  expect_same_bits_for_1_2_3_threads([&](std::vector<float>& out) {
    const mf::Rotary<float> rope(d, 1, 38);
    mf::Matrix<float> y(rows, d), dx = x, p(rows, d);
    rope.forward(y, x, 4, rows / 4, 7);
    rope.backward(dx, dx, 4, rows / 4, 7);  // in place
    std::vector<Index> positions(static_cast<std::size_t>(rows));
    for (Index n = 0; n < rows; ++n) positions[std::size_t(n)] = (n * 37) % 500;
    rope.forward(p, x, positions);
    append(out, y);
    append(out, dx);
    append(out, p);
  });
}

TEST(ThreadCount, EmbeddingForwardBackwardSameBits) {
  const Index rows = thread_test_shape.rows, d = thread_test_shape.d, vocab = thread_test_shape.vocab;
  // Repeated ids (1100 tokens over 200 rows) make the backward sum several dy rows into one dW row.
  const auto tokens = random_tokens(rows, vocab, 22);
  const auto dy = float_matrix(rows, d, 23);
  expect_same_bits_for_1_2_3_threads([&](std::vector<float>& out) {
    mf::Embedding<float> embedding(vocab, d, std::uint64_t(24));
    mf::Matrix<float> y(rows, d);
    embedding.forward(y, tokens);
    embedding.backward(tokens, dy);
    embedding.backward(tokens, dy);  // gradients accumulate
    append(out, y);
    append(out, embedding.dweight());
    for (const Index r : embedding.touched_list()) out.push_back(float(r));
  });
}

TEST(ThreadCount, RMSNormForwardBackwardSameBits) {
  const Index rows = thread_test_shape.rows, d = thread_test_shape.d;
  const auto x = float_matrix(rows, d, 1), dy = float_matrix(rows, d, 2);
  expect_same_bits_for_1_2_3_threads([&](std::vector<float>& out) {
    mf::RMSNorm<float> norm(d);
    norm.scale() = float_matrix(1, d, 3).row(0).transpose();
    mf::RMSNormCache<float> cache;
    mf::Matrix<float> y(rows, d), dx(rows, d);
    norm.forward(y, x, cache);
    norm.backward(dx, x, dy, cache);
    norm.backward(dx, x, dy, cache);  // gradients accumulate
    append(out, y);
    append(out, dx);
    append(out, norm.dscale());
  });
}

TEST(ThreadCount, LayerNormForwardBackwardSameBits) {
  const Index rows = thread_test_shape.rows, d = thread_test_shape.d;
  const auto x = float_matrix(rows, d, 4), dy = float_matrix(rows, d, 5);
  expect_same_bits_for_1_2_3_threads([&](std::vector<float>& out) {
    mf::LayerNorm<float> norm(d);
    norm.gamma() = float_matrix(1, d, 6).row(0).transpose();
    mf::LayerNormCache<float> cache;
    mf::Matrix<float> y(rows, d), dx(rows, d);
    norm.forward(y, x, cache);
    norm.backward(dx, x, dy, cache);
    append(out, y);
    append(out, dx);
    append(out, norm.dgamma());
    append(out, norm.dbeta());
  });
}

TEST(ThreadCount, CrossEntropySameBits) {
  const Index rows = thread_test_shape.rows, vocab = thread_test_shape.vocab;
  const auto logits = float_matrix(rows, vocab, 7);
  const auto targets = random_tokens(rows, vocab, 8);
  expect_same_bits_for_1_2_3_threads([&](std::vector<float>& out) {
    mf::CrossEntropyCache<float> cache;
    const float loss = mf::cross_entropy_forward<float>(logits, targets, cache);
    mf::Matrix<float> dlogits(rows, vocab);
    mf::cross_entropy_backward<float>(dlogits, logits, targets, cache, 0.5f);
    out.push_back(loss);
    append(out, dlogits);
  });
}

TEST(ThreadCount, LinearForwardBackwardSameBits) {
  const Index rows = thread_test_shape.rows, d = thread_test_shape.d, vocab = thread_test_shape.vocab;
  const auto x = float_matrix(rows, d, 9), dy = float_matrix(rows, vocab, 10);
  expect_same_bits_for_1_2_3_threads([&](std::vector<float>& out) {
    mf::Linear<float> head(d, vocab, true, std::uint64_t(11));
    mf::Matrix<float> y(rows, vocab), dx(rows, d);
    head.forward(y, x);
    head.backward(dx, x, dy);
    append(out, y);
    append(out, dx);
    append(out, head.dweight());
    append(out, head.dbias());
  });
}

/// Each column sum must be the chain 0 + m[0, c] + m[1, c] + … in row order, bit for bit, for any thread count:
/// whole blocks of 64 columns and a partial last block, one thread's share and several, no rows at all.
template <class Scalar>
void expect_column_sums_are_row_order_chains() {
  ThreadSetting threads;
  const std::pair<Index, Index> shapes[] = {{0, 5}, {1, 64}, {7, 65}, {1100, 48}, {1100, 200}, {2048, 256}, {300, 130}};
  for (const auto& [r, c] : shapes) {
    mf::Matrix<Scalar> m(r, c);
    mf::Rng rng(std::uint64_t(r * 1000 + c));
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = Scalar(rng.normal());
    mf::Vector<Scalar> expected = mf::Vector<Scalar>::Zero(c);
    for (Index col = 0; col < c; ++col)
      for (Index n = 0; n < r; ++n) expected(col) += m(n, col);
    for (int n = 1; n <= 3; ++n) {
      threads.set(n);
      const mf::Vector<Scalar> sums = mf::detail::column_sums<Scalar>(m);
      ASSERT_EQ(sums.size(), c);
      EXPECT_EQ(0, std::memcmp(sums.data(), expected.data(), std::size_t(c) * sizeof(Scalar)))
          << r << " x " << c << ", " << n << " threads";
    }
  }
}

TEST(ThreadCount, ColumnSumsAreRowOrderChains) {
  expect_column_sums_are_row_order_chains<float>();
  expect_column_sums_are_row_order_chains<double>();
}

TEST(ThreadCount, GeluAndSoftmaxSameBits) {
  const Index rows = thread_test_shape.rows, vocab = thread_test_shape.vocab;
  const auto x = float_matrix(rows, vocab, 12), dy = float_matrix(rows, vocab, 13);
  expect_same_bits_for_1_2_3_threads([&](std::vector<float>& out) {
    mf::Matrix<float> y(rows, vocab), dx(rows, vocab);
    mf::gelu_forward(y, x);
    append(out, y);
    mf::gelu_backward(dx, x, dy);
    append(out, dx);
    mf::softmax_forward(y, x);
    append(out, y);
    mf::softmax_backward(dx, y, dy);
    append(out, dx);
  });
}

// A model wide enough that the norms, the residual adds and the cross-entropy split rows between threads too.
TEST(ThreadCount, ModelForwardBackwardSameBits) {
  mf::MemoryFormerLM<float>::Config c;
  c.vocab = 256;
  c.layers = 2;
  c.block.d = 64;
  c.block.heads = 4;
  c.block.tau = 8;
  c.block.gelu = true;
  c.block.norm = mf::NormKind::Layer;
  const Index batch = 6, seq = 96;
  const auto tokens = random_tokens(batch * seq, 256, 14), targets = random_tokens(batch * seq, 256, 15);
  expect_same_bits_for_1_2_3_threads([&](std::vector<float>& out) {
    mf::MemoryFormerLM<float> model(c, 16);
    mf::MemoryFormerLM<float>::Cache cache;
    out.push_back(model.forward_loss(tokens, targets, batch, seq, cache));
    model.backward(cache);
    append(out, cache.logits);
    for (const auto& p : model.parameters()) out.insert(out.end(), p.grad.begin(), p.grad.end());
  });
  mf::TransformerLM<float>::Config t;
  t.vocab = 256;
  t.layers = 1;
  t.block.d = 64;
  t.block.heads = 4;
  t.block.parallel_residual = true;
  expect_same_bits_for_1_2_3_threads([&](std::vector<float>& out) {
    mf::TransformerLM<float> model(t, 17);
    mf::TransformerLM<float>::Cache cache;
    out.push_back(model.forward_loss(tokens, targets, batch, seq, cache));
    model.backward(cache);
    append(out, cache.logits);
    for (const auto& p : model.parameters()) out.insert(out.end(), p.grad.begin(), p.grad.end());
  });
}

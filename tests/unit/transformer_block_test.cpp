// SPDX-License-Identifier: MIT
// Tests of transformer_block.hpp: forward against a naive composition written with explicit loops, finite-difference
// gradients of dx and every parameter in both residual modes, KV-cache decoding equal to the full forward, config
// resolution, parameter views, and errors.
#include <memoryformer/transformer_block.hpp>
#include <memoryformer/flops.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <cstdint>
#include <numbers>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

namespace {

using Mat = mf::Matrix<double>;
using Block = mf::TransformerBlock<double>;



mf::TransformerBlockConfig block_config(mf::Index d, mf::Index heads, mf::Index rotary, bool parallel, bool bias = true) {
  mf::TransformerBlockConfig c;
  c.d = d;
  c.heads = heads;
  c.rotary_dims = rotary;
  c.parallel_residual = parallel;
  c.bias = bias;
  return c;
}

// The default init (std 0.02, zero biases, γ = 1, β = 0) keeps attention nearly uniform and GeLU nearly linear;
// larger random values exercise every nonlinearity and make the biases and norm parameters matter.
void randomize(Block& block, std::uint64_t seed) {
  mf::Rng rng(seed);
  for (auto& p : block.parameters()) {
    if (p.kind == mf::ParameterKind::Dense)
      rng.fill_normal(p.value, 0.0, 0.4);
    else if (p.kind == mf::ParameterKind::Bias)
      rng.fill_normal(p.value, 0.0, 0.3);
    else  // gamma and beta
      for (auto& v : p.value) v = (p.name.ends_with("gamma") ? 1.0 : 0.0) + 0.3 * rng.normal();
  }
}

// ---- naive composition, explicit loops throughout ----

Mat naive_layer_norm(const Mat& x, const mf::Vector<double>& gamma, const mf::Vector<double>& beta, double eps) {
  Mat y(x.rows(), x.cols());
  for (mf::Index n = 0; n < x.rows(); ++n) {
    double mean = 0, var = 0;
    for (mf::Index j = 0; j < x.cols(); ++j) mean += x(n, j);
    mean /= double(x.cols());
    for (mf::Index j = 0; j < x.cols(); ++j) var += (x(n, j) - mean) * (x(n, j) - mean);
    var /= double(x.cols());
    for (mf::Index j = 0; j < x.cols(); ++j) y(n, j) = (x(n, j) - mean) / std::sqrt(var + eps) * gamma(j) + beta(j);
  }
  return y;
}

Mat naive_linear(const Mat& x, const mf::Linear<double>& layer) {
  Mat y(x.rows(), layer.d_out());
  for (mf::Index n = 0; n < x.rows(); ++n)
    for (mf::Index o = 0; o < layer.d_out(); ++o) {
      double s = layer.has_bias() ? layer.bias()(o) : 0.0;
      for (mf::Index i = 0; i < layer.d_in(); ++i) s += x(n, i) * layer.weight()(i, o);
      y(n, o) = s;
    }
  return y;
}

// GPT-NeoX rotate-half: pairs (i, i + R/2) of the first R dims of each head rotated by pos·base^(−2i/R).
void naive_rotary(Mat& x, mf::Index row, mf::Index pos, mf::Index heads, mf::Index rotary, double base) {
  const mf::Index dh = x.cols() / heads, half = rotary / 2;
  for (mf::Index h = 0; h < heads; ++h)
    for (mf::Index i = 0; i < half; ++i) {
      const double angle = double(pos) * std::pow(base, -2.0 * double(i) / double(rotary));
      const double a = x(row, h * dh + i), b = x(row, h * dh + i + half);
      x(row, h * dh + i) = a * std::cos(angle) - b * std::sin(angle);
      x(row, h * dh + i + half) = b * std::cos(angle) + a * std::sin(angle);
    }
}

double naive_gelu(double v) { return 0.5 * v * (1.0 + std::erf(v / std::numbers::sqrt2)); }

// The whole block for ONE sequence x [seq, d], written from the formulas of design §3 / Pythia.
Mat naive_block_sequence(const Block& block, const Mat& x) {
  const auto& c = block.config();
  const mf::Index seq = x.rows(), d = c.d, heads = c.heads, dh = d / heads;
  const Mat a = naive_layer_norm(x, block.ln1().gamma(), block.ln1().beta(), c.norm_eps);
  Mat q = naive_linear(a, block.q()), k = naive_linear(a, block.k());
  const Mat v = naive_linear(a, block.v());
  for (mf::Index t = 0; t < seq; ++t) {
    naive_rotary(q, t, t, heads, c.resolved_rotary_dims(), c.rotary_base);
    naive_rotary(k, t, t, heads, c.resolved_rotary_dims(), c.rotary_base);
  }
  Mat ctx = Mat::Zero(seq, d);
  for (mf::Index h = 0; h < heads; ++h)
    for (mf::Index i = 0; i < seq; ++i) {
      std::vector<double> w(size_t(i + 1));
      double z = 0;
      for (mf::Index j = 0; j <= i; ++j) {
        double s = 0;
        for (mf::Index e = 0; e < dh; ++e) s += q(i, h * dh + e) * k(j, h * dh + e);
        w[size_t(j)] = std::exp(s / std::sqrt(double(dh)));
        z += w[size_t(j)];
      }
      for (mf::Index j = 0; j <= i; ++j)
        for (mf::Index e = 0; e < dh; ++e) ctx(i, h * dh + e) += w[size_t(j)] / z * v(j, h * dh + e);
    }
  const Mat attn = naive_linear(ctx, block.o());
  Mat h(seq, d);
  for (mf::Index n = 0; n < seq; ++n)
    for (mf::Index j = 0; j < d; ++j) h(n, j) = x(n, j) + attn(n, j);
  const Mat m = naive_layer_norm(c.parallel_residual ? x : h, block.ln2().gamma(), block.ln2().beta(), c.norm_eps);
  Mat up = naive_linear(m, block.up());
  for (mf::Index n = 0; n < up.rows(); ++n)
    for (mf::Index j = 0; j < up.cols(); ++j) up(n, j) = naive_gelu(up(n, j));
  const Mat down = naive_linear(up, block.down());
  Mat y(seq, d);
  // Both forms give y = x + attn + mlp(·); they differ only in what LN2 normalises.
  for (mf::Index n = 0; n < seq; ++n)
    for (mf::Index j = 0; j < d; ++j) y(n, j) = x(n, j) + attn(n, j) + down(n, j);
  return y;
}

Mat naive_block(const Block& block, const Mat& x, mf::Index batch, mf::Index seq) {
  Mat y(batch * seq, x.cols());
  for (mf::Index b = 0; b < batch; ++b) y.middleRows(b * seq, seq) = naive_block_sequence(block, x.middleRows(b * seq, seq));
  return y;
}

Mat run_forward(const Block& block, const Mat& x, mf::Index batch, mf::Index seq) {
  Mat y(x.rows(), x.cols());
  Block::Cache cache;
  block.forward(y, x, batch, seq, cache);
  return y;
}

struct Shape {
  const char* name;
  mf::Index batch, seq, d, heads, rotary;
  bool parallel, bias;
};

// Gradients of L = Σ dy ⊙ y with respect to x and every parameter, against central differences.
void check_block_gradients(const Shape& s) {
  SCOPED_TRACE(s.name);
  Block block(block_config(s.d, s.heads, s.rotary, s.parallel, s.bias), 7);
  randomize(block, 11);
  const mf::Index n = s.batch * s.seq;
  Mat x = random_matrix(n, s.d, 21);
  const Mat dy = random_matrix(n, s.d, 22);
  Block::Cache cache;
  Mat y(n, s.d), dx(n, s.d);
  block.forward(y, x, s.batch, s.seq, cache);
  block.zero_grad();
  block.backward(dx, x, dy, cache);

  const auto loss = [&] {
    Mat yy(n, s.d);
    Block::Cache c;
    block.forward(yy, x, s.batch, s.seq, c);
    return (yy.array() * dy.array()).sum();
  };
  const Mat dx_copy = dx;
  auto r = mf::check_gradient(std::span<double>(x.data(), size_t(x.size())),
                              std::span<const double>(dx_copy.data(), size_t(dx_copy.size())), loss);
  EXPECT_LE(r.relative_error, 1e-6) << "dx: max abs error " << r.max_abs_error << " at " << r.worst_index;
  EXPECT_EQ(r.checked, x.size());

  auto params = block.parameters("blk");
  EXPECT_EQ(params.size(), s.bias ? 16u : 10u);
  for (auto& p : params) {
    const std::vector<double> analytic(p.grad.begin(), p.grad.end());
    mf::GradCheckOptions options;
    options.max_coordinates = 160;  // evenly strided over the big FFN matrices; small tensors are checked whole
    const auto rp = mf::check_gradient(p.value, analytic, loss, {}, options);
    EXPECT_LE(rp.relative_error, 1e-6) << p.name << ": max abs error " << rp.max_abs_error << " at " << rp.worst_index;
    EXPECT_GT(rp.checked, 0) << p.name;
    double norm = 0;
    for (double g : analytic) norm += g * g;
    // A single token attends only to itself (ctx = v), so q and k get exactly zero gradient there.
    const bool attends_to_itself_only = s.seq == 1 && (p.name.starts_with("blk.q.") || p.name.starts_with("blk.k."));
    if (attends_to_itself_only)
      EXPECT_EQ(norm, 0.0) << p.name;
    else
      EXPECT_GT(norm, 1e-12) << p.name << " got no gradient";
  }
}

}  // namespace

TEST(TransformerBlock, ConfigResolvesPythiaDefaults) {
  mf::TransformerBlockConfig c;
  c.d = 512;
  c.heads = 8;  // head_dim 64 → rotary_pct 0.25 → 16
  EXPECT_EQ(c.head_dim(), 64);
  EXPECT_EQ(c.resolved_rotary_dims(), 16);
  EXPECT_EQ(c.hidden(), 2048);
  c.heads = 4;
  c.d = 56;  // head_dim 14 → 3.5 → 3 → even 2
  EXPECT_EQ(c.resolved_rotary_dims(), 2);
  c.d = 12;  // head_dim 3 → 0 (no rotation)
  EXPECT_EQ(c.resolved_rotary_dims(), 0);
  c.rotary_dims = 2;
  EXPECT_EQ(c.resolved_rotary_dims(), 2);
  c.ffn_hidden = 7;
  EXPECT_EQ(c.hidden(), 7);
  EXPECT_NO_THROW(c.validate());
  Block block(block_config(16, 2, -1, false), 1);
  EXPECT_EQ(block.rotary().rotary_dims(), 2);
  EXPECT_EQ(block.up().d_out(), 64);
  EXPECT_EQ(block.d(), 16);
}

TEST(TransformerBlock, InitialisationFollowsConfigAndSeed) {
  auto c = block_config(16, 2, 4, false);
  c.init_std = 0.5;
  Block a(c, 42), b(c, 42), other(c, 43);
  EXPECT_EQ(a.q().weight(), b.q().weight());
  EXPECT_EQ(a.down().weight(), b.down().weight());
  EXPECT_NE(a.q().weight(), other.q().weight());
  // Each projection has its own stream.
  EXPECT_NE(a.q().weight(), a.k().weight());
  EXPECT_NE(a.v().weight(), a.o().weight());
  // Sample std of the 16·64 up-projection weights is near init_std; biases 0, γ = 1, β = 0.
  const auto& w = a.up().weight();
  const double mean = w.mean();
  const double sd = std::sqrt((w.array() - mean).square().sum() / double(w.size()));
  EXPECT_NEAR(sd, 0.5, 0.05);
  EXPECT_EQ(a.up().bias().cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(a.ln1().gamma(), mf::Vector<double>::Ones(16));
  EXPECT_EQ(a.ln2().beta(), mf::Vector<double>::Zero(16));
}

TEST(TransformerBlock, ParametersNamesShapesAndCount) {
  Block block(block_config(12, 3, 2, false), 1);
  const auto views = block.parameters("blocks.0");
  const std::vector<std::string> names = {
      "blocks.0.ln1.gamma", "blocks.0.ln1.beta", "blocks.0.q.weight",  "blocks.0.q.bias",   "blocks.0.k.weight",
      "blocks.0.k.bias",    "blocks.0.v.weight", "blocks.0.v.bias",    "blocks.0.o.weight", "blocks.0.o.bias",
      "blocks.0.ln2.gamma", "blocks.0.ln2.beta", "blocks.0.up.weight", "blocks.0.up.bias",  "blocks.0.down.weight",
      "blocks.0.down.bias"};
  ASSERT_EQ(views.size(), names.size());
  mf::Index total = 0;
  for (size_t i = 0; i < views.size(); ++i) {
    EXPECT_EQ(views[i].name, names[i]);
    EXPECT_EQ(views[i].value.size(), views[i].grad.size());
    total += mf::Index(views[i].value.size());
  }
  EXPECT_EQ(views[12].shape, (std::vector<mf::Index>{12, 48}));
  EXPECT_EQ(views[14].shape, (std::vector<mf::Index>{48, 12}));
  EXPECT_EQ(views[2].kind, mf::ParameterKind::Dense);
  EXPECT_EQ(views[3].kind, mf::ParameterKind::Bias);
  EXPECT_EQ(views[0].kind, mf::ParameterKind::Norm);
  // 4·(d² + d) + (d·4d + 4d) + (4d·d + d) + 4d with d = 12.
  EXPECT_EQ(total, 4 * (144 + 12) + (576 + 48) + (576 + 12) + 48);
  EXPECT_EQ(block.num_parameters(), total);

  Block no_bias(block_config(12, 3, 2, false, false), 1);
  const auto nb = no_bias.parameters();
  ASSERT_EQ(nb.size(), 10u);
  EXPECT_EQ(nb[0].name, "ln1.gamma");
  EXPECT_EQ(nb[2].name, "q.weight");
  EXPECT_EQ(nb[3].name, "k.weight");
  mf::Index nb_total = 0;
  for (const auto& v : nb) nb_total += mf::Index(v.value.size());
  EXPECT_EQ(nb_total, 4 * 144 + 2 * 576 + 48);
  EXPECT_EQ(no_bias.num_parameters(), nb_total);

  // Pythia-70M's block (d = 512, 8 heads): 12d² + 13d, as flops.hpp counts it independently.
  mf::TransformerBlockConfig pythia;
  pythia.d = 512;
  pythia.heads = 8;
  const mf::TransformerBlock<float> pythia_block(pythia, 1);
  EXPECT_EQ(pythia_block.num_parameters(), 12 * 512 * 512 + 13 * 512);
  EXPECT_EQ(double(pythia_block.num_parameters()), mf::dense_block_parameters(512.0));
}

TEST(TransformerBlock, ForwardMatchesNaiveCompositionSequential) {
  Block block(block_config(12, 3, 2, false), 3);
  randomize(block, 4);
  const mf::Index batch = 2, seq = 5;
  const Mat x = random_matrix(batch * seq, 12, 5);
  const Mat y = run_forward(block, x, batch, seq);
  EXPECT_LE((y - naive_block(block, x, batch, seq)).cwiseAbs().maxCoeff(), 1e-12);
}

TEST(TransformerBlock, ForwardMatchesNaiveCompositionParallel) {
  Block block(block_config(12, 3, 2, true), 3);
  randomize(block, 4);
  const mf::Index batch = 2, seq = 5;
  const Mat x = random_matrix(batch * seq, 12, 5);
  const Mat y = run_forward(block, x, batch, seq);
  EXPECT_LE((y - naive_block(block, x, batch, seq)).cwiseAbs().maxCoeff(), 1e-12);
  // The two residual forms really differ (LN2 of h versus LN2 of x).
  Block seq_block(block_config(12, 3, 2, false), 3);
  randomize(seq_block, 4);
  EXPECT_GT((run_forward(seq_block, x, batch, seq) - y).cwiseAbs().maxCoeff(), 1e-3);
}

TEST(TransformerBlock, ForwardMatchesNaiveCompositionOtherShapes) {
  struct Case {
    mf::Index batch, seq, d, heads, rotary;
    bool parallel, bias;
    mf::Index ffn;
  };
  for (const Case& k : {Case{1, 1, 12, 3, 2, false, true, 0}, Case{3, 4, 8, 1, 8, false, true, 0},
                        Case{2, 3, 10, 2, 0, true, false, 7}, Case{1, 6, 16, 2, -1, true, true, 0},
                        Case{2, 7, 24, 4, 6, false, false, 9}}) {
    SCOPED_TRACE("batch " + std::to_string(k.batch) + " seq " + std::to_string(k.seq) + " d " + std::to_string(k.d) +
                 " heads " + std::to_string(k.heads));
    auto c = block_config(k.d, k.heads, k.rotary, k.parallel, k.bias);
    c.ffn_hidden = k.ffn;
    c.rotary_base = 500.0;
    Block block(c, 9);
    randomize(block, 10);
    const Mat x = random_matrix(k.batch * k.seq, k.d, 11, 2.0);
    EXPECT_LE((run_forward(block, x, k.batch, k.seq) - naive_block(block, x, k.batch, k.seq)).cwiseAbs().maxCoeff(),
              1e-12);
  }
}

TEST(TransformerBlock, SequencesDoNotMixAndAttentionIsCausal) {
  Block block(block_config(12, 3, 2, false), 3);
  randomize(block, 4);
  const mf::Index batch = 3, seq = 4;
  const Mat x = random_matrix(batch * seq, 12, 5);
  const Mat y = run_forward(block, x, batch, seq);
  // Changing token 2 of sequence 1 changes only rows 2, 3 of sequence 1.
  Mat x2 = x;
  x2.row(1 * seq + 2) *= -3.0;
  const Mat y2 = run_forward(block, x2, batch, seq);
  for (mf::Index r = 0; r < batch * seq; ++r) {
    const bool affected = r == 1 * seq + 2 || r == 1 * seq + 3;
    if (affected)
      EXPECT_GT((y2.row(r) - y.row(r)).cwiseAbs().maxCoeff(), 1e-6) << "row " << r;
    else
      EXPECT_EQ(y2.row(r), y.row(r)) << "row " << r;
  }
  // Each sequence alone gives the same rows as inside the batch.
  for (mf::Index b = 0; b < batch; ++b) {
    const Mat xb = x.middleRows(b * seq, seq);
    EXPECT_LE((run_forward(block, xb, 1, seq) - y.middleRows(b * seq, seq)).cwiseAbs().maxCoeff(), 1e-14);
  }
}

TEST(TransformerBlock, InPlaceForwardAndCacheReuse) {
  for (bool parallel : {false, true}) {
    Block block(block_config(12, 3, 2, parallel), 3);
    randomize(block, 4);
    const Mat x = random_matrix(6, 12, 5);
    Block::Cache cache;
    Mat y(6, 12);
    block.forward(y, x, 2, 3, cache);
    const double* a_data = cache.a.data();
    const double* up_data = cache.up.data();
    // Same sizes again: buffers are reused, not reallocated.
    Mat inplace = x;
    block.forward(inplace, inplace, 2, 3, cache);
    EXPECT_EQ(cache.a.data(), a_data);
    EXPECT_EQ(cache.up.data(), up_data);
    EXPECT_LE((inplace - y).cwiseAbs().maxCoeff(), 0.0) << "parallel " << parallel;
  }
}

TEST(TransformerBlock, GradientsMatchFiniteDifferences) {
  for (const Shape& s : {Shape{"batch 2 seq 3 d 12 heads 3 rotary 2, sequential", 2, 3, 12, 3, 2, false, true},
                         Shape{"batch 2 seq 3 d 12 heads 3 rotary 2, parallel", 2, 3, 12, 3, 2, true, true},
                         Shape{"batch 1 seq 1, sequential", 1, 1, 12, 3, 2, false, true},
                         Shape{"batch 1 seq 1, parallel", 1, 1, 12, 3, 2, true, true},
                         Shape{"one head, full rotary, sequential", 2, 3, 8, 1, 8, false, true},
                         Shape{"one head, parallel, no bias", 1, 4, 6, 1, 2, true, false},
                         Shape{"seq 5, 2 heads, no rotary, no bias", 1, 5, 10, 2, 0, false, false}})
    check_block_gradients(s);
}

TEST(TransformerBlock, BackwardAccumulatesUntilZeroGradAndMayAlias) {
  Block block(block_config(12, 3, 2, false), 3);
  randomize(block, 4);
  const Mat x = random_matrix(6, 12, 5), dy = random_matrix(6, 12, 6);
  Block::Cache cache;
  Mat y(6, 12), dx(6, 12);
  block.forward(y, x, 2, 3, cache);
  block.zero_grad();
  block.backward(dx, x, dy, cache);
  std::vector<std::vector<double>> once;
  for (const auto& p : block.parameters()) once.emplace_back(p.grad.begin(), p.grad.end());
  // dx may be dy itself and may be x itself.
  Mat dxy = dy;
  block.backward(dxy, x, dxy, cache);
  EXPECT_LE((dxy - dx).cwiseAbs().maxCoeff(), 1e-15);
  const auto views = block.parameters();
  for (size_t i = 0; i < views.size(); ++i)
    for (size_t j = 0; j < once[i].size(); ++j) ASSERT_NEAR(views[i].grad[j], 2.0 * once[i][j], 1e-12) << views[i].name;
  Mat xx = x;
  block.backward(xx, xx, dy, cache);
  EXPECT_LE((xx - dx).cwiseAbs().maxCoeff(), 1e-15);
  block.zero_grad();
  for (const auto& p : block.parameters())
    for (double g : p.grad) ASSERT_EQ(g, 0.0) << p.name;
}

TEST(TransformerBlock, DecodeEqualsFullForwardTokenByTokenAndInChunks) {
  for (bool parallel : {false, true}) {
    SCOPED_TRACE(parallel ? "parallel" : "sequential");
    Block block(block_config(12, 3, 2, parallel), 3);
    randomize(block, 4);
    const mf::Index batch = 2, seq = 6, d = 12;
    const Mat x = random_matrix(batch * seq, d, 5);
    const Mat y = run_forward(block, x, batch, seq);

    for (mf::Index step : {1, 2}) {
      SCOPED_TRACE("step " + std::to_string(step));
      auto kv = block.make_kv_cache(batch, seq);
      EXPECT_EQ(kv.d(), d);
      for (mf::Index p = 0; p < seq; p += step) {
        const mf::Index t = std::min(step, seq - p);
        Mat xs(batch * t, d), ys(batch * t, d);
        for (mf::Index b = 0; b < batch; ++b) xs.middleRows(b * t, t) = x.middleRows(b * seq + p, t);
        block.forward_decode(ys, xs, kv);
        EXPECT_EQ(kv.length(), p + t);
        for (mf::Index b = 0; b < batch; ++b)
          EXPECT_LE((ys.middleRows(b * t, t) - y.middleRows(b * seq + p, t)).cwiseAbs().maxCoeff(), 1e-12)
              << "sequence " << b << " position " << p;
      }
    }

    // Prefill 4 tokens then one at a time (uneven chunks), writing the output in place over the input.
    auto kv = block.make_kv_cache(batch, seq + 3);
    mf::Index p = 0;
    for (mf::Index t : {4, 1, 1}) {
      Mat io(batch * t, d);
      for (mf::Index b = 0; b < batch; ++b) io.middleRows(b * t, t) = x.middleRows(b * seq + p, t);
      block.forward_decode(io, io, kv);
      for (mf::Index b = 0; b < batch; ++b)
        EXPECT_LE((io.middleRows(b * t, t) - y.middleRows(b * seq + p, t)).cwiseAbs().maxCoeff(), 1e-12);
      p += t;
    }
  }
}

TEST(TransformerBlock, FloatMatchesDouble) {
  const auto c = block_config(12, 3, 2, false);
  Block bd(c, 3);
  randomize(bd, 4);
  mf::TransformerBlock<float> bf(c, 3);
  auto pd = bd.parameters();
  auto pf = bf.parameters();
  ASSERT_EQ(pd.size(), pf.size());
  for (size_t i = 0; i < pd.size(); ++i)
    for (size_t j = 0; j < pd[i].value.size(); ++j) pf[i].value[j] = float(pd[i].value[j]);
  const Mat x = random_matrix(6, 12, 5);
  const mf::Matrix<float> xf = x.cast<float>();
  mf::Matrix<float> yf(6, 12);
  mf::TransformerBlock<float>::Cache cache;
  bf.forward(yf, xf, 2, 3, cache);
  const Mat y = run_forward(bd, x, 2, 3);
  EXPECT_LE((yf.cast<double>() - y).cwiseAbs().maxCoeff(), 1e-4 * (1.0 + y.cwiseAbs().maxCoeff()));
  mf::Matrix<float> dxf(6, 12);
  EXPECT_NO_THROW(bf.backward(dxf, xf, mf::Matrix<float>::Ones(6, 12), cache));
  EXPECT_TRUE(dxf.allFinite());
}

TEST(TransformerBlock, BadConfigThrows) {
  const auto make = [](mf::TransformerBlockConfig c) { return [c] { Block b(c, 1); }; };
  auto c = block_config(12, 5, 2, false);
  expect_throw_with(make(c), "TransformerBlock: d = 12 is not divisible by heads = 5");
  EXPECT_THROW(make(c)(), mf::ConfigError);
  c = block_config(12, 2, 3, false);
  expect_throw_with(make(c), "rotary_dims = 3 must be even");
  EXPECT_THROW(make(c)(), mf::ConfigError);
  c = block_config(12, 3, 6, false);
  expect_throw_with(make(c), "rotary_dims = 6 exceeds head_dim = d/heads = 4");
  c = block_config(12, 3, -2, false);
  expect_throw_with(make(c), "rotary_dims = -2 must be ≥ 0");
  c = block_config(0, 1, 0, false);
  expect_throw_with(make(c), "d = 0 must be positive");
  c = block_config(12, 0, 0, false);
  expect_throw_with(make(c), "heads = 0 must be positive");
  c = block_config(12, 3, 2, false);
  c.ffn_hidden = -1;
  expect_throw_with(make(c), "ffn_hidden = -1");
  c = block_config(12, 3, 2, false);
  c.norm_eps = 0.0;
  expect_throw_with(make(c), "norm_eps");
  c = block_config(12, 3, 2, false);
  c.rotary_base = -1.0;
  expect_throw_with(make(c), "rotary_base");
  c = block_config(12, 3, 2, false);
  c.init_std = -0.1;
  expect_throw_with(make(c), "init_std");
  // validate() alone reports the caller's name.
  expect_throw_with([] { block_config(12, 5, 2, false).validate("MyModel"); }, "MyModel: d = 12");
}

TEST(TransformerBlock, BadShapesAndOrderThrow) {
  Block block(block_config(12, 3, 2, false), 1);
  Block::Cache cache;
  Mat y(6, 12), x = random_matrix(6, 12, 1);
  Mat x_wide(6, 13), y_wide(6, 13);
  expect_throw_with([&] { block.forward(y_wide, x_wide, 2, 3, cache); },
                    "TransformerBlock::forward: x is (6, 13), expected (batch·seq, d) = (6, 12) with batch = 2, seq = 3");
  EXPECT_THROW(block.forward(y_wide, x_wide, 2, 3, cache), mf::ShapeError);
  expect_throw_with([&] { block.forward(y, x, 2, 4, cache); },
                    "TransformerBlock::forward: x is (6, 12), expected (batch·seq, d) = (8, 12) with batch = 2, seq = 4");
  EXPECT_THROW(block.forward(y, x, 4, 2, cache), mf::ShapeError);
  Mat y_short(5, 12);
  expect_throw_with([&] { block.forward(y_short, x, 2, 3, cache); }, "TransformerBlock::forward: y is (5, 12)");
  expect_throw_with([&] { block.forward(y, x, 0, 3, cache); }, "batch = 0 must be ≥ 1");
  EXPECT_THROW(block.forward(y, x, 6, 0, cache), mf::ConfigError);

  // Backward before forward.
  Mat dx(6, 12);
  Block::Cache fresh;
  expect_throw_with([&] { block.backward(dx, x, y, fresh); },
                    "TransformerBlock::backward: the cache was not filled by forward; call forward first");
  EXPECT_THROW(block.backward(dx, x, y, fresh), mf::StateError);
  block.forward(y, x, 2, 3, cache);
  EXPECT_THROW(block.forward(y, x, 2, 4, cache), mf::ShapeError);
  EXPECT_NO_THROW(block.backward(dx, x, y, cache));  // a throw on the shape checks leaves the cache intact
  Mat x_other = random_matrix(4, 12, 2), dx_other(4, 12);
  expect_throw_with([&] { block.backward(dx_other, x_other, x_other, cache); },
                    "TransformerBlock::backward: x is (4, 12), expected (batch·seq, d) = (6, 12)");
  Mat dy_wide(6, 11);
  expect_throw_with([&] { block.backward(dx, x, dy_wide, cache); }, "dy is (6, 11)");
  // A NaN input reaches attention's scores through the norm and the products; the row named may be an earlier one
  // of its tile (the tile product multiplies its NaN value by the masked zeros of earlier rows).
  Mat x_nan = x;
  x_nan(4, 2) = std::numeric_limits<double>::quiet_NaN();
  expect_throw_with([&] { block.forward(y, x_nan, 2, 3, cache); }, "attention_forward: the scores or outputs of query");
  expect_throw_with([&] { block.forward(y, x_nan, 2, 3, cache); }, "of sequence 1, head");
  EXPECT_THROW(block.forward(y, x_nan, 2, 3, cache), mf::NonFiniteError);

  // Decoding: width, rows per sequence, capacity.
  auto kv = block.make_kv_cache(2, 3);
  Mat x3(3, 12), y3(3, 12);
  expect_throw_with([&] { block.forward_decode(y3, x3, kv); },
                    "TransformerBlock::forward_decode: x_new is (3, 12), expected (batch·t, d) = (2·t, 12)");
  Mat x2w(2, 11), y2w(2, 11);
  EXPECT_THROW(block.forward_decode(y2w, x2w, kv), mf::ShapeError);
  Mat x2 = random_matrix(2, 12, 3), y2(2, 12), y1(1, 12);
  expect_throw_with([&] { block.forward_decode(y1, x2, kv); }, "TransformerBlock::forward_decode: y_new is (1, 12)");
  mf::KVCache<double> kv_wrong(2, 3, 8);
  expect_throw_with([&] { block.forward_decode(y2, x2, kv_wrong); }, "kv holds 8 features per token, expected d = 12");
  Mat x2_nan = x2;  // sequence 1's new token: refused, and nothing is appended
  x2_nan(1, 5) = std::numeric_limits<double>::quiet_NaN();
  expect_throw_with([&] { block.forward_decode(y2, x2_nan, kv); },
                    "attention_decode: the scores or outputs of new token 0 of sequence 1, head");
  EXPECT_THROW(block.forward_decode(y2, x2_nan, kv), mf::NonFiniteError);
  EXPECT_EQ(kv.length(), 0);
  for (int i = 0; i < 3; ++i) block.forward_decode(y2, x2, kv);
  EXPECT_EQ(kv.length(), 3);
  expect_throw_with([&] { block.forward_decode(y2, x2, kv); },
                    "TransformerBlock::forward_decode: decoding 1 token(s) per sequence after 3 cached would make 4 > "
                    "max_seq = 3");
  EXPECT_THROW(block.forward_decode(y2, x2, kv), std::length_error);
  EXPECT_EQ(kv.length(), 3);
  auto kv2 = block.make_kv_cache(2, 3);
  Mat x4 = random_matrix(8, 12, 4), y4(8, 12);
  EXPECT_THROW(block.forward_decode(y4, x4, kv2), std::length_error);
  EXPECT_EQ(kv2.length(), 0);
  EXPECT_THROW(block.make_kv_cache(0, 3), mf::ConfigError);
}

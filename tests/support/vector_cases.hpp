// SPDX-License-Identifier: MIT
// Test support: loading reference-vector tensors into layers, and the runners for the block-level files.
#pragma once

#include <algorithm>
#include <string>

#include <gtest/gtest.h>

#include <memoryformer/io/text_tensor.hpp>
#include <memoryformer/memory_block.hpp>
#include <memoryformer/memoryformer_block.hpp>
#include <memoryformer/memory_layer.hpp>

#include "vector_files.hpp"

namespace memoryformer::testing_support {

/// Copies a file tensor into a parameter buffer, checking the element count.
template <class Scalar>
void copy_tensor(std::span<Scalar> dst, const TextTensor& src) {
  ASSERT_EQ(Index(dst.size()), src.size()) << "tensor '" << src.name << "' does not fit its parameter";
  std::transform(src.values.begin(), src.values.end(), dst.begin(), [](double v) { return Scalar(v); });
}

/// Sets a MemoryLayer's tables (and bias, when the file has it) from the named tensors.
template <class Scalar>
void load_into(MemoryLayer<Scalar>& layer, const TextTensorFile& file, const std::string& tables,
               const std::string& bias) {
  copy_tensor(layer.tables().values(), file.at(tables));
  if (file.has(bias)) copy_tensor(std::span<Scalar>(layer.bias().data(), size_t(layer.bias().size())), file.at(bias));
}

template <class Scalar>
double vector_rtol() {
  return std::is_same_v<Scalar, float> ? 1e-4 : 1e-9;  // design §5: LayerNorm/softmax paths to ~1e-4 in float
}

template <class Scalar>
void copy_vector(Vector<Scalar>& dst, const TextTensor& src) {
  copy_tensor(std::span<Scalar>(dst.data(), size_t(dst.size())), src);
}

/// Reads a MemoryBlockConfig from a file's scalar tensors and x's width.
inline MemoryBlockConfig memory_block_config_of(const TextTensorFile& file, Index d) {
  MemoryBlockConfig config;
  config.d = d;
  config.tau = int(file.at("tau").scalar());
  config.expand_bits = int(file.at("extra_bits").scalar());
  config.temperature = file.at("temperature").scalar();
  config.score = file.at("score_paper").scalar() != 0 ? ScoreKind::Paper : ScoreKind::L1;
  config.gelu = file.has("gelu") && file.at("gelu").scalar() != 0;
  config.bias = file.has("bias1");
  return config;
}

/// Loads ML1 / LayerNorm / ML2 parameters named <t1>, <b1>, <gamma>, <beta>, <t2>, <b2>.
template <class Scalar>
void load_memory_block(MemoryBlock<Scalar>& block, const TextTensorFile& file, const std::string& t1,
                       const std::string& b1, const std::string& gamma, const std::string& beta, const std::string& t2,
                       const std::string& b2) {
  load_into(block.ml1(), file, t1, b1);
  copy_vector(block.norm().gamma(), file.at(gamma));
  copy_vector(block.norm().beta(), file.at(beta));
  load_into(block.ml2(), file, t2, b2);
}

template <class Scalar>
void expect_memory_block_gradients(const MemoryBlock<Scalar>& block, const TextTensorFile& file, const std::string& t1,
                                   const std::string& b1, const std::string& gamma, const std::string& beta,
                                   const std::string& t2, const std::string& b2) {
  const double rtol = vector_rtol<Scalar>();
  EXPECT_TRUE(tensors_close(t1, block.ml1().dtables().data(), file.at(t1), rtol));
  if (file.has(b1)) {
    EXPECT_TRUE(tensors_close(b1, block.ml1().dbias().data(), file.at(b1), rtol));
  }
  EXPECT_TRUE(tensors_close(gamma, block.norm().dgamma().data(), file.at(gamma), rtol));
  EXPECT_TRUE(tensors_close(beta, block.norm().dbeta().data(), file.at(beta), rtol));
  EXPECT_TRUE(tensors_close(t2, block.ml2().dtables().data(), file.at(t2), rtol));
  if (file.has(b2)) {
    EXPECT_TRUE(tensors_close(b2, block.ml2().dbias().data(), file.at(b2), rtol));
  }
}

/// memory_block_*: x, tables1, bias1, ln_gamma, ln_beta, tables2, bias2, dy → y, dx and every parameter gradient.
template <class Scalar>
void run_memory_block_file(const TextTensorFile& file) {
  const Matrix<Scalar> x = file.at("x").template as_matrix<Scalar>();
  const Matrix<Scalar> dy = file.at("dy").template as_matrix<Scalar>();
  const MemoryBlockConfig config = memory_block_config_of(file, x.cols());
  ASSERT_EQ(file.at("tables2").dim(1), Index(1) << config.tau2()) << "tables2 rows must be 2^(tau + extra_bits)";
  MemoryBlock<Scalar> block(config, 0);
  load_memory_block(block, file, "tables1", "bias1", "ln_gamma", "ln_beta", "tables2", "bias2");
  MemoryBlockCache<Scalar> cache;
  Matrix<Scalar> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  block.forward(y, x, cache);
  block.zero_grad();
  block.backward(dx, x, dy, cache);
  const double rtol = vector_rtol<Scalar>();
  EXPECT_TRUE(tensors_close("y", y.data(), file.at("y"), rtol));
  EXPECT_TRUE(tensors_close("dx", dx.data(), file.at("dx"), rtol));
  expect_memory_block_gradients(block, file, "dtables1", "dbias1", "dln_gamma", "dln_beta", "dtables2", "dbias2");
}

/// memoryformer_block_*: the whole block of design §3, batch × seq from x's shape [batch, seq, d]; every parameter
/// and its gradient.
template <class Scalar>
void run_memoryformer_block_file(const TextTensorFile& file) {
  const auto& x_t = file.at("x");
  ASSERT_EQ(x_t.shape.size(), 3u) << "x must be [batch, seq, d]";
  const Index batch = x_t.dim(0), seq = x_t.dim(1), d = x_t.dim(2);
  const MemoryBlockConfig mb = memory_block_config_of(file, d);
  MemoryFormerBlockConfig config;
  config.d = d;
  config.heads = Index(file.at("heads").scalar());
  config.rotary_dims = Index(file.at("rotary_dims").scalar());
  config.tau = mb.tau;
  config.expand_bits = mb.expand_bits;
  config.gelu = mb.gelu;
  config.score = mb.score;
  config.temperature = mb.temperature;
  config.bias = file.has("bias_q");
  MemoryFormerBlock<Scalar> block(config, 0);
  copy_vector(block.norm1().rms()->scale(), file.at("norm1_scale"));
  load_into(block.q(), file, "tables_q", "bias_q");
  load_into(block.k(), file, "tables_k", "bias_k");
  load_into(block.v(), file, "tables_v", "bias_v");
  copy_vector(block.norm2().rms()->scale(), file.at("norm2_scale"));
  load_memory_block(block.memory_block(), file, "tables1", "bias1", "ln_gamma", "ln_beta", "tables2", "bias2");

  const Matrix<Scalar> x = x_t.template as_matrix<Scalar>();
  const Matrix<Scalar> dy = file.at("dy").template as_matrix<Scalar>();
  MemoryFormerBlockCache<Scalar> cache;
  Matrix<Scalar> y(x.rows(), d), dx(x.rows(), d);
  block.forward(y, x, batch, seq, cache);
  block.zero_grad();
  block.backward(dx, x, dy, cache);
  const double rtol = vector_rtol<Scalar>();
  EXPECT_TRUE(tensors_close("y", y.data(), file.at("y"), rtol));
  EXPECT_TRUE(tensors_close("dx", dx.data(), file.at("dx"), rtol));
  EXPECT_TRUE(tensors_close("dnorm1_scale", block.norm1().rms()->dscale().data(), file.at("dnorm1_scale"), rtol));
  EXPECT_TRUE(tensors_close("dnorm2_scale", block.norm2().rms()->dscale().data(), file.at("dnorm2_scale"), rtol));
  for (const char* name : {"q", "k", "v"}) {
    MemoryLayer<Scalar>& layer = *name == 'q' ? block.q() : *name == 'k' ? block.k() : block.v();
    const std::string t = std::string("dtables_") + name, b = std::string("dbias_") + name;
    EXPECT_TRUE(tensors_close(t, layer.dtables().data(), file.at(t), rtol));
    if (file.has(b)) {
      EXPECT_TRUE(tensors_close(b, layer.dbias().data(), file.at(b), rtol));
    }
  }
  expect_memory_block_gradients(block.memory_block(), file, "dtables1", "dbias1", "dln_gamma", "dln_beta", "dtables2",
                                "dbias2");
}

}  // namespace memoryformer::testing_support

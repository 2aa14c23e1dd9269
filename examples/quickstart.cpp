// SPDX-License-Identifier: MIT
// Quick start: a MemoryLayer in your own code — forward, backward, one SGD step — with its output shape and FLOPs
// beside the dense layer it replaces. Run: ./quickstart  (or ./quickstart --smoke for toy sizes)
#include <cstdio>
#include <cstring>

#include <memoryformer/flops.hpp>
#include <memoryformer/memory_layer.hpp>

int main(int argc, char** argv) {
  namespace mf = memoryformer;
  const bool smoke = argc > 1 && std::strcmp(argv[1], "--smoke") == 0;
  const mf::Index tokens = smoke ? 8 : 256, d = smoke ? 64 : 512;

  // d_in = d_out = d, τ = 8 bits per chunk: K = d/8 tables of 256 rows each.
  mf::MemoryLayer<float> layer({.d_in = d, .d_out = d, .tau = 8}, /*seed=*/42);

  // Any row-major [tokens, d] matrix works: an owned Matrix, or your own buffer via Eigen::Map / TensorMap.
  mf::Rng rng(1);
  mf::Matrix<float> x(tokens, d), target(tokens, d);
  for (mf::Index i = 0; i < x.size(); ++i) {
    x.data()[i] = float(rng.normal());
    target.data()[i] = float(0.1 * rng.normal());
  }

  mf::HashResult<float> cache;  // codes and scores, kept for backward
  mf::Matrix<float> y(tokens, d);
  auto loss_of = [&] { return 0.5 * double((y - target).squaredNorm()) / double(tokens); };

  layer.forward(y, x, cache);
  const double loss_before = loss_of();

  // Backward of the mean squared error: dY = (Y − T)/tokens. dx is overwritten; dtables, dbias accumulate.
  const mf::Matrix<float> dy = (y - target) / float(tokens);
  mf::Matrix<float> dx(tokens, d);
  layer.zero_grad();
  layer.backward(dx, x, dy, cache);

  // Plain SGD over the parameter views; only the table rows that were hit have non-zero gradients.
  const float lr = 0.5f;
  for (auto& p : layer.parameters())
    for (size_t i = 0; i < p.value.size(); ++i) p.value[i] -= lr * p.grad[i];
  layer.forward(y, x, cache);
  const double loss_after = loss_of();

  mf::Index touched = 0;
  for (auto t : layer.touched_rows()) touched += t;
  const double ml_flops = mf::memory_layer_flops_paper(double(tokens), double(d), double(d), 8);
  const double dense_flops = mf::dense_layer_flops_paper(double(tokens), double(d), double(d));

  std::printf("MemoryLayer %lld -> %lld, tau = 8, K = %lld tables of 256 rows\n", (long long)d, (long long)d,
              (long long)layer.num_tables());
  std::printf("input  (%lld, %lld)\noutput (%lld, %lld)\n", (long long)x.rows(), (long long)x.cols(),
              (long long)y.rows(), (long long)y.cols());
  std::printf("loss before SGD step %.6f, after %.6f\n", loss_before, loss_after);
  std::printf("table rows updated: %lld of %lld\n", (long long)touched, (long long)layer.tables().num_rows());
  std::printf("FLOPs (paper convention, multiply-add = 1) for %lld tokens: memory layer %.3g, dense layer %.3g (%.1fx fewer)\n",
              (long long)tokens, ml_flops, dense_flops, dense_flops / ml_flops);
  std::printf("parameters: memory layer %lld, dense layer %lld\n", (long long)layer.num_parameters(),
              (long long)(d * d + d));
  return loss_after < loss_before ? 0 : 1;
}

// SPDX-License-Identifier: MIT
// BlockNorm: the normalisation of a MemoryFormer block, RMSNorm or LayerNorm chosen at run time by NormKind (design §3).
#pragma once

#include <concepts>
#include <optional>
#include <string>
#include <vector>

#include "../parameter.hpp"
#include "../types.hpp"
#include "layer_norm.hpp"
#include "rms_norm.hpp"

namespace memoryformer {

/// Normalisation used before attention and before the Memory Block.
enum class NormKind {
  RMS,    ///< authors' code: x / (rms(x) + 1e-8) · g (eps added to the RMS)
  Layer,  ///< affine LayerNorm, eps 1e-5
};

/// What BlockNorm::forward keeps for backward (the statistics of whichever norm the BlockNorm holds).
template <std::floating_point Scalar>
struct BlockNormCache {
  RMSNormCache<Scalar> rms;      // per-row RMS (NormKind::RMS)
  LayerNormCache<Scalar> layer;  // per-row mean and 1/std (NormKind::Layer)
};

/**
 * @brief RMSNorm or LayerNorm over the last dimension of [rows, d], behind one interface; which one is chosen once,
 * at construction. Parameters, gradients and threads are those of the norm it holds (rms() or layer()).
 */
template <std::floating_point Scalar>
class BlockNorm {
 public:
  using Cache = BlockNormCache<Scalar>;

  /// @throws ConfigError (see RMSNorm, LayerNorm)
  BlockNorm(NormKind kind, Index d, double rms_eps, double layer_eps) {
    if (kind == NormKind::RMS) {
      rms_.emplace(d, rms_eps);
    } else {
      layer_.emplace(d, layer_eps);
    }
  }

  NormKind kind() const { return rms_ ? NormKind::RMS : NormKind::Layer; }
  Index d() const { return rms_ ? rms_->d() : layer_->d(); }

  /// y = norm(x); y may be x. @throws ShapeError
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, Cache& cache) const {
    if (rms_) {
      rms_->forward(y, x, cache.rms);
    } else {
      layer_->forward(y, x, cache.layer);
    }
  }
  /// dx overwritten (may be x or dy), parameter gradients accumulated. @throws ShapeError, StateError
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy, const Cache& cache) {
    if (rms_) {
      rms_->backward(dx, x, dy, cache.rms);
    } else {
      layer_->backward(dx, x, dy, cache.layer);
    }
  }
  void zero_grad() {
    if (rms_) rms_->zero_grad();
    if (layer_) layer_->zero_grad();
  }
  /// "<prefix>.scale" (RMS) or "<prefix>.gamma", "<prefix>.beta" (Layer).
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix) {
    return rms_ ? rms_->parameters(prefix) : layer_->parameters(prefix);
  }
  Index num_parameters() const { return rms_ ? rms_->d() : 2 * layer_->d(); }
  /// The RMSNorm held, or nullptr for NormKind::Layer.
  RMSNorm<Scalar>* rms() { return rms_ ? &*rms_ : nullptr; }
  const RMSNorm<Scalar>* rms() const { return rms_ ? &*rms_ : nullptr; }
  /// The LayerNorm held, or nullptr for NormKind::RMS.
  LayerNorm<Scalar>* layer() { return layer_ ? &*layer_ : nullptr; }
  const LayerNorm<Scalar>* layer() const { return layer_ ? &*layer_ : nullptr; }

 private:
  std::optional<RMSNorm<Scalar>> rms_;      // [d] scale, or empty
  std::optional<LayerNorm<Scalar>> layer_;  // [d] gamma, beta, or empty
};

}  // namespace memoryformer

// SPDX-License-Identifier: MIT
// Model checkpoints: a LanguageModel's config entries and parameters, with the optional AdamW state, saved
// atomically and loaded all or nothing, in the io/checkpoint_format.hpp format.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "../config_entries.hpp"
#include "../error.hpp"
#include "../model.hpp"
#include "../optim/adamw.hpp"
#include "../types.hpp"
#include "checkpoint.hpp"

namespace memoryformer {

namespace detail::ckpt {

/// Index of the first NaN or ±Inf value of a float tensor, or nothing.
inline std::optional<Index> first_non_finite(const CheckpointTensor& t) {
  const std::size_t width = dtype_size(t.dtype);
  const std::size_t n = t.bytes.size() / width;
  for (std::size_t i = 0; i < n; ++i) {
    double v = 0;
    if (t.dtype == DType::F64) {
      std::memcpy(&v, t.bytes.data() + i * 8, 8);
    } else {
      float f = 0;
      std::memcpy(&f, t.bytes.data() + i * 4, 4);
      v = f;
    }
    if (!std::isfinite(v)) return Index(i);
  }
  return std::nullopt;
}

}  // namespace detail::ckpt

/// A LanguageModel instantiation (what save_model and load_model accept).
template <class Model>
concept LanguageModelLike = requires(Model& m) {
  typename Model::BlockType;
  typename Model::ScalarType;
  { m.config_entries() } -> std::same_as<ConfigEntries>;
  m.parameters();
};

/// The "model.kind" of a checkpoint ("memoryformer", "transformer"), to pick the model class before loading.
/// @throws FormatError if the key is missing.
inline std::string checkpoint_model_kind(const Checkpoint& ckpt, const std::string& origin = "checkpoint") {
  return detail::model::ConfigReader(ckpt.config, origin).text("model.kind");
}

/**
 * @brief Saves the model's config entries and parameters, the optimiser's state when `optimizer` is given
 *        (tensors "adamw.*", see AdamW::state_tensors), and `extra_config` (e.g. "train.step"), atomically
 *        (temporary file + rename; see save_checkpoint). Parameters are written without copying.
 * @throws ConfigError when an extra key collides with a model key; IoError when writing fails.
 */
template <LanguageModelLike Model>
void save_model(const std::filesystem::path& path, Model& model, AdamW<typename Model::ScalarType>* optimizer = nullptr,
                const ConfigEntries& extra_config = {}) {
  ConfigEntries config = model.config_entries();
  for (const auto& [k, v] : extra_config) {
    for (const auto& [mk, mv] : config)
      detail::check_config(k != mk, "save_model", "extra config key '" + k + "' is a model key");
    config.emplace_back(k, v);
  }
  config.emplace_back("model.has_optimizer", optimizer ? "true" : "false");
  std::vector<CheckpointTensor> extra;
  if (optimizer != nullptr)
    for (const auto& s : optimizer->state_tensors()) extra.push_back(CheckpointTensor::from_values(s.name, s.shape, s.values));
  save_parameters(path, config, model.parameters(), extra);
}

/**
 * @brief Loads a model checkpoint (already read and checksum-validated, e.g. by load_checkpoint) into `model`, and
 *        the optimiser state into `optimizer` when given. All or nothing: when it throws, the model and the
 *        optimiser hold exactly the values they held before the call.
 *
 * Checks: the config entries equal the model's (kind, scalar type, vocab, layers, every block setting); every
 * parameter has a tensor of the same name, shape and dtype; with an optimiser, the checkpoint holds optimiser state
 * with the right names and shapes; no parameter or optimiser tensor holds NaN or ±Inf; the optimiser accepts the
 * loaded counts and moments (AdamW::load_state: integer counts, row counts ≤ the step count, v ≥ 0).
 * @param origin used in error messages (the path)
 * @return the checkpoint's config entries (e.g. to read "train.step")
 * @throws FormatError listing the mismatches.
 */
template <LanguageModelLike Model>
ConfigEntries load_model(const Checkpoint& ckpt, Model& model, AdamW<typename Model::ScalarType>* optimizer = nullptr,
                         const std::string& origin = "checkpoint") {
  using Scalar = typename Model::ScalarType;
  const std::string where = "load_model: " + origin + ": ";
  std::vector<std::string> problems;
  for (const auto& [key, value] : model.config_entries()) {
    const std::string* have = ckpt.find_config(key);
    if (have == nullptr)
      problems.push_back("no config key '" + key + "' (the model has " + key + "=" + value + ")");
    else if (*have != value)
      problems.push_back("the checkpoint has " + key + "=" + *have + ", the model has " + key + "=" + value);
  }
  // A kind mismatch makes every other difference noise: report it alone.
  if (const std::string* k = ckpt.find_config("model.kind"); k != nullptr && *k != model.kind())
    throw FormatError(where + "the checkpoint holds a '" + *k + "' model, this model is '" + std::string(model.kind()) +
                      "'");
  const auto params = model.parameters();
  auto check_tensor = [&](const std::string& name, const std::vector<Index>& shape) {
    const CheckpointTensor* t = ckpt.find_tensor(name);
    if (t == nullptr) {
      problems.push_back("no tensor '" + name + "'");
    } else if (t->shape != shape) {
      problems.push_back("tensor '" + name + "' is " + detail::ckpt::shape_text(t->shape) + ", the model needs " +
                         detail::ckpt::shape_text(shape));
    } else if (t->dtype != dtype_of<Scalar>()) {
      problems.push_back("tensor '" + name + "' is " + dtype_name(t->dtype) + ", the model is " +
                         dtype_name(dtype_of<Scalar>()));
    }
  };
  for (const auto& p : params) check_tensor(p.name, p.shape);
  std::vector<OptimizerStateTensor<Scalar>> state;
  if (optimizer != nullptr) {
    const std::string* has = ckpt.find_config("model.has_optimizer");
    if (has == nullptr || *has != "true") {
      problems.push_back("the checkpoint holds no optimizer state (saved without one)");
    } else {
      state = optimizer->state_tensors();
      for (const auto& s : state) check_tensor(s.name, s.shape);
    }
  }
  // NaN or ±Inf in a parameter or a moment would poison every later step: reject the file naming the tensor.
  if (problems.empty()) {
    auto check_finite_tensor = [&](const std::string& name) {
      if (const auto at = detail::ckpt::first_non_finite(ckpt.tensor(name)))
        problems.push_back("tensor '" + name + "' has a non-finite value at element " + std::to_string(*at));
    };
    for (const auto& p : params) check_finite_tensor(p.name);
    for (const auto& s : state) check_finite_tensor(s.name);
  }
  if (!problems.empty()) {
    std::string msg = where + std::to_string(problems.size()) + " mismatch" + (problems.size() > 1 ? "es" : "") + ": ";
    const std::size_t shown = std::min<std::size_t>(problems.size(), 8);
    for (std::size_t i = 0; i < shown; ++i) msg += (i ? "; " : "") + problems[i];
    if (shown < problems.size()) msg += "; and " + std::to_string(problems.size() - shown) + " more";
    throw FormatError(msg);
  }
  // The optimiser validates its counts only once they are loaded, so load it first, keeping a copy of its state to
  // put back if it refuses them; the parameters are written only after that, when nothing can fail any more.
  if (optimizer != nullptr) {
    std::vector<std::vector<Scalar>> saved;
    saved.reserve(state.size());
    for (const auto& s : state) saved.emplace_back(s.values.begin(), s.values.end());
    try {
      optimizer->load_state([&](const std::string& name, const std::vector<Index>& shape, std::span<Scalar> out) {
        ckpt.copy_tensor(name, std::span<const Index>(shape), out);
      });
    } catch (const std::exception& e) {
      // Put the saved state back through load_state itself, not through the spans taken above: with bfloat16
      // moments the failed load freed their buffers, and load_state rounds the (exactly expanded) values back to
      // the same bits.
      std::size_t next = 0;
      optimizer->load_state([&](const std::string&, const std::vector<Index>&, std::span<Scalar> out) {
        std::ranges::copy(saved[next++], out.begin());
      });
      throw FormatError(where + e.what());
    }
  }
  for (const auto& p : params) ckpt.copy_tensor(p.name, p.value);
  return ckpt.config;
}

/// load_model from a file: load_checkpoint(path) (which validates every byte and checksum), then load_model.
/// @throws FormatError as load_checkpoint and load_model.
template <LanguageModelLike Model>
ConfigEntries load_model(const std::filesystem::path& path, Model& model,
                         AdamW<typename Model::ScalarType>* optimizer = nullptr) {
  return load_model(load_checkpoint(path), model, optimizer, "'" + path.string() + "'");
}

}  // namespace memoryformer

// SPDX-License-Identifier: MIT
// Trainer: the training recipe of design §3 for a LanguageModel on byte-level text — AdamW (β = (0.9, 0.95), eps 1e-8,
// weight decay 0.1 except biases and norms), global-norm clipping, cosine schedule with linear warm-up, periodic
// validation, atomic checkpoints and exact resume. Silent: progress goes to callbacks.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <numbers>
#include <string>
#include <utility>
#include <vector>

#include "../detail/checked_size.hpp"
#include "../detail/checks.hpp"
#include "../detail/xxhash.hpp"
#include "../distributed/collectives.hpp"
#include "../distributed/communicator.hpp"
#include "../distributed/data_parallel.hpp"
#include "../distributed/self_communicator.hpp"
#include "../error.hpp"
#include "../io/model_checkpoint.hpp"
#include "../model.hpp"
#include "../optim/adamw.hpp"
#include "../optim/clip.hpp"
#include "../optim/schedule.hpp"
#include "../random.hpp"
#include "text_data.hpp"

namespace memoryformer {

/// The recipe's AdamW options with the RowSparse update for tables and the embedding (the Trainer's default).
inline AdamWOptions row_sparse_adamw() {
  AdamWOptions o;
  o.sparse_update = SparseUpdate::RowSparse;
  return o;
}

/// Settings of a training run. The defaults are the paper's recipe (design §3) at this library's small sizes.
struct TrainerOptions {
  Index steps = 1000;              ///< optimisation steps of the run: the length of the cosine schedule
  Index batch = 16;                ///< sequences per micro-batch (one forward and backward)
  /// Micro-batches per optimisation step: a step draws accumulate·batch sequences, runs forward and backward on
  /// `batch` of them at a time with the gradients accumulating, and averages, so accumulate = N with batch = B is
  /// the step of accumulate = 1 with batch = N·B (up to float summation order) at the activation memory of B.
  Index accumulate = 1;
  Index seq = 128;                 ///< tokens per sequence
  double lr = 3e-3;                ///< peak learning rate (recipe: 3e-3 for MemoryFormer, 3× the dense model's)
  double lr_min_ratio = 0.01;      ///< cosine decay down to lr · lr_min_ratio (recipe: lr/100)
  double warmup_ratio = 0.01;      ///< linear warm-up over this share of the steps, at least 1 step (recipe: 1%)
  double clip_norm = 1.0;          ///< global gradient-norm clipping threshold; 0 disables clipping
  /// β, eps, weight decay (not on biases and norms), per-kind learning-rate multipliers ("lr groups") and the
  /// sparse update mode of tables and the embedding. Default here: RowSparse (see AdamW for its lazy semantics).
  AdamWOptions adamw = row_sparse_adamw();
  Index eval_every = 100;          ///< validate every this many steps and after the last; 0: only when asked
  Index eval_windows = 64;         ///< validation windows (seq tokens each) per evaluation; 0: the whole split
  std::uint64_t data_seed = 1;     ///< the batch of step t is drawn with Rng::stream(data_seed, t)
  std::filesystem::path checkpoint_path;  ///< where run() saves checkpoints; empty: never
  Index checkpoint_every = 0;      ///< with checkpoint_path: save every this many steps (0: only at the end)
  /// Distributed runs: compare an XXH3 of the replicated parameters across the ranks every this many steps and after
  /// the last step, stopping with a DistributedError when they differ (0: only after the last step).
  Index replica_check_every = 100;
  DataParallelOptions data_parallel;  ///< distributed runs: how gradients are summed over the ranks
  /// Keep a copy of every Memory Layer's tables in the layout their prefill kernel reads, kept current by the
  /// optimiser's update pass (ParameterView::values_written; LanguageModel::keep_tables_packed re-packs a copy that
  /// was released), instead of packing per forward call: the same results, no packing pass per step or micro-batch,
  /// for the tables' size in memory again. Code that writes the tables between steps other than through the model's
  /// API (e.g. through the optimiser's views) then calls model().tables_changed().
  bool packed_tables = true;

  /// @throws ConfigError naming the offending value.
  void validate(std::string_view where = "TrainerOptions") const {
    detail::check_config(steps >= 1, where, "steps = " + std::to_string(steps) + " must be ≥ 1");
    detail::check_config(batch >= 1, where, "batch = " + std::to_string(batch) + " must be ≥ 1");
    detail::check_config(accumulate >= 1, where, "accumulate = " + std::to_string(accumulate) + " must be ≥ 1");
    detail::check_config(seq >= 1, where, "seq = " + std::to_string(seq) + " must be ≥ 1");
    (void)detail::checked_product(where, "batch · accumulate · seq (tokens per step)", {batch, accumulate, seq});
    detail::check_config(std::isfinite(lr) && lr >= 0.0, where, "lr = " + std::to_string(lr) + " must be ≥ 0");
    detail::check_config(lr_min_ratio >= 0.0 && lr_min_ratio <= 1.0, where,
                         "lr_min_ratio = " + std::to_string(lr_min_ratio) + " is outside [0, 1]");
    detail::check_config(warmup_ratio >= 0.0 && warmup_ratio <= 1.0, where,
                         "warmup_ratio = " + std::to_string(warmup_ratio) + " is outside [0, 1]");
    detail::check_config(std::isfinite(clip_norm) && clip_norm >= 0.0, where,
                         "clip_norm = " + std::to_string(clip_norm) + " must be ≥ 0 (0: no clipping)");
    detail::check_config(eval_every >= 0 && eval_windows >= 0 && checkpoint_every >= 0 && replica_check_every >= 0,
                         where, "eval_every, eval_windows, checkpoint_every and replica_check_every must be ≥ 0");
    data_parallel.validate(where);
  }

  /// The learning-rate schedule these options describe.
  CosineSchedule schedule() const {
    const auto warmup = std::max<std::int64_t>(1, std::int64_t(std::llround(warmup_ratio * double(steps))));
    return {lr, lr * lr_min_ratio, std::min<std::int64_t>(warmup, steps), steps};
  }
};

/// What one optimisation step did (passed to on_step callbacks).
struct StepInfo {
  Index step = 0;                  ///< steps completed, including this one (1 after the first step)
  Index total_steps = 0;           ///< TrainerOptions::steps
  double loss = 0.0;               ///< mean training cross-entropy of this step's batch (all micro-batches), nats per token
  double lr = 0.0;                 ///< base learning rate used (before per-kind multipliers)
  double grad_norm = 0.0;          ///< global gradient norm before clipping
  Index tokens = 0;                ///< tokens processed by this Trainer object so far (resumed steps excluded)
  double step_seconds = 0.0;       ///< wall time of this step
  double elapsed_seconds = 0.0;    ///< wall time of the steps of this Trainer object so far
  double tokens_per_second = 0.0;  ///< tokens / elapsed_seconds
  double eta_seconds = 0.0;        ///< remaining steps × mean step time so far
};

/// A validation result (passed to on_eval callbacks).
struct EvalInfo {
  Index step = 0;              ///< steps completed when evaluated
  double loss = 0.0;           ///< mean cross-entropy over the validation tokens, nats per token
  double bits_per_byte = 0.0;  ///< loss / ln 2: tokens are bytes
  Index tokens = 0;            ///< validation tokens scored
  double seconds = 0.0;        ///< wall time of the evaluation
};

/// Summary of Trainer::run.
struct TrainResult {
  Index steps = 0;                 ///< steps completed (resumed ones included)
  double train_loss = 0.0;         ///< mean training loss of the last min(20, steps run) steps
  EvalInfo validation;             ///< the last evaluation (run() always evaluates after the last step)
  Index tokens = 0;                ///< training tokens processed in this run
  double seconds = 0.0;            ///< wall time of the training steps (evaluations excluded)
  double tokens_per_second = 0.0;  ///< tokens / seconds
  bool stopped_early = false;      ///< request_stop() ended the run before options.steps
};

/// What a Trainer trains: a model with a loss forward, its backward, gradients it can clear and parameter views
/// (LanguageModel satisfies it; FrozenLanguageModel, which has no backward, does not).
template <class Model>
concept TrainableModel = requires(Model& m, std::span<const std::int32_t> ids, Index n, typename Model::Cache& cache) {
  typename Model::ScalarType;
  m.forward_loss(ids, ids, n, n, cache);
  m.backward(cache);
  m.zero_grad();
  m.parameters();
};

/**
 * @brief Trains a LanguageModel on a TextDataset with the design §3 recipe.
 *
 * One step: zero_grad → (forward_loss → backward) on each of the step's `accumulate` micro-batches, the gradients
 * accumulating → AdamW::step_fused with the scheduled rate: global-norm clip, update and gradient zeroing in two
 * passes. The batch of step t depends only on (data_seed, t), so a run resumed from a checkpoint of step t
 * (model + optimizer + step count) continues exactly as the uninterrupted run would.
 *
 * **Distributed** (design §11): with a Communicator of R ranks, every rank runs the same Trainer on its own
 * process. Each micro-batch of `batch` sequences is split into R contiguous shares of batch/R sequences (rank r takes
 * the r-th), so the run sees the same sequences as the one-rank run with the same options; the loss of each share is
 * scaled by 1/R and DataParallel sums the gradients of the replicated parameters over the ranks after the step's
 * last backward. A model built with a TableSharding on the same communicator (table parallelism) keeps only its
 * tables' share on each rank, and the optimiser's clipping norm then adds the sharded parts over the ranks.
 * Evaluation splits the windows over the ranks (a multiple of R of them). Checkpoints: see save_checkpoint.
 * Every call of step(), evaluate(), run(), save_checkpoint() and resume() is then collective (see Communicator).
 *
 * The model, the data and the callbacks must outlive the trainer. The library prints nothing: see callbacks.hpp for
 * a progress bar and printers.
 * @tparam Model a LanguageModel (TrainableModel)
 */
template <class Model>
class Trainer {
  static_assert(TrainableModel<Model>,
                "Trainer needs a model with forward_loss, backward, zero_grad and parameters (a LanguageModel); a "
                "FrozenLanguageModel is inference-only: train the LanguageModel, then freeze it");

 public:
  using Scalar = typename Model::ScalarType;
  using StepCallback = std::function<void(const StepInfo&)>;
  using EvalCallback = std::function<void(const EvalInfo&)>;
  using CheckpointCallback = std::function<void(const std::filesystem::path&, Index step)>;

  /// @throws ConfigError for invalid options (see TrainerOptions::validate, AdamW) or a model whose vocabulary
  ///         cannot hold byte tokens.
  Trainer(Model& model, const TextDataset& data, TrainerOptions options) : Trainer(model, data, std::move(options), nullptr) {}

  /**
   * @brief A distributed trainer: one per rank of `communicator`, which must outlive it (see the class comment).
   * @throws ConfigError as above, or when batch is not a multiple of the rank count
   */
  Trainer(Model& model, const TextDataset& data, TrainerOptions options, Communicator& communicator)
      : Trainer(model, data, std::move(options), &communicator) {}

 private:
  Trainer(Model& model, const TextDataset& data, TrainerOptions options, Communicator* communicator)
      : model_(model),
        data_(data),
        options_((options.validate("Trainer"), std::move(options))),
        comm_(communicator != nullptr ? *communicator : self_),
        params_(model.parameters()),
        optimizer_(params_, options_.adamw),
        data_parallel_(comm_, params_, options_.data_parallel) {
    detail::check_config(model.vocab() >= TextDataset::vocab(), "Trainer",
                         "the model's vocab = " + std::to_string(model.vocab()) + " cannot hold " +
                             std::to_string(TextDataset::vocab()) + " byte tokens");
    detail::check_config(options_.batch % comm_.size() == 0, "Trainer",
                         "batch = " + std::to_string(options_.batch) + " sequences cannot be split evenly over " +
                             std::to_string(comm_.size()) + " ranks");
    for (const auto& p : params_) sharded_ = sharded_ || p.sharded;
    if (sharded_) optimizer_.set_sharded_norm_sum([this](double x) { return all_reduce_sum(comm_, x); });
    if (options_.packed_tables) model_.tables_changed();
  }

 public:

  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  const TrainerOptions& options() const { return options_; }
  Model& model() { return model_; }
  AdamW<Scalar>& optimizer() { return optimizer_; }
  /// Steps completed (including resumed ones).
  Index step_count() const { return step_; }
  /// The ranks of the run (a SelfCommunicator for a trainer built without one).
  Communicator& communicator() { return comm_; }
  /// True when the model's tables are split across the ranks (table parallelism).
  bool table_parallel() const { return sharded_; }
  /// The base learning rate of 0-based step `step`.
  double learning_rate(Index step) const { return options_.schedule()(step); }

  void on_step(StepCallback cb) { step_callbacks_.push_back(std::move(cb)); }
  void on_eval(EvalCallback cb) { eval_callbacks_.push_back(std::move(cb)); }
  void on_checkpoint(CheckpointCallback cb) { checkpoint_callbacks_.push_back(std::move(cb)); }
  /// Makes run() return after the current step (e.g. from a callback, on a time budget).
  void request_stop() { stop_requested_ = true; }

  /// The batch of 0-based step `step`, all accumulate·batch sequences (a pure function of data_seed and step).
  void batch_of_step(TokenBatch& out, Index step) const {
    Rng rng = Rng::stream(options_.data_seed, std::uint64_t(step));
    data_.sample_train(out, options_.batch * options_.accumulate, options_.seq, rng);
  }

  /**
   * @brief One optimisation step (does not call callbacks; run() does).
   * @throws NonFiniteError when the loss or the gradient norm is not finite (nothing is updated then).
   */
  StepInfo step() {
    const auto t0 = std::chrono::steady_clock::now();
    batch_of_step(batch_, step_);
    // After a step_fused the gradients are zero already and this clears nothing of them; it is for a first step,
    // a step after an exception, and gradients the caller accumulated in between.
    model_.zero_grad();
    // Rank r takes sequences [r·share, (r+1)·share) of every micro-batch; its loss counts 1/R of the step's mean.
    const Index ranks = comm_.size(), micro = options_.batch, parts = options_.accumulate;
    const Index share = micro / ranks, tokens_per_part = micro * batch_.seq;
    const Scalar dloss = Scalar(1.0 / (double(parts) * double(ranks)));
    double loss = 0.0;
    for (Index part = 0; part < parts; ++part) {
      const auto first = std::size_t(part * tokens_per_part + comm_.rank() * share * batch_.seq),
                 count = std::size_t(share * batch_.seq);
      const Scalar part_loss =
          model_.forward_loss(std::span<const std::int32_t>(batch_.inputs).subspan(first, count),
                              std::span<const std::int32_t>(batch_.targets).subspan(first, count), share,
                              batch_.seq, cache_);
      if (!std::isfinite(double(part_loss)) && ranks == 1) throw_non_finite_loss(double(part_loss));
      loss += double(part_loss) / double(parts);
      model_.backward(cache_, dloss);
    }
    if (ranks > 1) {
      data_parallel_.sum_gradients();
      loss = all_reduce_sum(comm_, loss) / double(ranks);
      if (!std::isfinite(loss)) throw_non_finite_loss(loss);  // on every rank: the sum carries any rank's NaN
    }
    const double lr = learning_rate(step_);
    const double norm = optimizer_.step_fused(lr, options_.clip_norm);
    if (options_.packed_tables) model_.keep_tables_packed();  // the step updated the current copies row by row
    if (!std::isfinite(norm))
      throw NonFiniteError("Trainer::step: the gradient norm is " + std::to_string(norm) + " at step " +
                           std::to_string(step_) + " (try a lower learning rate)");
    ++step_;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tokens_ += batch_.batch * batch_.seq;
    seconds_ += seconds;
    ++steps_this_object_;
    StepInfo info;
    info.step = step_;
    info.total_steps = options_.steps;
    info.loss = loss;
    info.lr = lr;
    info.grad_norm = norm;
    info.tokens = tokens_;
    info.step_seconds = seconds;
    info.elapsed_seconds = seconds_;
    info.tokens_per_second = seconds_ > 0.0 ? double(tokens_) / seconds_ : 0.0;
    info.eta_seconds = double(std::max<Index>(0, options_.steps - step_)) * seconds_ / double(steps_this_object_);
    return info;
  }

  /// The DataParallel that sums the gradients of distributed steps.
  DataParallel<Scalar>& data_parallel() { return data_parallel_; }

  /// Validation loss over options().eval_windows windows (see TextDataset::validation_windows).
  EvalInfo evaluate() { return evaluate(options_.eval_windows); }

  /**
   * @brief Mean validation cross-entropy over `max_windows` evenly spread windows of seq tokens (0: all), scored in
   *        batches of options().batch windows. Changes no parameter or gradient. With R ranks, the largest multiple
   *        of R of those windows, each batch split evenly over the ranks.
   * @throws ConfigError when the validation split is shorter than seq + 1 tokens, or holds fewer windows than ranks.
   */
  EvalInfo evaluate(Index max_windows) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto starts = data_.validation_windows(options_.seq, max_windows);
    const Index ranks = comm_.size();
    const Index usable = Index(starts.size()) / ranks * ranks;
    detail::check_config(usable > 0, "Trainer::evaluate",
                         std::to_string(starts.size()) + " validation windows cannot be split over " +
                             std::to_string(ranks) + " ranks");
    double total = 0.0;
    Index tokens = 0;
    for (Index first = 0; first < usable; first += options_.batch * ranks) {
      const Index share = std::min(options_.batch * ranks, usable - first) / ranks;
      data_.validation_batch(eval_batch_, std::span<const Index>(starts).first(std::size_t(usable)),
                             first + comm_.rank() * share, share, options_.seq);
      const Index n = eval_batch_.batch * eval_batch_.seq;
      total += double(model_.forward_loss(eval_batch_.inputs, eval_batch_.targets, eval_batch_.batch,
                                          eval_batch_.seq, eval_cache_)) * double(n);
      tokens += n;
    }
    if (ranks > 1) {
      total = all_reduce_sum(comm_, total);
      tokens = all_reduce_sum(comm_, tokens);
    }
    EvalInfo info;
    info.step = step_;
    info.tokens = tokens;
    info.loss = tokens > 0 ? total / double(tokens) : 0.0;
    info.bits_per_byte = info.loss / std::numbers::ln2;
    info.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return info;
  }

  /**
   * @brief Steps from step_count() to options().steps, calling the step callbacks after every step, evaluating every
   *        eval_every steps and after the last one, and saving checkpoints as the options say.
   * @throws NonFiniteError as step(); IoError when a checkpoint cannot be written.
   */
  TrainResult run() {
    TrainResult result;
    const Index tokens0 = tokens_;
    const double seconds0 = seconds_;
    std::vector<double> recent;
    stop_requested_ = false;
    bool evaluated_last = false;
    while (step_ < options_.steps) {
      const StepInfo info = step();
      recent.push_back(info.loss);
      if (recent.size() > 20) recent.erase(recent.begin());
      for (auto& cb : step_callbacks_) cb(info);
      evaluated_last = false;
      if (options_.eval_every > 0 && step_ % options_.eval_every == 0 && step_ < options_.steps) {
        result.validation = evaluate();
        evaluated_last = true;
        for (auto& cb : eval_callbacks_) cb(result.validation);
      }
      if (!options_.checkpoint_path.empty() && options_.checkpoint_every > 0 && step_ % options_.checkpoint_every == 0 &&
          step_ < options_.steps)
        save_checkpoint(options_.checkpoint_path);
      if (comm_.size() > 1) {
        // Every rank stops together: a time budget measured on one rank's clock must not leave the others waiting.
        stop_requested_ = all_reduce_sum(comm_, Index(stop_requested_ ? 1 : 0)) > 0;
        if (options_.replica_check_every > 0 && step_ % options_.replica_check_every == 0)
          data_parallel_.check_replicas("after step " + std::to_string(step_));
      }
      if (stop_requested_) {
        result.stopped_early = step_ < options_.steps;
        break;
      }
    }
    data_parallel_.check_replicas("after step " + std::to_string(step_));
    if (!evaluated_last) {
      result.validation = evaluate();
      for (auto& cb : eval_callbacks_) cb(result.validation);
    }
    if (!options_.checkpoint_path.empty()) save_checkpoint(options_.checkpoint_path);
    result.steps = step_;
    for (double l : recent) result.train_loss += l / double(recent.size());
    result.tokens = tokens_ - tokens0;
    result.seconds = seconds_ - seconds0;
    result.tokens_per_second = result.seconds > 0.0 ? double(result.tokens) / result.seconds : 0.0;
    return result;
  }

  /**
   * @brief Saves model, optimiser state and the step count ("train.step", with "train.data_seed") atomically, then
   *        calls the checkpoint callbacks.
   *
   * Distributed: the replicas are identical, so rank 0 alone writes `path`. Table-parallel: every rank writes its
   * own shard, `<path>.shard-<r>-of-<R>` (its tables, the replicated parameters and the optimiser state of both,
   * atomically, as one checkpoint file), then rank 0 writes `path` last as the manifest: the rank count, the step,
   * and each shard's file name and XXH3-64. resume() checks every shard against the manifest, so a save that was
   * cut short between the shards and the manifest is refused instead of mixing steps.
   * @throws IoError when writing fails.
   */
  void save_checkpoint(const std::filesystem::path& path) {
    const ConfigEntries entries{{"train.step", std::to_string(step_)},
                                {"train.data_seed", std::to_string(options_.data_seed)},
                                {"train.batch", std::to_string(options_.batch)},
                                {"train.accumulate", std::to_string(options_.accumulate)},
                                {"train.seq", std::to_string(options_.seq)}};
    if (!sharded_) {
      if (comm_.rank() == 0) save_model(path, model_, &optimizer_, entries);
      comm_.barrier();
    } else {
      const std::filesystem::path shard = shard_path(path, comm_.rank(), comm_.size());
      save_model(shard, model_, &optimizer_, entries);
      const std::vector<std::uint64_t> digests = all_gather_value<std::uint64_t>(comm_, file_digest(shard));
      if (comm_.rank() == 0) {
        Checkpoint manifest;
        manifest.config = {{"table_parallel.ranks", std::to_string(comm_.size())}, {"train.step", std::to_string(step_)}};
        for (int q = 0; q < comm_.size(); ++q) {
          manifest.config.emplace_back("table_parallel.shard." + std::to_string(q),
                                       shard_path(path, q, comm_.size()).filename().string());
          manifest.config.emplace_back("table_parallel.shard." + std::to_string(q) + ".xxh3",
                                       std::to_string(digests[std::size_t(q)]));
        }
        memoryformer::save_checkpoint(path, manifest);
      }
      comm_.barrier();
    }
    for (auto& cb : checkpoint_callbacks_) cb(path, step_);
  }

  /// The file rank `rank` of `ranks` writes its shard to in a table-parallel save_checkpoint(path).
  static std::filesystem::path shard_path(const std::filesystem::path& path, int rank, int ranks) {
    return std::filesystem::path(path.string() + ".shard-" + std::to_string(rank) + "-of-" + std::to_string(ranks));
  }

  /**
   * @brief Loads a checkpoint written by save_checkpoint: parameters, optimiser state and the step count. The next
   *        step() then does exactly what the saved run's next step did, given the same options.
   * @return the step count restored
   * @throws FormatError for a missing, damaged or mismatching checkpoint (the model and optimiser are unchanged), or
   *         one whose data seed, batch, accumulate or seq differ from the options (the batches would differ).
   */
  Index resume(const std::filesystem::path& path) {
    // Every rank loads; if any fails, all throw (the failing ones their own error), so none waits for the others.
    std::optional<std::string> error;
    Index step = 0;
    try {
      step = resume_this_rank(path);
    } catch (const std::exception& e) {
      if (comm_.size() == 1) throw;
      error = e.what();
    }
    if (comm_.size() > 1) {
      const std::vector<int> failed = all_gather_value<int>(comm_, error ? 1 : 0);
      if (error) throw FormatError(*error);
      for (std::size_t q = 0; q < failed.size(); ++q)
        if (failed[q] != 0)
          throw FormatError("Trainer::resume: '" + path.string() + "': rank " + std::to_string(q) +
                            " could not load its part (its error is on its output)");
    }
    return step;
  }

 private:
  [[noreturn]] void throw_non_finite_loss(double loss) const {
    throw NonFiniteError("Trainer::step: the training loss is " + std::to_string(loss) + " at step " +
                         std::to_string(step_) + " (try a lower learning rate)");
  }

  /// XXH3-64 of a file's bytes.
  static std::uint64_t file_digest(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw FormatError("Trainer: cannot read back '" + path.string() + "'");
    detail::Xxh3Stream hash;
    std::vector<char> buffer(std::size_t(1) << 20);
    while (in) {
      in.read(buffer.data(), std::streamsize(buffer.size()));
      hash.update(buffer.data(), std::size_t(in.gcount()));
    }
    return hash.digest();
  }

  /// The checkpoint this rank loads: `path` itself, or its shard when `path` is a table-parallel manifest (checked).
  std::filesystem::path checkpoint_of_this_rank(const std::filesystem::path& path, const Checkpoint& ckpt) const {
    const std::string origin = "'" + path.string() + "'";
    const std::string* ranks = ckpt.find_config("table_parallel.ranks");
    if (ranks == nullptr) {
      if (sharded_)
        throw FormatError("Trainer::resume: " + origin +
                          " is a whole-model checkpoint; this model is table-parallel (its tables are split)");
      return path;
    }
    if (!sharded_)
      throw FormatError("Trainer::resume: " + origin + " is a table-parallel checkpoint of " + *ranks +
                        " ranks; resume it table-parallel on " + *ranks + " ranks");
    if (*ranks != std::to_string(comm_.size()))
      throw FormatError("Trainer::resume: " + origin + " is a table-parallel checkpoint of " + *ranks +
                        " ranks; this run has " + std::to_string(comm_.size()) +
                        " (a table-parallel run resumes on as many ranks as saved it)");
    const std::string key = "table_parallel.shard." + std::to_string(comm_.rank());
    const std::string* name = ckpt.find_config(key);
    const std::string* digest = ckpt.find_config(key + ".xxh3");
    if (name == nullptr || digest == nullptr)
      throw FormatError("Trainer::resume: " + origin + ": the manifest has no " + key);
    const std::filesystem::path shard = path.parent_path() / *name;
    if (std::to_string(file_digest(shard)) != *digest)
      throw FormatError("Trainer::resume: " + origin + ": the shard '" + shard.string() +
                        "' is not the one the manifest lists (XXH3 differs: written by another save?)");
    return shard;
  }

  Index resume_this_rank(const std::filesystem::path& manifest_or_file) {
    Checkpoint first = load_checkpoint(manifest_or_file);
    const std::filesystem::path path = checkpoint_of_this_rank(manifest_or_file, first);
    const Checkpoint ckpt = path == manifest_or_file ? std::move(first) : load_checkpoint(path);
    const std::string origin = "'" + path.string() + "'";
    const detail::model::ConfigReader r(ckpt.config, "Trainer::resume: " + origin);
    const std::int64_t step = r.integer("train.step");
    if (step < 0) throw FormatError("Trainer::resume: " + origin + ": train.step = " + std::to_string(step) + " < 0");
    const auto expect = [&](const char* key, std::int64_t want) {
      if (r.integer(key) != want)
        throw FormatError("Trainer::resume: " + origin + ": the checkpoint has " + key + "=" +
                          std::to_string(r.integer(key)) + ", this run has " + std::to_string(want) +
                          " (resuming with other data settings would not continue the same run)");
    };
    if (r.text("train.data_seed") != std::to_string(options_.data_seed))
      throw FormatError("Trainer::resume: " + origin + ": the checkpoint has train.data_seed=" +
                        r.text("train.data_seed") + ", this run has " + std::to_string(options_.data_seed));
    expect("train.batch", options_.batch);
    // Checkpoints written before accumulation existed are accumulate = 1.
    const std::string* accumulate = ckpt.find_config("train.accumulate");
    const std::int64_t saved_accumulate = accumulate == nullptr ? 1 : r.integer("train.accumulate");
    if (saved_accumulate != options_.accumulate)
      throw FormatError("Trainer::resume: " + origin + ": the checkpoint has train.accumulate=" +
                        std::to_string(saved_accumulate) + ", this run has " + std::to_string(options_.accumulate) +
                        " (resuming with other data settings would not continue the same run)");
    expect("train.seq", options_.seq);
    load_model(ckpt, model_, &optimizer_, origin);
    if (options_.packed_tables) model_.tables_changed();  // loading wrote the tables (and released the copies)
    step_ = Index(step);
    return step_;
  }

  Model& model_;
  const TextDataset& data_;
  TrainerOptions options_;
  SelfCommunicator self_;   // the communicator of a trainer built without one
  Communicator& comm_;
  bool sharded_ = false;    // the model holds sharded parameters (table parallelism)
  std::vector<ParameterView<Scalar>> params_;
  AdamW<Scalar> optimizer_;
  DataParallel<Scalar> data_parallel_;
  Index step_ = 0;
  Index tokens_ = 0;
  double seconds_ = 0.0;
  Index steps_this_object_ = 0;
  bool stop_requested_ = false;
  TokenBatch batch_, eval_batch_;
  typename Model::Cache cache_, eval_cache_;
  std::vector<StepCallback> step_callbacks_;
  std::vector<EvalCallback> eval_callbacks_;
  std::vector<CheckpointCallback> checkpoint_callbacks_;
};

}  // namespace memoryformer

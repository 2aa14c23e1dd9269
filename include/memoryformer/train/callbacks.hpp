// SPDX-License-Identifier: MIT
// Trainer callbacks that report progress on a stream the caller chooses (the library itself prints nothing): a
// progress bar with loss, tokens/s and ETA, a validation printer, a history recorder and a time budget.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numbers>
#include <ostream>
#include <string>
#include <vector>

#include "../types.hpp"
#include "trainer.hpp"

namespace memoryformer {

/// "1h02m", "3m07s", "12.3s".
inline std::string format_duration(double seconds) {
  char buf[32];
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  if (seconds < 60) {
    std::snprintf(buf, sizeof(buf), "%.1fs", seconds);
  } else if (seconds < 3600) {
    const long s = std::lround(seconds);
    std::snprintf(buf, sizeof(buf), "%ldm%02lds", s / 60, s % 60);
  } else {
    const long m = std::lround(seconds / 60);
    std::snprintf(buf, sizeof(buf), "%ldh%02ldm", m / 60, m % 60);
  }
  return buf;
}

/**
 * @brief A one-line progress bar, redrawn with '\r' after every step:
 *        `[#######.............]  350/1000 loss 1.8421 lr 2.9e-03 5,120 tok/s ETA 2m07s`.
 *        Use it as `trainer.on_step(ProgressBar(std::cerr))`. With `every` > 1 it draws every that many steps
 *        (and the last one). It never ends the line: EvalPrinter (which starts with a new line) or finish() does.
 */
class ProgressBar {
 public:
  /// @param out    the stream to draw on (it must outlive the bar)
  /// @param width  characters of the bar
  /// @param every  draw every this many steps
  explicit ProgressBar(std::ostream& out, int width = 24, Index every = 1)
      : out_(&out), width_(width > 0 ? width : 1), every_(every > 0 ? every : 1) {}

  void operator()(const StepInfo& s) {
    if (s.step % every_ != 0 && s.step != s.total_steps) return;
    *out_ << '\r' << line(s) << std::flush;
  }

  /// Ends the current line (e.g. before printing something else).
  void finish() { *out_ << '\n' << std::flush; }

  /// The text of the bar for `s`, without '\r'.
  std::string line(const StepInfo& s) const {
    const double frac = s.total_steps > 0 ? double(s.step) / double(s.total_steps) : 1.0;
    const int filled = int(std::lround(std::min(1.0, frac) * width_));
    std::string bar = "[" + std::string(std::size_t(filled), '#') + std::string(std::size_t(width_ - filled), '.') + "]";
    char buf[160];
    std::snprintf(buf, sizeof(buf), " %5ld/%ld loss %.4f lr %.1e %s tok/s ETA %s ", long(s.step), long(s.total_steps),
                  s.loss, s.lr, group_thousands(s.tokens_per_second).c_str(), format_duration(s.eta_seconds).c_str());
    return bar + buf;
  }

 private:
  static std::string group_thousands(double v) {
    std::string digits = std::to_string(std::llround(v));
    for (int i = int(digits.size()) - 3; i > 0; i -= 3) digits.insert(std::size_t(i), ",");
    return digits;
  }
  std::ostream* out_;
  int width_;
  Index every_;
};

/// Prints each validation result on its own line: `step 200: val loss 1.7312 nats, 2.4976 bits/byte (16384 tokens)`.
/// With `new_line_first` it starts with '\n' (to leave a progress bar's line intact).
class EvalPrinter {
 public:
  explicit EvalPrinter(std::ostream& out, bool new_line_first = true) : out_(&out), new_line_first_(new_line_first) {}
  void operator()(const EvalInfo& e) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "step %ld: val loss %.4f nats, %.4f bits/byte (%ld tokens, %s)", long(e.step),
                  e.loss, e.bits_per_byte, long(e.tokens), format_duration(e.seconds).c_str());
    if (new_line_first_) *out_ << '\n';
    *out_ << buf << '\n' << std::flush;
  }

 private:
  std::ostream* out_;
  bool new_line_first_;
};

/// Records every step's loss and every evaluation, e.g. for a loss curve or a JSON report. Attach it by reference:
/// `trainer.on_step(std::ref(history)); trainer.on_eval(std::ref(history));`.
struct TrainingHistory {
  std::vector<StepInfo> steps;   ///< one per step
  std::vector<EvalInfo> evals;   ///< one per evaluation
  void operator()(const StepInfo& s) { steps.push_back(s); }
  void operator()(const EvalInfo& e) { evals.push_back(e); }
};

/// Stops the trainer once the training steps have taken `seconds` of wall time:
/// `trainer.on_step(TimeBudget(trainer, 600))`. The schedule is not shortened: the run ends part-way.
template <class TrainerType>
class TimeBudget {
 public:
  TimeBudget(TrainerType& trainer, double seconds) : trainer_(&trainer), seconds_(seconds) {}
  void operator()(const StepInfo& s) {
    if (s.elapsed_seconds >= seconds_) trainer_->request_stop();
  }

 private:
  TrainerType* trainer_;
  double seconds_;
};

}  // namespace memoryformer

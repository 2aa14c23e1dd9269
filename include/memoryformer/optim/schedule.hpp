// SPDX-License-Identifier: MIT
// Learning-rate schedule of the training recipe (design §3.3, §9.4): linear warm-up, then cosine decay to lr_min.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>

#include "../detail/checks.hpp"
#include "../error.hpp"

namespace memoryformer {

/**
 * @brief The learning rate for the 0-based step `step` of a run of `total_steps` steps.
 *
 * With u = step + 1 (steps completed once this one is done), W = warmup_steps, T = total_steps:
 *   - u ≤ W (warm-up):   lr_max · u / W            (step 0 gets lr_max/W, step W−1 exactly lr_max)
 *   - W < u ≤ T (decay): lr_min + (lr_max − lr_min) · (1 + cos(π·(u − W)/(T − W))) / 2
 *                        (continuous with the warm-up; the last step, T−1, gets exactly lr_min)
 *   - u > T:             lr_min
 * A pure function of its arguments.
 * @throws ConfigError for step < 0, total_steps < 1, warmup_steps outside [0, total_steps], lr_max < 0,
 *         lr_min outside [0, lr_max], or non-finite rates.
 */
inline double cosine_lr(std::int64_t step, double lr_max, double lr_min, std::int64_t warmup_steps,
                        std::int64_t total_steps) {
  constexpr const char* where = "cosine_lr";
  detail::check_config(step >= 0, where, "step = " + std::to_string(step) + " is negative");
  detail::check_config(total_steps >= 1, where, "total_steps = " + std::to_string(total_steps) + " must be ≥ 1");
  detail::check_config(warmup_steps >= 0 && warmup_steps <= total_steps, where,
                       "warmup_steps = " + std::to_string(warmup_steps) + " is outside [0, total_steps = " +
                           std::to_string(total_steps) + "]");
  detail::check_config(std::isfinite(lr_max) && lr_max >= 0.0, where,
                       "lr_max = " + std::to_string(lr_max) + " must be finite and ≥ 0");
  detail::check_config(std::isfinite(lr_min) && lr_min >= 0.0 && lr_min <= lr_max, where,
                       "lr_min = " + std::to_string(lr_min) + " is outside [0, lr_max = " + std::to_string(lr_max) +
                           "]");
  if (step >= total_steps) return lr_min;  // u > T, decided before step + 1, which could overflow
  const std::int64_t u = step + 1;
  if (u <= warmup_steps) return lr_max * double(u) / double(warmup_steps);
  if (u >= total_steps) return lr_min;
  const double progress = double(u - warmup_steps) / double(total_steps - warmup_steps);
  return lr_min + (lr_max - lr_min) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

/// cosine_lr with its parameters bundled; `schedule(step)` gives the rate of a step.
struct CosineSchedule {
  double lr_max = 0.0;
  double lr_min = 0.0;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;

  /// The paper's recipe (design §3.3, §9.4): warm-up over 1% of the steps (total_steps / 100, at least 1), decay to
  /// lr_max / 100.
  static CosineSchedule paper(double lr_max, std::int64_t total_steps) {
    return {lr_max, lr_max / 100.0, total_steps / 100 > 0 ? total_steps / 100 : 1, total_steps};
  }

  /// The learning rate of 0-based step `step`. @throws ConfigError as cosine_lr.
  double operator()(std::int64_t step) const { return cosine_lr(step, lr_max, lr_min, warmup_steps, total_steps); }
};

}  // namespace memoryformer

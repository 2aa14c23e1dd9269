// SPDX-License-Identifier: MIT
// Seeded random numbers with the library's own uniform and normal transforms, so a seed gives the same parameters
// with every standard library (std::normal_distribution differs between libstdc++ and libc++).
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>

namespace memoryformer {

/// SplitMix64: a 64-bit counter-based generator. Small, fast, and good enough for initialisation and sampling.
/// Independent streams come from `Rng::stream(seed, id)`, which mixes the stream id into the seed.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}

  /// An independent generator for sub-stream `id` of `seed` (e.g. one per table or parameter tensor).
  static Rng stream(std::uint64_t seed, std::uint64_t id) { return Rng(mix(seed ^ mix(id + 0x632BE59BD9B4E019ULL))); }

  std::uint64_t next_u64() { return mix(state_ += 0x9E3779B97F4A7C15ULL); }

  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }

  /// Uniform integer in [0, n), n > 0, without modulo bias (rejection on the low range).
  std::uint64_t uniform_index(std::uint64_t n) {
    const std::uint64_t limit = ~std::uint64_t(0) - (~std::uint64_t(0) % n);
    std::uint64_t v = next_u64();
    while (v >= limit) v = next_u64();
    return v % n;
  }

  /// Standard normal by Box–Muller on the library's own uniforms; the second value of each pair is cached.
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double angle = 2.0 * std::numbers::pi * u2;
    spare_ = r * std::sin(angle);
    has_spare_ = true;
    return r * std::cos(angle);
  }

  double normal(double mean, double stddev) { return mean + stddev * normal(); }

  /// Fills `out` with N(mean, stddev²) values.
  template <class Scalar>
  void fill_normal(std::span<Scalar> out, double mean, double stddev) {
    for (auto& v : out) v = Scalar(normal(mean, stddev));
  }

  template <class Scalar>
  void fill_uniform(std::span<Scalar> out, double lo, double hi) {
    for (auto& v : out) v = Scalar(lo + (hi - lo) * uniform());
  }

 private:
  static std::uint64_t mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  std::uint64_t state_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace memoryformer

// SPDX-License-Identifier: MIT
// Seeded mutation fuzzing of the checkpoint reader, in memory (parse_checkpoint on bytes): bit flips, truncations,
// header and directory fields, overlapping ranges and non-finite values. Every mutated file is either rejected with
// FormatError or loads as a well-formed checkpoint; mutations whose checksums are left stale are always rejected
// unless they left the bytes unchanged. Mutations that should reach the deeper checks get recomputed checksums.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <memoryformer/io/checkpoint_format.hpp>
#include <memoryformer/io/model_checkpoint.hpp>
#include <memoryformer/model.hpp>
#include <memoryformer/optim/adamw.hpp>

#include "../support/checkpoint_bytes.hpp"
#include "../support/tiny_model.hpp"

namespace memoryformer {
namespace {

namespace mf = memoryformer;
namespace ts = memoryformer::testing_support;

/// Small checkpoints covering the format's features: f32 and f64, rank 0, zero-size tensors, config entries.
std::vector<mf::Checkpoint> base_checkpoints() {
  std::vector<mf::Checkpoint> out;
  mf::Checkpoint a;
  a.set_config("tau", "8");
  a.set_config("name", "fuzz");
  a.add_tensor("w", {3, 5}, std::vector<float>(15, 0.25f));
  a.add_tensor("empty", {0, 4}, std::vector<float>{});
  a.add_tensor("scalar", {}, std::vector<double>{3.5});
  a.add_tensor("b", {7}, std::vector<double>{1, 2, 3, 4, 5, 6, 7});
  out.push_back(a);
  mf::Checkpoint b;
  b.add_tensor("e1", {0}, std::vector<float>{});
  b.add_tensor("e2", {0}, std::vector<float>{});
  b.add_tensor("x", {40}, std::vector<float>(40, -1.0f));
  b.add_tensor("y", {2, 2}, std::vector<double>{1, 2, 3, 4});
  out.push_back(b);
  return out;
}

bool same(const mf::Checkpoint& x, const mf::Checkpoint& y) {
  if (x.config != y.config || x.tensors.size() != y.tensors.size()) return false;
  for (std::size_t i = 0; i < x.tensors.size(); ++i) {
    const auto &a = x.tensors[i], &b = y.tensors[i];
    if (a.name != b.name || a.dtype != b.dtype || a.shape != b.shape || a.bytes != b.bytes) return false;
  }
  return true;
}

/// What a loaded checkpoint must satisfy whatever the file: bytes match shapes, the total fits in the file, and it
/// serializes and parses back to itself.
::testing::AssertionResult well_formed(const mf::Checkpoint& c, std::size_t file_size) {
  std::uint64_t total = 0;
  for (const auto& t : c.tensors) {
    if (t.bytes.size() != std::size_t(t.numel()) * mf::dtype_size(t.dtype))
      return ::testing::AssertionFailure() << "tensor '" << t.name << "' has bytes not matching its shape";
    total += t.bytes.size();
  }
  if (total > file_size) return ::testing::AssertionFailure() << "tensors hold " << total << " bytes from a file of " << file_size;
  if (!same(c, mf::parse_checkpoint(mf::serialize_checkpoint(c))))
    return ::testing::AssertionFailure() << "does not round-trip";
  return ::testing::AssertionSuccess();
}

/// The oracle for moved ranges, pairwise: no two non-empty ranges intersect and no empty one lies strictly inside
/// a non-empty one.
::testing::AssertionResult ranges_disjoint(const ts::CheckpointBytes& b, const std::vector<ts::EntryFields>& dir) {
  for (std::size_t i = 0; i < dir.size(); ++i)
    for (std::size_t j = 0; j < dir.size(); ++j) {
      if (i == j) continue;
      const auto oi = ts::get_at<std::uint64_t>(b, dir[i].offset_at), si = ts::get_at<std::uint64_t>(b, dir[i].size_at);
      const auto oj = ts::get_at<std::uint64_t>(b, dir[j].offset_at), sj = ts::get_at<std::uint64_t>(b, dir[j].size_at);
      const bool both = si > 0 && sj > 0 && oi < oj + sj && oj < oi + si;
      const bool empty_inside = si == 0 && sj > 0 && oj < oi && oi < oj + sj;
      if (both || empty_inside)
        return ::testing::AssertionFailure() << "tensors '" << dir[i].name << "' [" << oi << ", " << oi + si
                                             << ") and '" << dir[j].name << "' [" << oj << ", " << oj + sj
                                             << ") overlap but were accepted";
    }
  return ::testing::AssertionSuccess();
}

enum class Outcome { Rejected, Loaded };

Outcome try_parse(const ts::CheckpointBytes& b, mf::Checkpoint& out) {
  try {
    out = mf::parse_checkpoint(b, "fuzz");
    return Outcome::Loaded;
  } catch (const mf::FormatError&) {
    return Outcome::Rejected;
  }
}

TEST(CheckpointFuzz, EveryMutationIsRejectedOrLoadsWellFormed) {
  std::mt19937_64 rng(20241204);
  const auto bases = base_checkpoints();
  std::vector<ts::CheckpointBytes> files;
  std::vector<std::vector<ts::EntryFields>> dirs;
  for (const auto& c : bases) {
    files.push_back(mf::serialize_checkpoint(c));
    dirs.push_back(ts::directory_of(files.back()));
    ASSERT_EQ(dirs.back().size(), c.tensors.size());
  }
  constexpr int mutations = 12000;
  int rejected = 0, loaded_equal = 0, loaded_other = 0;
  int by_kind[8] = {};
  for (int iter = 0; iter < mutations; ++iter) {
    const std::size_t which = rng() % files.size();
    const auto& original = files[which];
    const auto& dir = dirs[which];
    ts::CheckpointBytes b = original;
    const int kind = int(rng() % 8);
    ++by_kind[kind];
    bool fix = false, must_reject = false, check_disjoint = false;
    auto pick_entry = [&]() -> const ts::EntryFields& { return dir[rng() % dir.size()]; };
    switch (kind) {
      case 0:  // bit flips anywhere, checksums left stale
        for (int f = 1 + int(rng() % 3); f > 0; --f) b[rng() % b.size()] ^= std::byte(1u << (rng() % 8));
        break;
      case 1:  // bit flip anywhere but the checksums, checksums recomputed
        b[rng() % (b.size() - 8)] ^= std::byte(1u << (rng() % 8));
        fix = true;
        break;
      case 2:  // truncation or extension
        if (rng() % 2) {
          b.resize(rng() % b.size());
        } else {
          b.resize(b.size() + 1 + rng() % 100, std::byte(0));
          fix = rng() % 2 == 0;
        }
        break;
      case 3: {  // preamble fields: file size, header size, counts, version, reserved
        const std::size_t fields[] = {4, 12, 16, 24, 32, 36};
        const std::size_t at = fields[rng() % 6];
        const std::uint64_t values[] = {0, 1, 0xFFFFFFFFull, 0xFFFFFFFFFFFFFFFFull, rng(), b.size(), b.size() - 8,
                                        ts::get_at<std::uint64_t>(b, at) + 1, ts::get_at<std::uint64_t>(b, at) - 1};
        const std::uint64_t v = values[rng() % 9];
        if (at == 4 || at == 12 || at == 32 || at == 36)
          ts::put_at<std::uint32_t>(b, at, std::uint32_t(v));
        else
          ts::put_at<std::uint64_t>(b, at, v);
        fix = true;
        break;
      }
      case 4: {  // directory fields: dims, offset, size
        const auto& e = pick_entry();
        const std::uint64_t values[] = {0, 1, 64, 1ull << 47, 1ull << 48, 0xFFFFFFFFFFFFFFFFull, rng() % 4096,
                                        ts::get_at<std::uint64_t>(b, e.offset_at) + 64};
        const std::uint64_t v = values[rng() % 8];
        const int field = int(rng() % 3);
        if (field == 0 && e.rank > 0)
          ts::put_at<std::uint64_t>(b, e.dims_at + 8 * (rng() % e.rank), v);
        else if (field == 1)
          ts::put_at<std::uint64_t>(b, e.offset_at, v);
        else
          ts::put_at<std::uint64_t>(b, e.size_at, v);
        fix = true;
        break;
      }
      case 5: {  // overlap: ranges moved onto or into others'
        if (rng() % 2) {
          // 1–3 tensors moved to random aligned offsets of the data region; checked below by a pairwise oracle.
          const std::uint64_t first = (ts::get_at<std::uint64_t>(b, 24) + 63) / 64 * 64;
          const std::uint64_t slots = (b.size() - 8 - first) / 64 + 1;
          for (int m = 1 + int(rng() % 3); m > 0; --m)
            ts::put_at<std::uint64_t>(b, pick_entry().offset_at, first + 64 * (rng() % slots));
          fix = true;
          check_disjoint = true;
          break;
        }
        if (dir.size() < 2) break;
        const auto& e = pick_entry();
        const auto& f = pick_entry();
        if (&e == &f) break;
        const auto f_off = ts::get_at<std::uint64_t>(b, f.offset_at);
        const auto f_size = ts::get_at<std::uint64_t>(b, f.size_at);
        const auto e_size = ts::get_at<std::uint64_t>(b, e.size_at);
        ts::put_at<std::uint64_t>(b, e.offset_at, f_off);
        fix = true;
        // Two ranges at one offset overlap unless one of them is empty.
        must_reject = e_size > 0 && f_size > 0;
        break;
      }
      case 6: {  // non-finite values in a tensor, checksums recomputed: the byte format accepts them
        const auto& e = pick_entry();
        const auto off = ts::get_at<std::uint64_t>(b, e.offset_at);
        const auto size = ts::get_at<std::uint64_t>(b, e.size_at);
        if (size >= 4) {
          const float bad[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()};
          ts::put_at<float>(b, std::size_t(off + (rng() % (size / 4)) * 4), bad[rng() % 2]);
        }
        fix = true;
        break;
      }
      default: {  // random bytes in the header, checksums recomputed
        const std::size_t header = std::size_t(ts::get_at<std::uint64_t>(b, 24));
        for (int f = 1 + int(rng() % 4); f > 0; --f) b[rng() % header] = std::byte(rng() & 0xFF);
        fix = true;
        break;
      }
    }
    if (fix) ts::fix_checksums(b, dir);
    mf::Checkpoint c;
    const Outcome outcome = try_parse(b, c);
    if (outcome == Outcome::Rejected) {
      ++rejected;
      continue;
    }
    ASSERT_FALSE(must_reject) << "iteration " << iter << ": overlapping tensors were accepted";
    if (check_disjoint) {
      ASSERT_TRUE(ranges_disjoint(b, dir)) << "iteration " << iter;
    }
    if (same(c, bases[which])) {
      ++loaded_equal;
      continue;
    }
    // Stale checksums must never let a changed file through.
    ASSERT_TRUE(fix) << "iteration " << iter << " (kind " << kind << "): a file with stale checksums loaded differently";
    ++loaded_other;
    ASSERT_TRUE(well_formed(c, b.size())) << "iteration " << iter << " (kind " << kind << ")";
  }
  EXPECT_EQ(rejected + loaded_equal + loaded_other, mutations);
  EXPECT_GT(rejected, mutations / 2);  // most mutations are damage the reader must see
  for (int k = 0; k < 8; ++k) EXPECT_GT(by_kind[k], mutations / 16) << "kind " << k << " was rarely drawn";
  RecordProperty("rejected", rejected);
  RecordProperty("loaded_equal", loaded_equal);
  RecordProperty("loaded_other", loaded_other);
}

/// Empty tensors placed inside another tensor's range used to hide overlaps from a neighbours-only check.
TEST(CheckpointFuzz, ZeroSizeTensorsDoNotHideOverlaps) {
  mf::Checkpoint c;
  c.add_tensor("big", {64}, std::vector<float>(64, 1.0f));
  c.add_tensor("z", {0}, std::vector<float>{});
  c.add_tensor("small", {16}, std::vector<float>(16, 2.0f));
  auto b = mf::serialize_checkpoint(c);
  const auto dir = ts::directory_of(b);
  const auto big = ts::get_at<std::uint64_t>(b, dir[0].offset_at);
  ts::put_at<std::uint64_t>(b, dir[1].offset_at, big + 64);  // inside "big"
  ts::put_at<std::uint64_t>(b, dir[2].offset_at, big + 128);  // inside "big" too
  ts::fix_checksums(b, dir);
  EXPECT_THROW(mf::parse_checkpoint(b), mf::FormatError);
  // The empty tensor alone inside "big" is an overlap as well.
  b = mf::serialize_checkpoint(c);
  ts::put_at<std::uint64_t>(b, dir[1].offset_at, big + 64);
  ts::fix_checksums(b, dir);
  EXPECT_THROW(mf::parse_checkpoint(b), mf::FormatError);
}

mf::MemoryFormerLM<float>::Config tiny_lm_config() { return mf::testing_support::tiny_memoryformer_lm(); }

std::vector<std::vector<float>> snapshot(std::vector<mf::ParameterView<float>> params) {
  std::vector<std::vector<float>> out;
  for (const auto& p : params) out.emplace_back(p.value.begin(), p.value.end());
  return out;
}

std::vector<std::vector<float>> snapshot(mf::AdamW<float>& opt) {
  std::vector<std::vector<float>> out;
  for (const auto& s : opt.state_tensors()) out.emplace_back(s.values.begin(), s.values.end());
  return out;
}

/// Mutated model checkpoints (values and optimiser counts, checksums recomputed): load_model either loads every
/// value or leaves the model and the optimiser bit-identical.
TEST(CheckpointFuzz, ModelLoadsAreAllOrNothing) {
  using Model = mf::MemoryFormerLM<float>;
  Model source(tiny_lm_config(), 1);
  mf::AdamW<float> source_opt(source.parameters());
  for (auto& s : source_opt.state_tensors())
    for (std::size_t i = 0; i < s.values.size(); ++i) s.values[i] = s.name == "adamw.step" || s.name.starts_with("adamw.row_step.") ? 3.0f : 0.5f;
  mf::Checkpoint ckpt;
  for (const auto& [k, v] : source.config_entries()) ckpt.set_config(k, v);
  ckpt.set_config("model.has_optimizer", "true");
  for (const auto& p : source.parameters()) ckpt.add_tensor(p.name, p.shape, p.value);
  for (const auto& s : source_opt.state_tensors()) ckpt.add_tensor(s.name, s.shape, s.values);
  const auto original = mf::serialize_checkpoint(ckpt);
  const auto dir = ts::directory_of(original);

  Model target(tiny_lm_config(), 2);
  mf::AdamW<float> target_opt(target.parameters());
  std::mt19937_64 rng(7);
  int rejected = 0, loaded = 0;
  for (int iter = 0; iter < 300; ++iter) {
    auto b = original;
    const auto& e = dir[rng() % dir.size()];
    const auto off = ts::get_at<std::uint64_t>(b, e.offset_at);
    const auto size = ts::get_at<std::uint64_t>(b, e.size_at);
    const float values[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -1.0f,
                            0.5f, 1e9f, 2.0f};
    if (size >= 4) ts::put_at<float>(b, std::size_t(off + (rng() % (size / 4)) * 4), values[rng() % 6]);
    ts::fix_checksums(b, dir);
    const auto params_before = snapshot(target.parameters());
    const auto opt_before = snapshot(target_opt);
    const auto steps_before = target_opt.steps();
    try {
      mf::load_model(mf::parse_checkpoint(b), target, &target_opt, "fuzz");
      ++loaded;
      for (const auto& p : target.parameters())
        for (float v : p.value) ASSERT_TRUE(std::isfinite(v)) << p.name;
    } catch (const mf::FormatError&) {
      ++rejected;
      ASSERT_EQ(snapshot(target.parameters()), params_before) << "iteration " << iter;
      ASSERT_EQ(snapshot(target_opt), opt_before) << "iteration " << iter;
      ASSERT_EQ(target_opt.steps(), steps_before);
    }
  }
  EXPECT_GT(rejected, 50);
  EXPECT_GT(loaded, 50);
}

}  // namespace
}  // namespace memoryformer

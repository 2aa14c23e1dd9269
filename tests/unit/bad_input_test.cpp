// SPDX-License-Identifier: MIT
// One case per class of bad input the library must turn into its own exception types (error.hpp) instead of a
// crash, undefined behaviour, a wrapped size, a bare std::bad_alloc or silent garbage.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include <memoryformer/bucket_table.hpp>
#include <memoryformer/detail/checked_size.hpp>
#include <memoryformer/detail/lookup_kernels.hpp>
#include <memoryformer/frozen_memory_block.hpp>
#include <memoryformer/frozen_memory_layer.hpp>
#include <memoryformer/frozen_memoryformer_block.hpp>
#include <memoryformer/frozen_model.hpp>
#include <memoryformer/io/checkpoint.hpp>
#include <memoryformer/io/model_checkpoint.hpp>
#include <memoryformer/io/text_tensor.hpp>
#include <memoryformer/memory_block.hpp>
#include <memoryformer/memory_layer.hpp>
#include <memoryformer/model.hpp>
#include <memoryformer/nn/attention.hpp>
#include <memoryformer/nn/cross_entropy.hpp>
#include <memoryformer/nn/embedding.hpp>
#include <memoryformer/nn/kv_cache.hpp>
#include <memoryformer/nn/layer_norm.hpp>
#include <memoryformer/nn/linear.hpp>
#include <memoryformer/nn/rms_norm.hpp>
#include <memoryformer/nn/rope.hpp>
#include <memoryformer/optim/adamw.hpp>
#include <memoryformer/memoryformer_block.hpp>
#include <memoryformer/transformer_block.hpp>

#include "../support/checkpoint_bytes.hpp"
#include "../support/test_helpers.hpp"
#include "../support/tiny_model.hpp"

#if defined(__linux__)
#include <sys/resource.h>
#include <unistd.h>
#endif
#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

// The sanitizers reserve terabytes of shadow address space, so a process under one cannot be given a small
// address-space limit.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MEMORYFORMER_TEST_UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define MEMORYFORMER_TEST_UNDER_SANITIZER 1
#endif
#endif

namespace memoryformer {
namespace {

// The sanitizers' allocators abort on a request larger than they support instead of failing it as the system's does;
// told to return null, they let the case "BucketTable that cannot be allocated" run in those builds too. Unused in
// others.
extern "C" const char* __asan_default_options() { return "allocator_may_return_null=1"; }
extern "C" const char* __lsan_default_options() { return "allocator_may_return_null=1"; }
extern "C" const char* __tsan_default_options() { return "allocator_may_return_null=1"; }
extern "C" const char* __msan_default_options() { return "allocator_may_return_null=1"; }

namespace mf = memoryformer;
namespace ts = memoryformer::testing_support;
constexpr double inf = std::numeric_limits<double>::infinity();
constexpr double nan = std::numeric_limits<double>::quiet_NaN();

using Call = std::function<void()>;
using Check = std::function<::testing::AssertionResult(const Call&)>;

/// A check that passes when the call throws E (or a type derived from it).
template <class E>
Check throws() {
  return [](const Call& call) -> ::testing::AssertionResult {
    try {
      call();
    } catch (const E&) {
      return ::testing::AssertionSuccess();
    } catch (const std::exception& e) {
      return ::testing::AssertionFailure() << "threw " << typeid(e).name() << " (" << e.what() << "), expected "
                                           << typeid(E).name();
    }
    return ::testing::AssertionFailure() << "did not throw, expected " << typeid(E).name();
  };
}

struct Case {
  const char* name;
  Call call;
  Check check;
};

std::filesystem::path temp_file(const std::string& name) {
  return std::filesystem::temp_directory_path() / ("memoryformer_bad_input_" + name);
}

mf::MemoryFormerLM<float>::Config tiny_lm() { return mf::testing_support::tiny_memoryformer_lm(); }

/// Row-sparse AdamW, so that the optimiser state includes per-row step counts.
mf::AdamWOptions row_sparse() {
  mf::AdamWOptions o;
  o.sparse_update = mf::SparseUpdate::RowSparse;
  return o;
}

mf::MemoryLayerConfig small_layer() { return {.d_in = 8, .d_out = 3, .tau = 4}; }

/// A hash for small_layer() with code (row 0, table 1) replaced by `code`.
mf::HashResult<float> hash_with_code(std::int32_t code) {
  mf::MemoryLayer<float> layer(small_layer(), 1);
  mf::Matrix<float> x = mf::Matrix<float>::Ones(2, 8);
  auto h = layer.hasher().hash(x);
  h.codes[1] = code;
  return h;
}

/// A model checkpoint of tiny_lm() with AdamW state, as bytes; `edit` changes the checkpoint before serializing.
std::vector<std::byte> model_bytes(const std::function<void(mf::Checkpoint&)>& edit) {
  mf::MemoryFormerLM<float> m(tiny_lm(), 3);
  mf::AdamW<float> opt(m.parameters(), row_sparse());
  mf::Checkpoint c;
  for (const auto& [k, v] : m.config_entries()) c.set_config(k, v);
  c.set_config("model.has_optimizer", "true");
  for (const auto& p : m.parameters()) c.add_tensor(p.name, p.shape, p.value);
  for (const auto& s : opt.state_tensors()) c.add_tensor(s.name, s.shape, s.values);
  edit(c);
  return mf::serialize_checkpoint(c);
}

void set_first_value(mf::Checkpoint& c, const std::string& prefix, float v) {
  for (auto& t : c.tensors)
    if (t.name.starts_with(prefix) && !t.bytes.empty()) {
      std::memcpy(t.bytes.data(), &v, 4);
      return;
    }
  FAIL() << "no tensor named " << prefix << "*";
}

/// load_model on `bytes` into a fresh model + optimiser, which must stay bit-identical when the load throws.
void load_into_fresh(const std::vector<std::byte>& bytes) {
  mf::MemoryFormerLM<float> m(tiny_lm(), 9);
  mf::AdamW<float> opt(m.parameters(), row_sparse());
  std::vector<std::vector<float>> before;
  for (const auto& p : m.parameters()) before.emplace_back(p.value.begin(), p.value.end());
  try {
    mf::load_model(mf::parse_checkpoint(bytes), m, &opt, "bytes");
  } catch (...) {
    std::size_t i = 0;
    for (const auto& p : m.parameters()) EXPECT_EQ(std::vector<float>(p.value.begin(), p.value.end()), before[i++]);
    for (const auto& s : opt.state_tensors())
      for (float v : s.values) EXPECT_EQ(v, 0.0f) << s.name;
    throw;
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  // ---- size arithmetic
  out.push_back({"BucketTable size overflow", [] { mf::BucketTable<float>(1, 16, Index(1) << 46); },
                 throws<mf::ConfigError>()});
  // 2^46 floats (256 TB): more than a process can map, whatever the overcommit setting, and below the 2^48-element
  // size limit, so the allocation itself fails (sanitizers are told to return null, see the top of this file).
  out.push_back({"BucketTable that cannot be allocated", [] { mf::BucketTable<float>(1, 16, Index(1) << 30); },
                 throws<mf::ConfigError>()});
  out.push_back({"BucketTable negative width", [] { mf::BucketTable<float>(1, 4, -3); }, throws<mf::ConfigError>()});
  out.push_back({"KVCache batch × max_seq overflow", [] { mf::KVCache<float>(4, Index(1) << 62, 8); },
                 throws<mf::ConfigError>()});
  // ---- enum values made from integers that name no member
  out.push_back({"PackedTables storage outside StorageType",
                 [] { mf::PackedTables(mf::BucketTable<float>(2, 4, 8), static_cast<mf::StorageType>(7)); },
                 throws<mf::ConfigError>()});
  out.push_back({"PackedTables layout outside TableLayout",
                 [] {
                   mf::PackedTables(mf::BucketTable<float>(2, 4, 8), mf::StorageType::BF16,
                                    static_cast<mf::TableLayout>(-1));
                 },
                 throws<mf::ConfigError>()});
  out.push_back({"FrozenMemoryLayer layout outside FrozenLayout",
                 [] {
                   const mf::MemoryLayer<float> layer(small_layer(), 1);
                   mf::FrozenMemoryLayer(layer, mf::StorageType::F32, static_cast<mf::FrozenLayout>(3));
                 },
                 throws<mf::ConfigError>()});
  out.push_back({"freeze to a storage outside StorageType",
                 [] { (void)mf::freeze(mf::MemoryFormerLM<float>(tiny_lm(), 1), static_cast<mf::StorageType>(3)); },
                 throws<mf::ConfigError>()});
  out.push_back({"make_decode_state overflow",
                 [] {
                   mf::MemoryFormerLM<float> m(tiny_lm(), 1);
                   (void)m.make_decode_state(4, Index(1) << 62);
                 },
                 throws<mf::ConfigError>()});
  out.push_back({"LanguageModel batch × seq overflow",
                 [] {
                   mf::MemoryFormerLM<float> m(tiny_lm(), 1);
                   mf::MemoryFormerLM<float>::Cache cache;
                   std::vector<std::int32_t> tokens(4, 0);
                   m.forward(tokens, Index(1) << 32, Index(1) << 32, cache);
                 },
                 throws<mf::ConfigError>()});
  out.push_back({"tau + expand_bits overflow",
                 [] {
                   mf::MemoryBlockConfig c{.d = 8, .tau = 4, .expand_bits = INT_MAX};
                   c.validate();
                 },
                 throws<mf::ConfigError>()});
  out.push_back({"TextTensor size overflow",
                 [] {
                   mf::TextTensor t{"t", "f64", {Index(1) << 31, Index(1) << 31, 4}, {}};
                   (void)t.size();
                 },
                 throws<mf::FormatError>()});
  out.push_back({"text tensor file with an absurd shape",
                 [] {
                   const auto p = temp_file("absurd.txt");
                   std::ofstream(p) << "memoryformer-vectors 1\nx f64 3 2147483648 2147483648 4\n\n";
                   mf::read_text_tensors(p.string());
                 },
                 throws<mf::FormatError>()});
  out.push_back({"checked_shift past 62 bits", [] { (void)mf::detail::checked_shift("t", "x", 1, 64); },
                 throws<mf::ConfigError>()});
  out.push_back({"MemoryLayer table size overflow",
                 [] { mf::MemoryLayer<float>(mf::MemoryLayerConfig{.d_in = 1 << 20, .d_out = Index(1) << 40, .tau = 16}, 1); },
                 throws<mf::ConfigError>()});
  // ---- BucketHitCounter
  out.push_back({"BucketHitCounter tau 40", [] { mf::BucketHitCounter(1, 40); }, throws<mf::ConfigError>()});
  out.push_back({"BucketHitCounter tau 64", [] { mf::BucketHitCounter(1, 64); }, throws<mf::ConfigError>()});
  out.push_back({"BucketHitCounter tau -1", [] { mf::BucketHitCounter(1, -1); }, throws<mf::ConfigError>()});
  out.push_back({"BucketHitCounter counts(K)", [] { (void)mf::BucketHitCounter(2, 4).counts(2); },
                 throws<std::out_of_range>()});
  out.push_back({"BucketHitCounter counts(-1)", [] { (void)mf::BucketHitCounter(2, 4).counts(-1); },
                 throws<std::out_of_range>()});
  // ---- codes of a caller-supplied hash
  out.push_back({"forward_hashed code 2^20",
                 [] {
                   mf::MemoryLayer<float> layer(small_layer(), 1);
                   mf::Matrix<float> y(2, 3);
                   layer.forward_hashed(y, hash_with_code(1 << 20));
                 },
                 throws<mf::ShapeError>()});
  out.push_back({"forward_hashed code -1",
                 [] {
                   mf::MemoryLayer<float> layer(small_layer(), 1);
                   mf::Matrix<float> y(2, 3);
                   layer.forward_hashed(y, hash_with_code(-1));
                 },
                 throws<mf::ShapeError>()});
  out.push_back({"backward_hashed code 2^20",
                 [] {
                   mf::MemoryLayer<float> layer(small_layer(), 1);
                   mf::Matrix<float> dscores = mf::Matrix<float>::Zero(2, 2), dy = mf::Matrix<float>::Ones(2, 3);
                   layer.backward_hashed(dscores, dy, hash_with_code(1 << 20));
                 },
                 throws<mf::ShapeError>()});
  out.push_back({"backward_hashed code 16 (= 2^tau)",
                 [] {
                   mf::MemoryLayer<float> layer(small_layer(), 1);
                   mf::Matrix<float> dscores = mf::Matrix<float>::Zero(2, 2), dy = mf::Matrix<float>::Ones(2, 3);
                   layer.backward_hashed(dscores, dy, hash_with_code(16));
                 },
                 throws<mf::ShapeError>()});
  // ---- caches after a throwing forward
  out.push_back({"MemoryLayer backward after a NaN forward",
                 [] {
                   mf::MemoryLayer<float> layer(small_layer(), 1);
                   mf::HashResult<float> cache;
                   mf::Matrix<float> x = mf::Matrix<float>::Ones(2, 8);
                   (void)layer.forward(x, cache);
                   x(1, 3) = float(nan);
                   EXPECT_THROW((void)layer.forward(x, cache), mf::NonFiniteError);
                   mf::Matrix<float> dx(2, 8), dy = mf::Matrix<float>::Ones(2, 3);
                   layer.backward(dx, x, dy, cache);
                 },
                 throws<mf::StateError>()});
  out.push_back({"MemoryBlock backward after a NaN forward",
                 [] {
                   mf::MemoryBlock<float> block(mf::MemoryBlockConfig{.d = 8, .tau = 4, .expand_bits = 1}, 1);
                   mf::MemoryBlock<float>::Cache cache;
                   mf::Matrix<float> x = mf::Matrix<float>::Ones(2, 8), y(2, 8);
                   block.forward(y, x, cache);
                   x(0, 0) = float(nan);
                   EXPECT_THROW(block.forward(y, x, cache), mf::NonFiniteError);
                   mf::Matrix<float> dx(2, 8), dy = mf::Matrix<float>::Ones(2, 8);
                   block.backward(dx, x, dy, cache);
                 },
                 throws<mf::StateError>()});
  out.push_back({"MemoryFormerBlock backward after a NaN forward",
                 [] {
                   mf::MemoryFormerBlock<float> block(tiny_lm().block, 1);
                   mf::MemoryFormerBlock<float>::Cache cache;
                   mf::Matrix<float> x = mf::Matrix<float>::Ones(4, 8), y(4, 8);
                   block.forward(y, x, 1, 4, cache);
                   x(2, 5) = float(nan);
                   EXPECT_THROW(block.forward(y, x, 1, 4, cache), mf::NonFiniteError);
                   mf::Matrix<float> dx(4, 8), dy = mf::Matrix<float>::Ones(4, 8);
                   block.backward(dx, x, dy, cache);
                 },
                 throws<mf::StateError>()});
  out.push_back({"LanguageModel backward with a NaN dloss leaves gradients untouched",
                 [] {
                   mf::MemoryFormerLM<float> m(tiny_lm(), 1);
                   mf::MemoryFormerLM<float>::Cache cache;
                   std::vector<std::int32_t> tokens{1, 2, 3, 4}, targets{2, 3, 4, 5};
                   (void)m.forward_loss(tokens, targets, 1, 4, cache);
                   try {
                     m.backward(cache, float(nan));
                   } catch (...) {
                     for (const auto& p : m.parameters())
                       for (float g : p.grad) EXPECT_EQ(g, 0.0f) << p.name;
                     throw;
                   }
                 },
                 throws<mf::ConfigError>()});
  // ---- non-finite hyper-parameters
  out.push_back({"LanguageModel embedding init std +Inf",
                 [] {
                   auto c = tiny_lm();
                   c.embedding_init_std = inf;
                   mf::MemoryFormerLM<float> m(c, 1);
                 },
                 throws<mf::ConfigError>()});
  out.push_back({"LanguageModel head init std NaN",
                 [] {
                   auto c = tiny_lm();
                   c.head_init_std = nan;
                   mf::MemoryFormerLM<float> m(c, 1);
                 },
                 throws<mf::ConfigError>()});
  out.push_back({"MemoryLayer table init std +Inf",
                 [] {
                   auto c = small_layer();
                   c.table_init_std = inf;
                   mf::MemoryLayer<float> layer(c, 1);
                 },
                 throws<mf::ConfigError>()});
  out.push_back({"MemoryFormerBlock qkv init std +Inf",
                 [] {
                   auto c = tiny_lm().block;
                   c.qkv_init_std = inf;
                   mf::MemoryFormerBlock<float> b(c, 1);
                 },
                 throws<mf::ConfigError>()});
  out.push_back({"Linear init std +Inf", [] { mf::Linear<float>(2, 2, true, std::uint64_t(1), inf); },
                 throws<mf::ConfigError>()});
  // ---- checkpoints
  out.push_back({"checkpoint config tau that an int would truncate",
                 [] {
                   mf::MemoryFormerLM<float> m(tiny_lm(), 1);
                   auto entries = m.config_entries();
                   for (auto& [k, v] : entries)
                     if (k == "block.tau") v = "4294967300";
                   (void)mf::MemoryFormerLM<float>::config_from_entries(entries);
                 },
                 throws<mf::FormatError>()});
  out.push_back({"load_model adamw.step = -1",
                 [] { load_into_fresh(model_bytes([](auto& c) { set_first_value(c, "adamw.step", -1.0f); })); },
                 throws<mf::FormatError>()});
  out.push_back({"load_model adamw.step = 0.5",
                 [] { load_into_fresh(model_bytes([](auto& c) { set_first_value(c, "adamw.step", 0.5f); })); },
                 throws<mf::FormatError>()});
  out.push_back({"load_model adamw.step = Inf",
                 [] { load_into_fresh(model_bytes([](auto& c) { set_first_value(c, "adamw.step", float(inf)); })); },
                 throws<mf::FormatError>()});
  out.push_back({"load_model row_step > step",
                 [] { load_into_fresh(model_bytes([](auto& c) { set_first_value(c, "adamw.row_step.", 5.0f); })); },
                 throws<mf::FormatError>()});
  out.push_back({"load_model negative second moment",
                 [] { load_into_fresh(model_bytes([](auto& c) { set_first_value(c, "adamw.v.", -1.0f); })); },
                 throws<mf::FormatError>()});
  out.push_back({"load_model NaN second moment",
                 [] { load_into_fresh(model_bytes([](auto& c) { set_first_value(c, "adamw.v.", float(nan)); })); },
                 throws<mf::FormatError>()});
  out.push_back({"load_model NaN parameter",
                 [] { load_into_fresh(model_bytes([](auto& c) { set_first_value(c, "head.weight", float(nan)); })); },
                 throws<mf::FormatError>()});
  out.push_back({"checkpoint with overlapping tensors hidden by an empty one",
                 [] {
                   mf::Checkpoint c;
                   c.add_tensor("a", {32}, std::vector<float>(32, 1.0f));
                   c.add_tensor("z", {0}, std::vector<float>{});
                   c.add_tensor("b", {16}, std::vector<float>(16, 1.0f));
                   auto b = mf::serialize_checkpoint(c);
                   const auto dir = ts::directory_of(b);
                   const auto a_off = ts::get_at<std::uint64_t>(b, dir[0].offset_at);
                   ts::put_at<std::uint64_t>(b, dir[1].offset_at, a_off + 64);
                   ts::put_at<std::uint64_t>(b, dir[2].offset_at, a_off + 64);
                   ts::fix_checksums(b, dir);
                   (void)mf::parse_checkpoint(b);
                 },
                 throws<mf::FormatError>()});
  return out;
}

TEST(BadInput, EveryCaseThrowsTheLibrarysExceptionType) {
  int n = 0;
  for (const auto& c : cases()) {
    SCOPED_TRACE(c.name);
    EXPECT_TRUE(c.check(c.call)) << c.name;
    ++n;
  }
  EXPECT_GE(n, 30);
}

// With float32 and with bfloat16 moments (whose expanded buffers a failed load frees).
class FailedLoad : public ::testing::TestWithParam<mf::MomentStorage> {};

TEST_P(FailedLoad, LeavesModelAndOptimizerBitIdentical) {
  using Model = mf::MemoryFormerLM<float>;
  // A trained-looking state to protect: random parameters and non-zero moments and counts.
  Model m(tiny_lm(), 5);
  mf::AdamWOptions options = row_sparse();
  options.moments = GetParam();
  mf::AdamW<float> opt(m.parameters(), options);
  Model::Cache cache;
  std::vector<std::int32_t> tokens{1, 2, 3, 4}, targets{2, 3, 4, 5};
  for (int s = 0; s < 3; ++s) {
    m.zero_grad();
    (void)m.forward_loss(tokens, targets, 1, 4, cache);
    m.backward(cache);
    opt.step(1e-2);
  }
  auto bits = [&] {
    std::vector<std::vector<float>> out;
    for (const auto& p : m.parameters()) out.emplace_back(p.value.begin(), p.value.end());
    for (const auto& s : opt.state_tensors()) out.emplace_back(s.values.begin(), s.values.end());
    return out;
  };
  const auto before = bits();
  const auto steps = opt.steps();
  for (const auto& edit : std::vector<std::function<void(mf::Checkpoint&)>>{
           [](auto& c) { set_first_value(c, "adamw.step", -1.0f); },
           [](auto& c) { set_first_value(c, "adamw.row_step.", 1e6f); },
           [](auto& c) { set_first_value(c, "adamw.v.", float(nan)); },
           [](auto& c) { set_first_value(c, "adamw.step", 0.5f); },
           [](auto& c) { set_first_value(c, "adamw.v.", -1.0f); },
           [](auto& c) { set_first_value(c, "embedding.weight", float(inf)); }}) {
    const auto bytes = model_bytes(edit);
    EXPECT_THROW(mf::load_model(mf::parse_checkpoint(bytes), m, &opt, "bytes"), mf::FormatError);
    EXPECT_EQ(bits(), before);
    EXPECT_EQ(opt.steps(), steps);
  }
  // And a valid file does load, so the checks above are not vacuous.
  mf::load_model(mf::parse_checkpoint(model_bytes([](auto&) {})), m, &opt, "bytes");
  EXPECT_NE(bits(), before);
}

INSTANTIATE_TEST_SUITE_P(BadInput, FailedLoad,
                         ::testing::Values(mf::MomentStorage::Native, mf::MomentStorage::BFloat16),
                         [](const auto& info) {
                           return info.param == mf::MomentStorage::Native ? std::string("native_moments")
                                                                          : std::string("bf16_moments");
                         });

// AdamW::load_state on its own (without load_model's finite check) refuses non-finite moments, naming them.
TEST(BadInput, OptimizerStateWithNonFiniteMomentsIsRefused) {
  mf::MemoryFormerLM<float> m(tiny_lm(), 5);
  mf::AdamW<float> opt(m.parameters(), row_sparse());
  for (const char* which : {"m.", "v."}) {
    std::string text = "(no exception)";
    try {
      opt.load_state([&](const std::string& name, const std::vector<mf::Index>&, std::span<float> out) {
        std::ranges::fill(out, 0.0f);
        if (name.starts_with(std::string("adamw.") + which)) out[0] = std::numeric_limits<float>::quiet_NaN();
      });
    } catch (const mf::FormatError& e) {
      text = e.what();
    }
    EXPECT_NE(text.find(std::string(which[0] == 'm' ? "first" : "second") + " moment nan at element 0"),
              std::string::npos)
        << text;
  }
}

#if defined(__linux__) && !defined(MEMORYFORMER_TEST_UNDER_SANITIZER)
/// Caps the process's address space 8 MB above what it maps now. Returns 0, or 1 and 2 when the mapping cannot be read
/// or the cap cannot be set.
int cap_address_space() {
  long pages = 0;
  std::ifstream("/proc/self/statm") >> pages;
  if (pages <= 0) return 1;
  const rlim_t cap = rlim_t(pages) * rlim_t(sysconf(_SC_PAGESIZE)) + (rlim_t(8) << 20);
  const rlimit limit{cap, cap};
  return setrlimit(RLIMIT_AS, &limit) != 0 ? 2 : 0;
}

/// True when every value of `values` is zero.
template <class Range>
bool all_zero(const Range& values) {
  return std::ranges::all_of(values, [](auto v) { return v == 0; });
}

/// Runs `calls` in a child process (re-executed, so no threads of this one are copied), where an address-space limit
/// cannot harm other tests, and expects it to exit with status 0.
void expect_exit_zero_in_a_child(int (*calls)()) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(std::exit(calls()), ::testing::ExitedWithCode(0), "");
}

/// In a process whose address space is capped 8 MB above what it maps once the inputs and caches are made, every call
/// whose buffers grow with its rows must throw ConfigError naming the positions, not std::bad_alloc: forward calls
/// over 2^21 positions (tensors of 64 MB at d = 8) and backward calls over 2^19 (16 MB, from caches made before the
/// cap) of the models, blocks, layers, norms, attention, the hasher and Rotary, and decoding steps of 2^18 sequences.
/// Returns 0 when all do, else 100 + the case that did not (10 + it for a bare std::bad_alloc); 3, 4 and 9 when a
/// failed call left a hash, a KV cache or a block cache that looks valid; 5 to 8 for the Embedding's case; 90 when the
/// Memory Layer's refused backward calls changed a gradient.
int calls_past_an_address_space_limit() {
#if defined(MEMORYFORMER_USE_OPENMP)
  omp_set_num_threads(1);  // no thread stacks to map under the limit
#endif
  constexpr Index d = 8, big = Index(1) << 21, mid = Index(1) << 19, seq = 64;
  const mf::MemoryFormerLM<float>::Config lm = tiny_lm();
  mf::MemoryFormerLM<float> model(lm, 1);
  const mf::FrozenLanguageModel frozen = mf::freeze(model, mf::StorageType::F32);
  mf::MemoryFormerBlock<float> mf_block(lm.block, 2);
  mf::TransformerBlock<float> dense_block(mf::TransformerBlockConfig{.d = d, .heads = 2}, 3);
  mf::MemoryBlock<float> memory_block(mf::MemoryBlockConfig{.d = d, .tau = 4, .expand_bits = 1}, 4);
  mf::MemoryLayer<float> layer(mf::MemoryLayerConfig{.d_in = d, .d_out = d, .tau = 4}, 5);
  const std::vector<std::int32_t> tokens(static_cast<size_t>(big), 0);
  const std::span<const std::int32_t> tokens_mid(tokens.data(), static_cast<size_t>(mid));
  const mf::Matrix<float> x = mf::Matrix<float>::Constant(big, d, 0.5f), dy = mf::Matrix<float>::Ones(mid, d);
  mf::Matrix<float> y(big, d), dx(mid, d);
  const auto x_mid = x.topRows(mid);
  // Caches over 2^19 positions (2^13 sequences of 64) for the backward calls.
  mf::MemoryFormerLM<float>::Cache lm_cache;
  model.forward_loss(tokens_mid, tokens_mid, mid / seq, seq, lm_cache);
  mf::MemoryFormerBlock<float>::Cache mf_cache;
  mf_block.forward(y.topRows(mid), x_mid, mid / seq, seq, mf_cache);
  mf::TransformerBlock<float>::Cache dense_cache;
  dense_block.forward(y.topRows(mid), x_mid, mid / seq, seq, dense_cache);
  mf::MemoryBlock<float>::Cache memory_cache;
  memory_block.forward(y.topRows(mid), x_mid, memory_cache);
  mf::HashResult<float> hash;
  layer.forward(y.topRows(mid), x_mid, hash);
  mf::Matrix<float> dscores = mf::Matrix<float>::Zero(mid, layer.num_tables());  // backward_hashed allocates the rest
  mf::HashResult<float> big_hash;  // all 2^21 rows, for the lookup alone (hashed only: no lookup scratch grows yet)
  layer.hasher().hash(big_hash, x);
  // Buffers that hold a smaller batch when a larger one cannot be allocated: they must be left empty or as they were,
  // never dangling (Eigen's resize frees before it allocates), and the calls that failed must not mark them valid.
  mf::HashResult<float> hashed_under_cap;
  layer.hasher().hash(hashed_under_cap, x_mid);
  mf::MemoryFormerBlock<float>::Cache reused_mf_cache;
  mf_block.forward(y.topRows(mid), x_mid, mid / seq, seq, reused_mf_cache);
  const mf::FrozenMemoryLayer frozen_layer(layer, mf::StorageType::F32);
  const mf::FrozenMemoryBlock frozen_memory_block(memory_block, mf::StorageType::F32);
  const mf::FrozenMemoryFormerBlock frozen_mf_block(mf_block, mf::StorageType::F32);
  const mf::LayerNorm<float> layer_norm(1);
  const mf::RMSNorm<float> rms_norm(1);
  const mf::Rotary<float> rotary(d, 2, 4);
  mf::Embedding<float> embedding(Index(1) << 22, 1, std::uint64_t(6));  // a list of 2^22 touched rows is 32 MB
  // x and y seen as one column of 2^24 rows, for the norms of width 1.
  const Eigen::Map<const mf::Matrix<float>> x_column(x.data(), big * d, 1);
  Eigen::Map<mf::Matrix<float>> y_column(y.data(), big * d, 1);
  // Decoding 2^18 sequences at once: the caches exist before the cap, the call's buffers do not fit under it.
  constexpr Index decode_batch = Index(1) << 18;
  const std::span<const std::int32_t> tokens_decode(tokens.data(), static_cast<size_t>(decode_batch));
  const auto x_decode = x.topRows(decode_batch);
  auto y_decode = y.topRows(decode_batch);
  mf::Matrix<float> logits_decode(decode_batch, lm.vocab);
  auto model_state = model.make_decode_state(decode_batch, 1);
  auto frozen_state = frozen.make_decode_state(decode_batch, 1);
  auto mf_kv = mf_block.make_kv_cache(decode_batch, 1);
  auto dense_kv = dense_block.make_kv_cache(decode_batch, 1);
  auto frozen_kv = frozen_mf_block.make_kv_cache(decode_batch, 1);
  if (const int failed = cap_address_space(); failed != 0) return failed;

  mf::MemoryFormerLM<float>::Cache big_lm_cache;
  mf::MemoryFormerBlock<float>::Cache big_mf_cache;
  mf::TransformerBlock<float>::Cache big_dense_cache;
  mf::MemoryBlock<float>::Cache big_memory_cache;
  mf::LayerNormCache<float> layer_norm_cache;
  mf::RMSNormCache<float> rms_norm_cache;
  mf::CrossEntropyCache<float> cross_entropy_cache;
  mf::AttentionCache<float> attention_cache;
  mf::FrozenMemoryBlock::Scratch frozen_memory_scratch;
  mf::FrozenMemoryFormerBlock::Scratch frozen_mf_scratch, frozen_mf_decode_scratch;
  std::vector<std::function<void()>> calls = {
      [&] { model.forward(tokens, big / seq, seq, big_lm_cache); },
      [&] { (void)frozen.forward(tokens, big / seq, seq); },
      [&] { mf_block.forward(y, x, big / seq, seq, big_mf_cache); },
      [&] { mf_block.forward(y, x, big / seq, seq, reused_mf_cache); },
      [&] { dense_block.forward(y, x, big / seq, seq, big_dense_cache); },
      [&] { memory_block.forward(y, x, big_memory_cache); },
      [&] { layer.forward(y, x, hashed_under_cap); },
      [&] { model.backward(lm_cache); },
      [&] { mf_block.backward(dx, x_mid, dy, mf_cache); },
      [&] { dense_block.backward(dx, x_mid, dy, dense_cache); },
      [&] { memory_block.backward(dx, x_mid, dy, memory_cache); },
      [&] { layer.backward(dx, x_mid, dy, hash); },
      [&] { layer.backward_hashed(dscores, dy, hash); },
      [&] { layer_norm.forward(y_column, x_column, layer_norm_cache); },
      [&] { rms_norm.forward(y_column, x_column, rms_norm_cache); },
      [&] { (void)mf::cross_entropy_forward<float>(x, tokens, cross_entropy_cache); },
      [&] { mf::attention_forward<float>(y, x, x, x, big / seq, seq, 2, attention_cache); },
      [&] { mf_block.hasher().hash(hashed_under_cap, x); },
      [&] { rotary.forward(y, x, 1, big, Index(1) << 40); },  // positions past the cached angles
      [&] { frozen_memory_block.forward(y, x, frozen_memory_scratch); },
      [&] { frozen_mf_block.forward(y, x, big / seq, seq, frozen_mf_scratch); },
      [&] { model.forward_decode(logits_decode, tokens_decode, model_state); },
      [&] { frozen.forward_decode(logits_decode, tokens_decode, frozen_state); },
      [&] { mf_block.forward_decode(y_decode, x_decode, mf_kv); },
      [&] { dense_block.forward_decode(y_decode, x_decode, dense_kv); },
      [&] { frozen_mf_block.forward_decode(y_decode, x_decode, frozen_kv, frozen_mf_decode_scratch); },
  };
  // The fast kernels' prefill plan grows with the rows; the portable gather allocates nothing.
  if (mf::detail::use_fast_kernels<float>(mf::best_isa()))
    calls.push_back([&] { frozen_layer.forward_hashed(y, big_hash); });
  for (size_t i = 0; i < calls.size(); ++i) {
    try {
      calls[i]();
      return 100 + int(i);  // nothing failed: the cap did not bite
    } catch (const mf::ConfigError& e) {
      const std::string text = e.what();
      if (text.find("cannot be allocated") == std::string::npos || text.find(" positions") == std::string::npos)
        return 100 + int(i);
    } catch (const std::bad_alloc&) {
      return 10 + int(i);
    }
  }
  // The embedding's list of touched rows is reserved before dW changes.
  try {
    embedding.backward(std::span<const std::int32_t>(tokens.data(), 1), dy.topRows(1).leftCols(1));
    return 5;
  } catch (const mf::ConfigError& e) {
    if (std::string(e.what()).find("touched rows") == std::string::npos) return 6;
  } catch (const std::bad_alloc&) {
    return 7;
  }
  if (embedding.dweight().cwiseAbs().maxCoeff() != 0.0f) return 8;
  // A call that failed left no half-made state: the hash is empty, every cache as long as before.
  if (!hashed_under_cap.empty()) return 3;
  try {  // a forward refused the cache it could not refill
    mf_block.backward(dx, x_mid, dy, reused_mf_cache);
    return 9;
  } catch (const mf::StateError&) {
  }
  if (model_state.length() != 0 || frozen_state.length() != 0 || mf_kv.length() != 0 || dense_kv.length() != 0 ||
      frozen_kv.length() != 0)
    return 4;
  // The layer's refused backward calls left every gradient as it was: dbias, dtables, the touched rows, dscores.
  if (!layer.dbias().isZero() || !all_zero(layer.dtables().values()) || !layer.touched_list().empty() ||
      !all_zero(layer.touched_rows()) || !dscores.isZero())
    return 90;
  return 0;
}
#endif

TEST(BadInput, CallsWhoseBuffersCannotBeAllocated) {
#if defined(__linux__) && !defined(MEMORYFORMER_TEST_UNDER_SANITIZER)
  expect_exit_zero_in_a_child(calls_past_an_address_space_limit);
#else
  GTEST_SKIP() << "needs Linux and a process without a sanitizer's shadow memory (an address-space limit)";
#endif
}

#if defined(__linux__) && !defined(MEMORYFORMER_TEST_UNDER_SANITIZER)
/// The sorted backward kernel over a sort made before an address-space cap (as MemoryFormerBlock shares one), whose
/// sums buffer a backward over as many pairs (8 tables × 2^17 rows) has grown: the capped call over 2^19 rows is
/// refused only its per-thread dy slices, which it must allocate before it flags or lists a row. Returns 0 when it
/// is refused and leaves the touched rows, their list, dtables and dscores as they were; 1–2 when the cap could not
/// be set, 3 when the cap did not bite, 4 when something changed, 5 without the sorted kernel.
int sorted_backward_past_an_address_space_limit() {
#if defined(MEMORYFORMER_USE_OPENMP)
  omp_set_num_threads(1);  // no thread stacks to map under the limit
#endif
  constexpr Index d = 8, rows = Index(1) << 19, wide_rows = rows / 4;
  const mf::Isa isa = mf::best_isa();
  mf::MemoryLayer<float> layer(mf::MemoryLayerConfig{.d_in = d, .d_out = d, .tau = 4}, 5);  // 2 tables of 16 rows
  if (!mf::detail::lookup_backward_sorts<float>(isa, rows, layer.num_tables(), 4)) return 5;
  const mf::Matrix<float> x = mf::Matrix<float>::Constant(rows, d, 0.5f), dy = mf::Matrix<float>::Ones(rows, d);
  mf::Matrix<float> y(rows, d), dscores = mf::Matrix<float>::Zero(rows, layer.num_tables());
  mf::HashResult<float> hash;
  layer.forward(y, x, hash);
  mf::detail::SortedContributionsBuffer presorted;
  presorted.sort(hash.codes.data(), hash.scores.data(), hash.rows, hash.tables, 4);
  mf::MemoryLayer<float> wide(mf::MemoryLayerConfig{.d_in = 4 * d, .d_out = d, .tau = 4}, 7);  // 8 tables
  const Eigen::Map<const mf::Matrix<float>> x_wide(x.data(), wide_rows, 4 * d);
  mf::HashResult<float> h_wide;
  wide.forward(y.topRows(wide_rows), x_wide, h_wide);
  mf::Matrix<float> ds_wide = mf::Matrix<float>::Zero(wide_rows, wide.num_tables());
  wide.backward_hashed(ds_wide, dy.topRows(wide_rows), h_wide);
  std::vector<std::uint8_t> touched(std::size_t(layer.num_tables() * 16), 0);
  std::vector<Index> new_rows;
  new_rows.reserve(touched.size());
  std::vector<float> dtables(touched.size() * std::size_t(d), 0.0f);

  if (const int failed = cap_address_space(); failed != 0) return failed;
  try {
    mf::detail::lookup_backward(isa, dscores.data(), dscores.outerStride(), dy.data(), dy.outerStride(),
                                std::as_const(layer).tables().data(), dtables.data(), touched.data(), 4, d,
                                hash.tables, hash.codes.data(), hash.scores.data(), hash.rows, &presorted.sorted,
                                &new_rows);
    return 3;
  } catch (const std::bad_alloc&) {  // the kernel's own failure, which MemoryLayer names
  }
  if (!new_rows.empty() || !all_zero(touched) || !all_zero(dtables) || !dscores.isZero()) return 4;
  return 0;
}
#endif

TEST(BadInput, SortedBackwardRefusedItsScratchChangesNothing) {
#if defined(__linux__) && !defined(MEMORYFORMER_TEST_UNDER_SANITIZER)
  if (!mf::detail::lookup_backward_sorts<float>(mf::best_isa(), 2, 2, 4))
    GTEST_SKIP() << "needs the sorted backward kernel (a SIMD build)";
  expect_exit_zero_in_a_child(sorted_backward_past_an_address_space_limit);
#else
  GTEST_SKIP() << "needs Linux and a process without a sanitizer's shadow memory (an address-space limit)";
#endif
}

/// Fills the parameter named `name` with `value` and returns its previous values.
std::vector<float> fill_parameter(std::vector<mf::ParameterView<float>> params, const std::string& name, float value) {
  for (auto& p : params)
    if (p.name == name) {
      std::vector<float> old(p.value.begin(), p.value.end());
      std::fill(p.value.begin(), p.value.end(), value);
      return old;
    }
  ADD_FAILURE() << "no parameter " << name;
  return {};
}

/// Puts back values fill_parameter returned.
void restore_parameter(std::vector<mf::ParameterView<float>> params, const std::string& name,
                       const std::vector<float>& values) {
  for (auto& p : params)
    if (p.name == name) std::copy(values.begin(), values.end(), p.value.begin());
}

// A decoding step that fails after earlier blocks, or the block's own attention, appended their keys and values
// drops them again. Here a NaN norm scale gives a later hash a NaN input, and a NaN bias a later attention NaN
// queries.
TEST(BadInput, DecodeStepThatFailsPartWayLeavesTheCachesAsTheyWere) {
  mf::MemoryFormerLM<float>::Config c = tiny_lm();
  c.layers = 2;
  mf::MemoryFormerLM<float> model(c, 1);
  const std::vector<std::int32_t> first = {1, 2, 3, 4}, second = {5, 6};  // batch 2: two tokens each, then one
  mf::Matrix<float> logits(4, c.vocab), next(2, c.vocab), expected(2, c.vocab);
  auto state = model.make_decode_state(2, 8), clean_state = model.make_decode_state(2, 8);
  model.forward_decode(logits, first, state);
  model.forward_decode(logits, first, clean_state);
  model.forward_decode(expected, second, clean_state);

  // Block 1's first norm: block 0 has appended when block 1's hash refuses the step.
  const std::string scale = "blocks.1.norm1.scale";
  const std::vector<float> kept = fill_parameter(model.parameters(), scale, std::nanf(""));
  EXPECT_THROW(model.forward_decode(next, second, state), mf::NonFiniteError);
  EXPECT_EQ(state.length(), 2);
  for (const auto& kv : state.kv) EXPECT_EQ(kv.length(), 2);
  // The frozen model, from its first step: nothing stays appended either.
  const mf::FrozenLanguageModel frozen = mf::freeze(model, mf::StorageType::F32);
  auto frozen_state = frozen.make_decode_state(2, 8);
  EXPECT_THROW(frozen.forward_decode(logits, first, frozen_state), mf::NonFiniteError);
  EXPECT_EQ(frozen_state.length(), 0);
  for (const auto& kv : frozen_state.kv) EXPECT_EQ(kv.length(), 0);
  // Mended, the model continues from its two tokens with the bits of a run that never failed.
  restore_parameter(model.parameters(), scale, kept);
  model.forward_decode(next, second, state);
  EXPECT_TRUE(mf::testing_support::same_bits(next, expected));

  // One block whose Memory Block fails after its attention appended.
  mf::MemoryFormerBlock<float> block(c.block, 2);
  (void)fill_parameter(block.parameters(), "norm2.scale", std::nanf(""));
  auto kv = block.make_kv_cache(2, 8);
  const mf::Matrix<float> x_new = mf::Matrix<float>::Ones(2, c.block.d);
  mf::Matrix<float> y_new(2, c.block.d);
  EXPECT_THROW(block.forward_decode(y_new, x_new, kv), mf::NonFiniteError);
  EXPECT_EQ(kv.length(), 0);

  // A dense model whose second block's attention refuses scores that are not finite (NaN queries).
  mf::TransformerLM<float>::Config dense_config;
  dense_config.vocab = c.vocab;
  dense_config.layers = 2;
  dense_config.block.d = 8;
  dense_config.block.heads = 2;
  mf::TransformerLM<float> dense(dense_config, 3);
  auto dense_state = dense.make_decode_state(2, 8);
  dense.forward_decode(logits, first, dense_state);
  (void)fill_parameter(dense.parameters(), "blocks.1.q.bias", std::nanf(""));
  ts::expect_throw_with([&] { dense.forward_decode(next, second, dense_state); },
                        "attention_decode: the scores or outputs");
  EXPECT_THROW(dense.forward_decode(next, second, dense_state), mf::NonFiniteError);
  EXPECT_EQ(dense_state.length(), 2);
  for (const auto& dense_kv : dense_state.kv) EXPECT_EQ(dense_kv.length(), 2);
}

TEST(BadInput, SaveRemovesStaleTemporariesOfTheSameTarget) {
  namespace fs = std::filesystem;
  const fs::path dir = temp_file("stale_dir");
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path target = dir / "model.ckpt";
  const fs::path stale = dir / "model.ckpt.tmp.0123456789abcdef";
  const fs::path fresh = dir / "model.ckpt.tmp.fedcba9876543210";
  const fs::path other = dir / "other.ckpt.tmp.0123456789abcdef";
  const fs::path unlike = dir / "model.ckpt.tmp.not-ours";
  for (const auto& p : {stale, fresh, other, unlike}) std::ofstream(p) << "partial";
  const auto old = fs::file_time_type::clock::now() - std::chrono::hours(1);
  for (const auto& p : {stale, other, unlike}) fs::last_write_time(p, old);
  mf::Checkpoint c;
  c.add_tensor("x", {2}, std::vector<float>{1, 2});
  mf::save_checkpoint(target, c);
  EXPECT_FALSE(fs::exists(stale)) << "an old, unlocked temporary of the target stays behind";
  EXPECT_TRUE(fs::exists(fresh)) << "a recent temporary (perhaps a live writer's) was removed";
  EXPECT_TRUE(fs::exists(other)) << "another target's temporary was removed";
  EXPECT_TRUE(fs::exists(unlike)) << "a file not named like a temporary was removed";
  EXPECT_TRUE(fs::exists(target));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace memoryformer

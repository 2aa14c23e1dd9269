// SPDX-License-Identifier: MIT
// Tests of io/checkpoint.hpp: the documented byte layout, bitwise round trips, rejection of every truncation and
// byte flip, crafted malformed headers, garbage, atomic save, and parameter save/load with config checks.
#include <gtest/gtest.h>
#include <unistd.h>
#include <xxhash.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "memoryformer/io/checkpoint.hpp"
#include "memoryformer/random.hpp"

namespace mf = memoryformer;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<std::byte>;

/// A fresh directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("mf_ckpt_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  fs::path path_;
};

Bytes read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes b(c.size());
  if (!c.empty()) std::memcpy(b.data(), c.data(), c.size());
  return b;
}

void write_file(const fs::path& p, const Bytes& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

template <class T>
T get(const Bytes& b, std::size_t at) {
  T v;
  std::memcpy(&v, b.data() + at, sizeof(T));
  return v;
}

template <class T>
void put(Bytes& b, std::size_t at, T v) {
  std::memcpy(b.data() + at, &v, sizeof(T));
}

/// Recomputes the trailing whole-file checksum with xxHash directly, so a crafted header reaches the parser.
void fix_checksum(Bytes& b) {
  put<std::uint64_t>(b, b.size() - 8, XXH3_64bits(b.data(), b.size() - 8));
}

/// Byte positions of the fields of one directory entry, found by walking the layout as the header documents it.
struct EntryFields {
  std::string name;
  std::size_t name_len_at, name_at, dtype_at, rank_at, dims_at, offset_at, size_at, hash_at;
};

struct Layout {
  std::vector<std::pair<std::size_t, std::size_t>> config_key_len_at;  // (key length field, value length field)
  std::vector<EntryFields> entries;
  std::size_t header_end = 0;
};

Layout walk(const Bytes& b) {
  Layout l;
  std::size_t p = 40;
  const auto n_config = get<std::uint32_t>(b, 32);
  const auto n_tensors = get<std::uint32_t>(b, 36);
  for (std::uint32_t i = 0; i < n_config; ++i) {
    const std::size_t k = p;
    p += 4 + get<std::uint32_t>(b, p);
    const std::size_t v = p;
    p += 4 + get<std::uint32_t>(b, p);
    l.config_key_len_at.emplace_back(k, v);
  }
  for (std::uint32_t i = 0; i < n_tensors; ++i) {
    EntryFields e{};
    e.name_len_at = p;
    const auto len = get<std::uint32_t>(b, p);
    e.name_at = p + 4;
    e.name.assign(reinterpret_cast<const char*>(b.data() + p + 4), len);
    p += 4 + len;
    e.dtype_at = p;
    e.rank_at = p + 1;
    const auto rank = std::uint8_t(b[p + 1]);
    p += 4;
    e.dims_at = p;
    p += 8 * rank;
    e.offset_at = p;
    e.size_at = p + 8;
    e.hash_at = p + 16;
    p += 24;
    l.entries.push_back(e);
  }
  l.header_end = p;
  return l;
}

/// A small checkpoint with both dtypes, a rank-0 and an empty tensor, and values that only a bitwise copy keeps.
mf::Checkpoint small_checkpoint() {
  mf::Checkpoint c;
  c.set_config("model", "memoryformer");
  c.set_config("d", "256");
  c.set_config("tau", "8");
  std::vector<float> a = {1.5f, -0.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::denorm_min(),
                          std::bit_cast<float>(0x7fc01234u), 3.0e38f};
  c.add_tensor("a", {2, 3}, a);
  std::vector<double> b = {0.1, -2.5e-300, std::bit_cast<double>(0x7ff8000000abcdefULL), 1.0 / 3.0};
  c.add_tensor("blocks.0.b", {4}, b);
  c.add_tensor("scalar", {}, std::vector<double>{42.0});
  c.add_tensor("empty", {0, 5}, std::vector<float>{});
  return c;
}

void expect_same(const mf::Checkpoint& x, const mf::Checkpoint& y) {
  EXPECT_EQ(x.config, y.config);
  ASSERT_EQ(x.tensors.size(), y.tensors.size());
  for (std::size_t i = 0; i < x.tensors.size(); ++i) {
    EXPECT_EQ(x.tensors[i].name, y.tensors[i].name);
    EXPECT_EQ(x.tensors[i].dtype, y.tensors[i].dtype);
    EXPECT_EQ(x.tensors[i].shape, y.tensors[i].shape);
    EXPECT_TRUE(x.tensors[i].bytes == y.tensors[i].bytes) << x.tensors[i].name;
  }
}

std::string format_error(const Bytes& b) {
  try {
    mf::parse_checkpoint(b, "test");
  } catch (const mf::FormatError& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST(Checkpoint, LayoutMatchesTheDocumentedFormat) {
  const auto c = small_checkpoint();
  const Bytes b = mf::serialize_checkpoint(c);
  ASSERT_GE(b.size(), 48u);
  EXPECT_EQ(std::memcmp(b.data(), "MFRM", 4), 0);
  EXPECT_EQ(get<std::uint32_t>(b, 4), 1u);
  EXPECT_EQ(get<std::uint32_t>(b, 8), 0x01020304u);
  EXPECT_EQ(get<std::uint32_t>(b, 12), 0u);
  EXPECT_EQ(get<std::uint64_t>(b, 16), b.size());
  EXPECT_EQ(get<std::uint32_t>(b, 32), 3u);
  EXPECT_EQ(get<std::uint32_t>(b, 36), 4u);
  const Layout l = walk(b);
  EXPECT_EQ(get<std::uint64_t>(b, 24), l.header_end);
  // First config entry is "model" → "memoryformer".
  EXPECT_EQ(get<std::uint32_t>(b, 40), 5u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data()) + 44, 5), "model");
  EXPECT_EQ(get<std::uint32_t>(b, 49), 12u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data()) + 53, 12), "memoryformer");
  ASSERT_EQ(l.entries.size(), 4u);
  const int dtypes[4] = {1, 2, 2, 1};
  const int ranks[4] = {2, 1, 0, 2};
  for (std::size_t i = 0; i < 4; ++i) {
    const auto& e = l.entries[i];
    EXPECT_EQ(e.name, c.tensors[i].name);
    EXPECT_EQ(int(b[e.dtype_at]), dtypes[i]);
    EXPECT_EQ(int(b[e.rank_at]), ranks[i]);
    const auto off = get<std::uint64_t>(b, e.offset_at);
    const auto size = get<std::uint64_t>(b, e.size_at);
    EXPECT_EQ(off % 64, 0u) << e.name;
    EXPECT_GE(off, l.header_end);
    ASSERT_LE(off + size, b.size() - 8);
    EXPECT_EQ(size, c.tensors[i].bytes.size());
    if (size > 0) {
      EXPECT_EQ(std::memcmp(b.data() + off, c.tensors[i].bytes.data(), size), 0) << e.name;
    }
    EXPECT_EQ(get<std::uint64_t>(b, e.hash_at), XXH3_64bits(b.data() + off, size)) << e.name;
  }
  EXPECT_EQ(get<std::uint64_t>(b, l.entries[0].dims_at), 2u);
  EXPECT_EQ(get<std::uint64_t>(b, l.entries[0].dims_at + 8), 3u);
  EXPECT_EQ(get<std::uint64_t>(b, b.size() - 8), XXH3_64bits(b.data(), b.size() - 8));
}

TEST(Checkpoint, RoundTripIsBitwiseExactInMemoryAndOnDisk) {
  TempDir dir;
  const auto c = small_checkpoint();
  expect_same(c, mf::parse_checkpoint(mf::serialize_checkpoint(c)));
  const fs::path p = dir.path() / "model.mfrm";
  mf::save_checkpoint(p, c);
  expect_same(c, mf::load_checkpoint(p));
  EXPECT_TRUE(read_file(p) == mf::serialize_checkpoint(c));

  // Larger random tensors of both dtypes, read back through the typed helpers.
  mf::Rng rng(7);
  std::vector<float> f(1000);
  std::vector<double> d(777);
  rng.fill_normal(std::span<float>(f), 0.0, 1.0);
  rng.fill_normal(std::span<double>(d), 0.0, 1.0);
  mf::Checkpoint big;
  big.add_tensor("f", {10, 10, 10}, f);
  big.add_tensor("d", {7, 111}, d);
  mf::save_checkpoint(p, big);
  const auto back = mf::load_checkpoint(p);
  std::vector<float> f2(1000);
  std::vector<double> d2(777);
  back.copy_tensor("f", f2);
  back.copy_tensor("d", std::vector<mf::Index>{7, 111}, d2);
  EXPECT_EQ(std::memcmp(f.data(), f2.data(), f.size() * 4), 0);
  EXPECT_EQ(std::memcmp(d.data(), d2.data(), d.size() * 8), 0);
}

TEST(Checkpoint, EmptyCheckpointRoundTrips) {
  const mf::Checkpoint empty;
  const Bytes b = mf::serialize_checkpoint(empty);
  EXPECT_EQ(b.size(), 48u);
  const auto back = mf::parse_checkpoint(b);
  EXPECT_TRUE(back.config.empty());
  EXPECT_TRUE(back.tensors.empty());
}

TEST(Checkpoint, EveryTruncationIsRejected) {
  const Bytes b = mf::serialize_checkpoint(small_checkpoint());
  for (std::size_t len = 0; len < b.size(); ++len) {
    const Bytes cut(b.begin(), b.begin() + std::ptrdiff_t(len));
    EXPECT_THROW(mf::parse_checkpoint(cut), mf::FormatError) << "length " << len;
  }
  const Bytes cut(b.begin(), b.begin() + 100);
  EXPECT_NE(format_error(cut).find("truncated"), std::string::npos) << format_error(cut);
  EXPECT_NE(format_error(cut).find(std::to_string(b.size())), std::string::npos) << format_error(cut);
  EXPECT_NE(format_error(cut).find("100"), std::string::npos) << format_error(cut);
  // Trailing bytes are rejected too.
  Bytes longer = b;
  longer.push_back(std::byte{0});
  EXPECT_NE(format_error(longer).find("trailing"), std::string::npos) << format_error(longer);
}

TEST(Checkpoint, TruncatedFileOnDiskIsRejected) {
  TempDir dir;
  const Bytes b = mf::serialize_checkpoint(small_checkpoint());
  for (std::size_t len : {std::size_t(0), std::size_t(3), std::size_t(47), b.size() / 2, b.size() - 1}) {
    write_file(dir.path() / "t.mfrm", Bytes(b.begin(), b.begin() + std::ptrdiff_t(len)));
    EXPECT_THROW(mf::load_checkpoint(dir.path() / "t.mfrm"), mf::FormatError) << "length " << len;
  }
}

TEST(Checkpoint, EverySingleByteFlipIsRejected) {
  const Bytes b = mf::serialize_checkpoint(small_checkpoint());
  for (std::size_t i = 0; i < b.size(); ++i) {
    for (std::uint8_t mask : {std::uint8_t(0x01), std::uint8_t(0x80), std::uint8_t(0xFF)}) {
      Bytes c = b;
      c[i] ^= std::byte{mask};
      EXPECT_THROW(mf::parse_checkpoint(c), mf::FormatError) << "byte " << i << " mask " << int(mask);
    }
  }
}

TEST(Checkpoint, WrongMagicVersionAndByteOrder) {
  Bytes b = mf::serialize_checkpoint(small_checkpoint());
  {
    Bytes c = b;
    c[0] = std::byte{'X'};
    EXPECT_NE(format_error(c).find("not a memoryformer checkpoint"), std::string::npos) << format_error(c);
    EXPECT_NE(format_error(Bytes{std::byte{'P'}, std::byte{'K'}}).find("not a memoryformer checkpoint"),
              std::string::npos);
    EXPECT_NE(format_error(Bytes{}).find("empty"), std::string::npos);
  }
  {
    Bytes c = b;
    put<std::uint32_t>(c, 4, 2);
    fix_checksum(c);
    const std::string msg = format_error(c);
    EXPECT_NE(msg.find("unsupported checkpoint format version 2"), std::string::npos) << msg;
    put<std::uint32_t>(c, 4, 0);
    fix_checksum(c);
    EXPECT_NE(format_error(c).find("version 0"), std::string::npos) << format_error(c);
  }
  {
    Bytes c = b;
    put<std::uint32_t>(c, 8, 0x04030201u);
    fix_checksum(c);
    EXPECT_NE(format_error(c).find("big-endian"), std::string::npos) << format_error(c);
  }
}

TEST(Checkpoint, MissingOrUnreadableFile) {
  TempDir dir;
  const fs::path p = dir.path() / "nope.mfrm";
  try {
    mf::load_checkpoint(p);
    FAIL() << "no exception";
  } catch (const mf::FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(p.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("No such file"), std::string::npos) << msg;
  }
  EXPECT_THROW(mf::load_checkpoint(dir.path()), mf::FormatError);  // a directory
}

TEST(Checkpoint, ChecksumMismatchesNameTheTensor) {
  const Bytes b = mf::serialize_checkpoint(small_checkpoint());
  const Layout l = walk(b);
  const auto off = get<std::uint64_t>(b, l.entries[1].offset_at);
  Bytes c = b;
  c[off + 3] ^= std::byte{0x10};
  // Whole-file checksum fails first; the message still names the damaged tensor.
  std::string msg = format_error(c);
  EXPECT_NE(msg.find("checksum mismatch"), std::string::npos) << msg;
  EXPECT_NE(msg.find("damaged tensor data: 'blocks.0.b'"), std::string::npos) << msg;
  // With a consistent whole-file checksum, the per-tensor checksum catches it.
  fix_checksum(c);
  msg = format_error(c);
  EXPECT_NE(msg.find("checksum mismatch in the data of tensor 'blocks.0.b'"), std::string::npos) << msg;
}

TEST(Checkpoint, CraftedDirectoriesAreRejected) {
  const Bytes b = mf::serialize_checkpoint(small_checkpoint());
  const Layout l = walk(b);
  const auto& e0 = l.entries[0];
  auto crafted = [&](auto edit) {
    Bytes c = b;
    edit(c);
    fix_checksum(c);
    return format_error(c);
  };
  auto expect_msg = [](const std::string& msg, const std::string& part) {
    EXPECT_NE(msg.find(part), std::string::npos) << "expected '" << part << "' in: " << msg;
  };
  // Offsets outside the file, overflowing, misaligned, inside the header.
  expect_msg(crafted([&](Bytes& c) { put<std::uint64_t>(c, e0.offset_at, (b.size() / 64 + 10) * 64); }), "outside");
  expect_msg(crafted([&](Bytes& c) { put<std::uint64_t>(c, e0.offset_at, ~std::uint64_t(63)); }), "outside");
  expect_msg(crafted([&](Bytes& c) { put<std::uint64_t>(c, e0.offset_at, 0); }), "outside");
  expect_msg(crafted([&](Bytes& c) { put<std::uint64_t>(c, e0.offset_at, get<std::uint64_t>(b, e0.offset_at) + 4); }),
             "not 64-byte aligned");
  // Sizes: not matching the shape, absurd dims, product overflowing.
  expect_msg(crafted([&](Bytes& c) { put<std::uint64_t>(c, e0.size_at, ~std::uint64_t(0)); }), "byte size");
  expect_msg(crafted([&](Bytes& c) { put<std::uint64_t>(c, e0.dims_at, std::uint64_t(1) << 60); }), "absurd dimension");
  expect_msg(crafted([&](Bytes& c) {
               put<std::uint64_t>(c, e0.dims_at, std::uint64_t(1) << 47);
               put<std::uint64_t>(c, e0.dims_at + 8, std::uint64_t(1) << 47);
             }),
             "more than 2^64");
  expect_msg(crafted([&](Bytes& c) {
               // A consistent, huge tensor: shape and size agree, but the data cannot be in the file.
               put<std::uint64_t>(c, e0.dims_at, std::uint64_t(1) << 40);
               put<std::uint64_t>(c, e0.dims_at + 8, 1);
               put<std::uint64_t>(c, e0.size_at, std::uint64_t(4) << 40);
             }),
             "outside");
  // Two tensors on the same bytes.
  expect_msg(crafted([&](Bytes& c) {
               put<std::uint64_t>(c, l.entries[3].offset_at, get<std::uint64_t>(b, e0.offset_at));
               put<std::uint64_t>(c, l.entries[3].dims_at, 1);
               put<std::uint64_t>(c, l.entries[3].dims_at + 8, 1);
               put<std::uint64_t>(c, l.entries[3].size_at, 4);
             }),
             "overlap");
  // Unknown dtype, rank too large, reserved bits.
  expect_msg(crafted([&](Bytes& c) { c[e0.dtype_at] = std::byte{3}; }), "unknown dtype");
  expect_msg(crafted([&](Bytes& c) { c[e0.rank_at] = std::byte{200}; }), "rank 200");
  expect_msg(crafted([&](Bytes& c) { c[e0.rank_at + 1] = std::byte{1}; }), "reserved");
  // Counts and lengths far beyond the file: rejected without allocating (ASan would flag a huge allocation).
  expect_msg(crafted([&](Bytes& c) { put<std::uint32_t>(c, 36, 0xFFFFFFFFu); }), "header ends inside");
  expect_msg(crafted([&](Bytes& c) { put<std::uint32_t>(c, 32, 0xFFFFFFFFu); }), "header ends inside");
  expect_msg(crafted([&](Bytes& c) { put<std::uint32_t>(c, l.config_key_len_at[0].first, 0xFFFFFFFFu); }),
             "header ends inside a config key");
  expect_msg(crafted([&](Bytes& c) { put<std::uint32_t>(c, e0.name_len_at, 0x7FFFFFFFu); }), "tensor name");
  expect_msg(crafted([&](Bytes& c) { put<std::uint64_t>(c, 24, ~std::uint64_t(0)); }), "header size");
  expect_msg(crafted([&](Bytes& c) { put<std::uint64_t>(c, 24, 8); }), "header size");
  expect_msg(crafted([&](Bytes& c) { put<std::uint32_t>(c, 36, 3); }), "entries end at");
  expect_msg(crafted([&](Bytes& c) { put<std::uint32_t>(c, 12, 1); }), "reserved header field");
  // Duplicate names and keys: equal-length names rewritten in place.
  {
    // A real duplicate: two entries named "p" and "q", rewritten so both are "p".
    mf::Checkpoint d;
    d.add_tensor("p", {1}, std::vector<float>{1.0f});
    d.add_tensor("q", {1}, std::vector<float>{2.0f});
    Bytes c = mf::serialize_checkpoint(d);
    const Layout dl = walk(c);
    c[dl.entries[1].name_at] = std::byte{'p'};
    fix_checksum(c);
    expect_msg(format_error(c), "duplicate tensor name 'p'");
    mf::Checkpoint k;
    k.config = {{"x", "1"}, {"y", "2"}};
    c = mf::serialize_checkpoint(k);
    c[walk(c).config_key_len_at[1].first + 4] = std::byte{'x'};
    fix_checksum(c);
    expect_msg(format_error(c), "duplicate config key 'x'");
  }
}

TEST(Checkpoint, RandomGarbageAndMutationsOnlyEverThrowFormatError) {
  mf::Rng rng(2024);
  const Bytes valid = mf::serialize_checkpoint(small_checkpoint());
  auto must_be_format_error_or_parse = [](const Bytes& c) {
    try {
      (void)mf::parse_checkpoint(c);
    } catch (const mf::FormatError&) {
    } catch (const std::exception& e) {
      ADD_FAILURE() << "unexpected exception type: " << e.what();
    }
  };
  for (int it = 0; it < 300; ++it) {
    Bytes c(rng.uniform_index(600));
    for (auto& x : c) x = std::byte(rng.uniform_index(256));
    if (it % 2 == 1 && c.size() >= 12) std::memcpy(c.data(), valid.data(), 12);  // get past magic/version/marker
    if (it % 4 == 3 && c.size() >= 48) {
      put<std::uint64_t>(c, 16, c.size());
      fix_checksum(c);  // reach the directory parser with random counts and lengths
    }
    EXPECT_THROW(mf::parse_checkpoint(c), mf::FormatError) << "iteration " << it;
  }
  // Mutated valid files with a repaired checksum: the directory parser sees near-valid garbage. Each must either
  // parse (a changed config byte is legal) or throw FormatError.
  for (int it = 0; it < 1500; ++it) {
    Bytes c = valid;
    const int edits = 1 + int(rng.uniform_index(4));
    for (int e = 0; e < edits; ++e) {
      const auto at = rng.uniform_index(c.size() - 8);
      c[at] = std::byte(rng.uniform_index(256));
    }
    fix_checksum(c);
    must_be_format_error_or_parse(c);
  }
}

TEST(Checkpoint, SaveIsAtomicAndReplacesAnExistingFile) {
  TempDir dir;
  const fs::path p = dir.path() / "ckpt.mfrm";
  auto c1 = small_checkpoint();
  mf::save_checkpoint(p, c1);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"ckpt.mfrm"});
  mf::Checkpoint c2;
  c2.set_config("tau", "4");
  c2.add_tensor("z", {3}, std::vector<double>{1, 2, 3});
  mf::save_checkpoint(p, c2);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"ckpt.mfrm"});  // no temporary file left behind
  expect_same(c2, mf::load_checkpoint(p));
  // A relative path saves next to itself (the temporary file lives in the same directory).
  const fs::path cwd = fs::current_path();
  fs::current_path(dir.path());
  mf::save_checkpoint("rel.mfrm", c1);
  fs::current_path(cwd);
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"ckpt.mfrm", "rel.mfrm"}));
  expect_same(c1, mf::load_checkpoint(dir.path() / "rel.mfrm"));
}

TEST(Checkpoint, FailedSaveRemovesTheTemporaryFileAndNamesThePath) {
  TempDir dir;
  const auto c = small_checkpoint();
  // Missing directory: the temporary file cannot be created.
  const fs::path missing = dir.path() / "no_such_dir" / "x.mfrm";
  try {
    mf::save_checkpoint(missing, c);
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(missing.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("No such file"), std::string::npos) << msg;
  }
  // The target is a non-empty directory: writing succeeds, the rename fails, the temporary file must go.
  const fs::path target = dir.path() / "target.mfrm";
  fs::create_directories(target / "inside");
  try {
    mf::save_checkpoint(target, c);
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(target.string()), std::string::npos) << e.what();
  }
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"target.mfrm"});
}

TEST(AtomicFile, WritesReplacesAndLeavesTheOldFileOnFailure) {
  TempDir dir;
  const fs::path p = dir.path() / "out.txt";
  const auto read = [](const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  mf::write_file_atomically(p, "first");
  EXPECT_EQ(read(p), "first");
  const std::string binary("a\0b\xff", 4);
  mf::write_file_atomically(p, binary);
  EXPECT_EQ(read(p), binary);
  mf::write_file_atomically(p, "");
  EXPECT_EQ(read(p), "");
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"out.txt"});  // no temporary file left behind
  // A missing directory: IoError naming the path, nothing created.
  const fs::path missing = dir.path() / "no_such_dir" / "x.txt";
  try {
    mf::write_file_atomically(missing, "x");
    FAIL() << "no exception";
  } catch (const mf::IoError& e) {
    EXPECT_NE(std::string(e.what()).find(missing.string()), std::string::npos) << e.what();
  }
  // The target is a non-empty directory: the rename fails, the temporary file goes, the directory stays.
  const fs::path target = dir.path() / "target";
  fs::create_directories(target / "inside");
  EXPECT_THROW(mf::write_file_atomically(target, "x"), mf::IoError);
  EXPECT_TRUE(fs::is_directory(target / "inside"));
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"out.txt", "target"}));
}

TEST(Checkpoint, InvalidCheckpointsAreRefusedBeforeWriting) {
  TempDir dir;
  const fs::path p = dir.path() / "x.mfrm";
  mf::Checkpoint c;
  c.add_tensor("a", {2}, std::vector<float>{1, 2});
  EXPECT_THROW(c.add_tensor("a", {1}, std::vector<float>{1}), mf::ConfigError);
  EXPECT_THROW(c.add_tensor("b", {3}, std::vector<float>{1, 2}), mf::ShapeError);
  EXPECT_THROW(c.add_tensor("b", {-1}, std::vector<float>{}), mf::ShapeError);
  mf::Checkpoint dup = c;
  dup.tensors.push_back(dup.tensors[0]);
  EXPECT_THROW(mf::save_checkpoint(p, dup), mf::ConfigError);
  mf::Checkpoint bad_bytes = c;
  bad_bytes.tensors[0].bytes.pop_back();
  EXPECT_THROW(mf::save_checkpoint(p, bad_bytes), mf::ShapeError);
  mf::Checkpoint rank9;
  rank9.add_tensor("r", std::vector<mf::Index>(9, 1), std::vector<float>{1});
  EXPECT_THROW(mf::save_checkpoint(p, rank9), mf::ShapeError);
  mf::Checkpoint dup_key;
  dup_key.config = {{"k", "1"}, {"k", "2"}};
  EXPECT_THROW(mf::save_checkpoint(p, dup_key), mf::ConfigError);
  EXPECT_TRUE(dir.entries().empty());
}

TEST(Checkpoint, CopyTensorChecksSizeDtypeAndShape) {
  mf::Checkpoint c;
  c.add_tensor("f", {2, 2}, std::vector<float>{1.0f, 2.0f, 3.0f, 0.1f});
  c.add_tensor("d", {3}, std::vector<double>{0.1, 1e300, -2.0});
  std::vector<float> f3(3);
  EXPECT_THROW(c.copy_tensor("f", f3), mf::FormatError);
  EXPECT_THROW(c.copy_tensor("missing", f3), mf::FormatError);
  try {
    c.copy_tensor("d", f3);
    FAIL();
  } catch (const mf::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("is f64 in the checkpoint, the destination is f32"), std::string::npos);
  }
  c.copy_tensor("d", f3, /*allow_conversion=*/true);
  EXPECT_EQ(f3[0], static_cast<float>(0.1));
  EXPECT_TRUE(std::isinf(f3[1]));
  EXPECT_EQ(f3[2], -2.0f);
  std::vector<double> d4(4);
  c.copy_tensor("f", d4, true);
  EXPECT_EQ(d4[3], double(0.1f));
  EXPECT_THROW(c.copy_tensor("f", std::vector<mf::Index>{4}, d4, true), mf::FormatError);
  EXPECT_EQ(c.tensor("f").values<float>()[1], 2.0f);
  c.set_config("k", "1");
  c.set_config("k", "2");
  ASSERT_NE(c.find_config("k"), nullptr);
  EXPECT_EQ(*c.find_config("k"), "2");
  EXPECT_EQ(c.config.size(), 1u);
}

namespace {

/// A stand-in model: parameter storage and the views a layer would hand out.
template <class S>
struct ToyModel {
  std::vector<S> w = std::vector<S>(6), b = std::vector<S>(3), dw = std::vector<S>(6), db = std::vector<S>(3);
  std::vector<mf::ParameterView<S>> params() {
    return {{"layer.weight", {2, 3}, w, dw, mf::ParameterKind::Dense, 0, nullptr},
            {"layer.bias", {3}, b, db, mf::ParameterKind::Bias, 0, nullptr}};
  }
};

}  // namespace

TEST(Checkpoint, SaveAndLoadParameters) {
  TempDir dir;
  const fs::path p = dir.path() / "params.mfrm";
  ToyModel<float> m;
  for (int i = 0; i < 6; ++i) m.w[std::size_t(i)] = 0.5f * float(i) - 1.0f;
  m.b = {0.25f, -0.125f, 7.0f};
  const std::vector<std::pair<std::string, std::string>> config = {{"model", "memoryformer"}, {"tau", "8"}, {"d", "3"}};
  mf::Checkpoint extra;
  extra.add_tensor("adamw.step", {1}, std::vector<float>{5.0f});
  mf::save_parameters(p, config, m.params(), extra.tensors);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"params.mfrm"});

  ToyModel<float> m2;
  const auto rest = mf::load_parameters(p, m2.params(), {{"tau", "8"}, {"d", "3"}});
  EXPECT_EQ(m2.w, m.w);
  EXPECT_EQ(m2.b, m.b);
  EXPECT_EQ(rest.config, config);
  ASSERT_EQ(rest.tensors.size(), 1u);
  EXPECT_EQ(rest.tensors[0].name, "adamw.step");

  // Config mismatch names key, both values; nothing is written into the model.
  ToyModel<float> m3;
  try {
    mf::load_parameters(p, m3.params(), {{"tau", "4"}, {"layers", "6"}});
    FAIL() << "no exception";
  } catch (const mf::FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("checkpoint has tau=8, the model has tau=4"), std::string::npos) << msg;
    EXPECT_NE(msg.find("no config key 'layers'"), std::string::npos) << msg;
  }
  EXPECT_EQ(m3.w, std::vector<float>(6, 0.0f));

  // Shape mismatch and a missing parameter; still all-or-nothing.
  ToyModel<float> m4;
  auto views = m4.params();
  views[0].shape = {3, 2};
  std::vector<float> extra_value(2), extra_grad(2);
  views.push_back({"layer.scale", {2}, extra_value, extra_grad, mf::ParameterKind::Norm, 0, nullptr});
  try {
    mf::load_parameters(p, views, {});
    FAIL() << "no exception";
  } catch (const mf::FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'layer.weight' is (2, 3) in the checkpoint, the model's parameter is (3, 2)"), std::string::npos)
        << msg;
    EXPECT_NE(msg.find("no tensor for parameter 'layer.scale'"), std::string::npos) << msg;
  }
  EXPECT_EQ(m4.b, std::vector<float>(3, 0.0f));

  // dtype: a float checkpoint into a double model only with conversion.
  ToyModel<double> md;
  EXPECT_THROW(mf::load_parameters(p, md.params(), {}), mf::FormatError);
  mf::load_parameters(p, md.params(), {}, /*allow_conversion=*/true);
  for (std::size_t i = 0; i < 6; ++i) EXPECT_EQ(md.w[i], double(m.w[i]));

  // A double model round-trips bitwise.
  for (std::size_t i = 0; i < 6; ++i) md.w[i] = std::sqrt(double(i) + 0.5);
  mf::save_parameters(dir.path() / "d.mfrm", config, md.params());
  ToyModel<double> md2;
  mf::load_parameters(dir.path() / "d.mfrm", md2.params(), config);
  EXPECT_EQ(std::memcmp(md.w.data(), md2.w.data(), 6 * sizeof(double)), 0);

  // An extra tensor may not shadow a parameter name.
  mf::Checkpoint clash;
  clash.add_tensor("layer.bias", {3}, std::vector<float>{0, 0, 0});
  EXPECT_THROW(mf::save_parameters(p, config, m.params(), clash.tensors), mf::ConfigError);
}

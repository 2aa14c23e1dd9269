// SPDX-License-Identifier: MIT
// Reference vectors (design §5): every file in $MEMORYFORMER_VECTORS is run, in float and in double. Every parameter
// of a case (τ, temperature, score variant, sizes) comes from the file's tensors, never from its name; the file
// name's prefix only says which module the file is for.
#include <functional>
#include <map>
#include <string>

#include <gtest/gtest.h>

#include <memoryformer/hash.hpp>
#include <memoryformer/memory_layer.hpp>

#include "../support/vector_files.hpp"
#include "../support/vector_cases.hpp"

namespace mf = memoryformer;
using mf::testing_support::tensors_close;

namespace {

template <class Scalar>
double rtol_for() {
  return std::is_same_v<Scalar, float> ? 2e-5 : 1e-10;
}

template <class Scalar>
void check_codes(const std::vector<std::int32_t>& codes, const mf::TextTensor& expected) {
  ASSERT_EQ(mf::Index(codes.size()), expected.size()) << "codes";
  for (size_t i = 0; i < codes.size(); ++i)
    ASSERT_EQ(double(codes[i]), expected.values[i]) << "code " << i << " (row " << i / size_t(expected.dim(1))
                                                     << ", table " << i % size_t(expected.dim(1)) << ")";
}

/// hash_*: z [N, K, τ] → codes, score_l1, and score_paper_t<T> for every temperature the file lists.
template <class Scalar>
void run_hash_file(const mf::TextTensorFile& file) {
  const auto& z = file.at("z");
  ASSERT_EQ(z.shape.size(), 3u) << "z must be [N, K, tau]";
  const int tau = int(z.dim(2));
  // z [N, K, τ] row-major is already x [N, K·τ] row-major: the same values in the same order.
  const mf::Matrix<Scalar> x = mf::ConstMatrixMap<Scalar>(z.template as_matrix<Scalar>().data(), z.dim(0), z.dim(1) * tau);
  int score_tensors = 0;
  for (const auto& t : file.tensors) {
    mf::HashConfig config{tau, mf::ScoreKind::L1, 1.0};
    if (t.name == "score_l1") {
    } else if (t.name.rfind("score_paper_t", 0) == 0) {
      config.score = mf::ScoreKind::Paper;
      config.temperature = std::stod(t.name.substr(13));
    } else {
      continue;
    }
    ++score_tensors;
    const mf::SignHasher<Scalar> hasher(config);
    const auto h = hasher.hash(x);
    check_codes<Scalar>(h.codes, file.at("codes"));
    EXPECT_TRUE(tensors_close(t.name, h.scores.data(), t, rtol_for<Scalar>()));
  }
  EXPECT_GE(score_tensors, 1) << "no score_* tensor in " << file.path;
}

/// memory_layer_*: x, tables, bias, dy → y, codes, scores, dx, dtables, dbias.
template <class Scalar>
void run_memory_layer_file(const mf::TextTensorFile& file) {
  const auto& x_t = file.at("x");
  const auto& tables_t = file.at("tables");
  mf::MemoryLayerConfig config;
  config.tau = int(file.at("tau").scalar());
  config.temperature = file.at("temperature").scalar();
  config.score = file.at("score_paper").scalar() != 0 ? mf::ScoreKind::Paper : mf::ScoreKind::L1;
  config.d_in = x_t.dim(1);
  config.d_out = tables_t.dim(2);
  config.bias = file.has("bias");
  ASSERT_EQ(tables_t.dim(0), config.d_in / config.tau) << "tables' K";
  ASSERT_EQ(tables_t.dim(1), mf::Index(1) << config.tau) << "tables' 2^tau";
  mf::MemoryLayer<Scalar> layer(config, 0);
  mf::testing_support::load_into(layer, file, "tables", "bias");

  const mf::Matrix<Scalar> x = x_t.template as_matrix<Scalar>();
  const mf::Matrix<Scalar> dy = file.at("dy").template as_matrix<Scalar>();
  mf::HashResult<Scalar> cache;
  mf::Matrix<Scalar> y(x.rows(), config.d_out), dx(x.rows(), config.d_in);
  layer.forward(y, x, cache);
  layer.zero_grad();
  layer.backward(dx, x, dy, cache);
  const double rtol = rtol_for<Scalar>();
  check_codes<Scalar>(cache.codes, file.at("codes"));
  EXPECT_TRUE(tensors_close("scores", cache.scores.data(), file.at("scores"), rtol));
  EXPECT_TRUE(tensors_close("y", y.data(), file.at("y"), rtol));
  EXPECT_TRUE(tensors_close("dx", dx.data(), file.at("dx"), rtol));
  EXPECT_TRUE(tensors_close("dtables", layer.dtables().data(), file.at("dtables"), rtol));
  if (config.bias) {
    EXPECT_TRUE(tensors_close("dbias", layer.dbias().data(), file.at("dbias"), rtol));
  }
}

template <class Scalar>
void run_file(const std::string& path) {
  const auto file = mf::read_text_tensors(path);  // a file that cannot be parsed throws: the test fails
  const std::string name = std::filesystem::path(path).filename().string();
  if (name.rfind("hash_", 0) == 0) return run_hash_file<Scalar>(file);
  if (name.rfind("memory_layer_", 0) == 0) return run_memory_layer_file<Scalar>(file);
  if (name.rfind("memory_block_", 0) == 0) return mf::testing_support::run_memory_block_file<Scalar>(file);
  if (name.rfind("memoryformer_block_", 0) == 0) return mf::testing_support::run_memoryformer_block_file<Scalar>(file);
  FAIL() << path << ": no module handles this file (known prefixes: hash_, memory_layer_, memory_block_, "
                    "memoryformer_block_)";
}

// The files are listed when the test runs, not when ctest discovers the tests: a caller's MEMORYFORMER_VECTORS
// then selects the files even with a test list discovered earlier for another directory.
template <class Scalar>
void run_every_file() {
  const auto files = mf::testing_support::vector_files();
  ASSERT_FALSE(files.empty()) << "no reference vectors in " << mf::testing_support::vectors_dir();
  for (const auto& path : files) {
    SCOPED_TRACE(path);
    run_file<Scalar>(path);
  }
  ::testing::Test::RecordProperty("vector_files", int(files.size()));
}

TEST(ReferenceVectors, EveryFileMatchesInFloat) { run_every_file<float>(); }
TEST(ReferenceVectors, EveryFileMatchesInDouble) { run_every_file<double>(); }

TEST(VectorDirectory, IsNotEmpty) {
  EXPECT_FALSE(mf::testing_support::vector_files().empty())
      << "no reference vectors in " << mf::testing_support::vectors_dir();
}

TEST(VectorReader, RejectsMalformedFiles) {
  const auto dir = std::filesystem::temp_directory_path() / "memoryformer_vector_reader_test";
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    const auto p = dir / name;
    std::ofstream(p) << text;
    return p.string();
  };
  EXPECT_THROW(mf::read_text_tensors(write("a.txt", "not-vectors 1\nx f64 1 1\n1\n")), mf::FormatError);
  EXPECT_THROW(mf::read_text_tensors(write("b.txt", "memoryformer-vectors 1\nx f64 1 3\n1 2\n")), mf::FormatError);
  EXPECT_THROW(mf::read_text_tensors(write("c.txt", "memoryformer-vectors 1\nx f64 1 2\n1 abc\n")), mf::FormatError);
  EXPECT_THROW(mf::read_text_tensors(write("d.txt", "memoryformer-vectors 1\nx q32 1 1\n1\n")), mf::FormatError);
  EXPECT_THROW(mf::read_text_tensors(write("e.txt", "memoryformer-vectors 1\nx f64 1 2\n")), mf::FormatError);
  EXPECT_THROW(mf::read_text_tensors((dir / "missing.txt").string()), mf::FormatError);
  const auto ok = mf::read_text_tensors(write("f.txt", "memoryformer-vectors 1\n# c\nx f64 2 1 2\n1.5 -2\n"));
  EXPECT_EQ(ok.at("x").values, (std::vector<double>{1.5, -2}));
  std::filesystem::remove_all(dir);
}

}  // namespace

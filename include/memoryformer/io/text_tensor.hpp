// SPDX-License-Identifier: MIT
// Reader for the reference-vector text format (design §5): a header line, '#' comments, then tensors as
// "NAME TYPE RANK DIM0 DIM1 ..." followed by one line of row-major values.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "../detail/checked_size.hpp"
#include "../error.hpp"
#include "../types.hpp"

namespace memoryformer {

/// One tensor of a vector file. Values are kept as double whatever the TYPE (i32 values are exact in double).
struct TextTensor {
  std::string name;
  std::string type;           ///< "f64" or "i32"
  std::vector<Index> shape;   ///< empty for none; rank-1 [1] for scalars as the files write them
  std::vector<double> values; ///< row-major

  /// Product of the shape. @throws FormatError when a dim is negative or the product exceeds 2^48 values.
  Index size() const {
    Index n = 1;
    for (auto d : shape) {
      if (d < 0 || __builtin_mul_overflow(n, d, &n) || n > detail::max_elements)
        throw FormatError("tensor '" + name + "' has shape dims whose product is negative or exceeds 2^48 values");
    }
    return n;
  }
  Index dim(size_t i) const {
    if (i >= shape.size())
      throw FormatError("tensor '" + name + "' has rank " + std::to_string(shape.size()) + ", asked for dim " +
                        std::to_string(i));
    return shape[i];
  }
  /// The single value of a one-element tensor.
  double scalar() const {
    if (values.size() != 1)
      throw FormatError("tensor '" + name + "' has " + std::to_string(values.size()) + " values, expected 1");
    return values[0];
  }
  /// The tensor as a [rows, last dim] matrix (rank ≥ 1), converted to Scalar.
  template <std::floating_point Scalar>
  Matrix<Scalar> as_matrix() const {
    const Index cols = shape.empty() ? 1 : shape.back();
    const Index rows = cols == 0 ? 0 : size() / cols;
    Matrix<Scalar> m(rows, cols);
    for (Index i = 0; i < size(); ++i) m.data()[i] = Scalar(values[size_t(i)]);
    return m;
  }
};

/// A parsed vector file: tensors by name, in file order too, plus its comment lines.
struct TextTensorFile {
  std::string path;
  std::vector<std::string> comments;
  std::vector<TextTensor> tensors;  ///< in file order

  bool has(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return true;
    return false;
  }
  const TextTensor& at(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return t;
    throw FormatError(path + ": no tensor named '" + name + "'");
  }
};

/**
 * @brief Parses a reference-vector file.
 * @throws FormatError naming the file and line for a missing header, a malformed tensor line, a value count that
 *         does not match the shape, or a value that is not a number.
 */
inline TextTensorFile read_text_tensors(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw FormatError(path + ": cannot open");
  TextTensorFile file;
  file.path = path;
  std::string line;
  size_t line_no = 0;
  auto fail = [&](const std::string& why) {
    throw FormatError(path + ":" + std::to_string(line_no) + ": " + why);
  };
  if (!std::getline(in, line)) fail("empty file");
  ++line_no;
  if (line.rfind("memoryformer-vectors 1", 0) != 0) fail("first line is '" + line + "', expected 'memoryformer-vectors 1'");
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty() || line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (line[0] == '#') {
      file.comments.push_back(line);
      continue;
    }
    std::istringstream header(line);
    TextTensor t;
    int rank = -1;
    if (!(header >> t.name >> t.type >> rank)) fail("malformed tensor header '" + line + "'");
    if (t.type != "f64" && t.type != "i32") fail("tensor '" + t.name + "' has unknown type '" + t.type + "'");
    if (rank < 0 || rank > 8) fail("tensor '" + t.name + "' has rank " + std::to_string(rank));
    for (int i = 0; i < rank; ++i) {
      Index d = -1;
      if (!(header >> d) || d < 0) fail("tensor '" + t.name + "' has a bad dimension " + std::to_string(i));
      t.shape.push_back(d);
    }
    if (!std::getline(in, line)) fail("tensor '" + t.name + "' has no value line");
    ++line_no;
    Index expected = 0;
    try {
      expected = t.size();
    } catch (const FormatError& e) {
      fail(e.what());
    }
    // Reserve only what the value line can hold (≥ 2 characters per value): the shape alone may be absurd.
    t.values.reserve(std::min(size_t(expected), line.size() / 2 + 1));
    const char* p = line.data();
    const char* end = line.data() + line.size();
    while (p < end) {
      while (p < end && (*p == ' ' || *p == '\t' || *p == '\r')) ++p;
      if (p >= end) break;
      double v = 0.0;
      auto [next, ec] = std::from_chars(p, end, v);
      if (ec != std::errc()) fail("tensor '" + t.name + "' has a value that is not a number near '" +
                                  std::string(p, size_t(std::min<std::ptrdiff_t>(end - p, 20))) + "'");
      t.values.push_back(v);
      p = next;
    }
    if (Index(t.values.size()) != expected)
      fail("tensor '" + t.name + "' has " + std::to_string(t.values.size()) + " values, its shape needs " +
           std::to_string(expected));
    file.tensors.push_back(std::move(t));
  }
  if (file.tensors.empty()) fail("no tensors");
  return file;
}

}  // namespace memoryformer

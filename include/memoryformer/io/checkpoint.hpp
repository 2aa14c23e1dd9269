// SPDX-License-Identifier: MIT
// Checkpoint files: atomic save and fully validating load of the io/checkpoint_format.hpp format, and saving or
// loading parameter views all or nothing.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../parameter.hpp"
#include "../types.hpp"
#include "atomic_file.hpp"
#include "checkpoint_format.hpp"

namespace memoryformer {

namespace detail::ckpt {

/// A file opened for reading as a read_checkpoint source (pread: no shared stream position).
class FileSource {
 public:
  FileSource(const std::filesystem::path& path, const std::string& origin) : origin_(origin) {
    fd_ = FileDescriptor(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd_.get() < 0) throw FormatError(origin_ + ": cannot open: " + errno_text(errno));
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) throw FormatError(origin_ + ": cannot stat: " + errno_text(errno));
    if (!S_ISREG(st.st_mode)) throw FormatError(origin_ + ": not a regular file");
    size_ = std::uint64_t(st.st_size);
  }
  std::uint64_t size() const { return size_; }
  void read(std::uint64_t offset, void* dst, std::size_t n) {
    auto* p = static_cast<char*>(dst);
    while (n > 0) {
      const ssize_t got = ::pread(fd_.get(), p, n, off_t(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw FormatError(origin_ + ": read failed at offset " + std::to_string(offset) + ": " + errno_text(errno));
      if (got == 0)
        throw FormatError(origin_ + ": unexpected end of file at offset " + std::to_string(offset) +
                          " (did the file change while it was being read?)");
      p += got;
      n -= std::size_t(got);
      offset += std::uint64_t(got);
    }
  }

 private:
  FileDescriptor fd_;
  std::uint64_t size_ = 0;
  const std::string& origin_;
};

inline void save_checkpoint_file(const std::filesystem::path& path, const CheckpointToWrite& w, const char* where) {
  write_file_atomically(path, where, [&](FileSink& sink) { write_checkpoint(w, sink); });
}

}  // namespace detail::ckpt

/**
 * @brief Writes `ckpt` to `path` atomically: to "<path>.tmp.<random>" in the same directory, fsync, then rename
 *        over `path` (replacing an existing file). Readers see the old file or the complete new one, never a part.
 *        The new file gets mode 0666 & ~umask (an old file's mode is not kept); a symlink at `path` is replaced by
 *        the file, not followed. POSIX only (open/flock/fsync/rename). Temporary files that an interrupted earlier
 *        save of the same `path` left behind ("<path>.tmp.<16 hex digits>", unlocked, older than a minute) are
 *        removed first; see detail::ckpt::remove_stale_temporaries for the exact rule.
 * @throws ConfigError/ShapeError (as serialize_checkpoint) before touching the filesystem; IoError naming
 *         the path and the system's error text if creating, writing, syncing or renaming fails, after removing the
 *         temporary file.
 */
inline void save_checkpoint(const std::filesystem::path& path, const Checkpoint& ckpt) {
  const auto w = detail::ckpt::view_for_write(ckpt);
  detail::ckpt::validate_for_write("save_checkpoint", w);
  detail::ckpt::save_checkpoint_file(path, w, "save_checkpoint");
}

/**
 * @brief Reads and fully validates the checkpoint at `path` (two passes: the whole-file checksum, then the header
 *        and tensors). Peak memory is the tensor data plus the header plus 1 MiB; whatever a header claims, no
 *        allocation exceeds the file's actual size, so the total stays below twice the file size.
 * @throws FormatError naming the path and the problem: missing or unreadable file, wrong magic ("not a memoryformer
 *         checkpoint"), other byte order, unsupported version, truncation or trailing bytes (expected vs actual
 *         size), whole-file checksum mismatch (naming damaged tensors when the directory is intact), a malformed
 *         directory (entry outside the file, misaligned, size not matching shape, absurd dims, overlap, duplicate
 *         names or keys), per-tensor checksum mismatch (naming the tensor).
 */
inline Checkpoint load_checkpoint(const std::filesystem::path& path) {
  const std::string where = "load_checkpoint: '" + path.string() + "'";
  detail::ckpt::FileSource src(path, where);
  return detail::ckpt::read_checkpoint(src, where);
}

/**
 * @brief Saves `params` (values only, as their own dtype and shape, named by ParameterView::name), `config` and
 *        `extra` tensors (e.g. optimiser state) atomically, without copying the parameters.
 * @throws ShapeError if a parameter's value size differs from its shape; ConfigError for a name in `extra` equal
 *         to a parameter's, or duplicates; IoError as save_checkpoint.
 */
template <CheckpointScalar S>
void save_parameters(const std::filesystem::path& path, const std::vector<std::pair<std::string, std::string>>& config,
                     const std::vector<ParameterView<S>>& params, const std::vector<CheckpointTensor>& extra = {}) {
  detail::ckpt::CheckpointToWrite w;
  w.config = config;
  w.tensors.reserve(params.size() + extra.size());
  for (const auto& p : params) {
    Index n = 0;
    if (!detail::ckpt::checked_numel(p.shape, n) || std::size_t(n) != p.value.size())
      throw ShapeError("save_parameters: parameter " + detail::ckpt::quote_name(p.name) + " has shape " +
                       detail::ckpt::shape_text(p.shape) + " but " + std::to_string(p.value.size()) + " values");
    w.tensors.push_back({p.name, dtype_of<S>(), p.shape, std::as_bytes(std::span<const S>(p.value))});
  }
  for (const auto& t : extra) w.tensors.push_back({t.name, t.dtype, t.shape, t.bytes});
  detail::ckpt::validate_for_write("save_parameters", w);
  detail::ckpt::save_checkpoint_file(path, w, "save_parameters");
}

/**
 * @brief Loads the checkpoint at `path` into `params`, all or nothing: nothing is written unless every check passes.
 *
 * Checks that every (key, value) of `required_config` is in the checkpoint with that value ("checkpoint has tau=8,
 * the model has tau=4"), and that every parameter has a tensor of the same name, shape and dtype (or either float
 * dtype if allow_conversion). Tensors of the checkpoint that are not parameters are allowed (e.g. optimiser state);
 * put the values that determine the architecture (layers, d, τ, ...) in `required_config` to catch a mismatch there.
 * @return the rest of the checkpoint: its full config and the tensors not loaded into a parameter.
 * @throws FormatError as load_checkpoint, or listing every mismatch found.
 */
template <CheckpointScalar S>
Checkpoint load_parameters(const std::filesystem::path& path, const std::vector<ParameterView<S>>& params,
                           const std::vector<std::pair<std::string, std::string>>& required_config,
                           bool allow_conversion = false) {
  Checkpoint ckpt = load_checkpoint(path);
  const std::string where = "load_parameters: '" + path.string() + "': ";
  std::vector<std::string> problems;
  for (const auto& [key, value] : required_config) {
    const std::string* have = ckpt.find_config(key);
    if (have == nullptr)
      problems.push_back("checkpoint has no config key " + detail::ckpt::quote_name(key) + " (the model has " + key + "=" +
                         value + ")");
    else if (*have != value)
      problems.push_back("checkpoint has " + key + "=" + *have + ", the model has " + key + "=" + value);
  }
  std::vector<std::size_t> index(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    Index n = 0;
    if (!detail::ckpt::checked_numel(p.shape, n) || std::size_t(n) != p.value.size())
      throw ShapeError("load_parameters: parameter " + detail::ckpt::quote_name(p.name) + " has shape " +
                       detail::ckpt::shape_text(p.shape) + " but " + std::to_string(p.value.size()) + " values");
    const auto it = std::ranges::find_if(ckpt.tensors, [&](const CheckpointTensor& t) { return t.name == p.name; });
    if (it == ckpt.tensors.end()) {
      problems.push_back("checkpoint has no tensor for parameter " + detail::ckpt::quote_name(p.name));
      continue;
    }
    index[i] = std::size_t(it - ckpt.tensors.begin());
    if (it->shape != p.shape)
      problems.push_back("tensor " + detail::ckpt::quote_name(p.name) + " is " + detail::ckpt::shape_text(it->shape) +
                         " in the checkpoint, the model's parameter is " + detail::ckpt::shape_text(p.shape));
    else if (it->dtype != dtype_of<S>() && !allow_conversion)
      problems.push_back(std::string("tensor ") + detail::ckpt::quote_name(p.name) + " is " + dtype_name(it->dtype) +
                         " in the checkpoint, the model is " + dtype_name(dtype_of<S>()) + " (allow conversion to convert)");
  }
  if (!problems.empty()) {
    std::string msg = where + std::to_string(problems.size()) + " mismatch" + (problems.size() > 1 ? "es" : "") + ": ";
    const std::size_t shown = std::min<std::size_t>(problems.size(), 8);
    for (std::size_t i = 0; i < shown; ++i) msg += (i ? "; " : "") + problems[i];
    if (shown < problems.size()) msg += "; and " + std::to_string(problems.size() - shown) + " more";
    throw FormatError(msg);
  }
  std::vector<bool> used(ckpt.tensors.size(), false);
  for (std::size_t i = 0; i < params.size(); ++i) {
    ckpt.tensors[index[i]].copy_to(params[i].value, allow_conversion);
    used[index[i]] = true;
  }
  Checkpoint rest;
  rest.config = std::move(ckpt.config);
  for (std::size_t i = 0; i < ckpt.tensors.size(); ++i)
    if (!used[i]) rest.tensors.push_back(std::move(ckpt.tensors[i]));
  return rest;
}

}  // namespace memoryformer

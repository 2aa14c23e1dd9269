// SPDX-License-Identifier: MIT
// Atomic file replacement (POSIX): write to "<target>.tmp.<16 hex digits>" in the same directory, fsync, rename over
// the target; and removal of the temporary files that an interrupted earlier write of the same target left behind.
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "../detail/xxhash.hpp"
#include "../error.hpp"

namespace memoryformer::detail::ckpt {

/// Owns a POSIX file descriptor.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd = -1) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept {
    if (this != &other) {
      close();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  ~FileDescriptor() { close(); }
  int get() const { return fd_; }
  /// Closes now; returns the errno of a failed close (0 on success), since close can report a failed write.
  int close() {
    if (fd_ < 0) return 0;
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc == 0 ? 0 : errno;
  }

 private:
  int fd_;
};

inline std::string errno_text(int err) { return std::generic_category().message(err); }

/// Buffered writer to a file descriptor; throws IoError with errno text.
class FileSink {
 public:
  FileSink(int fd, const std::string& what) : fd_(fd), what_(what) { buffer_.reserve(buffer_capacity); }
  void operator()(const void* data, std::size_t n) {
    const auto* p = static_cast<const std::byte*>(data);
    if (buffer_.size() + n > buffer_capacity) flush();
    if (n >= buffer_capacity) {
      write_all(p, n);
    } else {
      buffer_.insert(buffer_.end(), p, p + n);
    }
  }
  void flush() {
    write_all(buffer_.data(), buffer_.size());
    buffer_.clear();
  }

 private:
  static constexpr std::size_t buffer_capacity = std::size_t(1) << 20;
  void write_all(const std::byte* p, std::size_t n) {
    while (n > 0) {
      const ssize_t put = ::write(fd_, p, std::min<std::size_t>(n, std::size_t(1) << 30));
      if (put < 0 && errno == EINTR) continue;
      if (put < 0) throw IoError(what_ + ": " + errno_text(errno));
      p += put;
      n -= std::size_t(put);
    }
  }
  int fd_;
  const std::string& what_;
  std::vector<std::byte> buffer_;
};


/// Lower-case hex digits of v, 16 of them.
inline std::string hex16(std::uint64_t v) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 0; i < 16; ++i) s[std::size_t(15 - i)] = digits[(v >> (4 * i)) & 0xF];
  return s;
}

/// A name for the temporary file that no other saver in this or another process picks at the same time.
inline std::string temporary_suffix(std::uint64_t attempt) {
  static std::atomic<std::uint64_t> counter{0};
  const std::uint64_t parts[5] = {std::uint64_t(::getpid()), counter.fetch_add(1, std::memory_order_relaxed),
                                  std::uint64_t(std::chrono::steady_clock::now().time_since_epoch().count()),
                                  std::uint64_t(reinterpret_cast<std::uintptr_t>(&attempt)), attempt};
  return ".tmp." + hex16(xxh3_64(parts, sizeof(parts)));
}

/// How old an unlocked temporary file must be before remove_stale_temporaries deletes it.
inline constexpr std::chrono::seconds stale_temporary_age{60};

/// True when `name` is "<base>.tmp.<16 lower-case hex digits>", the names temporary_suffix makes for `base`.
inline bool is_temporary_of(std::string_view name, std::string_view base) {
  constexpr std::string_view mid = ".tmp.";
  if (name.size() != base.size() + mid.size() + 16 || !name.starts_with(base) ||
      name.substr(base.size(), mid.size()) != mid)
    return false;
  return std::ranges::all_of(name.substr(base.size() + mid.size()),
                             [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

/**
 * Removes the temporary files an interrupted write of `target` left behind. A candidate is a regular file (not a
 * symlink) in target's directory named "<target's file name>.tmp.<16 hex digits>". It is removed only when both
 * hold: no process holds its lock (every writer keeps an exclusive flock on its temporary file until it is
 * renamed or removed, and the kernel drops the lock when the writer dies), and it was last modified more than
 * stale_temporary_age ago (so a file another writer has just created, and not yet locked, is never touched).
 * Best effort: errors are ignored, since a leftover file must not make a save fail. Returns the number removed.
 */
inline std::size_t remove_stale_temporaries(const std::filesystem::path& target) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path dir = target.parent_path();
  if (dir.empty()) dir = ".";
  const std::string base = target.filename().string();
  if (base.empty()) return 0;
  std::size_t removed = 0;
  fs::directory_iterator it(dir, ec);
  if (ec) return 0;
  const auto now = fs::file_time_type::clock::now();
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) break;
    const fs::path p = it->path();
    if (!is_temporary_of(p.filename().string(), base)) continue;
    std::error_code e2;
    if (!fs::is_regular_file(fs::symlink_status(p, e2)) || e2) continue;
    const auto mtime = fs::last_write_time(p, e2);
    if (e2 || now - mtime < stale_temporary_age) continue;
    FileDescriptor fd(::open(p.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (fd.get() < 0) continue;
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) continue;  // a live writer holds it
    if (::unlink(p.c_str()) == 0) ++removed;
  }
  return removed;
}

/**
 * Writes `target` atomically: `write(FileSink&)` fills "<target>.tmp.<random>" (created exclusively, mode
 * 0666 & ~umask, locked with flock while it exists), which is fsynced and renamed over `target`; the directory is
 * then fsynced (best effort). Stale temporaries of earlier interrupted writes of `target` are removed first (see
 * remove_stale_temporaries). On any failure the temporary file is removed and IoError names the paths
 * and the system's error text; `what` prefixes the messages (e.g. "save_checkpoint").
 */
template <class Write>
void write_file_atomically(const std::filesystem::path& path, const std::string& what_prefix, Write&& write) {
  remove_stale_temporaries(path);
  const std::string target = path.string();
  std::string tmp;
  FileDescriptor fd;
  for (std::uint64_t attempt = 0;; ++attempt) {
    tmp = target + temporary_suffix(attempt);
    fd = FileDescriptor(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
    if (fd.get() >= 0) break;
    const int err = errno;
    if (err != EEXIST || attempt >= 100)
      throw IoError(what_prefix + ": cannot create a temporary file next to '" + target + "' ('" + tmp +
                    "'): " + errno_text(err));
  }
  try {
    // The lock tells remove_stale_temporaries of other writers that this file is alive.
    (void)::flock(fd.get(), LOCK_EX | LOCK_NB);
    const std::string what = what_prefix + ": writing '" + target + "' (temporary file '" + tmp + "') failed";
    FileSink sink(fd.get(), what);
    write(sink);
    sink.flush();
    // fsync before rename: otherwise a crash can leave the new name pointing at a file whose data never reached disk.
    while (::fsync(fd.get()) != 0) {
      if (errno != EINTR) throw IoError(what + ": fsync: " + errno_text(errno));
    }
    // Closing drops the lock; the file was modified just now, so the age rule still protects it until the rename.
    if (const int err = fd.close(); err != 0) throw IoError(what + ": close: " + errno_text(err));
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec)
      throw IoError(what_prefix + ": cannot rename '" + tmp + "' to '" + target + "': " + ec.message());
  } catch (...) {
    fd.close();
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable. Best effort: some filesystems refuse fsync on directories, and the new file is
  // already complete under its final name.
  std::filesystem::path dir = path.parent_path();
  if (dir.empty()) dir = ".";
  FileDescriptor dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dfd.get() >= 0) (void)::fsync(dfd.get());
}

}  // namespace memoryformer::detail::ckpt

namespace memoryformer {

/**
 * @brief Replaces the file at `path` with `contents`, atomically: readers see the old file or the whole new one,
 *        never a part (a temporary file next to it, fsynced, then renamed over it). A symlink at `path` is replaced
 *        by the file, not followed; a target that is no regular file (a device, a pipe) wants a plain stream.
 * @throws IoError naming the path and the system's error text; the old file, if any, is then unchanged.
 */
inline void write_file_atomically(const std::filesystem::path& path, std::string_view contents) {
  detail::ckpt::write_file_atomically(path, "write_file_atomically", [&](detail::ckpt::FileSink& sink) {
    sink(contents.data(), contents.size());
  });
}

}  // namespace memoryformer

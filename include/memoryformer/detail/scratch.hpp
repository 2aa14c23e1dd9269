// SPDX-License-Identifier: MIT
// Memory for the Memory Layer kernels (design §1.3 storage, §1.5 lookup): huge-page-friendly aligned blocks for
// packed tables, and per-thread grow-only scratch so that a const, thread-safe forward allocates nothing per call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace memoryformer::detail {

inline constexpr std::size_t huge_page_bytes = std::size_t(2) << 20;

/// Zeroed block of `bytes` bytes, 64-byte aligned; blocks of ≥ 256 KB are rounded up to whole 2 MB pages, 2 MB
/// aligned and (on Linux) advised as transparent huge pages: the kernels read them at random, and with 4 KB pages
/// nearly every such read would also miss the first-level TLB. Free with std::free.
inline void* allocate_tables(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  const bool huge = bytes >= (std::size_t(256) << 10);
  const std::size_t align = huge ? huge_page_bytes : 64;
  const std::size_t rounded = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, rounded);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) (void)madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure just means 4 KB pages
#endif
  std::memset(p, 0, rounded);
  return p;
}

/// Asks the kernel to back the 2 MB-aligned interior of [p, p + bytes) with huge pages, collapsing pages already
/// touched (MADV_COLLAPSE, Linux ≥ 6.1; an older kernel just declines). The tables are read at random, and with
/// 4 KB pages almost every row of a large decode stack would also miss the TLB.
/// Advice only: nothing changes if the kernel refuses.
inline void advise_huge_pages(void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = (reinterpret_cast<std::uintptr_t>(p) + huge_page_bytes - 1) / huge_page_bytes * huge_page_bytes;
  const auto end = (reinterpret_cast<std::uintptr_t>(p) + bytes) / huge_page_bytes * huge_page_bytes;
  if (end <= begin) return;
  void* start = reinterpret_cast<void*>(begin);
  (void)madvise(start, end - begin, MADV_HUGEPAGE);
  constexpr int madv_collapse = 25;  // MADV_COLLAPSE, not in every libc's headers yet
  (void)madvise(start, end - begin, madv_collapse);
#else
  (void)p;
  (void)bytes;
#endif
}

/// An owning, aligned, zero-initialised byte block from allocate_tables (copyable and movable).
class TableBlock {
 public:
  TableBlock() = default;
  explicit TableBlock(std::size_t bytes) : data_(static_cast<std::byte*>(allocate_tables(bytes))), bytes_(bytes) {}
  TableBlock(const TableBlock& other) : TableBlock(other.bytes_) {
    if (bytes_ != 0) std::memcpy(data_, other.data_, bytes_);
  }
  TableBlock& operator=(const TableBlock& other) {
    if (this != &other) {
      TableBlock copy(other);
      swap(copy);
    }
    return *this;
  }
  TableBlock(TableBlock&& other) noexcept { swap(other); }
  TableBlock& operator=(TableBlock&& other) noexcept {
    swap(other);
    return *this;
  }
  ~TableBlock() { std::free(data_); }

  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  std::size_t size() const { return bytes_; }
  void swap(TableBlock& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
  }

 private:
  std::byte* data_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Grow-only buffer; contents are undefined after growing.
class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { std::free(data_); }

  std::byte* get(std::size_t bytes) {
    if (bytes > bytes_) {
      std::free(data_);
      data_ = nullptr;
      bytes_ = 0;
      data_ = static_cast<std::byte*>(allocate_tables(bytes));
      bytes_ = bytes;
    }
    return data_;
  }

 private:
  std::byte* data_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Per-thread scratch, one buffer per Slot: reused across calls (so the cache stays warm and nothing is allocated
/// in the steady state) and private to the calling thread (so concurrent const forwards do not share it).
template <int Slot, class T>
T* thread_scratch(std::size_t count) {
  static thread_local ScratchBuffer buffer;
  return reinterpret_cast<T*>(buffer.get(count * sizeof(T)));
}

}  // namespace memoryformer::detail

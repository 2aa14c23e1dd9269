// SPDX-License-Identifier: MIT
// The machine description every benchmark result carries: CPU model (/proc/cpuinfo), caches
// (sysfs), compiler, flags, ISA and commit. memoryformer_bench writes it as Google Benchmark context,
// memoryformer_report prints it in its header; both call the functions below, nothing else describes the machine.
#pragma once

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <memoryformer/detail/simd.hpp>
#include <memoryformer/types.hpp>

namespace mfbench {

using memoryformer::Index;

/// One cache level as the kernel describes it in /sys/devices/system/cpu/cpu0/cache/index*/.
struct CacheLevel {
  int level = 0;
  std::string type;  // Data, Instruction, Unified
  double bytes = 0;
};

inline std::string read_first_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (in) std::getline(in, line);
  return line;
}

/// CPU model name from /proc/cpuinfo ("unknown" if absent).
inline std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        auto v = line.substr(colon + 1);
        v.erase(0, v.find_first_not_of(" \t"));
        return v;
      }
    }
  }
  return "unknown";
}

/// Number of "processor" entries in /proc/cpuinfo (logical CPUs visible to us).
inline int logical_cpu_count() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  int n = 0;
  while (std::getline(in, line))
    if (line.rfind("processor", 0) == 0) ++n;
  return n;
}

/// Caches of cpu0 ("48K", "2048K", "491520K" → bytes). Empty when sysfs is not available.
inline std::vector<CacheLevel> read_caches() {
  std::vector<CacheLevel> out;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    const std::string level = read_first_line(dir + "level");
    if (level.empty()) break;
    CacheLevel c;
    c.level = std::atoi(level.c_str());
    c.type = read_first_line(dir + "type");
    std::string size = read_first_line(dir + "size");
    double mult = 1;
    if (!size.empty() && (size.back() == 'K' || size.back() == 'k')) mult = 1024, size.pop_back();
    else if (!size.empty() && size.back() == 'M') mult = 1024.0 * 1024, size.pop_back();
    else if (!size.empty() && size.back() == 'G') mult = 1024.0 * 1024 * 1024, size.pop_back();
    c.bytes = std::atof(size.c_str()) * mult;
    out.push_back(c);
  }
  return out;
}

/// Size in bytes of the data/unified cache of `level` (0 if unknown).
inline double cache_bytes(const std::vector<CacheLevel>& caches, int level) {
  for (const auto& c : caches)
    if (c.level == level && c.type != "Instruction") return c.bytes;
  return 0;
}

inline std::string compiler_string() {
  std::string s;
#if defined(MEMORYFORMER_BENCH_COMPILER)
  s = MEMORYFORMER_BENCH_COMPILER;  // from bench/CMakeLists.txt: "<id> <version>"
#elif defined(__clang__)
  s = "clang " __clang_version__;
#elif defined(__GNUC__)
  s = "gcc " __VERSION__;
#else
  s = "unknown";
#endif
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

/// Compiler flags of the benchmark build, when the build system passes them (bench/CMakeLists.txt does).
inline std::string cxx_flags_string() {
#if defined(MEMORYFORMER_BENCH_CXX_FLAGS)
  return MEMORYFORMER_BENCH_CXX_FLAGS;
#else
  return "unknown (built without bench/CMakeLists.txt)";
#endif
}

/// gnuplot to call: the one CMake found at configure time, else whatever "gnuplot" is on PATH ("" if none).
inline std::string gnuplot_command() {
#if defined(MEMORYFORMER_GNUPLOT_EXECUTABLE)
  const std::string configured = MEMORYFORMER_GNUPLOT_EXECUTABLE;
  if (!configured.empty() && std::ifstream(configured).good()) return configured;
#endif
  return std::system("command -v gnuplot >/dev/null 2>&1") == 0 ? "gnuplot" : "";
}

/// The SIMD flags this translation unit was compiled with, and the kernel path the layers use.
inline std::string isa_string() {
  std::string s;
#if defined(__AVX512F__)
  s += "AVX512F ";
#endif
#if defined(__AVX2__)
  s += "AVX2 ";
#endif
#if defined(__FMA__)
  s += "FMA ";
#endif
  if (s.empty()) s = "(no AVX) ";
#if defined(MEMORYFORMER_BENCH_ISA)
  s += "(build ISA " MEMORYFORMER_BENCH_ISA ") ";
#endif
  s += "-> kernels: ";
  s += std::string(memoryformer::isa_name(memoryformer::best_isa()));
  return s;
}

inline std::string git_sha() {
#if defined(MEMORYFORMER_GIT_SHA)
#define MFBENCH_STR2(x) #x
#define MFBENCH_STR(x) MFBENCH_STR2(x)
  // Accept both -DMEMORYFORMER_GIT_SHA="\"abc\"" and -DMEMORYFORMER_GIT_SHA=abc.
  std::string s = MFBENCH_STR(MEMORYFORMER_GIT_SHA);
  if (s.size() >= 2 && s.front() == '"' && s.back() == '"') s = s.substr(1, s.size() - 2);
  return s.empty() ? "unknown" : s;
#undef MFBENCH_STR
#undef MFBENCH_STR2
#else
  return "unknown";
#endif
}


/// Context keys every benchmark JSON carries: CPU, compiler, ISA, git SHA, caches, thread count.
inline void add_benchmark_context() {
  benchmark::AddCustomContext("cpu_model", cpu_model_name());
  benchmark::AddCustomContext("compiler", compiler_string());
  benchmark::AddCustomContext("cxx_flags", cxx_flags_string());
  benchmark::AddCustomContext("isa", isa_string());
  benchmark::AddCustomContext("git_sha", git_sha());
  benchmark::AddCustomContext("eigen", std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) +
                                           "." + std::to_string(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("threads", "1 (Eigen::setNbThreads(1))");
  const auto caches = read_caches();
  for (int level = 1; level <= 3; ++level) {
    const double b = cache_bytes(caches, level);
    if (b > 0) benchmark::AddCustomContext("cache_L" + std::to_string(level) + "_bytes", std::to_string(Index(b)));
  }
}

/// The report's header lines: "CPU: … | compiler: … | ISA: … | git: …" and "flags: …".
inline std::string machine_header() {
  return "CPU: " + cpu_model_name() + " | compiler: " + compiler_string() + " | ISA: " + isa_string() +
         " | git: " + git_sha() + "\nflags: " + cxx_flags_string() + "\n";
}

}  // namespace mfbench

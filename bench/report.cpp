// SPDX-License-Identifier: MIT
// memoryformer_report: the paper's FLOP tables recomputed by the library (design §2, §4: Table 1, Table 5,
// Figure 1), the scale model of data- and table-parallel training (distributed/scaling.hpp), and measured Memory
// Layer / dense and MemoryFormer block / Transformer block time ratios on this machine, as text or JSON.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <memoryformer/distributed/scaling.hpp>
#include <memoryformer/io/atomic_file.hpp>

#include "bench_model.hpp"
#include "bench_support.hpp"

namespace fs = std::filesystem;
namespace mf = memoryformer;
using mfbench::Index;
using mfbench::LayerShape;

namespace {

// ------------------------------------------------------------------------------------------------ options

struct Options {
  bool help = false;
  bool full = false;
  bool smoke = false;
  bool json = false;
  bool measure = true;
  std::string out_dir;  // empty: current directory (redirected if that is the source tree)
  double max_table_mb = -1;
  double min_time = -1;
  int repetitions = -1;
  bool peak_memory = true;
  std::vector<std::string> only;  // sections (scale, layer, block, model); empty: all
  double scale_tokens = 16384;    // scale section: tokens per optimizer step over all ranks
  double scale_seq = 2048;        // scale section: sequence length (attention work per token)
  double scale_rate = mf::default_multiply_adds_per_second;  // scale section: multiply-adds/s per rank
  bool section(const std::string& name) const {
    return only.empty() || std::find(only.begin(), only.end(), name) != only.end();
  }
  /// True when a section that runs benchmarks is selected.
  bool benchmarks() const { return section("layer") || section("block") || section("model"); }
};

void print_help() {
  std::cout <<
      R"(memoryformer_report: FLOPs of the paper recomputed by the library, and measured Memory Layer vs dense times.

Usage: memoryformer_report [options]
  (default)          Table 1 and Table 5 recomputed, Figure 1 series (CSV, PNG with gnuplot), the scale model
                     of data- and table-parallel training (bytes, state and projected step time per rank for
                     R = 1..64; arithmetic only), and measured
                     memory/dense time ratios for d in {512, 1024}, tau in {4, 8}, N in {1, 16, 2048} plus
                     d = 256, tau = 4 (tables fit L2) and d = 2048, tau = 8 (N = 1, 2048); 3 repetitions each
                     (median); then MemoryFormerBlock vs TransformerBlock (tau = 8, heads = d/64): prefill at
                     s = 1024, d in {512, 768}, and one-token decode after 1023 cached tokens at d = 512 through
                     stacks deep enough that their weights exceed the L3 size; then whole models:
                     MemoryFormer-tiny's shape against Pythia-70M's (prefill s = 1024 and 2048, decode at
                     context 1024, training seq 256 x batch 8; 1 thread, and 2 in OpenMP builds), paired.
  --full             the whole grid d in {256, 512, 1024, 2048} x tau in {4, 6, 8, 10} x N in {1, 16, 2048}
                     (tens of minutes; shapes whose fp32 tables + gradients exceed --max-table-mb are skipped);
                     blocks at s in {1024, 2048} x d in {512, 768, 1024}, prefill and decode (up to ~6 GB RAM)
  --smoke            tiny shapes, a few seconds (for tests of this program; --smoke --only model is the
                     whole-model section's test)
  --no-measure       only the analytic tables (no timing)
  --json             print one JSON array on stdout instead of the text report (progress goes to stderr)
  --out DIR          directory for memoryformer_figure1.{csv,gp,png} and memoryformer_measured.csv
                     (default: the current directory; if that is the source tree, a temp directory instead)
  --max-table-mb MB  cap on fp32 tables + gradients per Memory Layer (1 MB = 1e6 bytes)
  --min-time SEC     minimum time per benchmark (default 0.1)
  --repetitions N    repetitions per benchmark, the median is used (default 3, smoke 1)
  --only LIST        only these sections, comma-separated: scale, layer, block, model (default: all; the
                     paper's analytic tables are always printed)
  --scale-tokens T   scale section: tokens per optimizer step over all ranks (default 16384)
  --scale-seq S      scale section: sequence length, which sets the attention work per token (default 2048)
  --scale-rate X     scale section: multiply-adds per second of one rank (default 5e10)
  --no-peak          whole models: skip the peak-memory child processes
  --help             this text

Conventions: FLOPs in the paper's convention count one multiply-add as ONE FLOP and leave out softmax, norms,
rotary and hashing (design §4). "literal" counts are the multiply-adds of the block this library builds.
Memory is in MB = 1e6 bytes (that is what reproduces the paper's Table 5).
Times are single-thread CPU times (Eigen::setNbThreads(1)). The scale section is arithmetic only (projections,
nothing is measured).
)";
}

bool parse_args(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) -> std::optional<std::string> {
      const std::string f = flag;
      if (a == f) {
        if (i + 1 >= argc) {
          std::cerr << "memoryformer_report: " << f << " needs a value\n";
          return std::nullopt;
        }
        return std::string(argv[++i]);
      }
      if (a.rfind(f + "=", 0) == 0) return a.substr(f.size() + 1);
      return std::nullopt;
    };
    if (a == "--help" || a == "-h") {
      o.help = true;
    } else if (a == "--full") {
      o.full = true;
    } else if (a == "--smoke") {
      o.smoke = true;
    } else if (a == "--json") {
      o.json = true;
    } else if (a == "--no-peak") {
      o.peak_memory = false;
    } else if (a == "--only" || a.rfind("--only=", 0) == 0) {
      auto v = value("--only");
      if (!v) return false;
      std::stringstream list(*v);
      for (std::string item; std::getline(list, item, ',');) {
        if (item != "scale" && item != "layer" && item != "block" && item != "model") {
          std::cerr << "memoryformer_report: --only takes scale, layer, block, model; got '" << item << "'\n";
          return false;
        }
        o.only.push_back(item);
      }
    } else if (a == "--scale-tokens" || a.rfind("--scale-tokens=", 0) == 0 || a == "--scale-seq" ||
               a.rfind("--scale-seq=", 0) == 0 || a == "--scale-rate" || a.rfind("--scale-rate=", 0) == 0) {
      const std::string flag = a.substr(0, a.find('='));
      auto v = value(flag.c_str());
      if (!v) return false;
      char* end = nullptr;
      const double x = std::strtod(v->c_str(), &end);
      const double least = flag == "--scale-rate" ? 0.0 : 1.0;
      if (end == v->c_str() || *end != '\0' || !std::isfinite(x) || x < least || (least == 0.0 && x == 0.0)) {
        std::cerr << "memoryformer_report: " << flag << " takes a finite number "
                  << (least == 0.0 ? "> 0" : ">= 1") << "; got '" << *v << "'\n";
        return false;
      }
      (flag == "--scale-tokens" ? o.scale_tokens : flag == "--scale-seq" ? o.scale_seq : o.scale_rate) = x;
    } else if (a == "--no-measure") {
      o.measure = false;
    } else if (a == "--out" || a.rfind("--out=", 0) == 0) {
      auto v = value("--out");
      if (!v) return false;
      o.out_dir = *v;
    } else if (a == "--max-table-mb" || a.rfind("--max-table-mb=", 0) == 0) {
      auto v = value("--max-table-mb");
      if (!v) return false;
      o.max_table_mb = std::atof(v->c_str());
    } else if (a == "--min-time" || a.rfind("--min-time=", 0) == 0) {
      auto v = value("--min-time");
      if (!v) return false;
      o.min_time = std::atof(v->c_str());
    } else if (a == "--repetitions" || a.rfind("--repetitions=", 0) == 0) {
      auto v = value("--repetitions");
      if (!v) return false;
      o.repetitions = std::atoi(v->c_str());
    } else {
      std::cerr << "memoryformer_report: unknown argument '" << a << "' (see --help)\n";
      return false;
    }
  }
  if (o.full && o.smoke) {
    std::cerr << "memoryformer_report: --full and --smoke exclude each other\n";
    return false;
  }
  return true;
}

/// The current directory, unless it is the library's source tree (or a source subdirectory), which the report
/// must not litter: then a directory under the system temp dir.
fs::path choose_out_dir(const Options& o, std::string& note) {
  if (!o.out_dir.empty()) return fs::path(o.out_dir);
  const fs::path cwd = fs::current_path();
  auto is_root = [](const fs::path& p) {
    std::error_code ec;
    return fs::exists(p / "include" / "memoryformer" / "flops.hpp", ec) && fs::exists(p / "bench" / "report.cpp", ec);
  };
  bool in_source = is_root(cwd);
  if (!in_source && cwd.has_parent_path() && is_root(cwd.parent_path())) {
    const std::string leaf = cwd.filename().string();
    in_source = leaf.rfind("build", 0) != 0 && leaf.rfind("out", 0) != 0;
  }
  if (!in_source) return cwd;
  const fs::path tmp = fs::temp_directory_path() / "memoryformer_report";
  note = "the current directory is the source tree; writing to " + tmp.string() + " instead (use --out DIR)";
  return tmp;
}

// ------------------------------------------------------------------------------------------------ formatting

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}
std::string pad(std::string s, size_t w, bool right = true) {
  if (s.size() >= w) return s;
  return right ? std::string(w - s.size(), ' ') + s : s + std::string(w - s.size(), ' ');
}
std::string g1(double flops) { return fmt("%.1f", flops / 1e9); }  // as the paper prints: G, one decimal
std::string mb(double bytes) { return fmt("%.1f", bytes / 1e6); }
std::string human_bytes(double b) {
  if (b >= 1e9) return fmt("%.2f GB", b / 1e9);
  if (b >= 1e6) return fmt("%.1f MB", b / 1e6);
  if (b >= 1e3) return fmt("%.1f KB", b / 1e3);
  return fmt("%.0f B", b);
}

/// JSON number, or null for NaN/Inf (JSON has no NaN).
std::string jnum(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}
std::string jstr(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

/// One JSON object built field by field, in insertion order.
class JsonObject {
 public:
  JsonObject& num(const std::string& k, double v) { return raw(k, jnum(v)); }
  /// A measured field: left out when it was not measured (NaN).
  JsonObject& measured(const std::string& k, double v) { return std::isfinite(v) ? num(k, v) : *this; }
  JsonObject& str(const std::string& k, const std::string& v) { return raw(k, jstr(v)); }
  JsonObject& boolean(const std::string& k, bool v) { return raw(k, v ? "true" : "false"); }
  JsonObject& raw(const std::string& k, const std::string& v) {
    fields_.emplace_back(k, v);
    return *this;
  }
  std::string dump() const {
    std::string s = "{";
    for (size_t i = 0; i < fields_.size(); ++i) s += (i ? ", " : "") + jstr(fields_[i].first) + ": " + fields_[i].second;
    return s + "}";
  }

 private:
  std::vector<std::pair<std::string, std::string>> fields_;
};

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ------------------------------------------------------------------------------------------------ Table 1

/// FLOPs the paper prints in Table 1 (G, per block, s = 2048), copied from the paper's Table 1.
struct PrintedFlops {
  double no_attn = kNaN, total = kNaN;
};
// The paper's Table 1 as printed (G FLOPs of one block at s = 2048). Its MF-small row (1.0 / 7.4) is 0.1 G above
// what its own formula 6Ksd + 2s²d gives with K = 96 (0.906 / 7.35): the report shows both, it does not adjust.
PrintedFlops paper_printed(std::string_view model) {
  if (model == "Pythia-70M") return {6.4, 10.7};
  if (model == "MemoryFormer-tiny") return {0.4, 4.7};
  if (model == "Pythia-160M") return {14.5, 20.9};
  if (model == "MemoryFormer-small") return {1.0, 7.4};
  if (model == "Pythia-410M") return {25.8, 34.4};
  if (model == "MemoryFormer-base") return {1.6, 10.2};
  return {};
}

void table1(std::ostream& os, std::vector<JsonObject>& json) {
  constexpr double s = 2048;
  os << "== Table 1 of the paper: inference FLOPs of ONE block at s = 2048 (paper convention, G) ==\n"
     << "   (the paper's caption: \"Inference FLOPs are measured for one block with sequence length of 2048\")\n\n";
  os << pad("model", 20, false) << pad("layers", 7) << pad("d", 6) << pad("K", 5) << pad("w/o attn", 10)
     << pad("total", 8) << pad("paper w/o", 11) << pad("paper tot", 10) << pad("literal", 9) << pad("model tot", 11)
     << pad("tables fp16", 13) << "\n";
  for (const auto& m : mf::paper_table1_models) {
    const double no_attn = mf::paper_model_block_flops(m, s, false);
    const double total = mf::paper_model_block_flops(m, s, true);
    const double k = m.memoryformer ? double(m.d / m.tau) : 0.0;
    const auto printed = paper_printed(m.name);
    double literal = kNaN, storage = kNaN;
    if (m.memoryformer) {
      const mf::MemoryFormerBlockShape shape{.d = double(m.d), .heads = 1, .tau = m.tau, .expand_bits = 2};
      literal = mf::memoryformer_block_flops_literal(s, shape).total;
      storage = mf::memoryformer_block_table_bytes(shape, mf::StorageType::F16);
    } else {
      storage = mf::dense_block_parameter_bytes(m.d, mf::StorageType::F16);
    }
    const double model_total = m.layers * total;
    os << pad(std::string(m.name), 20, false) << pad(std::to_string(m.layers), 7) << pad(std::to_string(m.d), 6)
       << pad(m.memoryformer ? std::to_string(m.d / m.tau) : "-", 5) << pad(g1(no_attn), 10) << pad(g1(total), 8)
       << pad(std::isfinite(printed.no_attn) ? fmt("%.1f", printed.no_attn) : "n/a", 11)
       << pad(std::isfinite(printed.total) ? fmt("%.1f", printed.total) : "n/a", 10)
       << pad(m.memoryformer ? g1(literal) : "=", 9) << pad(g1(model_total), 11)
       << pad(mb(storage) + " MB", 13) << "\n";
    json.push_back(JsonObject()
                       .str("kind", "table1")
                       .str("model", std::string(m.name))
                       .num("layers", m.layers)
                       .num("d", m.d)
                       .num("s", s)
                       .num("tau", m.memoryformer ? m.tau : 0)
                       .num("K", k)
                       .num("flops_paper_no_attn", no_attn)
                       .num("flops_paper_total", total)
                       .num("flops_paper_model_total", model_total)
                       .num("flops_literal_total", m.memoryformer ? literal : total)
                       .num("paper_printed_no_attn_G", printed.no_attn)
                       .num("paper_printed_total_G", printed.total)
                       .num(m.memoryformer ? "table_bytes_fp16_per_block" : "parameter_bytes_fp16_per_block", storage));
  }
  os << "\n   w/o attn, total: paper convention per block (Transformer 12sd^2 + 2s^2d; MemoryFormer 6Ksd + 2s^2d).\n"
        "   paper w/o, paper tot: the values the paper's Table 1 prints; its MF-small row (1.0 / 7.4) is 0.1 G above\n"
        "   its own formula 6Ksd + 2s^2d with K = 96 (0.9 / 7.3), and this table does not adjust either.\n"
        "   literal: multiply-adds of the block this library builds (QKV 3sKd + ML1 sK*K(tau+e) + ML2 sKd + 2s^2d,\n"
        "   e = 2, hashing not included). model tot: layers x block total (paper convention).\n"
        "   tables fp16: MemoryFormer Q/K/V + Memory Block tables per block; Pythia: block parameters (12d^2+13d).\n\n";
}

void table5(std::ostream& os) {
  os << "== Table 5 of the paper: Memory Block table memory, d = 512, tau = 8, fp16 ==\n";
  const double printed[4] = {33.6, 52.4, 88.1, 157.3};
  os << pad("e", 3) << pad("library MB", 12) << pad("paper MB", 10) << pad("MiB", 8) << "\n";
  for (int e = 0; e < 4; ++e) {
    const double b = mf::memory_block_table_bytes(512, 8, e, mf::StorageType::F16);
    os << pad(std::to_string(e), 3) << pad(fmt("%.1f", mf::megabytes(b)), 12) << pad(fmt("%.1f", printed[e]), 10)
       << pad(fmt("%.1f", mf::mebibytes(b)), 8) << "\n";

  }
  os << "   formula: ML1 K*2^tau*K(tau+e) + ML2 K*2^(tau+e)*d values x 2 bytes; MB = 1e6 bytes reproduces the paper.\n\n";
}

// ------------------------------------------------------------------------------------------------ Figure 1

void figure1(std::ostream& os, const fs::path& out_dir, std::vector<JsonObject>& json) {
  const fs::path csv = out_dir / "memoryformer_figure1.csv";
  std::ostringstream f;
  f << "s,d,K,transformer_paper,memoryformer_paper,ratio_paper,memoryformer_literal,ratio_literal\n";
  for (double s : {1024.0, 2048.0}) {
    for (int d = 512; d <= 3072; d += 512) {
      const double t = mf::transformer_block_flops_paper(s, d);
      const double m = mf::memoryformer_block_flops_paper(s, d, 8);
      const double lit = mf::memoryformer_block_flops_literal(s, {.d = double(d), .heads = 1, .tau = 8}).total;
      f << s << ',' << d << ',' << d / 8 << ',' << jnum(t) << ',' << jnum(m) << ',' << jnum(m / t) << ','
        << jnum(lit) << ',' << jnum(lit / t) << '\n';
      for (int mf_row = 0; mf_row < 2; ++mf_row)
        json.push_back(JsonObject()
                           .str("kind", "figure1")
                           .str("model", mf_row ? "MemoryFormer block" : "Transformer block")
                           .num("d", d)
                           .num("s", s)
                           .num("tau", mf_row ? 8 : 0)
                           .num("K", mf_row ? d / 8 : 0)
                           .num("flops_paper_no_attn", mf_row ? mf::memoryformer_block_flops_paper_no_attention(s, d, 8)
                                                              : mf::transformer_block_flops_paper_no_attention(s, d))
                           .num("flops_paper_total", mf_row ? m : t)
                           .num("flops_literal_total", mf_row ? lit : t));
    }
  }
  try {
    mf::write_file_atomically(csv, f.str());
  } catch (const mf::IoError& e) {
    os << "== Figure 1: " << e.what() << " ==\n\n";
    return;
  }
  os << "== Figure 1 of the paper: FLOPs per block vs d (tau = 8), s in {1024, 2048} ==\n"
     << "   CSV: " << fs::absolute(csv).string() << "\n";
  const double r_paper = mf::memoryformer_block_flops_paper(2048, 2048, 8) / mf::transformer_block_flops_paper(2048, 2048);
  const double r_lit = mf::memoryformer_block_flops_literal(2048, {.d = 2048, .heads = 1, .tau = 8}).total /
                       mf::transformer_block_flops_paper(2048, 2048);
  os << "   at s = d = 2048: MemoryFormer / Transformer = " << fmt("%.4f", r_paper)
     << " with the paper's 6Ksd (= 11/56), " << fmt("%.4f", r_lit)
     << " with the literal count (e = 2); the paper says \"about 19%\".\n";

  // A PNG when gnuplot is available; the script is kept next to the CSV so the plot can be redone by hand.
  const fs::path gp = out_dir / "memoryformer_figure1.gp";
  const fs::path png = out_dir / "memoryformer_figure1.png";
  {
    std::ostringstream g;
    g << "set terminal pngcairo size 900,600\n"
      << "set output '" << png.string() << "'\n"
      << "set datafile separator ','\n"
      << "set title 'FLOPs per block (paper convention, tau = 8)'\n"
      << "set xlabel 'hidden size d'\nset ylabel 'GFLOPs per block'\nset key left top\nset grid\n"
      << "f = '" << csv.string() << "'\n"
      << "plot f every ::1 using ($1==1024?$2:1/0):($4/1e9) with linespoints lw 2 title 'Transformer, s=1024', \\\n"
      << "     f every ::1 using ($1==2048?$2:1/0):($4/1e9) with linespoints lw 2 title 'Transformer, s=2048', \\\n"
      << "     f every ::1 using ($1==1024?$2:1/0):($5/1e9) with linespoints lw 2 title 'MemoryFormer, s=1024', \\\n"
      << "     f every ::1 using ($1==2048?$2:1/0):($5/1e9) with linespoints lw 2 title 'MemoryFormer, s=2048', \\\n"
      << "     f every ::1 using ($1==2048?$2:1/0):($7/1e9) with lines dt 2 title 'MemoryFormer literal, s=2048'\n";
    try {
      mf::write_file_atomically(gp, g.str());
    } catch (const mf::IoError& e) {
      os << "   " << e.what() << ": no PNG\n\n";
      return;
    }
  }
  if (const std::string gnuplot = mfbench::gnuplot_command(); !gnuplot.empty()) {
    const std::string cmd = "'" + gnuplot + "' '" + gp.string() + "' 2>/dev/null";
    if (std::system(cmd.c_str()) == 0 && fs::exists(png))
      os << "   PNG: " << fs::absolute(png).string() << " (gnuplot script: " << gp.filename().string() << ")\n\n";
    else
      os << "   gnuplot failed; script left at " << fs::absolute(gp).string() << "\n\n";
  } else {
    os << "   gnuplot not on PATH: no PNG (script for later: " << fs::absolute(gp).string() << ")\n\n";
  }
}

// ------------------------------------------------------------------------------------------------ scale model

/// Seconds with three significant digits ("0.0123", "1.23", "123").
std::string seconds(double v) {
  if (v >= 100) return fmt("%.0f", v);
  if (v >= 1) return fmt("%.2f", v);
  return fmt("%.3g", v);
}

/// Per-rank exchange, model state and projected step time of data- and table-parallel training of the paper's
/// models (distributed/scaling.hpp), for R = 1 … 64. Arithmetic only.
void scale_section(std::ostream& os, const Options& opt, std::vector<JsonObject>& json) {
  constexpr int ranks[] = {1, 2, 4, 8, 16, 32, 64};
  constexpr double links_gbit[] = {10, 100};
  const double latency = mf::default_message_latency_seconds;
  os << "== Scale model: data- and table-parallel training, per rank and optimizer step (projection) ==\n"
     << "   T = " << fmt("%.0f", opt.scale_tokens) << " tokens per step over all ranks (--scale-tokens), s = "
     << fmt("%.0f", opt.scale_seq) << " (--scale-seq),\n"
     << "   float32, AdamW, byte vocabulary (256), e = 2, one micro-batch; compute at " << fmt("%.3g", opt.scale_rate)
     << " multiply-adds/s per rank\n   (--scale-rate); links: alpha = " << fmt("%.0f", latency * 1e6)
     << " us per message, beta = 10 or 100 Gbit/s.\n\n";
  os << pad("model / mode", 26, false) << pad("R", 4) << pad("sent/rank", 11) << pad("dense", 10) << pad("sparse", 10)
     << pad("tbl act", 10) << pad("msgs", 7) << pad("state/rank", 12) << pad("compute s", 11) << pad("step@10G s", 12)
     << pad("step@100G s", 13) << "\n";
  for (const auto& m : mf::paper_table1_models) {
    for (auto mode : {mf::ParallelMode::Data, mf::ParallelMode::Table}) {
      if (mode == mf::ParallelMode::Table && !m.memoryformer) continue;
      const std::string label = std::string(m.name) + (mode == mf::ParallelMode::Data ? " data" : " table");
      for (int r : ranks) {
        mf::ScaleInputs in;
        in.tokens_per_step = opt.scale_tokens;
        in.sequence_length = opt.scale_seq;
        in.multiply_adds_per_second = opt.scale_rate;
        in.ranks = r;
        in.mode = mode;
        const mf::ScaleEstimate e = mf::estimate_scale(m, in);
        double comm[2], step[2];
        for (int i = 0; i < 2; ++i) {
          comm[i] = mf::communication_seconds(e, mf::link_bytes_per_second(links_gbit[i]), latency);
          step[i] = mf::projected_step_seconds(e, mf::link_bytes_per_second(links_gbit[i]), latency);
        }
        const auto bytes = [](double b) { return b == 0 ? std::string("0") : human_bytes(b); };
        os << pad(r == 1 ? label : "", 26, false) << pad(std::to_string(r), 4) << pad(bytes(e.bytes_sent()), 11)
           << pad(bytes(e.dense_allreduce.bytes), 10) << pad(bytes(e.sparse_rows.bytes), 10)
           << pad(bytes(e.table_activations.bytes), 10) << pad(fmt("%.0f", e.messages()), 7)
           << pad(human_bytes(e.state_bytes()), 12) << pad(seconds(e.compute_seconds), 11)
           << pad(seconds(step[0]), 12) << pad(seconds(step[1]), 13) << "\n";
        json.push_back(JsonObject()
                           .str("kind", "scale")
                           .str("model", std::string(m.name))
                           .boolean("memoryformer", m.memoryformer)
                           .str("mode", std::string(mf::parallel_mode_name(mode)))
                           .num("ranks", r)
                           .num("layers", m.layers)
                           .num("d", m.d)
                           .num("tau", m.memoryformer ? m.tau : 0)
                           .num("tokens_per_step", in.tokens_per_step)
                           .num("sequence_length", in.sequence_length)
                           .num("bytes_per_value", in.bytes_per_value)
                           .num("dense_fallback_fraction", in.dense_fallback_fraction)
                           .num("parameters", e.parameters.total())
                           .num("table_parameters", e.parameters.tables)
                           .num("bytes_sent_per_rank", e.bytes_sent())
                           .num("dense_allreduce_bytes", e.dense_allreduce.bytes)
                           .num("sparse_rows_bytes", e.sparse_rows.bytes)
                           .num("table_activation_bytes", e.table_activations.bytes)
                           .num("messages_per_rank", e.messages())
                           .num("dense_fallbacks", e.dense_fallbacks)
                           .num("state_bytes_per_rank", e.state_bytes())
                           .num("table_state_bytes_per_rank", e.table_state_bytes)
                           .num("replicated_state_bytes", e.replicated_state_bytes)
                           .num("training_multiply_adds_per_rank", e.training_multiply_adds)
                           .num("multiply_adds_per_second", in.multiply_adds_per_second)
                           .num("compute_s", e.compute_seconds)
                           .num("message_latency_s", latency)
                           .num("communication_s_10gbit", comm[0])
                           .num("communication_s_100gbit", comm[1])
                           .num("step_s_10gbit", step[0])
                           .num("step_s_100gbit", step[1]));
      }
    }
  }
  os << "\n   sent/rank = dense + sparse + tbl act: bytes one rank sends per optimizer step. dense: one allreduce of\n"
        "   the dense weights, biases, norms and LM head (2(R-1)/R x values x 4 bytes, as an all-to-all of segments\n"
        "   + an allgather). sparse: per Memory Layer's tables (data mode) and the embedding, an allgather of the\n"
        "   touched row ids (8 bytes each) then an allreduce of the union of touched rows, or of the whole parameter\n"
        "   when the union exceeds half its rows (expected distinct rows of a 2^tau-row table hit by t tokens under a\n"
        "   uniform hash: M(1 - (1 - 1/M)^t)). tbl act (table mode, each rank owning K/R tables of every Memory\n"
        "   Layer): codes + scores to the owners and partial outputs back in the forward, codes + scores, dy and\n"
        "   score gradients in the backward. state/rank: parameters + gradients + two AdamW moments (16 bytes per\n"
        "   value), tables divided over the ranks in table mode (the rank with ceil(K/R) tables); activations not\n"
        "   included. compute: 3 x forward multiply-adds of the rank's T/R tokens (MemoryFormer blocks as built,\n"
        "   literal count; Transformer blocks 12d^2 + 2sd per token; LM head d x 256). step = compute + alpha x\n"
        "   msgs + sent/beta, with no overlap of compute and communication.\n\n";
}

// ------------------------------------------------------------------------------------------------ measuring

/// Median (and spread) of the repetitions of one benchmark.
struct Measurement {
  std::string name;
  int samples = 0;
  double cpu_us = kNaN;  // median CPU time per call, µs
  double real_us = kNaN;
  double cpu_us_min = kNaN, cpu_us_max = kNaN;
  std::map<std::string, double> counters;         // of the first repetition (build_s: only it builds)
  std::map<std::string, double> counter_medians;  // over the repetitions (paired ratios, rates)
  std::string error;
  /// Median over the repetitions of counter `k` (NaN when absent).
  double median(const std::string& k) const {
    auto it = counter_medians.find(k);
    return it == counter_medians.end() ? kNaN : it->second;
  }
};

/// Collects every iteration run; prints one progress line per finished benchmark to stderr.
class CollectingReporter : public benchmark::BenchmarkReporter {
 public:
  explicit CollectingReporter(size_t expected) : expected_(expected) {}
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.run_type != Run::RT_Iteration) continue;
      auto& v = runs_[r.run_name.function_name];
      v.push_back(r);
      if (r.error_occurred) errors_[r.run_name.function_name] = r.error_message;
      const auto total_reps = std::max<int64_t>(1, r.repetitions);
      if (int64_t(v.size()) == total_reps || r.error_occurred) {
        ++done_;
        std::cerr << "[" << done_ << "/" << expected_ << "] " << r.run_name.function_name << "  "
                  << (r.error_occurred ? "ERROR " + r.error_message : fmt("%.2f us", to_us(r, r.GetAdjustedCPUTime())))
                  << "\n";
      }
    }
  }
  std::map<std::string, Measurement> measurements() const {
    std::map<std::string, Measurement> out;
    for (const auto& [name, v] : runs_) {
      Measurement m;
      m.name = name;
      if (auto e = errors_.find(name); e != errors_.end()) {
        m.error = e->second;
        out[name] = m;
        continue;
      }
      std::vector<double> cpu, real;
      for (const auto& r : v) {
        cpu.push_back(to_us(r, r.GetAdjustedCPUTime()));
        real.push_back(to_us(r, r.GetAdjustedRealTime()));
      }
      m.samples = int(cpu.size());
      m.cpu_us = median(cpu);
      m.real_us = median(real);
      m.cpu_us_min = *std::min_element(cpu.begin(), cpu.end());
      m.cpu_us_max = *std::max_element(cpu.begin(), cpu.end());
      for (const auto& [k, c] : v.front().counters) {
        m.counters[k] = c.value;
        std::vector<double> values;
        for (const auto& r : v)
          if (auto it = r.counters.find(k); it != r.counters.end()) values.push_back(it->second.value);
        m.counter_medians[k] = median(values);
      }
      out[name] = m;
    }
    return out;
  }

 private:
  static double to_us(const Run& r, double t) {
    switch (r.time_unit) {
      case benchmark::kNanosecond: return t / 1e3;
      case benchmark::kMicrosecond: return t;
      case benchmark::kMillisecond: return t * 1e3;
      default: return t * 1e6;
    }
  }
  static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  }
  size_t expected_;
  size_t done_ = 0;
  std::map<std::string, std::vector<Run>> runs_;
  std::map<std::string, std::string> errors_;
};

/// The block grid of a report run: --smoke, --full or the default subset, with the run's min time and repetitions.
mfbench::BlockGrid report_block_grid(const Options& opt, const mfbench::Grid& layer_grid) {
  mfbench::BlockGrid g = opt.smoke ? mfbench::smoke_block_grid()
                                   : (opt.full ? mfbench::full_block_grid() : mfbench::default_block_grid());
  g.repetitions = layer_grid.repetitions;
  if (opt.min_time > 0) g.min_time = opt.min_time;
  return g;
}

/// The model grid of a report run: --smoke or the default, with the run's repetitions and --no-peak.
mfbench::ModelGrid report_model_grid(const Options& opt, const mfbench::Grid& layer_grid) {
  mfbench::ModelGrid g = opt.smoke ? mfbench::smoke_model_grid() : mfbench::default_model_grid();
  g.repetitions = layer_grid.repetitions;
  g.peak_memory = opt.peak_memory;
  if (opt.min_time > 0 && !opt.smoke) g.min_time = std::max(g.min_time, 5 * opt.min_time);
  return g;
}

/// Analytic fields of one block row of the JSON output. Prefill: one block call on s tokens. Decode: one new token
/// at context s in one block (the paper formula divided by s).
JsonObject block_analytic_json(const mfbench::BlockShape& s, bool memoryformer, bool decode,
                               const mfbench::StackPlan& plan) {
  JsonObject o;
  o.str("kind", "block")
      .str("model", memoryformer ? "memoryformer_block" : "transformer_block")
      .str("mode", decode ? "decode" : "prefill")
      .num("d", double(s.d))
      .num("s", double(s.s))
      .num("heads", double(s.heads()))
      .num("tau", memoryformer ? s.tau : 0)
      .num("K", memoryformer ? double(s.k()) : 0.0)
      .num("expand_bits", memoryformer ? 2 : 0)
      .num("flops_paper_no_attn", mfbench::block_flops_paper(memoryformer, decode, s, false))
      .num("flops_paper_total", mfbench::block_flops_paper(memoryformer, decode, s, true))
      .num("flops_paper_ratio_memoryformer_over_transformer",
           mfbench::block_flops_paper(true, decode, s) / mfbench::block_flops_paper(false, decode, s))
      .num("weight_bytes_fp32_per_block",
           memoryformer ? mfbench::memoryformer_block_weight_bytes(s) : mfbench::transformer_block_weight_bytes(s))
      .num("weight_bytes_per_token", memoryformer ? mfbench::memoryformer_block_bytes_per_token(s)
                                                  : mfbench::transformer_block_bytes_per_token(s));
  if (decode) {
    o.num("layers", double(plan.layers))
        .num("kv_caches_per_layer", double(plan.kv_sets))
        .num("stack_weight_bytes", plan.weight_bytes)
        .num("stack_resident_bytes", plan.resident_bytes)
        .num("cache_target_bytes", plan.target_bytes)
        .boolean("stack_exceeds_cache_target", plan.exceeds_target)
        .num("kv_bytes_per_token", mfbench::kv_bytes_per_token(s));
  } else {
    o.num("layers", 1);
  }
  return o;
}

void print_block_section(std::ostream& os, const mfbench::BlockGrid& grid,
                         const std::map<std::string, Measurement>& results, std::vector<JsonObject>& json) {
  using mfbench::BlockShape;
  auto find = [&](const std::string& n) -> const Measurement* {
    auto it = results.find(n);
    return it == results.end() || !it->second.error.empty() ? nullptr : &it->second;
  };
  auto counter = [](const Measurement* m, const char* k) {
    if (!m) return kNaN;
    auto it = m->counters.find(k);
    return it == m->counters.end() ? kNaN : it->second;
  };
  auto num = [](const char* f, double v) { return std::isfinite(v) ? fmt(f, v) : std::string("-"); };
  const auto caches = mfbench::read_caches();
  const double l3 = mfbench::cache_bytes(caches, 3);

  os << "== MemoryFormer block vs Transformer block, measured (single thread, CPU time, median of "
     << std::max(1, grid.repetitions) << ") ==\n"
     << "   MemoryFormerBlock<float>: RMSNorm, one shared hash for the Q/K/V Memory Layers, causal attention with\n"
     << "   partial rotary, no W_O, Memory Block (tau = 8, e = 2). TransformerBlock<float>: Pythia-style LayerNorm,\n"
     << "   Q/K/V/O d x d, the same attention, GeLU FFN d -> 4d -> d. heads = d/64, batch 1.\n"
     << "   ratio = MemoryFormer time / Transformer time (> 1: MemoryFormer slower). FLOPr = the same ratio of paper\n"
     << "   FLOPs (2s^2d + 6Ksd vs 2s^2d + 12sd^2; decode: per token, i.e. divided by s).\n\n";

  // ---- prefill
  os << "   Prefill: forward(y, x, batch = 1, seq = s); times in ms per call.\n";
  os << pad("d", 7) << pad("heads", 6) << pad("s", 6) << pad("FLOPr", 7) << pad("FLOPr-a", 8) << pad("MF ms", 9)
     << pad("TF ms", 9) << pad("ratio", 7) << pad("pair r", 8) << pad("packed r", 9) << pad("bf16 r", 8)
     << pad("attn ms", 9) << pad("attn%MF", 8)
     << pad("attn%TF", 8) << pad("rest r", 8) << pad("MF GF/s", 9) << pad("TF GF/s", 9) << pad("MF ns/t", 9)
     << pad("TF ns/t", 9) << pad("build MF/TF s", 15) << "\n";
  for (const auto& s : grid.prefill) {
    const auto* m = find(mfbench::block_name("memoryformer", "prefill", s));
    const auto* t = find(mfbench::block_name("transformer", "prefill", s));
    const auto* a = find(mfbench::block_name("attention", "prefill", s));
    const auto* p = find(mfbench::block_name("paired", "prefill", s));
    const auto* pp = find(mfbench::block_name("paired", "prefill_packed", s));
    const auto* pb = find(mfbench::block_name("paired", "prefill_bf16", s));
    const double fm = mfbench::block_flops_paper(true, false, s), ft = mfbench::block_flops_paper(false, false, s);
    const double fm_na = mfbench::block_flops_paper(true, false, s, false);
    const double ft_na = mfbench::block_flops_paper(false, false, s, false);
    const double mus = m ? m->cpu_us : kNaN, tus = t ? t->cpu_us : kNaN, aus = a ? a->cpu_us : kNaN;
    const double ratio = mus / tus;
    const double paired = p ? p->median("time_ratio") : kNaN;
    const double paired_packed = pp ? pp->median("time_ratio") : kNaN;
    const double paired_bf16 = pb ? pb->median("time_ratio") : kNaN;
    // Attention is timed alone on the same shape; block minus attention approximates "everything else".
    const double rest_m = mus - aus, rest_t = tus - aus;
    const double rest_ratio = (rest_m > 0 && rest_t > 0) ? rest_m / rest_t : kNaN;
    os << pad(std::to_string(s.d), 7) << pad(std::to_string(s.heads()), 6) << pad(std::to_string(s.s), 6)
       << pad(fmt("%.3f", fm / ft), 7) << pad(fmt("%.3f", fm_na / ft_na), 8) << pad(num("%.2f", mus / 1e3), 9)
       << pad(num("%.2f", tus / 1e3), 9) << pad(num("%.2f", ratio), 7) << pad(num("%.2f", paired), 8)
       << pad(num("%.2f", paired_packed), 9) << pad(num("%.2f", paired_bf16), 8)
       << pad(num("%.2f", aus / 1e3), 9) << pad(num("%.0f%%", 100 * aus / mus), 8)
       << pad(num("%.0f%%", 100 * aus / tus), 8) << pad(num("%.2f", rest_ratio), 8)
       << pad(num("%.1f", fm / (mus * 1e3)), 9) << pad(num("%.1f", ft / (tus * 1e3)), 9)
       << pad(num("%.0f", mus * 1e3 / double(s.s)), 9) << pad(num("%.0f", tus * 1e3 / double(s.s)), 9)
       << pad(num("%.1f", counter(m, "build_s")) + "/" + num("%.2f", counter(t, "build_s")), 15) << "\n";
    for (int is_mf = 1; is_mf >= 0; --is_mf) {
      const Measurement* x = is_mf ? m : t;
      JsonObject o = block_analytic_json(s, is_mf, false, {});
      const double f = is_mf ? fm : ft;
      o.measured("us_per_call", x ? x->cpu_us : kNaN)
          .measured("us_per_call_min", x ? x->cpu_us_min : kNaN)
          .measured("us_per_call_max", x ? x->cpu_us_max : kNaN)
          .measured("ns_per_token", x ? x->cpu_us * 1e3 / double(s.s) : kNaN)
          .measured("tokens_per_s", x ? double(s.s) / (x->cpu_us * 1e-6) : kNaN)
          .measured("paper_flops_per_s", x ? f / (x->cpu_us * 1e-6) : kNaN)
          .measured("attention_us", aus)
          .measured("build_s", counter(x, "build_s"))
          .measured("time_ratio_memoryformer_over_transformer", ratio)
          .measured("rest_time_ratio_memoryformer_over_transformer", rest_ratio)
          .measured("paired_time_ratio_memoryformer_over_transformer", paired)
          .measured("paired_packed_time_ratio_memoryformer_over_transformer", paired_packed)
          .measured("paired_bf16_time_ratio_memoryformer_over_transformer", paired_bf16);
      json.push_back(o);
    }
  }
  os << "   FLOPr-a: paper FLOP ratio without attention. ratio: of the two blocks' medians, timed one after the other;\n"
        "   pair r: the same ratio with both blocks called alternately in one benchmark (block/paired/prefill: median\n"
        "   of the repetitions' time ratios), the figure to quote; packed r: the same with the MemoryFormer block's\n"
        "   packed table copy kept current (tables_changed(), as in training and inference on fixed tables), so its\n"
        "   calls do not re-pack the tables; bf16 r: the same with the MemoryFormer block frozen to bf16 panels\n"
        "   (FrozenMemoryFormerBlock, the storage `generate` uses by default). attn: attention_forward alone on the\n"
        "   same shape\n"
        "   (part of both blocks); attn%: its share of each block's time; rest r: (block - attention) time ratio.\n"
        "   GF/s: paper GFLOP per second. ns/t: ns per token. build: seconds to construct the block (not timed).\n\n";

  // ---- decode
  const double target = mfbench::block_cache_target(grid);
  os << "   Decode: forward_decode of ONE token after s - 1 cached tokens, through a stack of layers whose weights\n"
     << "   exceed " << human_bytes(target)
     << (grid.cache_target_bytes > 0 ? std::string(" (set by this grid)")
                                     : " (1.25 x the L3 of " + human_bytes(l3) + " that sysfs reports)")
     << "; each layer cycles through several KV caches (kv sets) so that keys and\n"
     << "   values also come from DRAM, and successive tokens cycle through " << grid.token_pool
     << " distinct inputs. Times in us per token PER LAYER.\n";
  os << pad("d", 7) << pad("heads", 6) << pad("s", 6) << pad("layers", 8) << pad("kv sets", 8) << pad("stack MF", 10)
     << pad("stack TF", 10) << pad("FLOPr", 7) << pad("MF us", 9) << pad("TF us", 9) << pad("ratio", 7)
     << pad("attn us", 9) << pad("attn%MF", 8) << pad("attn%TF", 8) << pad("MF B/tok", 10) << pad("TF B/tok", 10)
     << pad("KV B/tok", 10) << pad("MF GB/s", 9) << pad("TF GB/s", 9) << pad("MF tok/s", 10) << pad("TF tok/s", 10)
     << pad("build MF/TF s", 15) << "\n";
  for (const auto& s : grid.decode) {
    const auto* m = find(mfbench::block_name("memoryformer", "decode", s));
    const auto* t = find(mfbench::block_name("transformer", "decode", s));
    const auto pm = mfbench::plan_decode_stack(grid, s, true), pt = mfbench::plan_decode_stack(grid, s, false);
    const double fm = mfbench::block_flops_paper(true, true, s), ft = mfbench::block_flops_paper(false, true, s);
    const double mus = m ? m->cpu_us / double(pm.layers) : kNaN, tus = t ? t->cpu_us / double(pt.layers) : kNaN;
    const double ratio = mus / tus;
    const auto* a = find(mfbench::block_name("attention", "decode", s));
    const double aus = a ? a->cpu_us / double(mfbench::kv_caches_for_target(grid, s)) : kNaN;
    const double bm = mfbench::memoryformer_block_bytes_per_token(s), bt = mfbench::transformer_block_bytes_per_token(s);
    const double kv = mfbench::kv_bytes_per_token(s);
    const double gbm = (bm + kv) / (mus * 1e3), gbt = (bt + kv) / (tus * 1e3);
    os << pad(std::to_string(s.d), 7) << pad(std::to_string(s.heads()), 6) << pad(std::to_string(s.s), 6)
       << pad(std::to_string(pm.layers) + "/" + std::to_string(pt.layers), 8)
       << pad(std::to_string(pm.kv_sets) + "/" + std::to_string(pt.kv_sets), 8) << pad(human_bytes(pm.weight_bytes), 10)
       << pad(human_bytes(pt.weight_bytes), 10) << pad(fmt("%.3f", fm / ft), 7) << pad(num("%.1f", mus), 9)
       << pad(num("%.1f", tus), 9) << pad(num("%.2f", ratio), 7) << pad(num("%.1f", aus), 9)
       << pad(num("%.0f%%", 100 * aus / mus), 8) << pad(num("%.0f%%", 100 * aus / tus), 8) << pad(human_bytes(bm), 10)
       << pad(human_bytes(bt), 10) << pad(human_bytes(kv), 10) << pad(num("%.1f", gbm), 9) << pad(num("%.1f", gbt), 9)
       << pad(num("%.0f", m ? 1e6 / m->cpu_us : kNaN), 10) << pad(num("%.0f", t ? 1e6 / t->cpu_us : kNaN), 10)
       << pad(num("%.1f", counter(m, "build_s")) + "/" + num("%.1f", counter(t, "build_s")), 15) << "\n";
    for (int is_mf = 1; is_mf >= 0; --is_mf) {
      const Measurement* x = is_mf ? m : t;
      const auto& plan = is_mf ? pm : pt;
      const double per_layer = is_mf ? mus : tus;
      JsonObject o = block_analytic_json(s, is_mf, true, plan);
      o.measured("us_per_call", per_layer)  // per token per layer
          .measured("us_per_call_min", x ? x->cpu_us_min / double(plan.layers) : kNaN)
          .measured("us_per_call_max", x ? x->cpu_us_max / double(plan.layers) : kNaN)
          .measured("ns_per_token", per_layer * 1e3)
          .measured("tokens_per_s", 1e6 / per_layer)
          .measured("stack_us_per_token", x ? x->cpu_us : kNaN)
          .measured("stack_tokens_per_s", x ? 1e6 / x->cpu_us : kNaN)
          .measured("paper_flops_per_s", (is_mf ? fm : ft) / (per_layer * 1e-6))
          .measured("bytes_read_GB_per_s", is_mf ? gbm : gbt)
          .measured("attention_us", aus)
          .measured("build_s", counter(x, "build_s"))
          .measured("time_ratio_memoryformer_over_transformer", ratio);
      json.push_back(o);
    }
    if (!pm.exceeds_target || !pt.exceeds_target)
      os << "   note: the " << (!pt.exceeds_target ? "Transformer" : "MemoryFormer") << " stack's weights do not exceed "
         << human_bytes(target) << " (memory cap), so they may be served from L3\n";
  }
  os << "   kv sets: KV caches per layer, MF / TF. attn: attention_decode alone, per layer, over as many KV caches as\n"
        "   exceed the same size; attn%: its share of each block's per-layer time.\n"
        "   stack: fp32 weights of the whole stack (MF / TF). B/tok: bytes read per token per layer - MF: the K rows\n"
        "   each Memory Layer gathers (Q, K, V, ML1, ML2); TF: all 12d^2 + 13d weights; KV: keys + values of s tokens.\n"
        "   GB/s: (B/tok + KV) / time. tok/s: tokens per second through the whole stack.\n\n";
}

/// The whole-model section: one paired benchmark per row (bench_model.cpp).
void print_model_section(std::ostream& os, const mfbench::ModelGrid& grid,
                         const std::map<std::string, Measurement>& results, std::vector<JsonObject>& json) {
  const auto& m = grid.shape;
  os << "== Whole models: MemoryFormerLM vs TransformerLM, paired (median of " << std::max(1, grid.repetitions)
     << ") ==\n"
     << "   d = " << m.d << ", " << m.layers << " layers, " << m.heads << " heads, vocab " << m.vocab
     << "; MemoryFormer: tau = " << m.tau << ", e = 2; dense: TransformerBlock, fp32"
     << (m.d == 512 && m.layers == 6 && m.heads == 8 ? " (MemoryFormer-tiny's and Pythia-70M's shape).\n" : ".\n")
     << "   ratio = MemoryFormer tokens/s / dense tokens/s (> 1: MemoryFormer faster), both models called alternately\n"
     << "   in one benchmark. FLOPr = MemoryFormer / dense paper FLOPs per token (blocks + LM head): FLOPs alone would\n"
     << "   predict ratio = 1/FLOPr. peak: resident bytes of a process that builds the model and runs one call.\n"
     << "   prefill: forward of s tokens; decode: one token at the given context; train: zero_grad, forward_loss,\n"
     << "   backward, clip, AdamW step (the Trainer's options). One thread: CPU time; two threads: wall time.\n";
  os << pad("mode", 9) << pad("length", 8) << pad("batch", 6) << pad("thr", 4) << pad("tables", 7) << pad("KV", 5) << pad("MF tok/s", 11)
     << pad("dense tok/s", 12) << pad("ratio", 7) << pad("FLOPr", 7) << pad("MF peak", 10) << pad("dense peak", 11)
     << "\n";
  for (const auto& row : grid.rows) {
    const auto it = results.find(mfbench::model_benchmark_name(row));
    const Measurement* x = it == results.end() || !it->second.error.empty() ? nullptr : &it->second;
    const double mf_tps = x ? x->median("mf_tokens_per_second") : kNaN;
    const double dense_tps = x ? x->median("dense_tokens_per_second") : kNaN;
    const double ratio = x ? x->median("ratio") : kNaN;
    const double flop_ratio = mfbench::model_flops_per_token(m, row, true) / mfbench::model_flops_per_token(m, row, false);
    const double mf_peak = x ? x->median("mf_peak_bytes") : kNaN, dense_peak = x ? x->median("dense_peak_bytes") : kNaN;
    auto num = [](const char* f, double v) { return std::isfinite(v) ? fmt(f, v) : std::string("-"); };
    auto bytes = [](double v) { return std::isfinite(v) && v > 0 ? human_bytes(v) : std::string("-"); };
    os << pad(mfbench::model_mode_name(row.mode), 9) << pad(std::to_string(row.length), 8)
       << pad(std::to_string(row.batch), 6) << pad(std::to_string(row.threads), 4) << pad(row.bf16 ? "bf16" : "fp32", 7)
       << pad(row.kv_bf16 ? "bf16" : "fp32", 5) << pad(num("%.0f", mf_tps), 11)
       << pad(num("%.0f", dense_tps), 12) << pad(num("%.2f", ratio), 7) << pad(fmt("%.3f", flop_ratio), 7)
       << pad(bytes(mf_peak), 10) << pad(bytes(dense_peak), 11) << "\n";
    JsonObject o;
    o.str("kind", "model")
        .str("model", "MemoryFormerLM vs TransformerLM")
        .str("mode", mfbench::model_mode_name(row.mode))
        .num("threads", row.threads)
        .num("d", double(m.d))
        .num("layers", double(m.layers))
        .num("heads", double(m.heads))
        .num("tau", m.tau)
        .num("vocab", double(m.vocab))
        .num("s", double(row.length))
        .num("batch", double(row.batch))
        .str("storage", row.bf16 ? "bf16" : "fp32")
        .str("kv_storage", row.kv_bf16 ? "bf16" : "fp32")
        .num("mf_flops_per_token", mfbench::model_flops_per_token(m, row, true))
        .num("dense_flops_per_token", mfbench::model_flops_per_token(m, row, false))
        .num("flop_ratio", flop_ratio)
        .measured("mf_tokens_per_second", mf_tps)
        .measured("dense_tokens_per_second", dense_tps)
        .measured("ratio", ratio)
        .measured("mf_peak_bytes", mf_peak > 0 ? mf_peak : kNaN)
        .measured("dense_peak_bytes", dense_peak > 0 ? dense_peak : kNaN);
    json.push_back(o);
  }
  os << "   length: s (prefill), context (decode), seq (train). tables: the MemoryFormer's; bf16 rows run it frozen\n"
        "   (FrozenLanguageModel, inference only; its peak leaves out the training model it was made from).\n"
        "   KV: both models' decode caches (bf16: half the bytes each new token reads).\n\n";
}

/// The analytic fields of one Memory Layer shape (N tokens is reported as "s").
JsonObject layer_analytic_json(const LayerShape& s) {
  JsonObject o;
  o.str("kind", "memory_layer")
      .str("model", "MemoryLayer vs dense")
      .num("d", double(s.d_out()))
      .num("d_in", double(s.d_in()))
      .num("d_out", double(s.d_out()))
      .num("s", double(s.n))
      .num("tau", s.tau)
      .num("K", double(s.k()))
      .num("flops_paper_no_attn", mf::memory_layer_flops_paper(double(s.n), double(s.d_in()), double(s.d_out()), s.tau))
      .num("flops_paper_total", mf::memory_layer_flops_paper(double(s.n), double(s.d_in()), double(s.d_out()), s.tau))
      .num("flops_dense_paper", mf::dense_layer_flops_paper(double(s.n), double(s.d_in()), double(s.d_out())))
      .num("table_bytes_fp32", s.table_bytes())
      .num("weight_bytes_fp32", s.weight_bytes());
  return o;
}

struct LayerRow {
  LayerShape s;
  const Measurement *mf = nullptr, *df = nullptr, *mb = nullptr, *db = nullptr, *lookup = nullptr;
  const Measurement *pf = nullptr, *pb = nullptr;  // memory_layer/paired/{forward,backward}
};

void measured_section(std::ostream& os, const mfbench::Grid& grid, const std::vector<LayerShape>& skipped,
                      const std::map<std::string, Measurement>& results, const fs::path& out_dir,
                      std::vector<JsonObject>& json) {
  const auto caches = mfbench::read_caches();
  const double l2 = mfbench::cache_bytes(caches, 2), l3 = mfbench::cache_bytes(caches, 3);
  os << "== Memory Layer vs dense layer y = xW + b, measured (single thread, CPU time, median of "
     << std::max(1, grid.repetitions) << ") ==\n"
     << "   CPU: " << mfbench::cpu_model_name() << ", " << mfbench::logical_cpu_count() << " logical CPUs; L2 "
     << fmt("%.0f", l2 / 1024) << " KiB, L3 " << fmt("%.0f", l3 / 1024) << " KiB (sysfs, cpu0); "
     << mfbench::isa_string() << "\n"
     << "   ratio = memory time / dense time (> 1: the Memory Layer is slower). FLOP ratio = paper FLOPs memory/dense.\n\n";
  os << pad("d_in", 5) << pad("d_out", 6) << pad("tau", 4) << pad("K", 5) << pad("N", 6) << pad("tables", 10)
     << pad("FLOPr", 7) << pad("mem fwd", 11) << pad("GB/s", 6) << pad("dense fwd", 11) << pad("ratio", 7)
     << pad("pair r", 7) << pad("lookup", 10) << pad("mem bwd", 11) << pad("dense bwd", 11) << pad("ratio", 7)
     << pad("pair r", 7) << "   (times in us per call)\n";

  std::vector<LayerRow> rows;
  auto find = [&](const std::string& n) -> const Measurement* {
    auto it = results.find(n);
    return it == results.end() || !it->second.error.empty() ? nullptr : &it->second;
  };
  for (const auto& s : mfbench::grid_shapes(grid)) {
    if (!mfbench::shape_fits(grid, s)) continue;
    LayerRow r{s};
    r.mf = find(mfbench::memory_forward_name(s));
    r.df = find(mfbench::dense_forward_name(s));
    r.mb = find(mfbench::memory_backward_name(s));
    r.db = find(mfbench::dense_backward_name(s));
    r.lookup = find("memory_layer/forward_hashed/" + mfbench::shape_suffix(s));
    r.pf = find(mfbench::memory_paired_name(s, false));
    r.pb = find(mfbench::memory_paired_name(s, true));
    rows.push_back(r);
  }
  auto us = [](const Measurement* m) { return m ? fmt(m->cpu_us < 10 ? "%.3f" : "%.1f", m->cpu_us) : std::string("-"); };
  auto ratio = [](const Measurement* a, const Measurement* b) { return a && b ? a->cpu_us / b->cpu_us : kNaN; };
  const fs::path csv = out_dir / "memoryformer_measured.csv";
  std::ostringstream f;
  f << "d_in,d_out,tau,K,N,table_bytes,weight_bytes,flops_memory_paper,flops_dense_paper,memory_forward_us,"
       "dense_forward_us,forward_ratio,lookup_only_us,memory_backward_us,dense_backward_us,backward_ratio,"
       "memory_forward_us_min,memory_forward_us_max,dense_forward_us_min,dense_forward_us_max,table_rows_GB_per_s,"
       "paired_forward_ratio,paired_backward_ratio\n";
  for (const auto& r : rows) {
    const auto& s = r.s;
    const double fm = mf::memory_layer_flops_paper(double(s.n), double(s.d_in()), double(s.d_out()), s.tau);
    const double fd = mf::dense_layer_flops_paper(double(s.n), double(s.d_in()), double(s.d_out()));
    const double rf = ratio(r.mf, r.df), rb = ratio(r.mb, r.db);
    const double prf = r.pf ? r.pf->median("time_ratio") : kNaN, prb = r.pb ? r.pb->median("time_ratio") : kNaN;
    auto r2 = [](double v) { return std::isfinite(v) ? fmt("%.2f", v) : std::string("-"); };
    const double rows_moved = double(s.n) * double(s.k()) * double(s.d_out()) * 4.0;
    os << pad(std::to_string(s.d_in()), 5) << pad(std::to_string(s.d_out()), 6) << pad(std::to_string(s.tau), 4)
       << pad(std::to_string(s.k()), 5) << pad(std::to_string(s.n), 6) << pad(mb(s.table_bytes()) + "MB", 10)
       << pad(fmt("%.3f", fm / fd), 7) << pad(us(r.mf), 11)
       << pad(r.mf ? fmt("%.1f", rows_moved / (r.mf->cpu_us * 1e3)) : "-", 6) << pad(us(r.df), 11)
       << pad(r2(rf), 7) << pad(r2(prf), 7) << pad(us(r.lookup), 10) << pad(us(r.mb), 11) << pad(us(r.db), 11)
       << pad(r2(rb), 7) << pad(r2(prb), 7) << "\n";
    f << s.d_in() << ',' << s.d_out() << ',' << s.tau << ',' << s.k() << ',' << s.n << ',' << jnum(s.table_bytes())
      << ',' << jnum(s.weight_bytes()) << ',' << jnum(fm) << ',' << jnum(fd) << ','
      << jnum(r.mf ? r.mf->cpu_us : kNaN) << ',' << jnum(r.df ? r.df->cpu_us : kNaN) << ',' << jnum(rf) << ','
      << jnum(r.lookup ? r.lookup->cpu_us : kNaN) << ',' << jnum(r.mb ? r.mb->cpu_us : kNaN) << ','
      << jnum(r.db ? r.db->cpu_us : kNaN) << ',' << jnum(rb) << ',' << jnum(r.mf ? r.mf->cpu_us_min : kNaN) << ','
      << jnum(r.mf ? r.mf->cpu_us_max : kNaN) << ',' << jnum(r.df ? r.df->cpu_us_min : kNaN) << ','
      << jnum(r.df ? r.df->cpu_us_max : kNaN) << ',' << jnum(r.mf ? rows_moved / (r.mf->cpu_us * 1e3) : kNaN) << ','
      << jnum(prf) << ',' << jnum(prb) << '\n';
    JsonObject o = layer_analytic_json(s);
    o.measured("memory_forward_us", r.mf ? r.mf->cpu_us : kNaN)
        .measured("dense_forward_us", r.df ? r.df->cpu_us : kNaN)
        .measured("forward_ratio", rf)
        .measured("lookup_only_us", r.lookup ? r.lookup->cpu_us : kNaN)
        .measured("memory_backward_us", r.mb ? r.mb->cpu_us : kNaN)
        .measured("dense_backward_us", r.db ? r.db->cpu_us : kNaN)
        .measured("backward_ratio", rb)
        .measured("memory_forward_ns_per_token", r.mf ? r.mf->cpu_us * 1e3 / double(s.n) : kNaN)
        .measured("dense_forward_ns_per_token", r.df ? r.df->cpu_us * 1e3 / double(s.n) : kNaN)
        .measured("memory_forward_us_min", r.mf ? r.mf->cpu_us_min : kNaN)
        .measured("memory_forward_us_max", r.mf ? r.mf->cpu_us_max : kNaN)
        .measured("dense_forward_us_min", r.df ? r.df->cpu_us_min : kNaN)
        .measured("dense_forward_us_max", r.df ? r.df->cpu_us_max : kNaN)
        .measured("table_rows_GB_per_s", r.mf ? rows_moved / (r.mf->cpu_us * 1e3) : kNaN)
        .measured("paired_forward_ratio", prf)
        .measured("paired_backward_ratio", prb);
    json.push_back(o);
  }
  os << "\n   tables: fp32 Memory Layer tables (K*2^tau*d_out*4). GB/s: table-row bytes gathered by the forward\n"
        "   (N*K*d_out*4, repeats counted) per second. lookup: forward with the hash precomputed (tau = 8 only).\n"
        "   mem bwd: dx overwritten, dtables/dbias accumulated (no zero_grad per call); dense bwd: dX, dW +=, db +=.\n"
        "   ratio: memory time / dense time of the solo benchmarks' medians; pair r: the same ratio with both called\n"
        "   alternately in one benchmark (memory_layer/paired/*, median of the repetitions), the figure to quote.\n";
  for (const auto& s : skipped)
    os << "   skipped " << mfbench::shape_suffix(s) << ": tables + dtables " << mb(2 * s.table_bytes())
       << " MB > cap " << mb(grid.max_table_bytes) << " MB (--max-table-mb)\n";
  try {
    mf::write_file_atomically(csv, f.str());
    os << "   CSV: " << fs::absolute(csv).string() << "\n\n";
  } catch (const mf::IoError& e) {
    os << "   " << e.what() << "\n\n";
  }
  os << "   Per token the Memory Layer reads K table rows; the dense layer reads all of W once per call and reuses it\n"
        "   for all N tokens of the call.\n\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (int rc = 0; mfbench::model_peak_child(argc, argv, rc)) return rc;
  Options opt;
  if (!parse_args(argc, argv, opt)) return 2;
  if (opt.help) {
    print_help();
    return 0;
  }
  const auto t0 = std::chrono::steady_clock::now();
  mfbench::init_single_thread();
  int status = 0;

  std::string out_note;
  const fs::path out_dir = choose_out_dir(opt, out_note);
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) {
    std::cerr << "memoryformer_report: cannot create " << out_dir.string() << ": " << ec.message() << "\n";
    return 1;
  }

  // Text goes to stdout normally; with --json it goes nowhere (stdout carries the JSON only).
  std::ostringstream text;
  std::vector<JsonObject> json;
  text << "memoryformer_report - MemoryFormer (Ding et al., NeurIPS 2024) FLOPs and measured costs\n"
       << mfbench::machine_header();
  if (!out_note.empty()) text << "note: " << out_note << "\n";
  text << "\n";

  table1(text, json);
  table5(text);
  figure1(text, out_dir, json);
  if (opt.section("scale")) scale_section(text, opt, json);

  if (opt.measure && opt.benchmarks()) {
    mfbench::Grid grid = opt.smoke ? mfbench::smoke_grid() : (opt.full ? mfbench::full_grid() : mfbench::default_grid());
    grid.repetitions = opt.repetitions > 0 ? opt.repetitions : (opt.smoke ? 1 : 3);
    if (opt.min_time > 0) grid.min_time = opt.min_time;
    if (opt.max_table_mb > 0) grid.max_table_bytes = opt.max_table_mb * 1e6;

    // Google Benchmark reads its own flags in Initialize; give it none, and run what this program registers.
    int bm_argc = 1;
    char* bm_argv[] = {argv[0], nullptr};
    benchmark::Initialize(&bm_argc, bm_argv);
    std::vector<LayerShape> skipped;
    size_t expected = 0;
    if (opt.section("layer")) {
      skipped = mfbench::register_memory_layer_benchmarks(grid, {.lookup_only = true, .scalar = false});
      std::vector<std::string> seen;
      for (const auto& s : mfbench::grid_shapes(grid)) {
        if (!mfbench::shape_fits(grid, s)) continue;
        for (const auto& n : {mfbench::memory_forward_name(s), mfbench::dense_forward_name(s),
                              mfbench::memory_backward_name(s), mfbench::dense_backward_name(s)})
          if (std::find(seen.begin(), seen.end(), n) == seen.end()) seen.push_back(n), ++expected;
        expected += 2;               // memory_layer/paired/{forward,backward}
        if (s.tau == 8) ++expected;  // memory_layer/forward_hashed
      }
    }
    const mfbench::BlockGrid block_grid = report_block_grid(opt, grid);
    if (opt.section("block")) expected += mfbench::register_block_suite(block_grid).size();
    const mfbench::ModelGrid model_grid = report_model_grid(opt, grid);
    std::vector<std::string> model_names;
    if (opt.section("model")) model_names = mfbench::register_model_benchmarks(model_grid);
    expected += model_names.size();
    std::cerr << "memoryformer_report: running " << expected << " benchmarks (" << grid.repetitions
              << " repetitions, min time " << grid.min_time << " s each)...\n";
    CollectingReporter reporter(expected);
    benchmark::RunSpecifiedBenchmarks(&reporter);
    const auto results = reporter.measurements();
    benchmark::Shutdown();
    if (opt.section("layer")) measured_section(text, grid, skipped, results, out_dir, json);
    if (opt.section("block")) print_block_section(text, block_grid, results, json);
    if (opt.section("model")) print_model_section(text, model_grid, results, json);
    // A benchmark that failed, or a model row without its figures, fails the run (the smoke test relies on it).
    for (const auto& [name, m] : results)
      if (!m.error.empty()) {
        std::cerr << "memoryformer_report: " << name << " failed: " << m.error << "\n";
        status = 1;
      }
    for (const auto& name : model_names) {
      const auto it = results.find(name);
      const bool ok = it != results.end() && it->second.error.empty() && it->second.median("mf_tokens_per_second") > 0 &&
                      it->second.median("dense_tokens_per_second") > 0 &&
                      (!model_grid.peak_memory ||
                       (it->second.median("mf_peak_bytes") > 0 && it->second.median("dense_peak_bytes") > 0));
      if (!ok) {
        std::cerr << "memoryformer_report: " << name << " gave no tokens/s or peak memory\n";
        status = 1;
      }
    }
  } else if (!opt.measure) {
    text << "(--no-measure: no timings)\n\n";
    const mfbench::Grid grid = opt.smoke ? mfbench::smoke_grid() : (opt.full ? mfbench::full_grid() : mfbench::default_grid());
    for (const auto& s : mfbench::grid_shapes(grid)) json.push_back(layer_analytic_json(s));
    const mfbench::BlockGrid block_grid = report_block_grid(opt, grid);
    for (const auto& s : block_grid.prefill)
      for (bool is_mf : {true, false}) json.push_back(block_analytic_json(s, is_mf, false, {}));
    for (const auto& s : block_grid.decode)
      for (bool is_mf : {true, false})
        json.push_back(block_analytic_json(s, is_mf, true, mfbench::plan_decode_stack(block_grid, s, is_mf)));
    print_model_section(text, report_model_grid(opt, grid), {}, json);
  }

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  text << "report finished in " << fmt("%.1f", secs) << " s; files in " << fs::absolute(out_dir).string() << "\n";

  if (opt.json) {
    std::cout << "[\n";
    for (size_t i = 0; i < json.size(); ++i) std::cout << "  " << json[i].dump() << (i + 1 < json.size() ? ",\n" : "\n");
    std::cout << "]\n";
    std::cerr << text.str();  // the human text is still useful in a log; stdout stays pure JSON
  } else {
    std::cout << text.str();
  }
  return status;
}

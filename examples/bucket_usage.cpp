// SPDX-License-Identifier: MIT
// bucket_usage: the paper's Figure 4 for a trained MemoryFormer checkpoint — how often each bucket of the first and
// last table of the Q/K/V layers, ML1 and ML2 is hit on validation text — as CSV, a summary, and a PNG when gnuplot
// is installed.
//
//   bucket_usage --checkpoint FILE [--text FILE] [--windows N] [--seq N] [--out PREFIX] [--block I]

#include "common/arg_reader.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <memoryformer/bucket_table.hpp>
#include <memoryformer/io/atomic_file.hpp>
#include <memoryformer/io/model_checkpoint.hpp>
#include <memoryformer/model.hpp>
#include <memoryformer/train/text_data.hpp>
#include <memoryformer/train/trainer.hpp>

#include "data/default_text.hpp"

namespace mf = memoryformer;
using mf::Index;

namespace {

struct Args {
  std::string checkpoint;
  std::string text_path;  // empty: the built-in text
  double val_fraction = 0.1;
  Index seq = 128, windows = 64, batch = 16;
  Index plot_block = -1;  // -1: the last block
  std::string out = "bucket_usage";
  bool smoke = false;
};

const char* usage =
    "usage: bucket_usage --checkpoint FILE [options]\n"
    "  --checkpoint FILE  a MemoryFormer checkpoint written by train_lm --save\n"
    "  --text FILE        text whose validation split is scored (default: the built-in text train_lm uses)\n"
    "  --val-fraction X   validation share at the end of the text, as in training (default 0.1)\n"
    "  --seq N --windows N   validation windows of N tokens, how many (default 128, 64)\n"
    "  --block I          block to plot (default: the last); the CSV has every block\n"
    "  --out PREFIX       writes PREFIX.csv, and PREFIX.png with gnuplot (default bucket_usage)\n"
    "  --smoke            train a tiny model for a few seconds and analyse it (what ctest runs)\n";

[[noreturn]] void fail(const std::string& msg) { memoryformer_examples::ArgReader(0, nullptr, "bucket_usage").fail(msg); }

Args parse(int argc, char** argv) {
  Args a;
  const memoryformer_examples::ArgReader args(argc, argv, "bucket_usage");
  auto value = [&](int& i) { return args.value(i); };
  auto number = [&](int& i) { return args.number(i, /*allow_negative=*/true); };
  // Counts are integers checked against their range: no double-to-integer conversion of an arbitrary value.
  auto count = [&](int& i) { return Index(args.integer(i, 0, Index(1) << 40)); };
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--help" || f == "-h") {
      std::cout << usage;
      std::exit(0);
    } else if (f == "--checkpoint") a.checkpoint = value(i);
    else if (f == "--text") a.text_path = value(i);
    else if (f == "--val-fraction") a.val_fraction = number(i);
    else if (f == "--seq") a.seq = count(i);
    else if (f == "--windows") a.windows = count(i);
    else if (f == "--block") a.plot_block = count(i);
    else if (f == "--out") a.out = value(i);
    else if (f == "--smoke") a.smoke = true;
    else fail("unknown option '" + f + "'");
  }
  if (a.smoke) {
    a.seq = 32;
    a.windows = 16;
    if (a.out == "bucket_usage") a.out = "bucket_usage_smoke";
  }
  if (a.checkpoint.empty() && !a.smoke) fail("--checkpoint is required");
  if (a.seq < 1 || a.windows < 1) fail("--seq and --windows must be ≥ 1");
  return a;
}

/// --smoke: a tiny MemoryFormer trained for a moment on the built-in text.
std::string make_smoke_checkpoint(const std::string& text) {
  const std::string path = "bucket_usage_smoke.ckpt";
  const mf::TextDataset data(text, 0.1);
  mf::MemoryFormerLM<float>::Config c;
  c.layers = 2;
  c.block.d = 32;
  c.block.heads = 2;
  c.block.tau = 4;
  mf::MemoryFormerLM<float> model(c, 1);
  mf::TrainerOptions o;
  o.steps = 40;
  o.batch = 8;
  o.seq = 32;
  o.eval_every = 0;
  o.eval_windows = 4;
  o.checkpoint_path = path;
  mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, data, o);
  trainer.run();
  std::cerr << "bucket_usage --smoke: trained a tiny model for 40 steps, saved '" << path << "'\n";
  return path;
}

/// One hashed layer group of one block: its hit counts over all its tables.
struct Usage {
  Index block = 0;
  std::string layer;  // "qkv" (one hash shared by Q, K and V), "ml1", "ml2"
  mf::BucketHitCounter hits;
};

/// Shannon entropy of the hit distribution in bits, divided by τ (1 = perfectly even use of all 2^τ buckets).
double normalized_entropy(std::span<const std::uint64_t> counts, int tau) {
  double total = 0, h = 0;
  for (auto c : counts) total += double(c);
  if (total == 0) return 0;
  for (auto c : counts)
    if (c > 0) h -= double(c) / total * std::log2(double(c) / total);
  return h / tau;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    const std::string text = a.text_path.empty() ? memoryformer_examples::default_text(a.smoke ? 60000 : 1000000)
                                                 : mf::read_text_file(a.text_path);
    const std::string path = a.checkpoint.empty() ? make_smoke_checkpoint(text) : a.checkpoint;
    const mf::Checkpoint ckpt = mf::load_checkpoint(path);
    const std::string origin = "'" + path + "'";
    if (mf::checkpoint_model_kind(ckpt, origin) != "memoryformer")
      throw std::runtime_error(origin + " holds a dense model: bucket usage needs a MemoryFormer checkpoint");
    mf::MemoryFormerLM<float> model(mf::MemoryFormerLM<float>::config_from_entries(ckpt.config, origin), 0);
    mf::load_model(ckpt, model, nullptr, origin);
    const auto& bc = model.config().block;
    const auto mb = bc.memory_block();

    std::vector<Usage> usage;
    for (Index b = 0; b < model.layers(); ++b) {
      usage.push_back({b, "qkv", mf::BucketHitCounter(bc.d / bc.tau, bc.tau)});
      usage.push_back({b, "ml1", mf::BucketHitCounter(mb.ml1().num_tables(), mb.ml1().tau)});
      usage.push_back({b, "ml2", mf::BucketHitCounter(mb.ml2().num_tables(), mb.ml2().tau)});
    }

    const mf::TextDataset data(text, a.val_fraction);
    const auto starts = data.validation_windows(a.seq, a.windows);
    mf::TokenBatch batch;
    mf::MemoryFormerLM<float>::Cache cache;
    Index tokens = 0;
    for (Index first = 0; first < Index(starts.size()); first += a.batch) {
      data.validation_batch(batch, starts, first, a.batch, a.seq);
      model.forward(batch.inputs, batch.batch, batch.seq, cache);
      tokens += batch.batch * batch.seq;
      for (Index b = 0; b < model.layers(); ++b) {
        const auto& c = cache.blocks[std::size_t(b)];
        usage[std::size_t(3 * b)].hits.record(c.hash.codes);
        usage[std::size_t(3 * b + 1)].hits.record(c.memory.hash1.codes);
        usage[std::size_t(3 * b + 2)].hits.record(c.memory.hash2.codes);
      }
    }

    // CSV: the first and last table of every hashed layer of every block.
    const std::string csv_path = a.out + ".csv";
    std::ostringstream csv;
    csv << "block,layer,table,bucket,hits,frequency\n";
    std::printf("bucket usage of '%s' on %ld validation tokens (Q, K and V share one hash per block, so one 'qkv' row "
                "covers all three)\n",
                path.c_str(), long(tokens));
    std::printf("%5s %4s %6s %8s %12s %10s %10s\n", "block", "layer", "table", "buckets", "used", "max/mean",
                "entropy/τ");
    for (const auto& u : usage) {
      const Index k = u.hits.num_tables();
      for (Index table : {Index(0), k - 1}) {
        const auto counts = u.hits.counts(table);
        double total = 0, max = 0;
        std::size_t used = 0;
        for (auto c : counts) {
          total += double(c);
          max = std::max(max, double(c));
          used += c > 0;
        }
        for (std::size_t bucket = 0; bucket < counts.size(); ++bucket)
          csv << u.block << ',' << u.layer << ',' << table << ',' << bucket << ',' << counts[bucket] << ','
              << (total > 0 ? double(counts[bucket]) / total : 0.0) << '\n';
        std::printf("%5ld %4s %6ld %8zu %12zu %10.2f %10.3f\n", long(u.block), u.layer.c_str(), long(table),
                    counts.size(), used, total > 0 ? max / (total / double(counts.size())) : 0.0,
                    normalized_entropy(counts, u.hits.tau()));
        if (k == 1) break;
      }
    }
    mf::write_file_atomically(csv_path, csv.str());
    std::printf("wrote %s\n", csv_path.c_str());

    // PNG with gnuplot, when it is installed: 2 × 3 panels (first/last table of QKV, ML1, ML2) of one block.
    if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
      std::printf("gnuplot not found: no PNG (apt-get install gnuplot-nox)\n");
      return 0;
    }
    const Index block = a.plot_block >= 0 ? std::min(a.plot_block, model.layers() - 1) : model.layers() - 1;
    const std::string gp_path = a.out + ".gp", png_path = a.out + ".png";
    std::ostringstream gp;
    gp << "set terminal pngcairo size 1500,800 font ',10'\n"
       << "set output '" << png_path << "'\n"
       << "set datafile separator ','\n"
       << "set multiplot layout 2,3 title 'Bucket usage of block " << block << " on " << tokens
       << " validation tokens (cf. MemoryFormer Figure 4)'\n"
       << "set style fill solid 0.8 noborder\nset xlabel 'bucket'\nset ylabel 'frequency'\nunset key\n";
    for (const char* which : {"first", "last"})
      for (const char* layer : {"qkv", "ml1", "ml2"}) {
        const auto& u = usage[std::size_t(3 * block + (layer[0] == 'q' ? 0 : layer[2] == '1' ? 1 : 2))];
        const Index table = which[0] == 'f' ? 0 : u.hits.num_tables() - 1;
        gp << "set xrange [-0.5:" << (Index(1) << u.hits.tau()) << "-0.5]\n";
        gp << "set title '" << (layer[0] == 'q' ? "Q/K/V (shared hash)" : layer[2] == '1' ? "ML1" : "ML2") << ", "
           << which << " table (" << table << "), " << (Index(1) << u.hits.tau()) << " buckets'\n"
           << "plot '" << csv_path << "' every ::1 using ($1==" << block << " && strcol(2) eq '" << layer
           << "' && $3==" << table << " ? $4 : 1/0):6 with boxes\n";
      }
    gp << "unset multiplot\n";
    mf::write_file_atomically(gp_path, gp.str());
    if (std::system(("gnuplot '" + gp_path + "'").c_str()) != 0) throw std::runtime_error("gnuplot failed on " + gp_path);
    std::printf("wrote %s (gnuplot script %s)\n", png_path.c_str(), gp_path.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "bucket_usage: " << e.what() << "\n";
    return 1;
  }
}

// SPDX-License-Identifier: MIT
// MpiEnvironment: what a program of the examples (and the mpi tests) does to run under mpirun — MPI_Init_thread at its
// start, MPI_Finalize at its end, and a failure on one rank turned into the end of the whole job, with its message,
// instead of the other ranks waiting forever in their next exchange.
#pragma once

#include <mpi.h>

#include <cstdio>
#include <string>

namespace memoryformer_examples {

class MpiEnvironment {
 public:
  /// MPI_Init_thread with MPI_THREAD_FUNNELED: only the main thread calls MPI (OpenMP threads never do).
  MpiEnvironment(int& argc, char**& argv) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  ~MpiEnvironment() { MPI_Finalize(); }
  MpiEnvironment(const MpiEnvironment&) = delete;
  MpiEnvironment& operator=(const MpiEnvironment&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  /// Prints "<program> (rank r of R): <message>" and returns `code` with one rank, or ends every rank of the job
  /// with `code` (MPI_Abort) with several: the others may be waiting for this one in an exchange.
  int fail(const char* program, const std::string& message, int code = 1) const {
    if (size_ == 1) {
      std::fprintf(stderr, "\n%s: %s\n", program, message.c_str());
      return code;
    }
    std::fprintf(stderr, "\n%s (rank %d of %d): %s\n", program, rank_, size_, message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    return code;
  }

 private:
  int rank_ = 0, size_ = 1;
};

}  // namespace memoryformer_examples

// SPDX-License-Identifier: MIT
// The world communicator of the mpi test programs (MPI is initialised by their main, mpi_test_main.cpp).
#pragma once

#include <memoryformer/distributed/mpi_communicator.hpp>

namespace memoryformer_test {

inline memoryformer::MpiCommunicator& world() {
  static memoryformer::MpiCommunicator comm;
  return comm;
}

}  // namespace memoryformer_test

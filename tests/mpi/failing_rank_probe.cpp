// SPDX-License-Identifier: MIT
// A job in which one rank fails while the others wait for it in an exchange: rank 1 cannot read its checkpoint, rank
// 0 is already inside a training step. ctest (mpi.failing_rank_stops_the_job) checks that the job ends promptly with
// rank 1's message, through the same MpiEnvironment::fail that train_lm uses, instead of hanging.
#include <exception>
#include <string>

#include <memoryformer/distributed/mpi_communicator.hpp>
#include <memoryformer/io/checkpoint.hpp>

#include "common/mpi_environment.hpp"
#include "support/distributed_cases.hpp"

int main(int argc, char** argv) {
  const memoryformer_examples::MpiEnvironment mpi(argc, argv);
  try {
    namespace mf = memoryformer;
    namespace cases = memoryformer_test::distributed;
    mf::MpiCommunicator comm;
    mf::MemoryFormerLM<float> model(cases::small_lm(), 1, mf::TableSharding{&comm});
    mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, cases::training_text(), cases::training_options(3), comm);
    if (comm.rank() == 1) (void)mf::load_checkpoint("/nonexistent/memoryformer-probe.ckpt");
    trainer.step();  // collective: without the abort, rank 0 would wait here forever
    return 0;
  } catch (const std::exception& e) {
    return mpi.fail("failing_rank_probe", e.what());
  }
}

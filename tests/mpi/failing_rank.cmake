# SPDX-License-Identifier: MIT
# Runs the failing-rank probe under mpirun (-DCOMMAND=<mpirun ... probe> as a ;-list) and passes when the job ends
# by itself (ctest's TIMEOUT catches a hang) with a non-zero exit code and the failing rank's message.
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
set(all "${out}${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "the job exited with 0 although rank 1 failed:\n${all}")
endif()
if(NOT all MATCHES "failing_rank_probe \\(rank 1 of 2\\): [^\n]*memoryformer-probe\\.ckpt")
  message(FATAL_ERROR "the job ended (${rc}) without rank 1's message:\n${all}")
endif()
message(STATUS "the job stopped (${rc}) with rank 1's message")

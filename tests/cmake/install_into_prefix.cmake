# SPDX-License-Identifier: MIT
# Test fixture (consumer.install): installs the build tree BUILD_DIR into a fresh PREFIX.
cmake_minimum_required(VERSION 3.25)
# Usage: cmake -DBUILD_DIR=... -DPREFIX=... [-DCONFIG=...] -P install_into_prefix.cmake
foreach(_v BUILD_DIR PREFIX)
  if(NOT DEFINED ${_v})
    message(FATAL_ERROR "install_into_prefix.cmake: ${_v} not set")
  endif()
endforeach()
file(REMOVE_RECURSE "${PREFIX}")  # no stale headers from an earlier install
set(_config_args "")
if(CONFIG)
  set(_config_args --config "${CONFIG}")
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${_config_args}
  RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${_rc})")
endif()

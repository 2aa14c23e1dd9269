# SPDX-License-Identifier: MIT
# Test consumer.pkg-config: `pkg-config --cflags --libs memoryformer` against the installed PREFIX must print
# the install's include directory, Eigen's and -lxxhash; then a program is compiled with exactly those flags and run.
cmake_minimum_required(VERSION 3.25)
# Usage: cmake -DPKG_CONFIG=... -DPREFIX=... -DPC_DIR=... -DINCLUDE_DIR=... -DCXX=... -DSOURCE=... -DOUTPUT=...
#        -P pkgconfig_check.cmake
foreach(_v PKG_CONFIG PC_DIR INCLUDE_DIR CXX SOURCE OUTPUT)
  if(NOT DEFINED ${_v})
    message(FATAL_ERROR "pkgconfig_check.cmake: ${_v} not set")
  endif()
endforeach()

if(DEFINED ENV{PKG_CONFIG_PATH} AND NOT "$ENV{PKG_CONFIG_PATH}" STREQUAL "")
  set(ENV{PKG_CONFIG_PATH} "${PC_DIR}:$ENV{PKG_CONFIG_PATH}")
else()
  set(ENV{PKG_CONFIG_PATH} "${PC_DIR}")
endif()
execute_process(COMMAND "${PKG_CONFIG}" --cflags --libs memoryformer
  OUTPUT_VARIABLE _flags ERROR_VARIABLE _err RESULT_VARIABLE _rc OUTPUT_STRIP_TRAILING_WHITESPACE)
message(STATUS "pkg-config --cflags --libs memoryformer: ${_flags}")
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "pkg-config failed (${_rc}): ${_err}")
endif()

separate_arguments(_args UNIX_COMMAND "${_flags}")
foreach(_want "-I${INCLUDE_DIR}" "-lxxhash")
  if(NOT _want IN_LIST _args)
    message(FATAL_ERROR "pkg-config output lacks ${_want}")
  endif()
endforeach()
if(NOT _flags MATCHES "-I[^ ]*eigen3")
  message(FATAL_ERROR "pkg-config output lacks Eigen's include directory")
endif()

get_filename_component(_outdir "${OUTPUT}" DIRECTORY)
file(MAKE_DIRECTORY "${_outdir}")
execute_process(COMMAND "${CXX}" -std=c++20 "${SOURCE}" ${_args} -o "${OUTPUT}" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "compiling ${SOURCE} with the pkg-config flags failed")
endif()
execute_process(COMMAND "${OUTPUT}" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "the program built with the pkg-config flags failed (${_rc})")
endif()

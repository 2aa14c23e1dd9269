# SPDX-License-Identifier: MIT
# Build settings for memoryformer's own executables (tests, benchmarks, examples). Never applied to the
# INTERFACE target `memoryformer`: consumers choose their own warnings, ISA and optimisation flags.
#
#   memoryformer_detect_isa()         sets MEMORYFORMER_HOST_ISA (avx512 | avx2 | none) and the flag lists
#                                     MEMORYFORMER_AVX512_FLAGS, MEMORYFORMER_AVX2_FLAGS, MEMORYFORMER_BEST_ISA_FLAGS
#   memoryformer_apply_warnings(tgt)  -Wall -Wextra -Wpedantic (+ -Werror with MEMORYFORMER_WERROR)
#   memoryformer_configure_target(tgt [ISA best|avx512|avx2|none] [OPT default|O3])
#                                     warnings + sanitizers + ISA flags + optimisation level

include_guard(GLOBAL)
include(CheckCXXSourceCompiles)
include(CMakePushCheckState)

set(MEMORYFORMER_AVX512_FLAGS
    -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 -mavx2 -mfma -mf16c -mbmi2)
set(MEMORYFORMER_AVX2_FLAGS -mavx2 -mfma -mf16c -mbmi2)

# Decides which ISA variants the BUILD machine can both compile and run. The result is cached in
# MEMORYFORMER_HOST_ISA; set that variable yourself (avx512, avx2 or none) to skip or override detection,
# e.g. when cross-compiling or when the tests will run on an older machine than the one building them.
function(memoryformer_detect_isa)
  if(NOT DEFINED MEMORYFORMER_HOST_ISA)
    set(_isa "none")
    if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang" AND (NOT CMAKE_CROSSCOMPILING OR CMAKE_CROSSCOMPILING_EMULATOR))
      try_run(_mf_isa_run _mf_isa_compile
        "${CMAKE_BINARY_DIR}/CMakeFiles/memoryformer_detect_isa"
        "${PROJECT_SOURCE_DIR}/cmake/detect_isa.cpp"
        RUN_OUTPUT_VARIABLE _mf_isa_out)
      if(_mf_isa_compile AND _mf_isa_run EQUAL 0 AND _mf_isa_out MATCHES "^(avx512|avx2|none)$")
        set(_isa "${_mf_isa_out}")
      endif()
    endif()

    # The machine may run an ISA that the compiler cannot target (old compiler): check the flag sets too.
    if(_isa STREQUAL "avx512")
      cmake_push_check_state(RESET)
      list(JOIN MEMORYFORMER_AVX512_FLAGS " " CMAKE_REQUIRED_FLAGS)
      set(CMAKE_REQUIRED_QUIET ON)
      check_cxx_source_compiles([[
        #include <immintrin.h>
        int main() {
          __m512 a = _mm512_set1_ps(1.0f);
          __m512bh b = _mm512_cvtne2ps_pbh(a, a);
          __m512i c = _mm512_add_epi16(_mm512_castps_si512(a), (__m512i)b);
          return _mm512_reduce_add_epi32(c) == 7;
        }]] MEMORYFORMER_COMPILER_HAS_AVX512)
      cmake_pop_check_state()
      if(NOT MEMORYFORMER_COMPILER_HAS_AVX512)
        set(_isa "avx2")
      endif()
    endif()
    if(_isa STREQUAL "avx2")
      cmake_push_check_state(RESET)
      list(JOIN MEMORYFORMER_AVX2_FLAGS " " CMAKE_REQUIRED_FLAGS)
      set(CMAKE_REQUIRED_QUIET ON)
      check_cxx_source_compiles([[
        #include <immintrin.h>
        int main() {
          __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(1.0f), _mm256_set1_ps(2.0f), _mm256_set1_ps(3.0f));
          unsigned short h = _cvtss_sh(_mm256_cvtss_f32(a), 0);
          return int(_pdep_u32(h, 0xffu));
        }]] MEMORYFORMER_COMPILER_HAS_AVX2)
      cmake_pop_check_state()
      if(NOT MEMORYFORMER_COMPILER_HAS_AVX2)
        set(_isa "none")
      endif()
    endif()

    set(MEMORYFORMER_HOST_ISA "${_isa}" CACHE STRING
        "Best ISA the build machine runs and the compiler targets (avx512, avx2, none); detected once")
    set_property(CACHE MEMORYFORMER_HOST_ISA PROPERTY STRINGS avx512 avx2 none)
  endif()

  if(MEMORYFORMER_HOST_ISA STREQUAL "avx512")
    set(_best ${MEMORYFORMER_AVX512_FLAGS})
  elseif(MEMORYFORMER_HOST_ISA STREQUAL "avx2")
    set(_best ${MEMORYFORMER_AVX2_FLAGS})
  elseif(MEMORYFORMER_HOST_ISA STREQUAL "none")
    set(_best "")
  else()
    message(FATAL_ERROR "MEMORYFORMER_HOST_ISA must be avx512, avx2 or none (got '${MEMORYFORMER_HOST_ISA}')")
  endif()
  if(MEMORYFORMER_NATIVE)
    set(_best -march=native)
  endif()
  set(MEMORYFORMER_BEST_ISA_FLAGS "${_best}" PARENT_SCOPE)
  message(STATUS "memoryformer: build machine ISA = ${MEMORYFORMER_HOST_ISA}; "
                 "tests/examples/bench use: ${_best}")
endfunction()

function(memoryformer_apply_warnings target)
  if(MSVC)
    target_compile_options(${target} PRIVATE /W4 /permissive- $<$<BOOL:${MEMORYFORMER_WERROR}>:/WX>)
  else()
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic $<$<BOOL:${MEMORYFORMER_WERROR}>:-Werror>)
  endif()
endfunction()

# -O2 for every configuration whose flags request no optimisation level (e.g. plain Debug = "-g"), so that
# Eigen-heavy tests stay fast; a configuration that names a level (Release -O3, the asan preset's -O1) keeps it.
function(_memoryformer_default_opt out)
  set(_result "")
  if(NOT MSVC)
    get_property(_multi GLOBAL PROPERTY GENERATOR_IS_MULTI_CONFIG)
    if(_multi)
      set(_configs ${CMAKE_CONFIGURATION_TYPES})
    else()
      set(_configs "${CMAKE_BUILD_TYPE}")
    endif()
    set(_need "")
    set(_need_empty FALSE)
    foreach(_cfg IN LISTS _configs)
      string(TOUPPER "${_cfg}" _ucfg)
      set(_flags "${CMAKE_CXX_FLAGS}")
      if(_ucfg)
        string(APPEND _flags " ${CMAKE_CXX_FLAGS_${_ucfg}}")
      endif()
      if(NOT _flags MATCHES "(^| )-O")
        if(_cfg STREQUAL "")
          set(_need_empty TRUE)
        else()
          list(APPEND _need "${_cfg}")
        endif()
      endif()
    endforeach()
    if(_need_empty)
      set(_result -O2)
    elseif(_need)
      list(JOIN _need "," _need_csv)
      set(_result "$<$<CONFIG:${_need_csv}>:-O2>")
    endif()
  endif()
  set(${out} "${_result}" PARENT_SCOPE)
endfunction()

function(memoryformer_configure_target target)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "ISA;OPT" "")
  if(NOT ARG_ISA)
    set(ARG_ISA best)
  endif()
  if(NOT ARG_OPT)
    set(ARG_OPT default)
  endif()

  memoryformer_apply_warnings(${target})

  if(ARG_ISA STREQUAL "best")
    set(_isa_flags ${MEMORYFORMER_BEST_ISA_FLAGS})
  elseif(ARG_ISA STREQUAL "avx512")
    set(_isa_flags ${MEMORYFORMER_AVX512_FLAGS})
  elseif(ARG_ISA STREQUAL "avx2")
    set(_isa_flags ${MEMORYFORMER_AVX2_FLAGS})
  elseif(ARG_ISA STREQUAL "none")
    set(_isa_flags "")
  else()
    message(FATAL_ERROR "memoryformer_configure_target: unknown ISA '${ARG_ISA}'")
  endif()
  if(_isa_flags)
    target_compile_options(${target} PRIVATE ${_isa_flags})
  endif()
  # GCC 12 bug 105593: the AVX-512 intrinsics' _mm*_undefined_*() (`__m256d __Y = __Y;`), inlined into Eigen's
  # AVX-512 packet code, raise dozens of (maybe-)uninitialized warnings per TU, attributed to GCC's own headers.
  # Silenced only where AVX-512 may be on; the avx2 and scalar ISA builds (and Clang) keep both warnings.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13
     AND _isa_flags MATCHES "avx512|march=native")
    target_compile_options(${target} PRIVATE -Wno-uninitialized -Wno-maybe-uninitialized)
  endif()
  # GCC 12 bugs 105329/105651: at -O2/-O3, `"literal" + std::string&&` (basic_string::insert inlined into
  # memcpy) raises false -Wrestrict, -Wstringop-overflow and -Warray-bounds warnings from libstdc++'s own headers,
  # depending on what else the optimiser inlined into the function. GCC 13 and Clang keep all three.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    target_compile_options(${target} PRIVATE -Wno-restrict -Wno-stringop-overflow -Wno-array-bounds)
  endif()
  # Plain ISO C++20 (-std=c++20, not gnu++20), as the library promises.
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)

  if(ARG_OPT STREQUAL "O3")
    if(NOT MSVC)
      target_compile_options(${target} PRIVATE -O3)
    endif()
  else()
    _memoryformer_default_opt(_opt)
    if(_opt)
      target_compile_options(${target} PRIVATE ${_opt})
    endif()
  endif()

  if(MEMORYFORMER_SANITIZE AND NOT MSVC)
    target_compile_options(${target} PRIVATE
      -fsanitize=${MEMORYFORMER_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
    get_target_property(_type ${target} TYPE)
    if(NOT _type STREQUAL "OBJECT_LIBRARY")
      target_link_options(${target} PRIVATE -fsanitize=${MEMORYFORMER_SANITIZE})
    endif()
    # The sanitizers' metadata makes millions of load-time relocations in a position-independent executable: a
    # non-PIE test binary starts in a fraction of the time, and ctest starts one per test.
    if(_type STREQUAL "EXECUTABLE")
      target_link_options(${target} PRIVATE -no-pie)
    endif()
  endif()
endfunction()

# Links the explicit instantiations of the models, blocks, trainers and optimizers that the tests compile
# (memoryformer_class_instantiations) into `target` and force-includes the header that declares them extern into its
# sources (only the given SOURCES, if any: a small source that uses none of them would only parse more), so they stop
# compiling their own copy of every member: a build-time measure for the examples and test programs built with the
# tests, with the same flags (memoryformer_configure_target, ISA best). Nothing without the tests.
function(memoryformer_use_class_instantiations target)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "" "SOURCES")
  if(NOT TARGET memoryformer_class_instantiations)
    return()
  endif()
  target_link_libraries(${target} PRIVATE memoryformer_class_instantiations)
  # Joined (-include<file>, which GCC and Clang accept): one option, so neither de-duplication nor a source's options
  # split it.
  set(_include "-include${PROJECT_SOURCE_DIR}/tests/support/class_template_instantiations.hpp")
  if(ARG_SOURCES)
    set_property(SOURCE ${ARG_SOURCES} TARGET_DIRECTORY ${target} APPEND PROPERTY COMPILE_OPTIONS "${_include}")
  else()
    target_compile_options(${target} PRIVATE "${_include}")
  endif()
endfunction()

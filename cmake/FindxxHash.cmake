# SPDX-License-Identifier: MIT
# FindxxHash: locate the xxHash library and provide the imported target xxHash::xxhash.
#
# Tries, in order:
#   1. an upstream xxHashConfig.cmake (upstream's CMake build, vcpkg, some distributions);
#   2. pkg-config's libxxhash.pc (what Debian/Ubuntu's libxxhash-dev ships: it has no CMake config);
#   3. a plain find_path(xxhash.h) + find_library(xxhash).
#
# Result variables: xxHash_FOUND, xxHash_VERSION, xxHash_INCLUDE_DIR, xxHash_LIBRARY (path 3 only).
# This file is installed next to memoryformerConfig.cmake so that find_dependency(xxHash) works for consumers.

include(FindPackageHandleStandardArgs)

if(TARGET xxHash::xxhash)
  # Already provided in this directory scope (e.g. by an earlier find_package(xxHash)).
  set(xxHash_FOUND TRUE)
  return()
endif()

# 1. Upstream config package. It exports xxHash::xxhash itself.
find_package(xxHash CONFIG QUIET)
if(xxHash_FOUND AND TARGET xxHash::xxhash)
  find_package_handle_standard_args(xxHash CONFIG_MODE)
  return()
endif()
set(xxHash_FOUND FALSE)

# 2. pkg-config.
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(XXHASH QUIET IMPORTED_TARGET libxxhash)
  if(XXHASH_FOUND AND TARGET PkgConfig::XXHASH)
    add_library(xxHash::xxhash INTERFACE IMPORTED)
    target_link_libraries(xxHash::xxhash INTERFACE PkgConfig::XXHASH)
    set(xxHash_VERSION "${XXHASH_VERSION}")
    # Informational only (pkg-config drops /usr/include, so XXHASH_INCLUDE_DIRS is often empty).
    find_path(xxHash_INCLUDE_DIR NAMES xxhash.h HINTS ${XXHASH_INCLUDE_DIRS} ${XXHASH_INCLUDEDIR})
    mark_as_advanced(xxHash_INCLUDE_DIR)
    find_package_handle_standard_args(xxHash
      REQUIRED_VARS XXHASH_LINK_LIBRARIES
      VERSION_VAR xxHash_VERSION)
    return()
  endif()
endif()

# 3. Plain search.
find_path(xxHash_INCLUDE_DIR NAMES xxhash.h)
find_library(xxHash_LIBRARY NAMES xxhash libxxhash)
mark_as_advanced(xxHash_INCLUDE_DIR xxHash_LIBRARY)

if(xxHash_INCLUDE_DIR AND EXISTS "${xxHash_INCLUDE_DIR}/xxhash.h")
  file(STRINGS "${xxHash_INCLUDE_DIR}/xxhash.h" _xxhash_version_lines
       REGEX "^#define XXH_VERSION_(MAJOR|MINOR|RELEASE)[ \t]+[0-9]+")
  foreach(_part MAJOR MINOR RELEASE)
    string(REGEX MATCH "XXH_VERSION_${_part}[ \t]+([0-9]+)" _m "${_xxhash_version_lines}")
    set(_xxhash_${_part} "${CMAKE_MATCH_1}")
  endforeach()
  if(NOT _xxhash_MAJOR STREQUAL "")
    set(xxHash_VERSION "${_xxhash_MAJOR}.${_xxhash_MINOR}.${_xxhash_RELEASE}")
  endif()
  unset(_xxhash_version_lines)
  unset(_xxhash_MAJOR)
  unset(_xxhash_MINOR)
  unset(_xxhash_RELEASE)
endif()

find_package_handle_standard_args(xxHash
  REQUIRED_VARS xxHash_LIBRARY xxHash_INCLUDE_DIR
  VERSION_VAR xxHash_VERSION)

if(xxHash_FOUND AND NOT TARGET xxHash::xxhash)
  add_library(xxHash::xxhash UNKNOWN IMPORTED)
  set_target_properties(xxHash::xxhash PROPERTIES
    IMPORTED_LOCATION "${xxHash_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${xxHash_INCLUDE_DIR}")
endif()

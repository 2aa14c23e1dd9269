# SPDX-License-Identifier: MIT
# API reference: the `docs` target runs Doxygen over the public headers (include/memoryformer, without detail/),
# with README.md as the main page and docs/*.md as related pages, and writes HTML to <build dir>/docs/html. Optional: enabled by -DMEMORYFORMER_BUILD_DOCS=ON (the `docs` preset).
#
# Warnings fail the build (WARN_AS_ERROR = FAIL_ON_WARNINGS): a malformed doc comment (a @param naming no
# parameter, an unknown command, a broken reference) is an error. Undocumented entities are not: the reference
# documents what carries a comment, so a new function without one does not break the build.
find_package(Doxygen)
if(NOT DOXYGEN_FOUND)
  message(FATAL_ERROR
    "MEMORYFORMER_BUILD_DOCS is ON but Doxygen was not found. "
    "Install it with: bash cmake/install-deps.sh --docs (Debian/Ubuntu package doxygen)")
endif()

set(DOXYGEN_PROJECT_NAME "memoryformer")
set(DOXYGEN_PROJECT_NUMBER "${PROJECT_VERSION}")
set(DOXYGEN_PROJECT_BRIEF "Header-only C++20 MemoryFormer: hashed lookup tables in place of fully-connected layers")
set(DOXYGEN_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}/docs")
set(DOXYGEN_GENERATE_HTML YES)
set(DOXYGEN_GENERATE_LATEX NO)
set(DOXYGEN_GENERATE_XML NO)
set(DOXYGEN_QUIET YES)
set(DOXYGEN_RECURSIVE YES)
set(DOXYGEN_FILE_PATTERNS "*.hpp" "*.md")
set(DOXYGEN_EXTENSION_MAPPING "hpp=C++")
set(DOXYGEN_STRIP_FROM_PATH "${PROJECT_SOURCE_DIR}/include" "${PROJECT_SOURCE_DIR}")
set(DOXYGEN_STRIP_FROM_INC_PATH "${PROJECT_SOURCE_DIR}/include")
# Public headers only: the internals in detail/ (namespace memoryformer::detail) are not part of the API.
set(DOXYGEN_EXCLUDE "${PROJECT_SOURCE_DIR}/include/memoryformer/detail")
set(DOXYGEN_EXCLUDE_SYMBOLS "detail" "memoryformer::detail" "memoryformer::detail::*")
set(DOXYGEN_EXTRACT_ALL NO)
set(DOXYGEN_EXTRACT_PRIVATE NO)
set(DOXYGEN_EXTRACT_STATIC YES)
set(DOXYGEN_HIDE_UNDOC_MEMBERS NO)
set(DOXYGEN_JAVADOC_AUTOBRIEF NO)
# Comments write the carriage return as '\r' (as in the code); without this alias Doxygen reads \r as a command.
set(DOXYGEN_ALIASES [[r=\\r]])
set(DOXYGEN_MARKDOWN_SUPPORT YES)
set(DOXYGEN_USE_MDFILE_AS_MAINPAGE "${PROJECT_SOURCE_DIR}/README.md")
set(DOXYGEN_BUILTIN_STL_SUPPORT YES)
set(DOXYGEN_ENABLE_PREPROCESSING YES)
set(DOXYGEN_MACRO_EXPANSION NO)
set(DOXYGEN_PREDEFINED "MEMORYFORMER_USE_OPENMP")
set(DOXYGEN_SOURCE_BROWSER NO)
set(DOXYGEN_HAVE_DOT NO)
# Malformed documentation fails; missing documentation does not (see the top of this file).
set(DOXYGEN_WARNINGS YES)
set(DOXYGEN_WARN_IF_UNDOCUMENTED NO)
set(DOXYGEN_WARN_IF_DOC_ERROR YES)
set(DOXYGEN_WARN_IF_INCOMPLETE_DOC NO)
set(DOXYGEN_WARN_NO_PARAMDOC NO)
set(DOXYGEN_WARN_AS_ERROR FAIL_ON_WARNINGS)

doxygen_add_docs(docs
  "${PROJECT_SOURCE_DIR}/README.md"
  "${PROJECT_SOURCE_DIR}/include/memoryformer"
  "${PROJECT_SOURCE_DIR}/docs"
  WORKING_DIRECTORY "${PROJECT_SOURCE_DIR}"
  COMMENT "Doxygen: API reference of the public headers -> ${PROJECT_BINARY_DIR}/docs/html/index.html")

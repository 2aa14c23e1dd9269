// SPDX-License-Identifier: MIT
// Library version; CMakeLists.txt parses these three macros.
#pragma once

#define MEMORYFORMER_VERSION_MAJOR 0
#define MEMORYFORMER_VERSION_MINOR 1
#define MEMORYFORMER_VERSION_PATCH 0
#define MEMORYFORMER_VERSION_STRING "0.1.0"

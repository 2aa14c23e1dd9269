#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Installs what building and testing memoryformer needs, from Debian/Ubuntu packages. Idempotent: when every
# package is already installed it does nothing (no apt-get update, no network).
#   bash cmake/install-deps.sh          build + tests + benchmarks
#   bash cmake/install-deps.sh --plot   also gnuplot-nox, which the benchmark report uses to draw its PNG
#   bash cmake/install-deps.sh --docs   also doxygen, which builds the API reference (cmake --workflow --preset docs)
#   bash cmake/install-deps.sh --mpi    also Open MPI (libopenmpi-dev, openmpi-bin): distributed training and its tests
set -euo pipefail

packages=(cmake ninja-build g++ make pkg-config libeigen3-dev libxxhash-dev libgtest-dev libbenchmark-dev)
for arg in "$@"; do
  case "$arg" in
    --plot) packages+=(gnuplot-nox) ;;
    --docs) packages+=(doxygen) ;;
    --mpi) packages+=(libopenmpi-dev openmpi-bin) ;;
    -h|--help)
      sed -n '3,8p' "$0" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    *)
      echo "install-deps.sh: unknown argument '$arg' (use --plot, --docs, --mpi or --help)" >&2
      exit 2 ;;
  esac
done

if ! command -v dpkg >/dev/null 2>&1; then
  echo "install-deps.sh: no dpkg here (not Debian/Ubuntu). Install the equivalents of:" >&2
  echo "  ${packages[*]}" >&2
  echo "  (CMake >= 3.25, Ninja, a C++20 compiler, pkg-config, Eigen >= 3.4, xxHash, GoogleTest, Google Benchmark;" >&2
  echo "  gnuplot with --plot, Doxygen with --docs, Open MPI with --mpi)" >&2
  exit 0
fi

missing=()
for p in "${packages[@]}"; do
  # `dpkg -s` also succeeds for removed packages whose config files remain, so read the status itself.
  status=$(dpkg -s "$p" 2>/dev/null || true)
  if [[ "$status" != *"Status: install ok installed"* ]]; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    run=()
  elif command -v sudo >/dev/null 2>&1; then
    # Without a terminal sudo cannot ask for a password: fail at once instead of hanging.
    if [[ -t 0 ]]; then run=(sudo); else run=(sudo -n); fi
  else
    echo "install-deps.sh: these packages are missing: ${missing[*]}" >&2
    echo "  Run as root:  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    echo "  (or re-run this script as root; sudo is not available)" >&2
    exit 1
  fi
  echo "install-deps.sh: installing ${missing[*]}"
  "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Debian 12's CMake is 3.25, the first with workflow presets; older distributions need a newer CMake.
cmake_version=$(cmake --version | sed -n '1s/^cmake version \([0-9]*\.[0-9]*\).*/\1/p')
if [[ -n "$cmake_version" ]]; then
  major=${cmake_version%%.*}
  minor=${cmake_version#*.}
  if ((major < 3 || (major == 3 && minor < 25))); then
    echo "install-deps.sh: CMake $cmake_version is too old; memoryformer needs >= 3.25 (cmake --workflow)." >&2
    exit 1
  fi
fi
echo "install-deps.sh: dependencies present (${packages[*]})"

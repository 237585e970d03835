#!/usr/bin/env bash
# Installs what is missing, builds with warnings as errors, and runs the whole test suite
# through ctest. `--sanitize` does the same in a separate AddressSanitizer + UBSan build.
set -euo pipefail
cd "$(dirname "$0")/.."

variant=release
[ "${1:-}" = "--sanitize" ] && variant=sanitize

bash scripts/setup.sh

build="build/$variant"
opts=(-DSLUICE_WERROR=ON -DSLUICE_TESTS=ON)
if [ "$variant" = sanitize ]; then
  opts+=(-DSLUICE_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug)
  # LuaJIT's allocator and the JIT confuse LeakSanitizer's view of Lua-owned memory only in
  # the interpreter's own frames; leaks in sluice's code are still reported.
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${ASAN_OPTIONS:-}"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
fi
cmake -S . -B "$build" "${opts[@]}" >/dev/null
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure -j"$(nproc)" --timeout 300

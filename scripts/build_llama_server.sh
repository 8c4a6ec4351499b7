#!/usr/bin/env bash
# Build a real llama.cpp `llama-server` on a CPU-only machine, once, for the real-engine test
# tier (tests/real/, `./dev.sh test-real`).
#
# The llama.cpp sources come from the llama-cpp-python sdist on PyPI (a pinned, checksummed
# release fetched with plain pip, so no git access is needed). The binary is statically linked
# and cached OUTSIDE the checkout, so every worktree and every clean checkout reuses it:
#     ${LLM_ROUTER_CACHE:-~/.cache/llm-router}/llama-server/bin/llama-server
# Run again: prints the cached path at once. Environment knobs:
#     LLAMA_CPP_PYTHON_VERSION  the sdist to build from (default 0.3.36)
#     BUILD_JOBS                parallel compile jobs (default 2: the machine may be shared)
#     PYTHON                    the interpreter whose pip downloads the sdist (default python3)
# The compile runs under `nice -n 19`; it takes about 10 minutes on two cores.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
jobs="${BUILD_JOBS:-2}"
python="${PYTHON:-python3}"
cache="${LLM_ROUTER_CACHE:-$HOME/.cache/llm-router}/llama-server"
binary="$cache/bin/llama-server"
stamp="$cache/bin/.built-from-llama-cpp-python-$version"

if [ -x "$binary" ] && [ -f "$stamp" ]; then
  echo "$binary"
  exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.build.lock"
if command -v flock >/dev/null && ! flock -n 9; then
  echo "build_llama_server.sh: another build is running; waiting for it" >&2
  flock 9
fi
if [ -x "$binary" ] && [ -f "$stamp" ]; then  # built by the run we waited for
  echo "$binary"
  exit 0
fi
for tool in cmake c++ tar; do
  command -v "$tool" >/dev/null || { echo "build_llama_server.sh: '$tool' is needed" >&2; exit 1; }
done

work="$cache/work-$version"
mkdir -p "$work" "$cache/bin"
sdist="$work/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  # --no-binary for this one package: the sdist, not a prebuilt wheel (its build tools may be
  # wheels; --no-binary :all: would compile cmake itself from source just to read metadata).
  echo "build_llama_server.sh: downloading llama-cpp-python $version (sdist, ~77 MB)" >&2
  "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$version" -d "$work"
fi
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
  tar -xzf "$sdist" -C "$work"
fi

echo "build_llama_server.sh: compiling llama-server with $jobs jobs (about 10 min; log: $work/build.log)" >&2
{
  nice -n 19 cmake -S "$src" -B "$work/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF \
    -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON
  nice -n 19 cmake --build "$work/build" --target llama-server -j "$jobs"
} >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }

built="$(find "$work/build" -type f -name llama-server -perm -u+x | head -n 1)"
[ -n "$built" ] || { echo "build_llama_server.sh: no llama-server in $work/build" >&2; exit 1; }
install -m 0755 "$built" "$binary.tmp"
mv "$binary.tmp" "$binary"
rm -f "$cache"/bin/.built-from-*
touch "$stamp"
rm -rf "$work"
echo "$binary"

#!/usr/bin/env bash
# Installs llama-cpp-python, the GGUF interop partner, from a wheel cached outside the repository.
# PyPI has no binary wheel for it, so the first run builds one from source (about 10-25 minutes on 2 cores);
# later runs install the cached wheel in seconds. Cache: $LLAMA_CPP_WHEELS (default ~/.cache/tunesmith/wheels).
#   bash bench/llama_cpp.sh            build if needed, install
#   bash bench/llama_cpp.sh --test     then run the llama.cpp interop suite (pytest -m llama_cpp)
set -euo pipefail
version="${LLAMA_CPP_VERSION:-0.3.36}"
cache="${LLAMA_CPP_WHEELS:-$HOME/.cache/tunesmith/wheels}"
mkdir -p "$cache"
if ! ls "$cache"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $version into $cache (once; 10-25 minutes on 2 cores)" >&2
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        python3 -m pip wheel --no-deps --wheel-dir "$cache" "llama-cpp-python==$version"
fi
# The cached wheel, and its runtime dependencies (numpy, typing-extensions, diskcache, jinja2) from the registry;
# --only-binary keeps pip from building llama-cpp-python from source again if the wheel were not found.
python3 -m pip install --find-links "$cache" --only-binary llama-cpp-python "llama-cpp-python==$version"
if [ "${1:-}" = "--test" ]; then
    cd "$(dirname "$0")/.."
    python3 -m pytest -q -s -m llama_cpp tests/test_gguf_llama_cpp.py  # -s: the interop table is printed
fi

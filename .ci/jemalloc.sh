# Sourced by .ci/run: jemalloc, the allocator `tunesmith train` runs on where the system has it
# (src/tunesmith/allocator.py), so its tests (tests/test_allocator.py) run rather than skip.

if ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libjemalloc2
fi
echo "jemalloc for the allocator tests: $(ls /usr/lib/*/libjemalloc.so.2 2>/dev/null || echo 'not available')"

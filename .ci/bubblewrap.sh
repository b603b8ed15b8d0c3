# Sourced by .ci/run: bubblewrap, the sandbox's namespaces for python graders (src/tunesmith/eval/graders/sandbox.py:
# no network, a read-only filesystem), so tests/test_python_grader.py tests them rather than the fallback alone.

if ! command -v bwrap >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap
fi
echo "bubblewrap for the python grader's sandbox: $(command -v bwrap || echo 'not available')"

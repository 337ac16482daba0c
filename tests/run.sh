#!/usr/bin/env bash
# The project's one test command: set up the machine and the venv, then run
# ruff, mypy and pytest. Extra arguments go to pytest, e.g.
#   bash tests/run.sh -k handshake -x
#   bash tests/run.sh --co -q
# Every check runs even if an earlier one failed, so one run reports them all;
# the exit status is non-zero if any failed (pytest's "no tests collected", 5,
# counts as a failure).
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd -- "$ROOT"

banner() { printf '\n==== %s ====\n' "$*"; }

banner "set-up (Debian packages, .venv)"
bash "$ROOT/deploy/setup-env.sh"

PY="$ROOT/.venv/bin/python"
failed=()

run_step() {
    local name="$1"
    shift
    banner "$name"
    local rc=0
    "$@" || rc=$?
    if ((rc == 0)); then
        printf -- '---- %s: ok\n' "$name"
    else
        if [[ "$name" == pytest* && $rc == 5 ]]; then
            printf -- '---- %s: no tests collected (exit 5)\n' "$name"
        else
            printf -- '---- %s: FAILED (exit %d)\n' "$name" "$rc"
        fi
        failed+=("$name")
    fi
}

run_step "ruff check prlnbd tests" "$PY" -m ruff check prlnbd tests
run_step "mypy" "$PY" -m mypy
run_step "pytest tests${*:+ $*}" "$PY" -m pytest tests "$@"
if (($# == 0)); then
    # The server runs on uvloop when it is installed; these run it on plain asyncio too
    # (its transports call get_buffer/buffer_updated and pause/resume writing differently), wire
    # protocol, bitmaps, TLS, replies by sendfile.
    run_step "pytest on the asyncio loop (protocol, bitmaps, TLS, sendfile)" env PRLNBD_LOOP=asyncio \
        "$PY" -m pytest tests/integration/test_protocol.py tests/integration/test_bitmaps.py \
        tests/integration/test_tls.py tests/integration/test_sendfile.py
fi

banner "summary"
if ((${#failed[@]} > 0)); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all checks passed"

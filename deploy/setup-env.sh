#!/usr/bin/env bash
# Prepare this checkout on a Debian 12 machine: the system packages the tests
# and the demo need, and the project venv in .venv with prlnbd installed
# editable plus its test extras.
#
# The one copy of the set-up: tests/run.sh and deploy/demo.sh both run it as
# `bash deploy/setup-env.sh`. It may be run by hand too; it is idempotent and
# does nothing that is already done. Progress goes to stderr so that callers
# keep a clean stdout.
#
# Environment:
#   PRLNBD_SKIP_APT=1      do not check or install Debian packages
#   PRLNBD_FORCE_PIP=1     run `pip install -e .[test]` even if it looks current
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
# Debian's interpreter: libnbd's bindings (`import nbd`, python3-libnbd) are
# built for it only, so the venv must be made from it with system site-packages.
SYSTEM_PYTHON=/usr/bin/python3
APT_PACKAGES=(
    qemu-utils
    libnbd-bin
    python3-libnbd
    fio
    qemu-system-x86
    nbdkit
    python3-venv
    # nbdinfo calls file(1) to describe what an export holds.
    file
    # as and ld: the VM boot test assembles its boot sector.
    binutils
    # certtool and openssl: the TLS tests make their certificates (psktool: PSK keys).
    gnutls-bin
    openssl
    # sslpsk3 (TLS-PSK, a test extra) builds a C extension against OpenSSL.
    gcc
    libssl-dev
    python3-dev
)
STAMP="$VENV/.prlnbd-setup-stamp"

log() { printf 'setup-env: %s\n' "$*" >&2; }
die() { printf 'setup-env: error: %s\n' "$*" >&2; exit 1; }

install_apt_packages() {
    if [[ "${PRLNBD_SKIP_APT:-0}" == 1 ]]; then
        log "PRLNBD_SKIP_APT=1: not checking Debian packages"
        return 0
    fi
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg -s "$pkg" >/dev/null 2>&1; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        log "Debian packages present"
        return 0
    fi

    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 \
            || die "not root and no sudo: install these packages first: ${missing[*]}"
        sudo=(sudo)
    fi
    log "installing Debian packages: ${missing[*]}"
    # No stdin in CI: never let apt or dpkg ask anything.
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null >&2
}

venv_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    # Made from Debian's python, and sees its site-packages (libnbd's bindings).
    "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import sys
if sys.prefix == sys.base_prefix or sys.base_prefix != "/usr":
    raise SystemExit(1)
import nbd  # noqa: F401
EOF
}

make_venv() {
    [[ -x "$SYSTEM_PYTHON" ]] || die "$SYSTEM_PYTHON not found (is python3 installed?)"
    if venv_ok; then
        log "venv $VENV is usable"
        return 0
    fi
    if [[ -e "$VENV" ]]; then
        log "venv $VENV is broken or not made from $SYSTEM_PYTHON: recreating it"
    else
        log "creating venv $VENV"
    fi
    "$SYSTEM_PYTHON" -m venv --clear --system-site-packages "$VENV" >&2
    rm -f "$STAMP"
    venv_ok || die "new venv $VENV cannot import nbd (is python3-libnbd installed?)"
}

# What the editable install depends on: the dependency list and entry points in
# pyproject.toml, and where this checkout lives.
stamp_value() {
    printf '%s %s\n' "$ROOT" "$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
}

install_package() {
    if [[ "${PRLNBD_FORCE_PIP:-0}" != 1 && -f "$STAMP" && -x "$VENV/bin/prlnbd" ]] \
        && [[ "$(cat -- "$STAMP")" == "$(stamp_value)" ]]; then
        log "prlnbd already installed in $VENV (pyproject.toml unchanged)"
        return 0
    fi
    log "pip install -e '.[test]' into $VENV"
    (cd -- "$ROOT" && "$VENV/bin/python" -m pip install --quiet \
        --disable-pip-version-check --no-input -e '.[test]' </dev/null >&2)
    stamp_value >"$STAMP"
}

install_apt_packages
make_venv
install_package
log "ready: $VENV"

#!/usr/bin/env bash
# The project's main job in one command: on a fresh Debian 12 machine (as root,
# or with sudo) install what is needed, then run `prlnbd demo`, which builds a
# demo Parallels bundle with a 3-layer snapshot chain, serves it over NBD and
# prints the URI and client commands to try. Arguments go to `prlnbd demo`:
#   bash deploy/demo.sh
#   bash deploy/demo.sh --dir /tmp/prlnbd-demo --socket /tmp/prlnbd-demo.sock
#   bash deploy/demo.sh --bind 127.0.0.1 --port 10809
# Relative paths in the arguments are taken from the directory you run it in.
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"

bash "$ROOT/deploy/setup-env.sh"
exec "$ROOT/.venv/bin/prlnbd" demo "$@"

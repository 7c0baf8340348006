#!/usr/bin/env bash
# Sidecar demo: a node proxy and a tagger in front of a local HTTPS service, one allowed request,
# one denied request, and the audit log verified. No root, no network, no cluster needed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

echo "==> building"
cargo build --quiet --bins
bin="$root/target/debug"
work="$(mktemp -d -t cellgate-quickstart.XXXXXX)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "==> keys, CA and a token for the cell (in $work)"
"$bin/cellgate" keys init --out "$work/keys"
"$bin/cellgate" ca init --out "$work/ca"
mkdir -p "$work/cells" && cp "$here/cell.yaml" "$work/cells/"
"$bin/cellgate" token issue --key "$work/keys/signing.key" --cell "$here/cell.yaml" --ttl 10m --bind 127.0.0.1 > "$work/token"

echo "==> a local HTTPS service for api.demo on 127.0.0.1:8443"
"$bin/cellgate-demo-upstream" --names api.demo --ca-out "$work" --listen 127.0.0.1:8443 > "$work/upstream.log" &
pids+=($!)

echo "==> cellgate-node (intake 127.0.0.1:15001, admin 127.0.0.1:15021)"
"$bin/cellgate-node" --listen 127.0.0.1:15001 --admin 127.0.0.1:15021 --cells "$work/cells" \
  --ca "$work/ca" --trust "$work/keys/signing.pub" --audit "$work/audit.jsonl" \
  --upstream-ca "$work/upstream-ca.pem" --resolve api.demo:8443:127.0.0.1 2> "$work/node.log" &
pids+=($!)

echo "==> cellgate-tagger (the sidecar; here without iptables, so --destination says where the agent was going)"
"$bin/cellgate-tagger" --listen 127.0.0.1:15006 --node 127.0.0.1:15001 --token-file "$work/token" \
  --destination 127.0.0.1:8443 2> "$work/tagger.log" &
pids+=($!)

for _ in $(seq 50); do
  curl -sf http://127.0.0.1:15021/readyz >/dev/null 2>&1 && [ -s "$work/upstream.log" ] && break
  sleep 0.1
done

agent_curl() { curl -sS --cacert "$work/ca/ca.crt" --connect-to api.demo:8443:127.0.0.1:15006 "$@"; }

echo
echo "==> allowed: GET https://api.demo:8443/v1/hello"
agent_curl https://api.demo:8443/v1/hello; echo
echo
echo "==> denied: DELETE https://api.demo:8443/admin/users"
agent_curl -X DELETE https://api.demo:8443/admin/users; echo
echo
echo "==> audit log ($work/audit.jsonl)"
sleep 0.3
cut -c1-220 "$work/audit.jsonl"
"$bin/cellgate" audit verify "$work/audit.jsonl"

#!/usr/bin/env bash
# OpenAI-compatible chat through Cellgate with the API key injected at the boundary.
# A local stub (stub.py) plays api.openai.local:8443; the agent (curl inside `cellgate run`) sends
# no key, or a wrong one; the stub logs the Authorization header it received; the streamed answer
# arrives chunk by chunk (timestamps show it is not buffered). Needs root (network namespace).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
if [ "$(id -u)" -ne 0 ]; then
  echo "run.sh needs root: cellgate run creates a network namespace and iptables rules (try: sudo $0)" >&2
  exit 1
fi

echo "==> building"
cargo build --quiet --bins
bin="$root/target/debug"
work="$(mktemp -d -t cellgate-openai.XXXXXX)"
stub=""
trap '[ -n "$stub" ] && kill "$stub" 2>/dev/null || true' EXIT

echo "==> a CA and a certificate for api.openai.local (openssl)"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=openai-stub CA" \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=api.openai.local" \
  -keyout "$work/leaf.key" -out "$work/leaf.csr" 2>/dev/null
printf 'subjectAltName=DNS:api.openai.local\n' > "$work/ext.cnf"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 1 -extfile "$work/ext.cnf" -out "$work/leaf.pem" 2>/dev/null

echo "==> the key lives in the secrets directory only (root-only, never inside the cell)"
mkdir -m 700 "$work/secrets"
key="sk-demo-$(openssl rand -hex 12)"
printf '%s\n' "$key" > "$work/secrets/openai-key"
chmod 600 "$work/secrets/openai-key"

echo "==> the stub upstream on 127.0.0.1:8443"
python3 "$here/stub.py" --listen 127.0.0.1:8443 --cert "$work/leaf.pem" --key "$work/leaf.key" \
  --key-file "$work/secrets/openai-key" --log "$work/upstream.log" > "$work/stub.out" 2>&1 &
stub=$!
for _ in $(seq 50); do [ -s "$work/stub.out" ] && break; sleep 0.1; done

echo "==> cellgate run -f examples/openai-stub/cell.yaml --secrets $work/secrets -- sh -c '...'"
"$bin/cellgate" run -f "$here/cell.yaml" --secrets "$work/secrets" --upstream-ca "$work/ca.pem" \
  --resolve api.openai.local:8443:127.0.0.1 --audit "$work/audit.jsonl" -- sh -c '
    echo "--- streamed chat completion, no API key sent by the agent (one line per chunk, with time):"
    curl -sSN https://api.openai.local:8443/v1/chat/completions \
      -H "content-type: application/json" \
      -d "{\"model\":\"stub\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" |
      while IFS= read -r line; do [ -n "$line" ] && echo "$(date +%T.%N | cut -c1-12)  $line"; done
    echo "--- the agent sends a key of its own: it is replaced"
    curl -sS https://api.openai.local:8443/v1/chat/completions -H "authorization: Bearer sk-agent-made-up" \
      -H "content-type: application/json" -d "{\"model\":\"stub\",\"messages\":[]}"; echo
    echo "--- the agent cannot find the key: environment, and the secrets directory"
    if env | grep -q "sk-demo-"; then echo "KEY IN ENVIRONMENT"; else echo "not in the environment"; fi
    cat '"$work"'/secrets/openai-key 2>&1 | grep -v "^sk-demo-" || true
  '

echo
echo "==> what the upstream received (the agent sent no key, or sk-agent-made-up):"
cat "$work/upstream.log"
if grep -q "Authorization: Bearer $key" "$work/upstream.log" && ! grep -q "sk-agent-made-up" "$work/upstream.log"; then
  echo "OK: the upstream saw the injected key on every request and never the agent's own"
else
  echo "UNEXPECTED: see $work/upstream.log" >&2; exit 1
fi
echo "==> the key is in no audit record:"
if grep -q "$key" "$work/audit.jsonl"; then echo "LEAK in audit" >&2; exit 1; else echo "OK"; fi
"$bin/cellgate" audit verify "$work/audit.jsonl"

#!/usr/bin/env bash
# Soak: CONNS concurrent HTTPS connections (default 10 000) held open for DURATION seconds
# (default 1800) through cellgate-tagger + cellgate-node to a local nginx, each sending a request
# every few seconds (h2load --rps). Every minute it samples the node's and the tagger's RSS and
# open file descriptors; at the end it checks that
#   - h2load saw no failed and no errored request,
#   - RSS at the last sample under load is within RSS_TOLERANCE (10 %) of RSS after the warm-up
#     (minute WARM_MIN),
#   - once the load has stopped and the connections are closed, the descriptors are back to what
#     they were before the load (no leak),
#   - the audit log verifies.
# Loopback only; bounded by `timeout`; kills what it started on exit. Not a CI test: a bench.
# Needs release binaries (built unless SKIP_BUILD=1), nginx-light, nghttp2-client (h2load), and
# a file-descriptor limit of 3 x CONNS per process (it raises its own limits; root may raise the hard one).
#
#   bench/soak.sh                          # 10 000 connections for 30 minutes
#   CONNS=2000 DURATION=300 bench/soak.sh  # a quick one
set -euo pipefail

CONNS="${CONNS:-10000}"
DURATION="${DURATION:-1800}"
RPS_PER_CONN="${RPS_PER_CONN:-0.2}"   # requests per second per connection (h2load --rps)
WARM_MIN="${WARM_MIN:-5}"
RSS_TOLERANCE="${RSS_TOLERANCE:-10}"  # percent
HOST=api.soak

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

for t in nginx h2load openssl python3; do
  command -v "$t" >/dev/null 2>&1 || [ "$t" = nginx -a -x /usr/sbin/nginx ] || {
    echo "missing $t (apt-get install nginx-light nghttp2-client openssl python3)" >&2; exit 1; }
done
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
# The connections are split over TAGGERS taggers (each holds two descriptors a connection, the
# agent's and the node's) and as many h2load processes, so that no process needs more than
# the hard limit allows (20 000 here, which an unprivileged sandbox cannot raise).
TAGGERS="${TAGGERS:-$(( (CONNS + 7999) / 8000 ))}"
per=$(( CONNS / TAGGERS ))
# The connections are opened by LOADERS h2load processes started STAGGER seconds apart, so that
# the TLS handshakes (each decided, minted from the cache and audited) come as a ramp, not as one
# storm of CONNS at once; loader i goes through tagger i mod TAGGERS.
LOADERS="${LOADERS:-$(( (CONNS + 999) / 1000 ))}"
STAGGER="${STAGGER:-5}"
per_loader=$(( CONNS / LOADERS ))
need_fds=$(( (CONNS > per * 2 ? CONNS : per * 2) + 1024 ))
[ "$(ulimit -Hn)" = unlimited ] || [ "$(ulimit -Hn)" -ge "$need_fds" ] || ulimit -Hn "$need_fds" 2>/dev/null || true
ulimit -n "$need_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge "$need_fds" ] || { echo "file-descriptor limit $(ulimit -n) < $need_fds" >&2; exit 1; }

bin="$root/target/release"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --quiet -p cellgate-node -p cellgate-tagger -p cellgate-cli
fi

work="$(mktemp -d -t cellgate-soak.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "(kept $work)"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT="$(free_port)"; NODE_PORT="$(free_port)"; ADMIN_PORT="$(free_port)"

(
  cd "$work"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout up-ca.key -out up-ca.pem -subj "/CN=soak upstream CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout up.key -out up.csr \
    -subj "/CN=$HOST" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:$HOST" > up.ext
  openssl x509 -req -in up.csr -CA up-ca.pem -CAkey up-ca.key -CAcreateserial -days 2 \
    -extfile up.ext -out up.crt 2>/dev/null
)
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $need_fds;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections $need_fds; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body; proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi; uwsgi_temp_path $work/nginx/uwsgi; scgi_temp_path $work/nginx/scgi;
  keepalive_timeout 3600s;
  keepalive_requests 100000000;
  server {
    listen 127.0.0.1:$UP_PORT ssl http2;
    server_name $HOST;
    ssl_certificate $work/up.crt; ssl_certificate_key $work/up.key;
    location = /v1/ping { return 200 "pong"; }
    location / { return 404; }
  }
}
EOF
"$NGINX" -e "$work/nginx/error.log" -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)

"$bin/cellgate" keys init --out "$work/keys" >/dev/null
"$bin/cellgate" ca init --out "$work/ca" >/dev/null
mkdir -p "$work/cells"
cat > "$work/cells/soak.yaml" <<EOF
apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata: {name: soak, namespace: default}
spec:
  limits: {connections: $((CONNS + 100))}
  capabilities:
    - name: soak-api
      destinations: [{host: $HOST, ports: [$UP_PORT]}]
      http: {methods: [GET], paths: ["/v1/**"]}
EOF
# The token outlives the run (the node closes what an expired token holds open).
"$bin/cellgate" token issue --key "$work/keys/signing.key" --cell "$work/cells/soak.yaml" \
  --ttl "$((DURATION / 60 + 30))m" --bind 127.0.0.1 > "$work/token"
CELLGATE_LOG=warn "$bin/cellgate-node" --listen "127.0.0.1:$NODE_PORT" --admin "127.0.0.1:$ADMIN_PORT" \
  --cells "$work/cells" --ca "$work/ca" --trust "$work/keys/signing.pub" --audit "$work/audit.jsonl" \
  --upstream-ca "$work/up-ca.pem" --resolve "$HOST:*:127.0.0.1" --max-connections "$((CONNS * 2))" \
  --http-idle-timeout 1h 2> "$work/node.log" &
pids+=($!); node_pid=$!
tagger_pids=(); tagger_ports=()
for t in $(seq 1 "$TAGGERS"); do
  port="$(free_port)"
  CELLGATE_LOG=warn "$bin/cellgate-tagger" --listen "127.0.0.1:$port" --node "127.0.0.1:$NODE_PORT" \
    --token-file "$work/token" --destination "127.0.0.1:$UP_PORT" 2> "$work/tagger$t.log" &
  pids+=($!); tagger_pids+=($!); tagger_ports+=("$port")
done
tagger_pid="${tagger_pids[0]}"
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
sleep 0.5

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
sample() {
  printf '%7s  %9s %9s  %7s %7s\n' "$1" "$(rss_kb "$node_pid")" "$(rss_kb "$tagger_pid")" \
    "$(fds "$node_pid")" "$(fds "$tagger_pid")"
}
base_node_fds="$(fds "$node_pid")"; base_tagger_fds="$(fds "$tagger_pid")"
echo "==> $CONNS connections for ${DURATION}s, ${RPS_PER_CONN} req/s each, through $TAGGERS tagger(s) and the node, opened by $LOADERS loaders ${STAGGER}s apart (tagger columns: the first tagger)"
printf '%7s  %9s %9s  %7s %7s\n' "t" "node KiB" "tagger KiB" "node fd" "tag fd" | tee "$work/samples.txt"
sample "start" | tee -a "$work/samples.txt"
# -D bounds each loader's run (the later ones end later by their start offset), timeout bounds
# h2load.
load_pids=()
for l in $(seq 1 "$LOADERS"); do
  port="${tagger_ports[$(( (l - 1) % TAGGERS ))]}"
  timeout $((DURATION + 300)) h2load -t1 -c"$per_loader" -m1 --rps="$RPS_PER_CONN" -D "$DURATION" \
    --connect-to="127.0.0.1:$port" --npn-list=h2 "https://$HOST:$UP_PORT/v1/ping" \
    > "$work/h2load$l.txt" 2>&1 &
  load_pids+=($!)
  [ "$l" = "$LOADERS" ] || sleep "$STAGGER"
done
load_pid="${load_pids[0]}"
minute=0
warm_rss=""
end_rss=""
while kill -0 "$load_pid" 2>/dev/null; do
  for _ in $(seq 1 60); do kill -0 "$load_pid" 2>/dev/null || break; sleep 1; done
  minute=$((minute + 1))
  # Only samples taken while the load runs count: once h2load ends, its connections close
  # and their memory is given back.
  kill -0 "$load_pid" 2>/dev/null || break
  sample "${minute}m" | tee -a "$work/samples.txt"
  [ "$minute" = "$WARM_MIN" ] && warm_rss="$(rss_kb "$node_pid") $(rss_kb "$tagger_pid")"
  end_rss="$(rss_kb "$node_pid") $(rss_kb "$tagger_pid")"
done
for l in $(seq 1 "$LOADERS"); do
  wait "${load_pids[$((l - 1))]}" || { echo "h2load $l failed:" >&2; cat "$work/h2load$l.txt" >&2; exit 1; }
done
cat "$work"/h2load[0-9]*.txt > "$work/h2load.txt"
sleep 5   # the connections close
sample "after" | tee -a "$work/samples.txt"
cat "$work/h2load.txt" | grep -E "^(finished|requests:|status codes:|traffic:)" | tee "$work/h2load-summary.txt"

fail=0
read -r succeeded failed errored < <(awk '/^requests:/ {
  for (i=1;i<=NF;i++) { if ($(i+1) ~ /^succeeded/) s+=$i; if ($(i+1) ~ /^failed/) f+=$i; if ($(i+1) ~ /^errored/) e+=$i }
  } END { print s+0, f+0, e+0 }' "$work/h2load.txt")
echo "requests: $succeeded succeeded, $failed failed, $errored errored"
[ "${failed:-1}" = 0 ] && [ "${errored:-1}" = 0 ] || { echo "FAIL: failed or errored requests"; fail=1; }
if [ -n "$warm_rss" ]; then
  read -r wn wt <<<"$warm_rss"; read -r en et <<<"$end_rss"
  for pair in "node $wn $en" "tagger $wt $et"; do
    read -r who w e <<<"$pair"
    pct=$(python3 -c "print(round(100*($e-$w)/$w,1))")
    echo "$who RSS after ${WARM_MIN}m: ${w} KiB, at the last sample under load: ${e} KiB (${pct} %)"
    python3 -c "import sys; sys.exit(0 if abs($e-$w) <= $w*$RSS_TOLERANCE/100 else 1)" || {
      echo "FAIL: $who RSS moved more than $RSS_TOLERANCE %"; fail=1; }
  done
else
  echo "(run shorter than WARM_MIN=$WARM_MIN minutes: no RSS comparison)"
fi
end_node_fds="$(fds "$node_pid")"; end_tagger_fds="$(fds "$tagger_pid")"
echo "descriptors before/after the load: node $base_node_fds/$end_node_fds, tagger $base_tagger_fds/$end_tagger_fds"
[ "$end_node_fds" -le "$((base_node_fds + 2))" ] && [ "$end_tagger_fds" -le "$((base_tagger_fds + 2))" ] || {
  echo "FAIL: descriptors not released"; fail=1; }
kill "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true
"$bin/cellgate" audit verify "$work/audit.jsonl" || { echo "FAIL: audit log"; fail=1; }
[ "$fail" = 0 ] && echo "SOAK PASSED" || { echo "SOAK FAILED"; exit 1; }

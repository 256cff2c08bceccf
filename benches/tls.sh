#!/usr/bin/env bash
# TLS to the upstream (`just bench-tls`): the latency and throughput rows of `just bench`
# with an HTTPS upstream (a local CA made here, trusted by the proxy through
# --upstream-ca-file and by nginx through proxy_ssl_trusted_certificate), connections
# kept alive and reused, against the same paths over plain HTTP in the same run; HTTP/1.1
# (the default) and HTTP/2 to the upstream for llm-proxy (nginx speaks HTTP/1.1 to
# upstreams); and
# what a fresh TCP + TLS handshake costs. One worker each, both with an access log
# (nginx's buffered, as ours is). Writes benches/tls.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-10s}
RATE=${BENCH_RATE:-1000}
target=${CARGO_TARGET_DIR:-target}/release
state=.cluster/bench-tls
kubectl=${KUBECTL:-$HOME/.cache/llm-proxy/bin/kubectl}
export KUBECONFIG=${KUBECONFIG:-$PWD/.cluster/kubeconfig}
plain_port=19300 tls_port=19301 nginx_plain=19303 nginx_tls=19304 ours=19305 ours_h2=19306 admin0=19310

for tool in wrk:wrk bc:bc nginx:nginx-light openssl:openssl; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${tool#*:}" >/dev/null; }
done
# shellcheck source=benches/lib.sh
. benches/lib.sh
load_bin=$(bench_bin load)
tests/cluster/cluster.sh up >/dev/null
rm -rf "$state" && mkdir -p "$state"
trap 'cleanup; nginx -c "$PWD/$state/nginx.conf" -p "$PWD/$state" -s stop 2>/dev/null || true' EXIT

# --- a local CA and a certificate for localhost -----------------------------------------
(
  cd "$state"
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 2 -subj "/CN=llm-proxy bench CA" 2>/dev/null
  openssl req "${ec[@]}" -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
  echo "subjectAltName=DNS:localhost,IP:127.0.0.1" >san.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null
)
start upstream-plain "$target/fake-upstream" "127.0.0.1:$plain_port"
start upstream-tls "$target/fake-upstream" "127.0.0.1:$tls_port" --tls "$state/server.pem" "$state/server.key"

# --- three Projects, one per upstream, and a token of each ------------------------------
bench_cluster tls-ops tls-apps tls-key '*'
run_id=$(date +%s)
for p in plain:http://127.0.0.1:$plain_port tls:https://localhost:$tls_port; do
  cat <<YAML | $kubectl apply -f - >/dev/null
apiVersion: llmproxy.io/v1alpha1
kind: Project
metadata: {name: bench-${p%%:*}, labels: {llmproxy.io/bench-tls: "1"}}
spec:
  apiKeySecretRef: {name: tls-key}
  upstream: {url: "${p#*:}"}
  allowedNamespaces: {from: All}
---
apiVersion: llmproxy.io/v1alpha1
kind: ProxyToken
metadata: {name: r$run_id-${p%%:*}, namespace: tls-apps, labels: {llmproxy.io/bench-tls: "1"}}
spec: {projectRef: {name: bench-${p%%:*}}, duration: 720h}
YAML
done
start controller "${image_env[@]}" "$target/llm-proxy" controller --namespace tls-ops --label-selector llmproxy.io/bench-tls=1 \
  --admin-addr "127.0.0.1:$admin0" --leader-elect=false
declare -A token
for p in plain tls; do
  until [ "$($kubectl -n tls-apps get proxytoken "r$run_id-$p" -o jsonpath='{.status.phase}' 2>/dev/null)" = Active ]; do sleep 0.2; done
  token[$p]=$($kubectl -n tls-apps get secret "r$run_id-$p" -o jsonpath='{.data.token}' | base64 -d)
done
kill "${pids[-1]}"
# A proxy process serves both Projects (each row sends its Project's token); a second
# one offers HTTP/2 to the upstream.
start proxy "${image_env[@]}" "$target/llm-proxy" proxy --namespace tls-ops --label-selector llmproxy.io/bench-tls=1 \
  --listen-addr "127.0.0.1:$ours" --admin-addr "127.0.0.1:$((admin0 + 1))" --worker-threads 1 \
  --upstream-ca-file "$state/ca.pem"
start proxy-h2 "${image_env[@]}" "$target/llm-proxy" proxy --namespace tls-ops --label-selector llmproxy.io/bench-tls=1 \
  --listen-addr "127.0.0.1:$ours_h2" --admin-addr "127.0.0.1:$((admin0 + 2))" --worker-threads 1 \
  --upstream-ca-file "$state/ca.pem" --upstream-http2
for admin in $((admin0 + 1)) $((admin0 + 2)); do
  until curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null; do sleep 0.05; done
done

cat >"$state/nginx.conf" <<NGINX
worker_processes 1;
pid $PWD/$state/nginx.pid;
error_log $PWD/$state/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log $PWD/$state/nginx-access.log combined buffer=64k flush=1s;
  upstream plain { server 127.0.0.1:$plain_port; keepalive 64; }
  upstream tls { server 127.0.0.1:$tls_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_plain;
    location / { proxy_pass http://plain; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
  server {
    listen 127.0.0.1:$nginx_tls;
    location / {
      proxy_pass https://tls; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off;
      proxy_ssl_trusted_certificate $PWD/$state/ca.pem; proxy_ssl_verify on; proxy_ssl_name localhost;
      proxy_ssl_server_name on; proxy_ssl_session_reuse on;
    }
  }
}
NGINX
nginx -c "$PWD/$state/nginx.conf" -p "$PWD/$state"
sleep 0.3

body='{"model":"m","messages":[{"role":"user","content":"hi"}]}'
# latency NAME URL TOKEN [load generator args] -> "p50 p99 p999" in ms
latency() {
  local name=$1 url=$2 bearer=$3; shift 3
  "$load_bin" --duration "$DURATION" --rate "$RATE" --connections 4 --method POST "$@" \
    --header "Authorization: Bearer $bearer" --header 'Content-Type: application/json' --body "$body" \
    "$url/v1/chat/completions" >"$state/load-$name.json"
  load_percentiles "$state/load-$name.json"
}
# throughput NAME URL TOKEN -> req/s (wrk, 16 connections)
throughput() {
  wrk_chat_script "$state/post-$1.lua" "$3"
  local out
  out=$(wrk -t2 -c16 -d"$DURATION" -s "$state/post-$1.lua" "$2/v1/chat/completions")
  echo "$out" >"$state/wrk-$1.txt"
  if echo "$out" | grep -q 'Non-2xx'; then echo "wrk saw errors from $1: $out" >&2; exit 1; fi
  echo "$out" | awk '/Requests\/sec/ {printf "%.0f\n", $2}'
}

declare -A lat thr
run() { lat[$1]=$(latency "$1" "$2" "$3" "${@:4}"); thr[$1]=$(throughput "$1" "$2" "$3"); }
run direct_plain "http://127.0.0.1:$plain_port" x
run direct_tls "https://localhost:$tls_port" x --cacert "$state/ca.pem"
run nginx_plain "http://127.0.0.1:$nginx_plain" x
run nginx_tls "http://127.0.0.1:$nginx_tls" x
run ours_plain "http://127.0.0.1:$ours" "${token[plain]}"
run ours_tls "http://127.0.0.1:$ours" "${token[tls]}"
run ours_h2 "http://127.0.0.1:$ours_h2" "${token[tls]}"
# A fresh TCP + TLS handshake for every request, at 100 req/s, straight to the upstream.
lat[fresh_plain]=$(RATE=100 latency fresh_plain "http://127.0.0.1:$plain_port" x --disable-keepalive)
lat[fresh_tls]=$(RATE=100 latency fresh_tls "https://localhost:$tls_port" x --disable-keepalive --cacert "$state/ca.pem")

field() { echo "$1" | cut -d' ' -f"$2"; }
sub() { echo "scale=3; $1 - $2" | bc | sed 's/^\./0./; s/^-\./-0./'; }
ratio() { echo "scale=2; $1 / $2" | bc | sed 's/^\./0./; s/^-\./-0./'; }
added() { sub "$(field "${lat[$1]}" "$3")" "$(field "${lat[$2]}" "$3")"; }
row() { # row LABEL NAME BASELINE
  local a1=– a2=– a3=–
  [ "$2" != "$3" ] && { a1=$(added "$2" "$3" 1); a2=$(added "$2" "$3" 2); a3=$(added "$2" "$3" 3); }
  echo "| $1 | $(field "${lat[$2]}" 1) | $(field "${lat[$2]}" 2) | $(field "${lat[$2]}" 3) | $a1 | $a2 | $a3 | ${thr[$2]} |"
}
{
  echo "# TLS to the upstream — \`just bench-tls\`"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); load generator, proxies and fake upstreams share the cores."
  echo "Latency: \`benches/load.rs\` (tokio + hyper, one thread; its TLS client: rustls), open loop at $RATE req/s over 4 connections for $DURATION, corrected for coordinated omission. Throughput: wrk, 16 connections for $DURATION."
  echo "One worker each (nginx worker_processes 1, llm-proxy --worker-threads 1), both writing an access log (nginx buffered). The upstream's certificate is signed by a CA this run makes; TLS 1.3, P-256."
  echo "Added latency: against the direct path of the same protocol."
  echo
  echo "| path | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | added p99.9 ms | req/s at 16 conns |"
  echo "|---|---|---|---|---|---|---|---|"
  row "direct, plain HTTP" direct_plain direct_plain
  row "nginx → plain HTTP upstream" nginx_plain direct_plain
  row "llm-proxy → plain HTTP upstream" ours_plain direct_plain
  row "direct, HTTPS (kept alive)" direct_tls direct_tls
  row "nginx → HTTPS upstream (HTTP/1.1, keepalive, session reuse)" nginx_tls direct_tls
  row "llm-proxy → HTTPS upstream, HTTP/1.1 (the default)" ours_tls direct_tls
  row "llm-proxy → HTTPS upstream, HTTP/2 (--upstream-http2)" ours_h2 direct_tls
  echo
  echo "- Ours / nginx with an HTTPS upstream: throughput $(ratio "${thr[ours_h2]}" "${thr[nginx_tls]}") over HTTP/2, $(ratio "${thr[ours_tls]}" "${thr[nginx_tls]}") over HTTP/1.1; added p50 $(ratio "$(added ours_h2 direct_tls 1)" "$(added nginx_tls direct_tls 1)") and $(ratio "$(added ours_tls direct_tls 1)" "$(added nginx_tls direct_tls 1)")."
  echo "- What TLS costs each proxy (HTTPS upstream / plain upstream throughput): nginx $(ratio "${thr[nginx_tls]}" "${thr[nginx_plain]}"), llm-proxy $(ratio "${thr[ours_h2]}" "${thr[ours_plain]}") (HTTP/2), $(ratio "${thr[ours_tls]}" "${thr[ours_plain]}") (HTTP/1.1)."
  echo "- HTTP/2 to the upstream vs HTTP/1.1, llm-proxy: throughput $(ratio "${thr[ours_h2]}" "${thr[ours_tls]}")×, p50 $(field "${lat[ours_h2]}" 1) vs $(field "${lat[ours_tls]}" 1) ms."
  echo "- A fresh handshake (a new connection per request, 100 req/s, straight to the upstream): p50 $(field "${lat[fresh_tls]}" 1) ms with TCP + TLS vs $(field "${lat[fresh_plain]}" 1) ms with TCP alone: the TLS handshake adds $(added fresh_tls fresh_plain 1) ms at p50, $(added fresh_tls fresh_plain 2) ms at p99. Kept-alive pooled connections pay it once per connection."
} >benches/tls.md
cat benches/tls.md

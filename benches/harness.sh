#!/usr/bin/env bash
# Benchmark harness (`just bench`): direct vs nginx vs llm-proxy on one machine, in one
# run, with the same fast fake upstream, plus controller minting throughput and stream
# time-to-first-byte. Prints one table and writes it to BENCHMARKS.md.
#
# Load generator: wrk (Debian). Latency is measured closed-loop at 1 connection (an
# unloaded request path: what one call pays), throughput at 16 connections (saturation;
# the generator, the proxy and the upstream share the machine's cores).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-10s}
TOKENS=${BENCH_TOKENS:-1000}
target=${CARGO_TARGET_DIR:-target}/release
state=.cluster/bench
kubectl=${KUBECTL:-$HOME/.cache/llm-proxy/bin/kubectl}
export KUBECONFIG=${KUBECONFIG:-$PWD/.cluster/kubeconfig}
up_port=19100 nginx_port=19101 proxy_port=19102 admin_port=19103 ctrl_admin=19104 litellm_port=19105
cache=${LLMPROXY_CACHE:-$HOME/.cache/llm-proxy}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need bc bc
need nginx nginx-light

cargo build --release --locked --bins --benches --quiet
# LiteLLM proxy, pinned exactly (neighbouring versions do not install here).
litellm_venv=$cache/litellm-venv
if ! "$litellm_venv/bin/litellm" --version >/dev/null 2>&1; then
  python3 -m venv "$litellm_venv"
  "$litellm_venv/bin/pip" install --quiet --disable-pip-version-check "litellm[proxy]==1.106.12"
fi
tests/cluster/cluster.sh up >/dev/null
mkdir -p "$state"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start() { local name=$1; shift; "$@" >"$state/$name.log" 2>&1 & pids+=($!); }

# --- the cluster side: a project and many tokens, minted by a real controller -------
$kubectl apply --server-side -f crds/llmproxy.io.yaml >/dev/null
$kubectl wait --for condition=established crd/proxytokens.llmproxy.io >/dev/null
for ns in bench-ops bench-apps; do $kubectl create namespace "$ns" --dry-run=client -o yaml | $kubectl apply -f - >/dev/null; done
$kubectl delete proxytokens -n bench-apps --all --wait=false >/dev/null 2>&1 || true
$kubectl -n bench-ops create secret generic bench-key --from-literal=apiKey=sk-bench-0123456789abcdefghijklmnop \
  --dry-run=client -o yaml | $kubectl apply -f - >/dev/null
cat <<YAML | $kubectl apply -f - >/dev/null
apiVersion: llmproxy.io/v1alpha1
kind: Project
metadata: {name: bench, labels: {llmproxy.io/bench: "1"}}
spec:
  apiKeySecretRef: {name: bench-key}
  upstream: {url: "http://127.0.0.1:$up_port"}
  allowedNamespaces: {from: All}
YAML
start upstream "$target/fake-upstream" "127.0.0.1:$up_port"
start controller "$target/llm-proxy" controller --namespace bench-ops --label-selector llmproxy.io/bench=1 \
  --proxy-url "http://127.0.0.1:$proxy_port" --admin-addr "127.0.0.1:$ctrl_admin" --leader-elect=false
sleep 1
manifest=$state/tokens.yaml
: >"$manifest"
# Fresh names each run: the previous run's Secrets may still await garbage collection.
run_id=$(date +%s)
for i in $(seq 1 "$TOKENS"); do
  printf -- '---\napiVersion: llmproxy.io/v1alpha1\nkind: ProxyToken\nmetadata: {name: r%s-t%s, namespace: bench-apps, labels: {llmproxy.io/bench: "1"}}\nspec: {projectRef: {name: bench}, duration: 720h}\n' "$run_id" "$i" >>"$manifest"
done
mint_start=$(date +%s.%N)
$kubectl apply --server-side -f "$manifest" >/dev/null
until [ "$($kubectl get proxytokens -n bench-apps --field-selector status.phase=Active -o name | wc -l)" -ge "$TOKENS" ]; do sleep 0.5; done
mint_secs=$(echo "$(date +%s.%N) - $mint_start" | bc)
token=$($kubectl -n bench-apps get secret "r$run_id-t1" -o jsonpath='{.data.token}' | base64 -d)

# --- the data plane ------------------------------------------------------------------
sync_start=$(date +%s.%N)
start proxy "$target/llm-proxy" proxy --namespace bench-ops --label-selector llmproxy.io/bench=1 \
  --listen-addr "127.0.0.1:$proxy_port" --admin-addr "127.0.0.1:$admin_port"
until curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null; do sleep 0.05; done
sync_secs=$(echo "$(date +%s.%N) - $sync_start" | bc)
proxy_pid=${pids[-1]}

cat >"$state/nginx.conf" <<NGINX
worker_processes 1;
pid $PWD/$state/nginx.pid;
error_log $PWD/$state/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  upstream fake { server 127.0.0.1:$up_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / { proxy_pass http://fake; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
NGINX
nginx -c "$PWD/$state/nginx.conf" -p "$PWD/$state"
trap 'cleanup; nginx -c "$PWD/$state/nginx.conf" -p "$PWD/$state" -s stop 2>/dev/null || true' EXIT

# LiteLLM refuses to start without a master key; clients then authenticate with it.
cat >"$state/litellm.yaml" <<YAML
model_list:
  - model_name: m
    litellm_params: {model: openai/m, api_base: "http://127.0.0.1:$up_port/v1", api_key: sk-bench-litellm}
general_settings: {master_key: sk-bench-litellm-master}
YAML
# No network here: use the model cost map LiteLLM ships instead of fetching one.
start litellm env LITELLM_LOCAL_MODEL_COST_MAP=True "$litellm_venv/bin/litellm" --config "$state/litellm.yaml" --host 127.0.0.1 --port "$litellm_port" --num_workers 2
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$litellm_port/health/liveliness" >/dev/null && break; sleep 0.2; done

cat >"$state/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
LUA
sed "s/Bearer $token/Bearer sk-bench-litellm-master/" "$state/post.lua" >"$state/post-litellm.lua"

# run NAME URL THREADS CONNECTIONS -> "p50_ms p99_ms rps"
run() {
  local out
  local script=$state/post.lua
  [ "$1" = litellm ] && script=$state/post-litellm.lua
  out=$(wrk -t"$3" -c"$4" -d"$DURATION" --latency -s "$script" "$2/v1/chat/completions")
  echo "$out" >"$state/wrk-$1-c$4.txt"
  local p50 p99 rps
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  echo "$(to_ms "$p50") $(to_ms "$p99") $rps"
}
to_ms() { # wrk prints 123.45us / 1.23ms / 1.23s
  local v=$1
  case $v in
    *us) echo "scale=4; ${v%us}/1000" | bc ;;
    *ms) echo "${v%ms}" ;;
    *s) echo "scale=4; ${v%s}*1000" | bc ;;
  esac
}

declare -A lat thr
for name in direct nginx ours litellm; do
  case $name in
    direct) url=http://127.0.0.1:$up_port ;;
    nginx) url=http://127.0.0.1:$nginx_port ;;
    ours) url=http://127.0.0.1:$proxy_port ;;
    litellm) url=http://127.0.0.1:$litellm_port ;;
  esac
  lat[$name]=$(run "$name" "$url" 1 1)
  thr[$name]=$(run "$name" "$url" 2 16)
done

# Streams: time to first byte and total, 20 streams of 20 chunks 10 ms apart.
ttfb() {
  local url=$1 sum_first=0 sum_total=0
  for _ in $(seq 1 20); do
    read -r first total < <(curl -sN -o /dev/null -w '%{time_starttransfer} %{time_total}\n' \
      -H "Authorization: Bearer $token" -H 'x-fake-chunks: 20' -H 'x-fake-chunk-delay-ms: 10' \
      --data-binary '{"model":"m","messages":[],"stream":true}' "$url/v1/chat/completions")
    sum_first=$(echo "$sum_first + $first" | bc -l); sum_total=$(echo "$sum_total + $total" | bc -l)
  done
  echo "$(echo "scale=3; $sum_first * 1000 / 20" | bc -l) $(echo "scale=1; $sum_total * 1000 / 20" | bc -l)"
}
read -r direct_ttfb direct_total < <(ttfb "http://127.0.0.1:$up_port")
read -r ours_ttfb ours_total < <(ttfb "http://127.0.0.1:$proxy_port")
rss_mb=$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$proxy_pid/status")
cleanup
pids=()

# Propagation and scale (Rust benches against the same control plane).
propagation=$(BENCH_PROXY_BIN=$target/llm-proxy cargo bench --quiet --locked --bench propagation 2>/dev/null | grep '^|')
scale=$(BENCH_PROXY_BIN=$target/llm-proxy cargo bench --quiet --locked --bench scale 2>/dev/null | grep '^-')

field() { echo "$1" | cut -d' ' -f"$2"; }
added() { echo "scale=3; $(field "${lat[$1]}" "$2") - $(field "${lat[direct]}" "$2")" | bc; }
ratio() { echo "scale=2; $1 / $2" | bc; }
report=$(cat <<MD
## Run of $(date -u +%Y-%m-%d) — \`just bench\`

Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB; load generator, proxies and the fake upstream share the cores.
Load: wrk, POST /v1/chat/completions with a fixed JSON answer; latency at 1 connection for $DURATION, throughput at 16 connections (2 threads) for $DURATION.
Routing table: 1 project, $TOKENS tokens, loaded from the local API server.

| path | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s at 16 conns |
|---|---|---|---|---|---|
| direct (client → upstream) | $(field "${lat[direct]}" 1) | $(field "${lat[direct]}" 2) | – | – | $(field "${thr[direct]}" 3) |
| nginx (plain reverse proxy, no auth) | $(field "${lat[nginx]}" 1) | $(field "${lat[nginx]}" 2) | $(added nginx 1) | $(added nginx 2) | $(field "${thr[nginx]}" 3) |
| llm-proxy (auth + key swap + usage + access log) | $(field "${lat[ours]}" 1) | $(field "${lat[ours]}" 2) | $(added ours 1) | $(added ours 2) | $(field "${thr[ours]}" 3) |
| LiteLLM 1.106.12 proxy (2 workers) | $(field "${lat[litellm]}" 1) | $(field "${lat[litellm]}" 2) | $(added litellm 1) | $(added litellm 2) | $(field "${thr[litellm]}" 3) |

- Added latency ours / nginx: p50 $(ratio "$(added ours 1)" "$(added nginx 1)"), p99 $(ratio "$(added ours 2)" "$(added nginx 2)").
- Throughput ours / nginx: $(ratio "$(field "${thr[ours]}" 3)" "$(field "${thr[nginx]}" 3)"); ours / LiteLLM: $(ratio "$(field "${thr[ours]}" 3)" "$(field "${thr[litellm]}" 3)").
- Streams (20 chunks, 10 ms apart; mean of 20): time to first byte direct $direct_ttfb ms, through llm-proxy $ours_ttfb ms; total $direct_total ms vs $ours_total ms.
- Controller: $TOKENS ProxyTokens minted in $mint_secs s ($(echo "scale=1; $TOKENS / $mint_secs" | bc) tokens/s).
- Proxy: initial sync of $TOKENS tokens in $sync_secs s (process start to ready); resident memory $rss_mb MB after the runs.

Propagation (API write → first request through the proxy that sees it; the write's own round trip included):

| change | trials | p50 ms | p99 ms | max ms |
|---|---|---|---|---|
$propagation

Scale:

$scale
MD
)
echo "$report"
{
  echo "# Benchmarks"
  echo
  echo "Reproduce with \`just bench\` (BENCH_DURATION, BENCH_TOKENS adjust it). Raw wrk output: \`.cluster/bench/\`."
  echo
  echo "$report"
} >BENCHMARKS.md

#!/usr/bin/env bash
# Benchmark harness (`just bench`): direct vs nginx vs llm-proxy on one machine, in one
# run, with the same fast fake upstream, plus controller minting throughput and stream
# time-to-first-byte. Prints one table and writes it to BENCHMARKS.md.
#
# Load generators: benches/load.rs open-loop at a fixed rate well below saturation for
# latency percentiles (p50/p99/p99.9, corrected for coordinated omission), wrk (Debian)
# closed-loop at 16 connections for throughput at saturation. The generator, the proxies
# and the upstream share the machine's cores. nginx and llm-proxy are measured with one
# worker each (worker_processes 1, --worker-threads 1) and with their defaults for this
# machine (one per core).
#
# `--quick` is for development: 3 s per run, 100 tokens, 20 propagation trials, 10,000
# tokens at scale, no LiteLLM; its report goes to .cluster/bench.md, not BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
if [ "${1:-}" = --quick ]; then
  quick=true
  : "${BENCH_DURATION:=3s}" "${BENCH_TOKENS:=100}" "${BENCH_PROPAGATION_TRIALS:=20}"
  : "${BENCH_SCALE_TOKENS:=10000}" "${BENCH_SCALE_PROJECTS:=100}"
  export BENCH_PROPAGATION_TRIALS BENCH_SCALE_TOKENS BENCH_SCALE_PROJECTS
fi
DURATION=${BENCH_DURATION:-10s}
TOKENS=${BENCH_TOKENS:-1000}
RATE=${BENCH_RATE:-1000}
LITELLM_RATE=${BENCH_LITELLM_RATE:-50}
target=${CARGO_TARGET_DIR:-target}/release
state=.cluster/bench
kubectl=${KUBECTL:-$HOME/.cache/llm-proxy/bin/kubectl}
export KUBECONFIG=${KUBECONFIG:-$PWD/.cluster/kubeconfig}
up_port=19100 nginx_port=19101 proxy_port=19102 admin_port=19103 ctrl_admin=19104 litellm_port=19105
nginx_n_port=19106 proxy_n_port=19107 admin_n_port=19108
cache=${LLMPROXY_CACHE:-$HOME/.cache/llm-proxy}

# shellcheck source=benches/lib.sh
. benches/lib.sh
# Debian's packages for the missing commands, with one index update for all of them.
missing=()
for pair in wrk:wrk bc:bc nginx:nginx-light; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if (( ${#missing[@]} )); then
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# LiteLLM installs in the background while our release build runs: its fat-LTO link
# keeps one core busy for minutes and leaves the other to it.
installs=()
# LiteLLM proxy, pinned exactly (neighbouring versions do not install here).
litellm_venv=$cache/litellm-venv
if ! $quick && ! "$litellm_venv/bin/litellm" --version >/dev/null 2>&1; then
  (python3 -m venv "$litellm_venv" &&
    "$litellm_venv/bin/pip" install --quiet --disable-pip-version-check "litellm[proxy]==1.106.12") & installs+=($!)
fi
propagation_bin=$(bench_bin propagation)
scale_bin=$(bench_bin scale)
load_bin=$(bench_bin load)
for p in "${installs[@]}"; do wait "$p"; done
tests/cluster/cluster.sh up >/dev/null
mkdir -p "$state"
trap cleanup EXIT

# --- the cluster side: a project and many tokens, minted by a real controller -------
bench_cluster bench-ops bench-apps bench-key bench,bench-models
# bench-models: the same with a model allowlist, for its cost per request.
cat <<YAML | $kubectl apply -f - >/dev/null
apiVersion: llmproxy.io/v1alpha1
kind: Project
metadata: {name: bench, labels: {llmproxy.io/bench: "1"}}
spec:
  apiKeySecretRef: {name: bench-key}
  upstream: {url: "http://127.0.0.1:$up_port"}
  allowedNamespaces: {from: All}
---
apiVersion: llmproxy.io/v1alpha1
kind: Project
metadata: {name: bench-models, labels: {llmproxy.io/bench: "1"}}
spec:
  apiKeySecretRef: {name: bench-key}
  upstream: {url: "http://127.0.0.1:$up_port"}
  allowedNamespaces: {from: All}
  limits: {models: ["gpt-4o-mini", "gpt-4.1*", "m"]}
YAML
start upstream "$target/fake-upstream" "127.0.0.1:$up_port"
start controller "${image_env[@]}" "$target/llm-proxy" controller --namespace bench-ops --label-selector llmproxy.io/bench=1 \
  --proxy-url "http://127.0.0.1:$proxy_port" --admin-addr "127.0.0.1:$ctrl_admin" --leader-elect=false
sleep 1
manifest=$state/tokens.yaml
: >"$manifest"
# Fresh names each run: the previous run's Secrets may still await garbage collection.
run_id=$(date +%s)
for i in $(seq 1 "$TOKENS"); do
  printf -- '---\napiVersion: llmproxy.io/v1alpha1\nkind: ProxyToken\nmetadata: {name: r%s-t%s, namespace: bench-apps, labels: {llmproxy.io/bench: "1"}}\nspec: {projectRef: {name: bench}, duration: 720h}\n' "$run_id" "$i" >>"$manifest"
done
printf -- '---\napiVersion: llmproxy.io/v1alpha1\nkind: ProxyToken\nmetadata: {name: r%s-models, namespace: bench-apps, labels: {llmproxy.io/bench: "1"}}\nspec: {projectRef: {name: bench-models}, duration: 720h, limits: {models: ["m"]}}\n' "$run_id" >>"$manifest"
mint_start=$(date +%s.%N)
$kubectl apply --server-side -f "$manifest" >/dev/null
until [ "$($kubectl get proxytokens -n bench-apps --field-selector status.phase=Active -o name | wc -l)" -ge "$((TOKENS + 1))" ]; do sleep 0.5; done
mint_secs=$(echo "$(date +%s.%N) - $mint_start" | bc)
token=$($kubectl -n bench-apps get secret "r$run_id-t1" -o jsonpath='{.data.token}' | base64 -d)
models_token=$($kubectl -n bench-apps get secret "r$run_id-models" -o jsonpath='{.data.token}' | base64 -d)

# --- the data plane ------------------------------------------------------------------
sync_start=$(date +%s.%N)
start proxy "${image_env[@]}" "$target/llm-proxy" proxy --namespace bench-ops --label-selector llmproxy.io/bench=1 \
  --listen-addr "127.0.0.1:$proxy_port" --admin-addr "127.0.0.1:$admin_port" --worker-threads 1
until curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null; do sleep 0.05; done
sync_secs=$(echo "$(date +%s.%N) - $sync_start" | bc)
proxy_pid=${pids[-1]}
start proxy-n "${image_env[@]}" "$target/llm-proxy" proxy --namespace bench-ops --label-selector llmproxy.io/bench=1 \
  --listen-addr "127.0.0.1:$proxy_n_port" --admin-addr "127.0.0.1:$admin_n_port"
until curl -sf "http://127.0.0.1:$admin_n_port/readyz" >/dev/null; do sleep 0.05; done

nginx_conf nginx.conf 1 "$nginx_port" "$up_port"
nginx_conf nginx-n.conf auto "$nginx_n_port" "$up_port"
stop_nginx() { for c in nginx.conf nginx-n.conf; do nginx -c "$PWD/$state/$c" -p "$PWD/$state" -s stop 2>/dev/null || true; done; }
trap 'cleanup; stop_nginx' EXIT

if ! $quick; then
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
fi

wrk_chat_script "$state/post.lua" "$token"
sed "s/Bearer $token/Bearer sk-bench-litellm-master/" "$state/post.lua" >"$state/post-litellm.lua"
sed "s/Bearer $token/Bearer $models_token/" "$state/post.lua" >"$state/post-models.lua"

# latency NAME URL RATE -> "p50_ms p99_ms p999_ms" (benches/load.rs, open loop at RATE req/s)
latency() {
  local bearer=$token
  [ "$1" = litellm ] && bearer=sk-bench-litellm-master
  [ "$1" = ours_models ] && bearer=$models_token
  "$load_bin" --duration "$DURATION" --rate "$3" --connections 4 --method POST \
    --header "Authorization: Bearer $bearer" --header 'Content-Type: application/json' \
    --body '{"model":"m","messages":[{"role":"user","content":"hi"}]}' "$2/v1/chat/completions" >"$state/load-$1.json"
  load_percentiles "$state/load-$1.json"
}
# cpu_ticks PID -> user + system CPU time of PID, in clock ticks
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# throughput NAME URL -> req/s (wrk, closed loop, 16 connections)
throughput() {
  local script=$state/post.lua out
  [ "$1" = litellm ] && script=$state/post-litellm.lua
  [ "$1" = ours_models ] && script=$state/post-models.lua
  local before
  before=$(cpu_ticks "$proxy_pid")
  out=$(wrk -t2 -c16 -d"$DURATION" -s "$script" "$2/v1/chat/completions")
  echo "$out" >"$state/wrk-$1.txt"
  # The one-thread proxy's CPU time per request, for the runs through it.
  echo "scale=1; ($(cpu_ticks "$proxy_pid") - $before) * 1000000 / $(getconf CLK_TCK) / $(echo "$out" | awk '/requests in/ {print $1}')" |
    bc >"$state/cpu-$1"
  if echo "$out" | grep -q 'Non-2xx'; then echo "wrk saw errors from $1: $out" >&2; exit 1; fi
  echo "$out" | awk '/Requests\/sec/ {printf "%.0f\n", $2}'
}

declare -A lat thr url
url=([direct]=http://127.0.0.1:$up_port [nginx]=http://127.0.0.1:$nginx_port [ours]=http://127.0.0.1:$proxy_port
  [ours_models]=http://127.0.0.1:$proxy_port
  [nginx_n]=http://127.0.0.1:$nginx_n_port [ours_n]=http://127.0.0.1:$proxy_n_port [litellm]=http://127.0.0.1:$litellm_port)
names=(direct nginx ours ours_models nginx_n ours_n)
$quick || names+=(litellm)
for name in "${names[@]}"; do
  rate=$RATE
  [ "$name" = litellm ] && rate=$LITELLM_RATE
  lat[$name]=$(latency "$name" "${url[$name]}" "$rate")
  thr[$name]=$(throughput "$name" "${url[$name]}")
done
# LiteLLM cannot take the common rate: its added latency is measured against direct at its own rate.
$quick || lat[direct_litellm]=$(latency direct_litellm "${url[direct]}" "$LITELLM_RATE")

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
propagation=$(BENCH_PROXY_BIN=$target/llm-proxy "$propagation_bin" 2>/dev/null | grep '^|')
scale=$(BENCH_PROXY_BIN=$target/llm-proxy "${image_env[@]}" "$scale_bin" 2>/dev/null | grep '^-')

field() { echo "$1" | cut -d' ' -f"$2"; }
# added NAME COLUMN [BASELINE]: NAME's latency percentile minus the direct path's
added() { echo "scale=3; $(field "${lat[$1]}" "$2") - $(field "${lat[${3:-direct}]}" "$2")" | bc | sed 's/^\./0./; s/^-\./-0./'; }
ratio() { echo "scale=2; $1 / $2" | bc | sed 's/^\./0./; s/^-\./-0./'; }
# added_ratio OURS NGINX: ours / nginx of two added latencies, or nginx's figure when it
# adds under 0.02 ms, within a run's spread (it even comes out negative): no ratio then.
added_ratio() {
  if [ "$(echo "$2 < 0.02" | bc)" = 1 ]; then echo "– (nginx adds $2 ms)"; else ratio "$1" "$2"; fi
}
row() { # row LABEL NAME [BASELINE]
  local base=${3:-direct} a1=– a2=– a3=–
  if [ "$2" != direct ]; then a1=$(added "$2" 1 "$base") a2=$(added "$2" 2 "$base") a3=$(added "$2" 3 "$base"); fi
  echo "| $1 | $(field "${lat[$2]}" 1) | $(field "${lat[$2]}" 2) | $(field "${lat[$2]}" 3) | $a1 | $a2 | $a3 | ${thr[$2]} |"
}
secs() { printf '%.2f' "$1"; }
threads=$(nproc)
report=$(cat <<MD
## Run of $(date -u +%Y-%m-%d) — \`just bench$($quick && echo " --quick")\`

Machine: $threads cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB; load generator, proxies and the fake upstream share the cores.
Load: POST /v1/chat/completions with a fixed JSON answer. Latency: \`benches/load.rs\` (tokio + hyper, one thread), open loop at $RATE req/s over 4 connections for $DURATION, corrected for coordinated omission (LiteLLM at $LITELLM_RATE req/s, against direct at the same rate). Throughput: wrk, closed loop, 16 connections (2 threads) for $DURATION.
Routing table: 1 project, $TOKENS tokens, loaded from the local API server. Both proxies log every request (nginx's access log buffered, 64 KiB or 100 ms, as llm-proxy's).

| path | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | added p99.9 ms | req/s at 16 conns |
|---|---|---|---|---|---|---|---|
$(row "direct (client → upstream)" direct)
$(row "nginx, 1 worker (plain reverse proxy, no auth, access log)" nginx)
$(row "llm-proxy, 1 thread (auth + key swap + usage + access log)" ours)
$(row "llm-proxy, 1 thread, token and project with a model allowlist" ours_models)
$(row "nginx, worker_processes auto ($threads)" nginx_n)
$(row "llm-proxy, default threads ($threads)" ours_n)
$($quick || row "LiteLLM 1.106.12 proxy, 2 workers (at $LITELLM_RATE req/s)" litellm direct_litellm)

- Added latency ours / nginx, one worker each: p50 $(added_ratio "$(added ours 1)" "$(added nginx 1)"), p99 $(added_ratio "$(added ours 2)" "$(added nginx 2)"), p99.9 $(added_ratio "$(added ours 3)" "$(added nginx 3)"); with defaults: p50 $(added_ratio "$(added ours_n 1)" "$(added nginx_n 1)"), p99 $(added_ratio "$(added ours_n 2)" "$(added nginx_n 2)"), p99.9 $(added_ratio "$(added ours_n 3)" "$(added nginx_n 3)").
- Model allowlist (the body read up to its model and checked against two lists, the rest scanned on): throughput $(ratio "${thr[ours_models]}" "${thr[ours]}")× that without one; the one-thread proxy's CPU time per request $(cat "$state/cpu-ours_models") µs with it, $(cat "$state/cpu-ours") µs without (user + system, over each wrk run); added p50 $(added ours_models 1) ms vs $(added ours 1) ms.
- Throughput ours / nginx: $(ratio "${thr[ours]}" "${thr[nginx]}") with one worker each, $(ratio "${thr[ours_n]}" "${thr[nginx_n]}") with defaults; ours / LiteLLM: $($quick && echo "not run with --quick" || ratio "${thr[ours_n]}" "${thr[litellm]}").
- Streams (20 chunks, 10 ms apart; mean of 20): time to first byte direct $(printf "%.3f" "$direct_ttfb") ms, through llm-proxy $(printf "%.3f" "$ours_ttfb") ms (added $(printf "%.3f" "$(echo "$ours_ttfb - $direct_ttfb" | bc)") ms); total $direct_total ms vs $ours_total ms.
- Controller: $TOKENS ProxyTokens minted in $(secs "$mint_secs") s ($(echo "scale=1; $TOKENS / $mint_secs" | bc) tokens/s).
- Proxy: initial sync of $TOKENS tokens in $(secs "$sync_secs") s (process start to ready); resident memory $rss_mb MB after the runs.

Propagation, two proxy replicas (API write → the first request through replica A that sees it, and → both replicas report they enforce it (their report Leases, rewritten at most every 100 ms; trials spaced 150 ms); the write's own round trip included):

| change | trials | first request p50 ms | p99 ms | max ms | all replicas report p50 ms | p99 ms | max ms |
|---|---|---|---|---|---|---|---|
$propagation

Scale:

$scale
MD
)
echo "$report"
if $quick; then
  echo "$report" >.cluster/bench.md
  exit 0
fi
# The hand-written analysis below the marker survives a new run.
analysis=$(sed -n '/^<!-- analysis -->$/,$p' BENCHMARKS.md 2>/dev/null || true)
{
  echo "# Benchmarks"
  echo
  echo "Reproduce with \`just bench\` (\`just bench --quick\` for a shorter run that writes \`.cluster/bench.md\`; BENCH_DURATION, BENCH_TOKENS, BENCH_RATE, BENCH_LITELLM_RATE adjust it). Raw load generator and wrk output: \`.cluster/bench/\`."
  echo
  echo "$report"
  if [ -n "$analysis" ]; then
    echo
    echo "$analysis"
  fi
} >BENCHMARKS.md

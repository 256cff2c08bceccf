#!/usr/bin/env bash
# A/B of two llm-proxy binaries on one worker each, with two yardsticks measured in the
# same run: nginx (one worker, buffered access log) and the floor (`fake-upstream
# --forward-to`: the proxy's HTTP server and upstream pool with nothing in between, so
# what hyper and the kernel cost): `benches/ab.sh A B [ROUNDS]`.
#
# Each round runs wrk (16 connections, closed loop) against nginx, the floor, A and B, in an order
# that rotates from round to round, and reads each server's CPU time (user + system,
# /proc) over its run. Prints every run and the medians: req/s, CPU µs per request, and
# the ratios to nginx and of B to A. Build A and B from two commits first, e.g.
#   cargo build --release --locked --bin llm-proxy && cp "$CARGO_TARGET_DIR/release/llm-proxy" /tmp/llm-proxy-A
# Needs the local control plane (`just cluster-up`) and a release fake-upstream.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 2 ] || { echo "usage: benches/ab.sh PROXY_A PROXY_B [ROUNDS]" >&2; exit 2; }
bin_a=$(realpath "$1") bin_b=$(realpath "$2") rounds=${3:-3}
DURATION=${BENCH_DURATION:-10s}
target=${CARGO_TARGET_DIR:-target}/release
state=.cluster/bench-ab
kubectl=${KUBECTL:-$HOME/.cache/llm-proxy/bin/kubectl}
export KUBECONFIG=${KUBECONFIG:-$PWD/.cluster/kubeconfig}
up_port=19400 nginx_port=19401 a_port=19402 b_port=19403 floor_port=19404 admin0=19410

for tool in wrk:wrk nginx:nginx-light; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${tool#*:}" >/dev/null; }
done
# shellcheck source=benches/lib.sh
. benches/lib.sh
# The release fake-upstream, and the load generator for the instruction counts.
load_bin=$(bench_bin load)
tests/cluster/cluster.sh up >/dev/null 2>&1
rm -rf "$state" && mkdir -p "$state"
trap 'cleanup; nginx -c "$PWD/$state/nginx.conf" -p "$PWD/$state" -s stop 2>/dev/null || true' EXIT

start upstream "$target/fake-upstream" "127.0.0.1:$up_port"
start floor "${image_env[@]}" "$target/fake-upstream" "127.0.0.1:$floor_port" --forward-to "http://127.0.0.1:$up_port"
bench_cluster ab-ops ab-apps ab-key '*'
run_id=$(date +%s)
cat <<YAML | $kubectl apply -f - >/dev/null 2>&1
apiVersion: llmproxy.io/v1alpha1
kind: Project
metadata: {name: bench-ab, labels: {llmproxy.io/bench-ab: "1"}}
spec:
  apiKeySecretRef: {name: ab-key}
  upstream: {url: "http://127.0.0.1:$up_port"}
  allowedNamespaces: {from: All}
---
apiVersion: llmproxy.io/v1alpha1
kind: ProxyToken
metadata: {name: r$run_id, namespace: ab-apps, labels: {llmproxy.io/bench-ab: "1"}}
spec: {projectRef: {name: bench-ab}, duration: 720h}
YAML
start controller "$bin_a" controller --namespace ab-ops --label-selector llmproxy.io/bench-ab=1 \
  --admin-addr "127.0.0.1:$admin0" --leader-elect=false
until [ "$($kubectl -n ab-apps get proxytoken "r$run_id" -o jsonpath='{.status.phase}' 2>/dev/null)" = Active ]; do sleep 0.2; done
token=$($kubectl -n ab-apps get secret "r$run_id" -o jsonpath='{.data.token}' | base64 -d)
kill "${pids[-1]}"

declare -A pid
admin=$admin0
for side in a b; do
  bin=bin_$side port=${side}_port admin=$((admin + 1))
  start "proxy-$side" "${image_env[@]}" "${!bin}" proxy --namespace ab-ops --label-selector llmproxy.io/bench-ab=1 \
    --listen-addr "127.0.0.1:${!port}" --admin-addr "127.0.0.1:$admin" --worker-threads 1
  pid[$side]=${pids[-1]}
done
for admin in $((admin0 + 1)) $((admin0 + 2)); do
  until curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null; do sleep 0.05; done
done
nginx_conf nginx.conf 1 "$nginx_port" "$up_port"
sleep 0.3
pid[nginx]=$(pgrep -P "$(cat "$state/nginx.conf.pid")" | head -1)
pid[floor]=${pids[1]}
wrk_chat_script "$state/post.lua" "$token"

declare -A port=([nginx]=$nginx_port [floor]=$floor_port [a]=$a_port [b]=$b_port)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# measure NAME -> "req/s µs-per-request requests"
measure() {
  local before after out requests
  before=$(cpu_ticks "${pid[$1]}")
  out=$(wrk -t2 -c16 -d"$DURATION" -s "$state/post.lua" "http://127.0.0.1:${port[$1]}/v1/chat/completions")
  after=$(cpu_ticks "${pid[$1]}")
  if echo "$out" | grep -q 'Non-2xx'; then echo "wrk saw errors from $1: $out" >&2; exit 1; fi
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$out" | awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$requests" \
    '/Requests\/sec/ {printf "%.0f %.1f %d\n", $2, ticks / hz / n * 1e6, n}'
}

# A warm-up run each (connections opened, caches and pools filled), not counted.
for name in nginx floor a b; do BENCH_DURATION=2s measure "$name" >/dev/null; done
declare -A results
order=(nginx floor a b)
echo "| round | server | req/s | CPU µs/request |"
echo "|---|---|---|---|"
for round in $(seq 1 "$rounds"); do
  for name in "${order[@]}"; do
    line=$(measure "$name")
    read -r rps cpu _ <<<"$line"
    results[$name]+="$rps $cpu;"
    echo "| $round | $name | $rps | $cpu |"
  done
  order=("${order[@]:1}" "${order[0]}")
done
median() { tr ';' '\n' | awk -v f="$1" 'NF {print $f}' | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
echo
echo "Medians over $rounds rounds of $DURATION (A = $1, B = $2):"
for name in nginx floor a b; do
  echo "- $name: $(echo "${results[$name]}" | median 1) req/s, $(echo "${results[$name]}" | median 2) µs CPU per request"
done
ratio() { echo "scale=3; $1 / $2" | bc | sed 's/^\./0./'; }
rps() { echo "${results[$1]}" | median 1; }
cpu() { echo "${results[$1]}" | median 2; }
echo "- throughput / nginx: floor $(ratio "$(rps floor)" "$(rps nginx)"), A $(ratio "$(rps a)" "$(rps nginx)"), B $(ratio "$(rps b)" "$(rps nginx)"); B / A $(ratio "$(rps b)" "$(rps a)")"
echo "- CPU per request / nginx: floor $(ratio "$(cpu floor)" "$(cpu nginx)"), A $(ratio "$(cpu a)" "$(cpu nginx)"), B $(ratio "$(cpu b)" "$(cpu nginx)"); B / A $(ratio "$(cpu b)" "$(cpu a)")"

# BENCH_INSTRUCTIONS=N: each proxy once more under callgrind, which counts the
# instructions it executes (within 0.1 – 3 % from run to run, whatever the neighbours do,
# where wrk rounds move by ±10 %; the proxy's background work is counted too): N chat
# completions one at a time, then N streamed ones of 20 chunks; instructions per request.
if [ -n "${BENCH_INSTRUCTIONS:-}" ]; then
  command -v valgrind >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
  n=$BENCH_INSTRUCTIONS
  # count SIDE LABEL BODY [HEADER] -> instructions per request; the profile is kept as
  # $state/callgrind-SIDE-LABEL.out (callgrind_annotate reads it).
  count() {
    callgrind_control -z "${pid[cg]}" >/dev/null 2>&1
    callgrind_control -i on "${pid[cg]}" >/dev/null 2>&1
    "$load_bin" --requests "$n" --connections 1 --method POST --header "Authorization: Bearer $token" \
      --header 'Content-Type: application/json' ${4:+--header "$4"} --body "$3" \
      "http://127.0.0.1:19405/v1/chat/completions" >"$state/load-callgrind.json"
    python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["errors"] == 0, d["first_error"]' "$state/load-callgrind.json"
    callgrind_control -i off "${pid[cg]}" >/dev/null 2>&1
    callgrind_control -d "${pid[cg]}" >/dev/null 2>&1
    sleep 1
    # Each dump is a new part, callgrind-SIDE.out.N; this one is the newest.
    cp "$(ls -t "$state/callgrind-$1.out".* | head -1)" "$state/callgrind-$1-$2.out"
    awk -v n="$n" '/^totals:/ {ir += $2} END {printf "%.0f", ir / n}' "$state/callgrind-$1-$2.out"
  }
  echo
  echo "Instructions per request (callgrind, one at a time, $n each):"
  echo "| server | chat completion | streamed, 20 chunks |"
  echo "|---|---|---|"
  for side in a b; do
    bin=bin_$side
    start "callgrind-$side" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$state/callgrind-$side.out" \
      "${!bin}" proxy --namespace ab-ops --label-selector llmproxy.io/bench-ab=1 --listen-addr 127.0.0.1:19405 \
      --admin-addr 127.0.0.1:19415 --worker-threads 1
    pid[cg]=${pids[-1]}
    until curl -sf http://127.0.0.1:19415/readyz >/dev/null; do sleep 0.2; done
    chat=$(count "$side" chat '{"model":"m","messages":[{"role":"user","content":"hi"}]}')
    streamed=$(count "$side" streamed '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}' 'x-fake-chunks: 20')
    echo "| $side | $chat | $streamed |"
    kill "${pid[cg]}"; wait "${pid[cg]}" 2>/dev/null || true
  done
fi

# BENCH_PERF=a (or b, nginx, floor): that server once more under `perf stat` (system calls and
# context switches per request), and once under `perf record` (cpu-clock: this VM has no
# hardware counters) for its 40 hottest symbols and the share spent in the kernel.
if [ -n "${BENCH_PERF:-}" ]; then
  target_pid=${pid[$BENCH_PERF]}
  perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$target_pid" -o "$state/perf-stat.csv" &
  counter=$!
  line=$(measure "$BENCH_PERF")
  kill -INT "$counter"; wait "$counter" || true
  read -r _ _ requests <<<"$line"
  echo
  echo "$BENCH_PERF, per request:"
  awk -F, -v n="$requests" '$3 ~ /sys_enter|context-switches/ {printf "- %s: %.2f\n", $3, $1 / n}' "$state/perf-stat.csv"
  perf record -q -e cpu-clock -F 999 -p "$target_pid" -o "$state/perf.data" -- sleep 8 2>/dev/null &
  recorder=$!
  measure "$BENCH_PERF" >/dev/null 2>&1
  wait "$recorder" || true
  echo
  echo "Where $BENCH_PERF's CPU time goes ($state/perf.data):"
  perf report -i "$state/perf.data" --no-children --sort dso --stdio 2>/dev/null | awk '/%/ && !/^#/ {print "- " $1, $2}' | head -5
  perf report -i "$state/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
    awk '/%/ && !/^#/ {$NF = ""; $(NF - 1) = ""; print "   ", $0}' | cut -c1-140 | head -40
fi

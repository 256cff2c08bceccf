#!/usr/bin/env bash
# Concurrent long streams (`just bench-streams`): 1,000 and 10,000 SSE streams held open
# at once, a chunk every 50 ms, direct to the fake upstream, through nginx, through the
# floor (`fake-upstream --forward-to`: the proxy's own HTTP server and upstream pool with
# nothing in between, as in `benches/ab.sh`) and through llm-proxy, in one run on this
# machine. Per path: streams that arrived whole and in
# order, time to first byte, each chunk's delay (upstream send → client arrival, one
# clock) and, for the proxies, resident memory per open stream and CPU. Writes
# benches/streams.md (with --quick, .cluster/bench-streams.md).
#
# STREAMS_COUNTS (default "1000 10000"), STREAMS_SECONDS (default 60), STREAMS_INTERVAL_MS
# (default 50); `--quick`: 1,000 streams for 15 s. BENCH_PROXY_BIN: another llm-proxy
# binary for the proxy (to compare two commits).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNTS=${STREAMS_COUNTS:-1000 10000}
SECONDS_HELD=${STREAMS_SECONDS:-60}
INTERVAL=${STREAMS_INTERVAL_MS:-50}
report_file=benches/streams.md
# --quick is for development: its figures go to the state folder, not the record.
if [ "${1:-}" = --quick ]; then COUNTS=1000 SECONDS_HELD=15 report_file=.cluster/bench-streams.md; fi
RAMP=2000 # new streams per second: 10,000 open in 5 s, no listen queue overflows
target=${CARGO_TARGET_DIR:-target}/release
state=.cluster/bench-streams
kubectl=${KUBECTL:-$HOME/.cache/llm-proxy/bin/kubectl}
export KUBECONFIG=${KUBECONFIG:-$PWD/.cluster/kubeconfig}
up_port=19200 nginx_port=19201 proxy_port=19202 admin_port=19203 ctrl_admin=19204 floor_port=19205

command -v nginx >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null; }
command -v bc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bc >/dev/null; }
# Each stream holds a descriptor in the client and the upstream and two in the proxy:
# raise this run's limit as far as the machine lets it (its hard limit may be fixed,
# 20,000 in some sandboxes), and cap the streams so the proxy's two fit.
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
ulimit -n "$hard"
max_streams=$(((hard - 500) / 2))
capped_note=""
counts=""
for count in $COUNTS; do
  if [ "$count" -gt "$max_streams" ]; then
    capped_note="- $count streams were asked for; this machine allows $hard open files per process (hard limit), and a proxy holds two per stream, so the run used $max_streams."
    count=$max_streams
  fi
  counts="$counts $count"
done
COUNTS=$counts
# shellcheck source=benches/lib.sh
. benches/lib.sh
client=$(bench_bin streams)
tests/cluster/cluster.sh up >/dev/null
rm -rf "$state" && mkdir -p "$state"
trap cleanup EXIT

# --- one project and one token, minted by the controller ------------------------------
bench_cluster streams-ops streams-apps streams-key streams
run_id=$(date +%s)
cat <<YAML | $kubectl apply -f - >/dev/null
apiVersion: llmproxy.io/v1alpha1
kind: Project
metadata: {name: streams, labels: {llmproxy.io/bench-streams: "1"}}
spec:
  apiKeySecretRef: {name: streams-key}
  upstream: {url: "http://127.0.0.1:$up_port"}
  allowedNamespaces: {from: All}
---
apiVersion: llmproxy.io/v1alpha1
kind: ProxyToken
metadata: {name: s$run_id, namespace: streams-apps, labels: {llmproxy.io/bench-streams: "1"}}
spec: {projectRef: {name: streams}, duration: 720h}
YAML
start controller "${image_env[@]}" "$target/llm-proxy" controller --namespace streams-ops --label-selector llmproxy.io/bench-streams=1 \
  --admin-addr "127.0.0.1:$ctrl_admin" --leader-elect=false
until [ "$($kubectl -n streams-apps get proxytoken "s$run_id" -o jsonpath='{.status.phase}')" = Active ]; do sleep 0.2; done
token=$($kubectl -n streams-apps get secret "s$run_id" -o jsonpath='{.data.token}' | base64 -d)

start upstream "$target/fake-upstream" "127.0.0.1:$up_port"
start proxy "${image_env[@]}" RUST_LOG=warn "${BENCH_PROXY_BIN:-$target/llm-proxy}" proxy --namespace streams-ops --label-selector llmproxy.io/bench-streams=1 \
  --listen-addr "127.0.0.1:$proxy_port" --admin-addr "127.0.0.1:$admin_port" --worker-threads 1 \
  --max-connections "$max_streams" --max-connections-per-client "$max_streams"
proxy_pid=${pids[-1]}
start floor "${image_env[@]}" "$target/fake-upstream" "127.0.0.1:$floor_port" --forward-to "http://127.0.0.1:$up_port"
floor_pid=${pids[-1]}
until curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null; do sleep 0.05; done
# nginx as an SSE reverse proxy is configured: unbuffered, HTTP/1.1 upstream keepalive.
cat >"$state/nginx.conf" <<NGINX
worker_processes 1;
worker_rlimit_nofile $hard;
pid $PWD/$state/nginx.pid;
error_log $PWD/$state/nginx-error.log;
events { worker_connections 65536; }
http {
  access_log off;
  upstream fake { server 127.0.0.1:$up_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port backlog=16384;
    location / {
      proxy_pass http://fake; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_read_timeout 300s;
    }
  }
}
NGINX
nginx -c "$PWD/$state/nginx.conf" -p "$PWD/$state"
trap 'cleanup; nginx -c "$PWD/$state/nginx.conf" -p "$PWD/$state" -s stop 2>/dev/null || true' EXIT
sleep 0.5
nginx_pids() { echo "$(cat "$state/nginx.pid") $(pgrep -P "$(cat "$state/nginx.pid")" | tr '\n' ' ')"; }

# rss_kb PIDS -> their resident memory together, KiB
rss_kb() { local sum=0; for p in $1; do sum=$((sum + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo "$sum"; }
# cpu_ticks PIDS -> their user + system CPU time together, clock ticks
cpu_ticks() { local sum=0; for p in $1; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$sum"; }

# run NAME URL PIDS COUNT -> the client's JSON line, plus "rss_idle_kb rss_held_kb cpu_cores" in $state
run() {
  local name=$1 url=$2 pids=$3 count=$4 out=$state/$1-$4
  local idle=0 before=0
  [ -n "$pids" ] && { idle=$(rss_kb "$pids"); before=$(cpu_ticks "$pids"); }
  local started
  started=$(date +%s.%N)
  "$client" "$url" "$token" "$count" "$SECONDS_HELD" "$INTERVAL" "$RAMP" >"$out.json" &
  local client_pid=$!
  # Sample memory while every stream is open: after the ramp, halfway through.
  sleep "$(echo "$count / $RAMP + $SECONDS_HELD / 2" | bc -l)"
  local held=0
  [ -n "$pids" ] && held=$(rss_kb "$pids")
  wait "$client_pid"
  local cores=0
  # Over the run's real length: a proxy behind on CPU stretches it.
  local wall
  wall=$(echo "$(date +%s.%N) - $started" | bc)
  [ -n "$pids" ] && cores=$(echo "scale=3; ($(cpu_ticks "$pids") - $before) / $(getconf CLK_TCK) / $wall" | bc)
  echo "$idle $held $cores $wall" >"$out.proc"
  sleep 2 # connections close
}

for count in $COUNTS; do
  run direct "http://127.0.0.1:$up_port" "" "$count"
  run nginx "http://127.0.0.1:$nginx_port" "$(nginx_pids)" "$count"
  run floor "http://127.0.0.1:$floor_port" "$floor_pid" "$count"
  run ours "http://127.0.0.1:$proxy_port" "$proxy_pid" "$count"
done

# --- the report ------------------------------------------------------------------------
report=$(python3 - "$state" "$COUNTS" "$SECONDS_HELD" "$INTERVAL" <<'PY'
import json, sys
state, counts, seconds, interval = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
labels = {"direct": "direct (client → upstream)", "nginx": "nginx, 1 worker (proxy_buffering off)",
          "floor": "the floor: the proxy's server and pool, nothing else, 1 thread",
          "ours": "llm-proxy, 1 thread (auth + key swap + usage + access log)"}
print("| streams | path | whole and in order | chunks received | run s | TTFB p99 ms | chunk delay p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | added p99.9 ms | memory per stream KiB | CPU cores |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
notes = []
for count in map(int, counts):
    r = {}
    for path in ("direct", "nginx", "floor", "ours"):
        d = json.load(open(f"{state}/{path}-{count}.json"))
        idle, held, cores, wall = open(f"{state}/{path}-{count}.proc").read().split()
        d["wall"] = float(wall)
        d["per_stream_kib"] = (int(held) - int(idle)) / int(count)
        d["cores"] = float(cores)
        r[path] = d
    for path, d in r.items():
        added = lambda k: "–" if path == "direct" else "%.2f" % (d[k] - r["direct"][k])
        mem = "–" if path == "direct" else "%.1f" % d["per_stream_kib"]
        cpu = "–" if path == "direct" else "%.2f" % d["cores"]
        whole = "%d of %d" % (d["complete"], d["streams"]) + ("" if not d["out_of_order"] else ", %d out of order" % d["out_of_order"])
        print(f"| {count:,} | {labels[path]} | {whole} | {d['chunks_received']:,} of {d['chunks_expected']:,} | {d['wall']:.0f} | {d['ttfb_p99_ms']:.2f} | "
              f"{d['delay_p50_ms']:.2f} | {d['delay_p99_ms']:.2f} | {d['delay_p999_ms']:.2f} | {added('delay_p50_ms')} | "
              f"{added('delay_p99_ms')} | {added('delay_p999_ms')} | {mem} | {cpu} |")
        if d["errors"]:
            notes.append(f"- {count:,} streams, {path}: failed streams by cause: {d['errors']}")
    n = r["nginx"]
    ratio = lambda a, b: "%.2f" % (a / b) if b > 0 and a >= 0 else "n/a"
    for path in ("ours", "floor"):
        o = r[path]
        notes.append(f"- {count:,} streams, {path} / nginx: memory per stream {ratio(o['per_stream_kib'], n['per_stream_kib'])}, "
                     f"added chunk delay p99 {ratio(o['delay_p99_ms'] - r['direct']['delay_p99_ms'], n['delay_p99_ms'] - r['direct']['delay_p99_ms'])}, "
                     f"p99.9 {ratio(o['delay_p999_ms'] - r['direct']['delay_p999_ms'], n['delay_p999_ms'] - r['direct']['delay_p999_ms'])}, CPU {ratio(o['cores'], n['cores'])}.")
print()
print("\n".join(notes))
PY
)
{
  echo "# Concurrent streams — \`just bench-streams\`"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB."
  echo "Each stream is its own HTTP/1.1 connection held for ${SECONDS_HELD} s, one chunk every ${INTERVAL} ms (fake upstream, chunks stamped when sent),"
  echo "opened at $RAMP a second; one client thread (\`benches/streams.rs\`), the upstream, and the proxy under test share the cores."
  echo "The floor: \`fake-upstream --forward-to\` (\`src/bare_forwarder.rs\`), llm-proxy's HTTP server and upstream pool with no token check, key swap, usage, metrics or log."
  echo "Memory per stream: the proxy's resident memory with every stream open minus before, divided by the streams (nginx: master + worker)."
  echo "CPU: the proxy's user + system time over the run, in cores. Chunk delay: upstream send → client arrival; added: minus the direct path's."
  echo
  echo "$report"
  [ -n "$capped_note" ] && echo "$capped_note"
} >"$report_file"
cat "$report_file"

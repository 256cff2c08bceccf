#!/usr/bin/env bash
# API-server cost of limits (`just bench-writes`): three proxy processes share 1,000
# requests a second on ONE token, and the API server's own counters say how many status
# writes (PATCH) and reads (GET) that costs, per limit kind, in the same run. Prints a
# table and writes it to benches/api-writes.md; BENCHMARKS.md quotes it.
#
# The figures come from kube-apiserver's apiserver_request_total, read before and after
# each run: every write the proxies and the controller make, conflicts (409) included.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-30}
RATE=${BENCH_RATE:-1000}
REPLICAS=3
FLUSH_MS=2000
target=${CARGO_TARGET_DIR:-target}/release
state=.cluster/bench-writes
kubectl=${KUBECTL:-$HOME/.cache/llm-proxy/bin/kubectl}
export KUBECONFIG=${KUBECONFIG:-$PWD/.cluster/kubeconfig}
up_port=19200 ctrl_admin=19201
proxy_ports=(19202 19204 19206)

# shellcheck source=benches/lib.sh
. benches/lib.sh
load_bin=$(bench_bin load)
tests/cluster/cluster.sh up >/dev/null
rm -rf "$state" && mkdir -p "$state"
trap cleanup EXIT

bench_cluster writes-ops writes-apps writes-key '*'
run=$(date +%s)
# Limits far above what the run spends: the figures are the steady state, not refusals.
cat <<YAML | $kubectl apply --server-side -f - >/dev/null
apiVersion: llmproxy.io/v1alpha1
kind: Project
metadata: {name: writes, labels: {llmproxy.io/bench-writes: "1"}}
spec: {apiKeySecretRef: {name: writes-key}, upstream: {url: "http://127.0.0.1:$up_port"}, allowedNamespaces: {from: All}}
---
apiVersion: llmproxy.io/v1alpha1
kind: Project
metadata: {name: writes-shared-$run, labels: {llmproxy.io/bench-writes: "1"}}
spec:
  apiKeySecretRef: {name: writes-key}
  upstream: {url: "http://127.0.0.1:$up_port"}
  allowedNamespaces: {from: All}
  limits: {tokensPerDay: 1000000000000}
---
apiVersion: llmproxy.io/v1alpha1
kind: ProxyToken
metadata: {name: unlimited-$run, namespace: writes-apps, labels: {llmproxy.io/bench-writes: "1"}}
spec: {projectRef: {name: writes}, duration: 720h}
---
apiVersion: llmproxy.io/v1alpha1
kind: ProxyToken
metadata: {name: capped-$run, namespace: writes-apps, labels: {llmproxy.io/bench-writes: "1"}}
spec: {projectRef: {name: writes}, duration: 720h, maxRequests: 1000000000}
---
apiVersion: llmproxy.io/v1alpha1
kind: ProxyToken
metadata: {name: rpm-$run, namespace: writes-apps, labels: {llmproxy.io/bench-writes: "1"}}
spec: {projectRef: {name: writes}, duration: 720h, limits: {requestsPerMinute: 120000}}
---
apiVersion: llmproxy.io/v1alpha1
kind: ProxyToken
metadata: {name: tokens-$run, namespace: writes-apps, labels: {llmproxy.io/bench-writes: "1"}}
spec: {projectRef: {name: writes}, duration: 720h, limits: {tokensPerMinute: 100000000, tokensPerDay: 1000000000000}}
---
apiVersion: llmproxy.io/v1alpha1
kind: ProxyToken
metadata: {name: shared-$run, namespace: writes-apps, labels: {llmproxy.io/bench-writes: "1"}}
spec: {projectRef: {name: writes-shared-$run}, duration: 720h}
YAML

start upstream "$target/fake-upstream" "127.0.0.1:$up_port"
start controller "${image_env[@]}" "$target/llm-proxy" controller --namespace writes-ops --label-selector llmproxy.io/bench-writes=1 \
  --proxy-url "http://127.0.0.1:${proxy_ports[0]}" --admin-addr "127.0.0.1:$ctrl_admin" --leader-elect=false
for i in $(seq 0 $((REPLICAS - 1))); do
  port=${proxy_ports[$i]}
  start "proxy-$i" "${image_env[@]}" "$target/llm-proxy" proxy --namespace writes-ops --label-selector llmproxy.io/bench-writes=1 \
    --listen-addr "127.0.0.1:$port" --admin-addr "127.0.0.1:$((port + 1))" --worker-threads 1 \
    --usage-flush-millis "$FLUSH_MS" --identity "proxy-$i"
  until curl -sf "http://127.0.0.1:$((port + 1))/readyz" >/dev/null; do sleep 0.05; done
done
kinds=(unlimited capped rpm tokens shared)
until [ "$($kubectl get proxytokens -n writes-apps -l llmproxy.io/bench-writes=1 --field-selector status.phase=Active -o name | wc -l)" -ge ${#kinds[@]} ]; do sleep 0.2; done
sleep 1

# requests VERB [CODE] -> status requests of that verb (and answer code) to ProxyTokens
# and Projects so far
requests() {
  $kubectl get --raw /metrics | awk -v verb="$1" -v code="${2:-}" '
    /^apiserver_request_total\{/ && /group="llmproxy.io"/ && /subresource="status"/ && $0 ~ "verb=\"" verb "\"" &&
      (code == "" || $0 ~ "code=\"" code "\"") { n += $NF }
    END { printf "%d\n", n }'
}

out=$state/table.md
{
  echo "| token's limit | req/s answered | status writes/s | refused as conflicts (409)/s | stored writes/s | bound on stored writes/s | status reads/s |"
  echo "|---|---|---|---|---|---|---|"
} >"$out"
for kind in "${kinds[@]}"; do
  token=$($kubectl -n writes-apps get secret "$kind-$run" -o jsonpath='{.data.token}' | base64 -d)
  # Warm: each replica claims its first shares before the window is measured.
  for port in "${proxy_ports[@]}"; do
    curl -sf -o /dev/null -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
      -d '{"model":"m","messages":[]}' "http://127.0.0.1:$port/v1/chat/completions"
  done
  # Past the previous row's idle give-backs (10 s after its last request) and a flush.
  sleep $((10 + FLUSH_MS / 1000 + 1))
  writes_before=$(requests PATCH) conflicts_before=$(requests PATCH 409) reads_before=$(requests GET)
  started=$(date +%s.%N)
  loads=()
  for port in "${proxy_ports[@]}"; do
    "$load_bin" --duration "$DURATION" --rate "$((RATE / REPLICAS))" --connections 4 --method POST \
      --header "Authorization: Bearer $token" --header 'Content-Type: application/json' \
      --body '{"model":"m","messages":[{"role":"user","content":"hi"}]}' \
      "http://127.0.0.1:$port/v1/chat/completions" >"$state/load-$kind-$port.json" &
    loads+=($!)
  done
  wait "${loads[@]}"
  # The last flush of the run lands within one interval.
  sleep $((FLUSH_MS / 1000 + 1))
  elapsed=$(echo "$(date +%s.%N) - $started" | bc)
  writes=$(($(requests PATCH) - writes_before)) reads=$(($(requests GET) - reads_before))
  conflicts=$(($(requests PATCH 409) - conflicts_before))
  answered=$(python3 -c 'import json, sys
print(sum(json.load(open(f))["ok"] for f in sys.argv[2:]) / float(sys.argv[1]))' "$DURATION" "$state"/load-"$kind"-*.json)
  # Stated in the README: flushes (one per replica and interval for the token, one more
  # for a limited Project) plus claims (one per block of requests or share of tokens,
  # and one per replica and minute window); conflicts come on top, each retried.
  case $kind in
    unlimited) bound=$(echo "$REPLICAS * 1000 / $FLUSH_MS" | bc -l) ;;
    tokens) bound=$(echo "$REPLICAS * 1000 / $FLUSH_MS + $REPLICAS / 60" | bc -l) ;;
    shared) bound=$(echo "2 * $REPLICAS * 1000 / $FLUSH_MS" | bc -l) ;;
    capped | rpm) bound=$(echo "$REPLICAS * 1000 / $FLUSH_MS + $RATE / 1000 + $REPLICAS / 60" | bc -l) ;;
  esac
  python3 - "$kind" "$answered" "$writes" "$conflicts" "$reads" "$elapsed" "$bound" >>"$out" <<'PY'
import sys
kind, answered, writes, conflicts, reads, elapsed, bound = sys.argv[1], *map(float, sys.argv[2:])
names = {"unlimited": "none", "capped": "maxRequests 10^9", "rpm": "requestsPerMinute 120,000",
         "tokens": "tokensPerMinute 10^8 + tokensPerDay 10^12", "shared": "its Project's tokensPerDay 10^12"}
print("| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f |" % (names[kind], answered, writes / elapsed,
      conflicts / elapsed, (writes - conflicts) / elapsed, bound, reads / elapsed))
PY
done
{
  echo
  echo "$REPLICAS proxy processes (one worker thread each) on one token, ${RATE} req/s offered for ${DURATION} s"
  echo "(benches/load.rs, open loop, a third to each), flush interval ${FLUSH_MS} ms; writes and reads are the API"
  echo "server's own counts of PATCH and GET on proxytokens/status and projects/status in the window,"
  echo "divided by its length (the load plus one flush interval). \`just bench-writes\`, $(date -u +%Y-%m-%d)."
} >>"$out"
cp "$out" benches/api-writes.md
cat "$out"

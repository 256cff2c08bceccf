#!/usr/bin/env bash
# The local demo: fake upstream + controller + proxy against the local control plane,
# the quickstart example applied, and one request through the proxy with curl.
#   hack/demo.sh up     start everything and send the request
#   hack/demo.sh down   stop the demo's processes
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}/debug
state=.cluster/demo
export KUBECONFIG=${KUBECONFIG:-$PWD/.cluster/kubeconfig}
kubectl=${KUBECTL:-$HOME/.cache/llm-proxy/bin/kubectl}
proxy_port=18081

stop() {
  for name in proxy controller upstream; do
    if [[ -f $state/$name.pid ]]; then
      kill "$(cat "$state/$name.pid")" 2>/dev/null || true
      rm -f "$state/$name.pid"
    fi
  done
}

start() {
  local name=$1
  shift
  nohup "$@" >"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
}

case ${1:-up} in
  down)
    stop
    echo "demo stopped"
    exit 0
    ;;
  up) ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac

mkdir -p "$state"
stop
echo "==> installing the CRDs and the quickstart example"
$kubectl apply --server-side -f crds/llmproxy.io.yaml >/dev/null
$kubectl wait --for condition=established crd/projects.llmproxy.io crd/proxytokens.llmproxy.io >/dev/null
$kubectl apply -f examples/quickstart/00-namespaces.yaml -f examples/quickstart/10-project.yaml >/dev/null
# Re-running the demo mints a fresh token.
$kubectl delete -f examples/quickstart/20-proxytoken.yaml --ignore-not-found --wait >/dev/null
$kubectl apply -f examples/quickstart/20-proxytoken.yaml >/dev/null

echo "==> starting the fake upstream, the controller and the proxy (logs in $state/)"
start upstream "$target/fake-upstream" 127.0.0.1:18080
# Integration tests run their own controller and proxy for objects labelled
# llmproxy.io/test; the demo's processes leave those alone.
start controller "$target/llm-proxy" controller --namespace llm-proxy --label-selector '!llmproxy.io/test' \
  --proxy-url "http://127.0.0.1:$proxy_port" --admin-addr 127.0.0.1:19090
start proxy "$target/llm-proxy" proxy --namespace llm-proxy --label-selector '!llmproxy.io/test' \
  --listen-addr "127.0.0.1:$proxy_port" --admin-addr 127.0.0.1:19091

for _ in $(seq 1 100); do
  curl -sf http://127.0.0.1:19091/readyz >/dev/null 2>&1 && break
  sleep 0.1
done
$kubectl -n demo-apps wait --for jsonpath='{.status.phase}'=Active proxytoken/chat-app --timeout 30s >/dev/null

echo "==> kubectl get projects,proxytokens -A"
$kubectl get projects
$kubectl get proxytokens -A
token=$($kubectl -n demo-apps get secret chat-app -o jsonpath='{.data.OPENAI_API_KEY}' | base64 -d)
base=$($kubectl -n demo-apps get secret chat-app -o jsonpath='{.data.OPENAI_BASE_URL}' | base64 -d)

echo "==> curl $base/chat/completions with the minted token"
curl -sS "$base/chat/completions" \
  -H "Authorization: Bearer $token" -H "Content-Type: application/json" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'
echo
echo "==> done. The demo keeps running; stop it with: just demo-down && just cluster-down"

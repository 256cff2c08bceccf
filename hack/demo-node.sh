#!/usr/bin/env bash
# The demo of the real thing: the Helm chart on the local node (`just cluster-up-node`),
# pods from the image built by `just image-local`, the quickstart applied, and a
# workload pod with nothing but the token Secret in envFrom calling the proxy's Service.
#   hack/demo-node.sh up     install, apply, call; prints the workload's answer
#   hack/demo-node.sh down   uninstall and stop the fake upstream (the node keeps running;
#                            `just cluster-down` stops it and cleans the host)
# The fake upstream runs on this host, on the node's address, where pods reach it.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-$HOME/.cache/llm-proxy/target}/debug
state=.cluster/demo-node
export KUBECONFIG=${KUBECONFIG:-$PWD/.cluster/kubeconfig}
kubectl=${KUBECTL:-$HOME/.cache/llm-proxy/bin/kubectl}
helm=${HELM:-$HOME/.cache/llm-proxy/bin/helm}
image=${IMAGE:-localhost/llm-proxy:dev}
port=${DEMO_UPSTREAM_PORT:-18080}

fail() {
  echo "error: $*" >&2
  exit 1
}

stop_upstream() {
  if [[ -f $state/upstream.pid ]]; then
    kill "$(cat "$state/upstream.pid")" 2>/dev/null || true
    rm -f "$state/upstream.pid"
  fi
}

case ${1:-up} in
  up) ;;
  down)
    "$helm" uninstall llm-proxy --namespace llm-proxy --wait 2>/dev/null || true
    "$kubectl" delete namespace demo-apps --ignore-not-found --wait=false
    stop_upstream
    exit 0
    ;;
  *) fail "usage: $0 up|down" ;;
esac

[[ $(tests/cluster/cluster.sh mode) == node ]] && tests/cluster/cluster.sh status ||
  fail "no node runs: just cluster-up-node"
mkdir -p "$state"

echo "== loading $image into the node"
tests/cluster/cluster.sh load "$image"

node_ip=$("$kubectl" get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')
stop_upstream
"$target/fake-upstream" "$node_ip:$port" >"$state/upstream.log" 2>&1 &
echo $! >"$state/upstream.pid"
upstream=http://$node_ip:$port
echo "== fake upstream on $upstream"

echo "== helm install"
"$helm" upgrade --install llm-proxy charts/llm-proxy --namespace llm-proxy --create-namespace \
  --set image.repository="${image%:*}" --set image.tag="${image##*:}" \
  --set 'upstreamPolicy.schemes={https,http}' --wait --timeout 180s >/dev/null
"$kubectl" get pods --namespace llm-proxy

echo "== the quickstart (the Project's upstream pointed at $upstream)"
"$kubectl" apply -f examples/quickstart/00-namespaces.yaml
sed "s#http://127.0.0.1:18080#$upstream#" examples/quickstart/10-project.yaml | "$kubectl" apply -f -
"$kubectl" apply -f examples/quickstart/20-proxytoken.yaml
"$kubectl" wait proxytoken/chat-app --namespace demo-apps --for=jsonpath='{.status.phase}'=Active --timeout=60s
"$kubectl" get projects,proxytokens -A

echo "== a workload pod with the token Secret in envFrom"
"$kubectl" delete pod caller --namespace demo-apps --ignore-not-found --wait
"$kubectl" apply -f - <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: caller, namespace: demo-apps}
spec:
  restartPolicy: Never
  containers:
    - name: app
      image: localhost/llmproxy/busybox:1.35
      imagePullPolicy: Never
      envFrom: [{secretRef: {name: chat-app}}]
      command:
        - sh
        - -c
        - >-
          echo "POST $OPENAI_BASE_URL/chat/completions" &&
          wget -q -O- --header "Authorization: Bearer $OPENAI_API_KEY"
          --header 'Content-Type: application/json'
          --post-data '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'
          "$OPENAI_BASE_URL/chat/completions"
YAML
"$kubectl" wait pod/caller --namespace demo-apps --for=jsonpath='{.status.phase}'=Succeeded --timeout=60s ||
  { "$kubectl" logs caller --namespace demo-apps >&2 || true; fail "the workload's request failed"; }
echo "== the workload's answer (kubectl logs caller -n demo-apps)"
"$kubectl" logs caller --namespace demo-apps
echo
"$kubectl" get proxytoken chat-app --namespace demo-apps

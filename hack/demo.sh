#!/usr/bin/env bash
# The local demo: fake upstream + controller + proxy against the local control plane,
# the quickstart example applied, and one request through the proxy with curl.
#   hack/demo.sh up     start everything and send the request; exits non-zero, with the
#                       reason, when any step fails (and then stops what it started)
#   hack/demo.sh down   stop the demo's processes
#
# Ports (127.0.0.1): each default is used when free, otherwise the next free port above
# it (the demo says so). Set one to use exactly that port (the demo fails if it is busy):
#   DEMO_UPSTREAM_PORT (18080)  DEMO_PROXY_PORT (18081)
#   DEMO_CONTROLLER_ADMIN_PORT (19090)  DEMO_PROXY_ADMIN_PORT (19091)
# The ports in use are written to .cluster/demo/ports.
set -euo pipefail
cd "$(dirname "$0")/.."

# The justfile builds into ~/.cache/llm-proxy/target unless CARGO_TARGET_DIR is set.
target=${CARGO_TARGET_DIR:-$HOME/.cache/llm-proxy/target}/debug
state=.cluster/demo
export KUBECONFIG=${KUBECONFIG:-$PWD/.cluster/kubeconfig}
kubectl=${KUBECTL:-$HOME/.cache/llm-proxy/bin/kubectl}
timeout=60 # seconds to wait for each process and for the token

fail() {
  echo "error: $*" >&2
  exit 1
}

# The process a pid file names, if it is still running and is one of the demo's.
demo_pid() {
  local pid
  [[ -f $state/$1.pid ]] || return 1
  pid=$(cat "$state/$1.pid")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ $(ps -o args= -p "$pid" 2>/dev/null) == *"$2"* ]] || return 1
  echo "$pid"
}

stop() {
  local name bin pid pids=()
  for name in proxy controller upstream; do
    bin=llm-proxy
    [[ $name == upstream ]] && bin=fake-upstream
    if pid=$(demo_pid "$name" "$bin"); then
      kill "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$state/$name.pid"
  done
  # Wait for them to exit (and free their ports); kill what is left after 10s.
  local deadline=$((SECONDS + 10))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -f "$state/ports"
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

for bin in llm-proxy fake-upstream; do
  [[ -x $target/$bin ]] || fail "$target/$bin not found: build it first (just build)"
done
command -v "$kubectl" >/dev/null || fail "kubectl not found at $kubectl: run just setup"
[[ -f $KUBECONFIG ]] || fail "no kubeconfig at $KUBECONFIG: start the control plane (just cluster-up)"

mkdir -p "$state"
stop

# On failure, stop whatever this run started (logs stay in $state/).
started=false
on_exit() {
  local rc=$?
  ((rc != 0)) || return 0
  stop
  if $started; then
    echo "demo failed; its processes were stopped (logs in $state/)" >&2
  fi
}
trap on_exit EXIT

# --- ports -----------------------------------------------------------------------------
busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
chosen=" "                       # the ports picked so far
defaults=" 18080 18081 19090 19091 " # a port that moves skips the others' defaults
# pick <variable> <what> <env override> <default>: sets <variable> to a free port.
pick() {
  local var=$1 what=$2 env=$3 port=$4
  if [[ -n ${!env:-} ]]; then
    port=${!env}
    if ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
      fail "$env=$port is not a port number"
    fi
    port=$((10#$port))
    if [[ $chosen == *" $port "* ]]; then
      fail "port $port for the $what ($env) is already used by the demo: set $env to another port"
    elif busy "$port"; then
      fail "port $port for the $what ($env) is busy: set $env to a free port, or unset it to let the demo pick one"
    fi
  else
    while [[ $chosen == *" $port "* ]] || { ((port != $4)) && [[ $defaults == *" $port "* ]]; } || busy "$port"; do
      ((port < $4 + 100)) || fail "no free port in $4-$port for the $what: set $env to a free port"
      port=$((port + 1))
    done
    if ((port != $4)); then
      local why="is busy"
      [[ $chosen == *" $4 "* ]] && why="is taken by another of the demo's processes"
      echo "    port $4 $why; the $what uses $port instead (set $env to choose another)"
    fi
  fi
  chosen+="$port "
  printf -v "$var" %s "$port"
}

echo "==> choosing ports"
upstream_port='' proxy_port='' controller_admin_port='' proxy_admin_port=''
pick upstream_port "fake upstream" DEMO_UPSTREAM_PORT 18080
pick proxy_port "proxy" DEMO_PROXY_PORT 18081
pick controller_admin_port "controller's admin endpoint" DEMO_CONTROLLER_ADMIN_PORT 19090
pick proxy_admin_port "proxy's admin endpoint" DEMO_PROXY_ADMIN_PORT 19091
cat >"$state/ports" <<EOF
UPSTREAM_PORT=$upstream_port
PROXY_PORT=$proxy_port
CONTROLLER_ADMIN_PORT=$controller_admin_port
PROXY_ADMIN_PORT=$proxy_admin_port
EOF
echo "    fake upstream $upstream_port, proxy $proxy_port, admin $controller_admin_port (controller) and $proxy_admin_port (proxy); saved in $state/ports"

# --- the example -----------------------------------------------------------------------
echo "==> installing the CRDs and the quickstart example"
$kubectl apply --server-side -f crds/llmproxy.io.yaml >/dev/null
$kubectl wait --for condition=established crd/projects.llmproxy.io crd/proxytokens.llmproxy.io crd/pricelists.llmproxy.io \
  --timeout "${timeout}s" >/dev/null || fail "the CRDs did not become established within ${timeout}s"
# The Project points at the fake upstream's port.
example_url=http://127.0.0.1:18080
project=$(sed "s#url: $example_url\$#url: http://127.0.0.1:$upstream_port#" examples/quickstart/10-project.yaml)
grep -q "url: http://127.0.0.1:$upstream_port\$" <<<"$project" ||
  fail "examples/quickstart/10-project.yaml no longer sets url: $example_url; update hack/demo.sh"
$kubectl apply -f examples/quickstart/00-namespaces.yaml -f - <<<"$project" >/dev/null
# Re-running the demo mints a fresh token: delete the old one and wait for the garbage
# collector to delete its Secret too (a leftover Secret would be a SecretConflict).
$kubectl delete -f examples/quickstart/20-proxytoken.yaml --ignore-not-found --wait --timeout "${timeout}s" >/dev/null ||
  fail "the old ProxyToken demo-apps/chat-app was not deleted within ${timeout}s"
$kubectl -n demo-apps wait --for delete secret/chat-app --timeout "${timeout}s" >/dev/null 2>&1 ||
  fail "the old Secret demo-apps/chat-app was not deleted within ${timeout}s (delete it if it is not the token's)"
$kubectl apply -f examples/quickstart/20-proxytoken.yaml >/dev/null

# --- the processes ---------------------------------------------------------------------
start() {
  local name=$1
  shift
  nohup "$@" >"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
  started=true
}

log_tail() {
  echo "--- last 20 lines of $state/$1.log:"
  tail -n 20 "$state/$1.log"
  echo "---"
}

# Says which of the started processes are no longer running, with the end of their logs.
report_exited() {
  local name pid
  for name in upstream controller proxy; do
    pid=$(cat "$state/$name.pid" 2>/dev/null) || continue
    kill -0 "$pid" 2>/dev/null && continue
    echo "error: the ${what[$name]} (pid $pid) is no longer running"
    log_tail "$name"
  done >&2
}

declare -A what=([upstream]="fake upstream" [controller]=controller [proxy]=proxy)
# check <name> <url>: waits until the process answers 2xx at url; fails with the end of
# its log when it exits or does not answer in time.
check() {
  local name=$1 url=$2 pid rc=0
  local reason="did not answer $url within ${timeout}s"
  pid=$(cat "$state/$name.pid")
  for _ in $(seq 1 $((timeout * 10))); do
    if kill -0 "$pid" 2>/dev/null && curl -sf -o /dev/null --max-time 2 "$url"; then
      kill -0 "$pid" 2>/dev/null && return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" || rc=$?
      reason="exited (status $rc)"
      break
    fi
    sleep 0.1
  done
  {
    echo "error: the ${what[$name]} $reason"
    log_tail "$name"
  } >&2
  exit 1
}

echo "==> starting the fake upstream, the controller and the proxy (logs in $state/)"
start upstream "$target/fake-upstream" "127.0.0.1:$upstream_port"
check upstream "http://127.0.0.1:$upstream_port/v1/models"
# Integration tests run their own controller and proxy for objects labelled
# llmproxy.io/test; the demo's processes leave those alone. A fixed identity lets a
# re-run take over the leader lease at once instead of waiting for it to expire.
start controller "$target/llm-proxy" controller --namespace llm-proxy --label-selector '!llmproxy.io/test' \
  --identity llm-proxy-demo --proxy-url "http://127.0.0.1:$proxy_port" --admin-addr "127.0.0.1:$controller_admin_port"
check controller "http://127.0.0.1:$controller_admin_port/healthz"
start proxy "$target/llm-proxy" proxy --namespace llm-proxy --label-selector '!llmproxy.io/test' \
  --listen-addr "127.0.0.1:$proxy_port" --admin-addr "127.0.0.1:$proxy_admin_port"
check proxy "http://127.0.0.1:$proxy_admin_port/readyz"

if ! $kubectl -n demo-apps wait --for jsonpath='{.status.phase}'=Active proxytoken/chat-app \
  --timeout "${timeout}s" >/dev/null; then
  {
    echo "error: the ProxyToken demo-apps/chat-app did not become Active within ${timeout}s"
    $kubectl -n demo-apps get proxytoken chat-app \
      -o jsonpath='    phase: {.status.phase}{"\n"}{range .status.conditions[*]}    {.type}={.status}: {.message}{"\n"}{end}' || true
    if kill -0 "$(cat "$state/controller.pid")" 2>/dev/null; then
      log_tail controller
    fi
  } >&2
  report_exited
  exit 1
fi

echo "==> kubectl get project demo; kubectl -n demo-apps get proxytokens"
$kubectl get project demo
$kubectl -n demo-apps get proxytokens
token=$($kubectl -n demo-apps get secret chat-app -o jsonpath='{.data.OPENAI_API_KEY}' | base64 -d)
base=$($kubectl -n demo-apps get secret chat-app -o jsonpath='{.data.OPENAI_BASE_URL}' | base64 -d)
[[ -n $token ]] || fail "the Secret demo-apps/chat-app has no OPENAI_API_KEY"
[[ $base == "http://127.0.0.1:$proxy_port/v1" ]] ||
  fail "the Secret demo-apps/chat-app has OPENAI_BASE_URL=$base, expected http://127.0.0.1:$proxy_port/v1"

echo "==> curl $base/chat/completions with the minted token"
rm -f "$state/response.json"
status=$(curl -sS -o "$state/response.json" -w '%{http_code}' --max-time 30 "$base/chat/completions" \
  -H "Authorization: Bearer $token" -H "Content-Type: application/json" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}') || true
cat "$state/response.json" 2>/dev/null || true
echo
if [[ $status != 200 ]]; then
  report_exited
  [[ $status =~ ^[1-9] ]] || fail "the request through the proxy got no response (logs in $state/)"
  fail "the request through the proxy got HTTP $status instead of 200 (logs in $state/)"
fi
grep -Eq '"object"[[:space:]]*:[[:space:]]*"chat\.completion"' "$state/response.json" ||
  fail "the response is not a chat completion (logs in $state/)"

echo "==> done. The demo keeps running (ports in $state/ports). Try it:"
echo "    TOKEN=\$(just kubectl -n demo-apps get secret chat-app -o jsonpath='{.data.token}' | base64 -d)"
echo "    curl -s http://127.0.0.1:$proxy_port/v1/chat/completions -H \"Authorization: Bearer \$TOKEN\" \\"
echo "         -H 'content-type: application/json' -d '{\"model\":\"m\",\"messages\":[],\"stream\":true}'"
echo "    Stop it with: just demo-down && just cluster-down"

#!/usr/bin/env bash
# Builds, starts and stops the local control plane (etcd + kube-apiserver +
# kube-controller-manager, built from Go modules by ./main.go).
#
#   cluster.sh build   build (or reuse) the binary; prints its path
#   cluster.sh up      start in the background unless running; prints the kubeconfig path
#   cluster.sh down    stop it
#   cluster.sh status  exit 0 when it is running
#   cluster.sh version the Kubernetes release it builds (from go.mod: defined there only)
#
# Paths (all overridable):
#   LLMPROXY_CACHE        built binaries, outside the clone (default ~/.cache/llm-proxy);
#                         Go keeps its own caches (GOCACHE, GOMODCACHE) outside it too
#   LLMPROXY_CLUSTER_DIR  state folder                    (default <repo>/.cluster)
#   kubeconfig            $LLMPROXY_CLUSTER_DIR/kubeconfig
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${LLMPROXY_CACHE:-$HOME/.cache/llm-proxy}
state=${LLMPROXY_CLUSTER_DIR:-$repo/.cluster}
bin=$cache/bin/llmproxy-cluster
# The one place the Kubernetes release is named is go.mod; everything else asks here.
k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$here/go.mod")

export GOFLAGS=${GOFLAGS:--buildvcs=false}

build() {
  local sum
  sum=$(cat "$here"/go.mod "$here"/go.sum "$here"/*.go | sha256sum | cut -c1-16)
  if [[ -x $bin && -f $bin.src && $(cat "$bin.src") == "$sum" ]]; then
    echo "$bin"
    return
  fi
  mkdir -p "$cache/bin"
  echo "building the control plane (kube-apiserver $k8s_version from Go modules; ~5 min cold)..." >&2
  local v=k8s.io/component-base/version cv=k8s.io/client-go/pkg/version minor
  minor=$(echo "$k8s_version" | cut -d. -f2)
  (cd "$here" && go build -trimpath -o "$bin.tmp" -ldflags "-s -w \
      -X $v.gitVersion=$k8s_version -X $v.gitMajor=1 -X $v.gitMinor=$minor \
      -X $cv.gitVersion=$k8s_version -X $cv.gitMajor=1 -X $cv.gitMinor=$minor" .)
  mv "$bin.tmp" "$bin"
  ln -sf llmproxy-cluster "$cache/bin/kubectl"
  echo "$sum" > "$bin.src"
  echo "$bin"
}

running() {
  [[ -f $state/pid && -f $state/kubeconfig ]] && kill -0 "$(cat "$state/pid")" 2>/dev/null
}

up() {
  if running; then
    echo "$state/kubeconfig"
    return
  fi
  build >/dev/null
  mkdir -p "$state"
  rm -f "$state/kubeconfig"
  nohup "$bin" up --dir "$state" >"$state/apiserver.log" 2>&1 &
  echo $! >"$state/pid"
  for _ in $(seq 1 300); do
    if [[ -f $state/kubeconfig ]]; then
      echo "$state/kubeconfig"
      return
    fi
    if ! kill -0 "$(cat "$state/pid")" 2>/dev/null; then
      echo "control plane exited; last lines of $state/apiserver.log:" >&2
      tail -20 "$state/apiserver.log" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "control plane not ready after 60s; see $state/apiserver.log" >&2
  exit 1
}

down() {
  [[ -f $state/pid ]] || return 0
  local pid
  pid=$(cat "$state/pid")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 75); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$state/pid" "$state/kubeconfig"
}

case ${1:-} in
  build) build ;;
  version) echo "${k8s_version#v}" ;;
  up) up ;;
  down) down ;;
  status) running ;;
  *) echo "usage: $0 build|up|down|status|version" >&2; exit 2 ;;
esac

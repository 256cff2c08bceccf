#!/usr/bin/env bash
# Builds, starts and stops the local control plane (etcd + kube-apiserver +
# kube-controller-manager, built from Go modules by ./main.go).
#
#   cluster.sh build [--node]  build (or reuse) the binary; prints its path. --node: also
#                              the node's (llmproxy-node, pause, CoreDNS)
#   cluster.sh up [--node]     start in the background unless running; prints the kubeconfig
#                              path. --node: with one real node (as root; node/main.go)
#   cluster.sh load IMAGE...   copy images from buildah's store into the node (like `kind load`)
#   cluster.sh down            stop it (a node removes everything it put on the host)
#   cluster.sh status          exit 0 when it is running
#   cluster.sh mode            "node" or "api-only", of the running one
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

coredns_version=v1.12.4

# go_build OUT PACKAGE SOURCES...: builds PACKAGE (of this module) into OUT unless the
# sources are unchanged since the last build.
go_build() {
  local out=$1 package=$2 sum
  shift 2
  sum=$(cat "$here"/go.mod "$here"/go.sum "$@" | sha256sum | cut -c1-16)
  if [[ -x $out && -f $out.src && $(cat "$out.src") == "$sum" ]]; then
    return
  fi
  mkdir -p "$cache/bin"
  echo "building $(basename "$out") (Kubernetes $k8s_version from Go modules; minutes when cold)..." >&2
  local v=k8s.io/component-base/version cv=k8s.io/client-go/pkg/version minor
  minor=$(echo "$k8s_version" | cut -d. -f2)
  (cd "$here" && go build -trimpath -o "$out.tmp" -ldflags "-s -w \
      -X $v.gitVersion=$k8s_version -X $v.gitMajor=1 -X $v.gitMinor=$minor \
      -X $cv.gitVersion=$k8s_version -X $cv.gitMajor=1 -X $cv.gitMinor=$minor" "$package")
  mv "$out.tmp" "$out"
  echo "$sum" > "$out.src"
}

build() {
  go_build "$bin" . "$here"/*.go "$here"/coredns.yaml
  ln -sf llmproxy-cluster "$cache/bin/kubectl"
  if [[ ${1:-} == --node ]]; then
    go_build "$cache/bin/llmproxy-node" ./node "$here"/node/*.go
    # Static: it runs alone in an image of its own.
    CGO_ENABLED=0 go_build "$cache/bin/llmproxy-pause" ./pause "$here"/pause/*.go
    if [[ $(cat "$cache/bin/coredns.src" 2>/dev/null) != "$coredns_version" ]]; then
      echo "building CoreDNS $coredns_version from Go modules (~3 min once)..." >&2
      GOBIN=$cache/bin CGO_ENABLED=0 go install -ldflags "-s -w" "github.com/coredns/coredns@$coredns_version"
      echo "$coredns_version" > "$cache/bin/coredns.src"
    fi
  fi
  echo "$bin"
}

running() {
  [[ -f $state/pid && -f $state/kubeconfig ]] && kill -0 "$(cat "$state/pid")" 2>/dev/null
}

mode() { cat "$state/mode" 2>/dev/null || echo api-only; }

up() {
  local want=api-only
  [[ ${1:-} == --node ]] && want=node
  if running; then
    if [[ $(mode) != "$want" && $want == node ]]; then
      echo "a control plane without a node runs already: stop it first (just cluster-down)" >&2
      exit 1
    fi
    echo "$state/kubeconfig"
    return
  fi
  local flags=()
  if [[ $want == node ]]; then
    [[ $(id -u) == 0 ]] || { echo "a node needs root (containerd, netfilter, mounts)" >&2; exit 1; }
    for tool in containerd runc ctr /usr/lib/cni/bridge; do
      command -v "$tool" >/dev/null || { echo "$tool missing: run hack/setup.sh" >&2; exit 1; }
    done
    flags=(--node)
  fi
  build "${flags[@]}" >/dev/null
  mkdir -p "$state"
  rm -f "$state/kubeconfig"
  echo "$want" > "$state/mode"
  nohup "$bin" up --dir "$state" "${flags[@]}" >"$state/apiserver.log" 2>&1 &
  echo $! >"$state/pid"
  # A node needs longer: its daemons, then CoreDNS rolled out.
  for _ in $(seq 1 $([[ $want == node ]] && echo 1200 || echo 300)); do
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
  echo "control plane not ready; see $state/apiserver.log" >&2
  exit 1
}

# load IMAGE...: what `kind load docker-image` does, from buildah's store.
load() {
  # One node per machine: whichever control plane started it (this one, or a test's).
  [[ -S /run/llmproxy-node/containerd.sock ]] || { echo "no node runs (cluster.sh up --node)" >&2; exit 1; }
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  for image in "$@"; do
    buildah push --quiet "$image" "docker-archive:$tmp/image.tar:$image" >/dev/null
    "$cache/bin/llmproxy-node" load "$tmp/image.tar"
    rm -f "$tmp/image.tar"
  done
}

down() {
  [[ -f $state/pid ]] || return 0
  local pid
  pid=$(cat "$state/pid")
  kill -TERM "$pid" 2>/dev/null || true
  # A node removes what it put on the host before it ends: give it time.
  for _ in $(seq 1 400); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$state/pid" "$state/kubeconfig" "$state/mode"
}

case ${1:-} in
  build) build "${2:-}" ;;
  version) echo "${k8s_version#v}" ;;
  up) up "${2:-}" ;;
  load) shift; load "$@" ;;
  down) down ;;
  status) running ;;
  mode) mode ;;
  *) echo "usage: $0 build|up|load|down|status|mode|version" >&2; exit 2 ;;
esac

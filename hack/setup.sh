#!/usr/bin/env bash
# Installs what building, testing and the demos need on a fresh machine, idempotently:
# just and cargo-deny (from crates.io), the official openai Python SDK in a venv, helm and
# the local control plane with its node (built from Go modules), the Prometheus Operator's
# ServiceMonitor CRD (from its Go module), and Debian packages for
# the node and the image. Everything lands under $LLMPROXY_CACHE (default
# ~/.cache/llm-proxy), ~/.cargo/bin or the system's packages, outside the clone, so
# reruns are fast.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${LLMPROXY_CACHE:-$HOME/.cache/llm-proxy}
openai_version=3.57.0
mkdir -p "$cache"

if ! command -v just >/dev/null 2>&1; then
  echo "setup: installing just (cargo install just --locked)..."
  cargo install just --locked --quiet
fi

# cargo-deny checks licenses, duplicate crates and sources (deny.toml) in `just lint`.
# Pinned: newer releases need a newer rustc than this machine's.
deny_version=0.18.3
if ! cargo deny --version 2>/dev/null | grep -qx "cargo-deny $deny_version"; then
  echo "setup: installing cargo-deny $deny_version (cargo install --locked; ~6 min once)..."
  cargo install cargo-deny --locked --version "$deny_version" --quiet
fi

# curl for the tests; for the node mode (tests/cluster/node): containerd, runc and the CNI
# plugins, busybox for workload pods; buildah and debootstrap build the image (hack/image.sh);
# Chromium and its WebDriver for the dashboard tests (tests/dashboard.rs).
packages=(curl containerd runc containernetworking-plugins busybox-static buildah debootstrap iptables iproute2
  chromium chromium-driver fonts-dejavu-core)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if (( ${#missing[@]} )); then
  echo "setup: installing ${missing[*]} (apt-get)..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv=$cache/venv
if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$openai_version')" 2>/dev/null; then
  echo "setup: installing the openai Python SDK $openai_version into $venv..."
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$openai_version"
fi

helm_version=v3.22.0
if ! "$cache/bin/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$helm_version"; then
  echo "setup: building helm $helm_version from Go modules..."
  GOBIN=$cache/bin GOFLAGS=-buildvcs=false go install \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version" \
    "helm.sh/helm/v3/cmd/helm@$helm_version"
fi

# The Prometheus Operator's ServiceMonitor CRD, what the chart's serviceMonitor.enabled
# needs installed: taken from the operator's Go module (no other registry is reachable
# here). The node test installs it and scrapes what the ServiceMonitors select.
prometheus_operator_version=v0.85.0
crds=$cache/crds/prometheus-operator-$prometheus_operator_version
if [ ! -s "$crds/monitoring.coreos.com_servicemonitors.yaml" ]; then
  echo "setup: fetching the Prometheus Operator's CRDs $prometheus_operator_version (Go module)..."
  # With -json, go reports a failure inside the JSON: show it whole.
  download=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$prometheus_operator_version") ||
    { echo "setup: go mod download failed: $download" >&2; exit 1; }
  module=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["Dir"])' "$download")
  mkdir -p "$crds"
  # Written whole or not at all, so a cut-short copy is never taken for the file.
  install -m 0644 "$module/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" "$crds/.partial"
  mv "$crds/.partial" "$crds/monitoring.coreos.com_servicemonitors.yaml"
fi
ln -sfn "$crds" "$cache/crds/prometheus-operator"

tests/cluster/cluster.sh build --node >/dev/null
echo "setup: done (cache: $cache)"

# llm-proxy: contributor recipes. `just --list` shows them.

# Builds are shared between clones (and with CI) under ~/.cache/llm-proxy.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", home_directory() / ".cache/llm-proxy/target")
export KUBECONFIG := justfile_directory() / ".cluster/kubeconfig"
kubectl := home_directory() / ".cache/llm-proxy/bin/kubectl"
helm := home_directory() / ".cache/llm-proxy/bin/helm"

default:
    @just --list

# Install just, the openai SDK venv and the local control plane (idempotent).
setup:
    bash hack/setup.sh

# Build the binaries (debug), with the demo's fake upstream.
build:
    cargo build --locked --bins --features fake-upstream

# Format check, clippy, CRD drift check (part of the unit tests), and every test: the
# node test (tests/node.rs) installs the chart with the image built here on a real node.
test: lint cluster-up image-local
    cargo test --locked --lib --bins --tests

# Unit tests only: no cluster needed.
unit:
    cargo test --locked --lib

# Integration and end-to-end tests against the local control plane.
e2e: cluster-up
    cargo test --locked --tests --test '*'

# cargo fmt --check, clippy with warnings as errors, and cargo-deny (licenses, bans,
# sources: deny.toml; advisories need GitHub, unreachable here). cargo-deny reads every
# platform's crates, and builds fetch only this one's: `cargo fetch` gets the rest.
lint:
    cargo fmt --all -- --check
    cargo clippy --locked --all-targets -- -D warnings
    cargo fetch --locked --quiet
    cargo deny --offline --log-level error check licenses bans sources

# Regenerate crds/ and the chart's copy from the Rust types.
crds:
    cargo run --locked --quiet -- crd > crds/llmproxy.io.yaml
    cp crds/llmproxy.io.yaml charts/llm-proxy/files/crds.yaml

# Start the local control plane (etcd + kube-apiserver + controller-manager) in the background.
cluster-up:
    @tests/cluster/cluster.sh up

# The same with one real node (kubelet, containerd, kube-proxy, scheduler, CoreDNS; as root).
cluster-up-node:
    @tests/cluster/cluster.sh up --node

# Stop the local control plane (and its node, removing what the node put on the host).
cluster-down:
    @tests/cluster/cluster.sh down

# kubectl of the same release as the local control plane, e.g. `just kubectl get projects`.
kubectl *args:
    @{{kubectl}} {{args}}

# helm lint and render the chart (helm is built by hack/setup.sh).
chart-lint:
    {{helm}} lint charts/llm-proxy
    {{helm}} template llm-proxy charts/llm-proxy --namespace llm-proxy --kube-version $(tests/cluster/cluster.sh version) > /dev/null

# Build the release image (needs a Docker engine, which this machine does not have).
image tag="llm-proxy:dev":
    docker build -t {{tag}} .

# Build the image here, without Docker or a registry: the same Dockerfile with buildah,
# its two base images made locally from Debian packages (hack/image.sh says how).
image-local tag="llm-proxy:dev":
    bash hack/image.sh {{tag}}

# Benchmarks: direct vs nginx vs llm-proxy, minting, propagation, scale; writes BENCHMARKS.md
# (`just bench --quick`: a shorter run for development, into .cluster/bench.md).
bench *ARGS: cluster-up
    bash benches/harness.sh {{ARGS}}

# API-server writes per second of each kind of limit: three proxies, 1,000 req/s on one token.
bench-writes: cluster-up
    bash benches/api-writes.sh

# HTTPS upstream (a local CA) vs plain, HTTP/2 vs HTTP/1.1 upstream, fresh handshake cost.
bench-tls: cluster-up
    bash benches/tls.sh

# Concurrent long SSE streams (1,000 and 10,000) direct, through nginx and through llm-proxy.
bench-streams *ARGS: cluster-up
    bash benches/streams.sh {{ARGS}}

# Every dashboard page's time with 1,000 Projects and 10,000 ProxyTokens, beside the API
# calls it makes (writes benches/dashboard.md).
bench-dashboard: cluster-up
    #!/usr/bin/env bash
    set -euo pipefail
    table=$(cargo bench --locked --quiet --bench dashboard)
    { printf '# Dashboard pages\n\n`just bench-dashboard`, %s, %s cores:\n\n%s\n' "$(date -u +%F)" "$(nproc)" "$table"; } > benches/dashboard.md
    cat benches/dashboard.md

# The dashboard's screenshots in docs/dashboard/, from its browser test (tests/dashboard.rs).
screenshots: cluster-up
    LLMPROXY_SCREENSHOTS=docs cargo test --locked --test dashboard

# Run the whole system locally and send one request through the proxy.
demo: build cluster-up
    bash hack/demo.sh up

# Stop the demo's processes (the control plane keeps running; `just cluster-down` stops it).
demo-down:
    bash hack/demo.sh down

# The real thing: the image built here, `helm install` on the local node, the quickstart,
# and a workload pod calling the proxy's Service with the token Secret in envFrom.
demo-node: build image-local cluster-up-node
    bash hack/demo-node.sh up

# Uninstall the node demo (`just cluster-down` also stops the node and cleans the host).
demo-node-down:
    bash hack/demo-node.sh down

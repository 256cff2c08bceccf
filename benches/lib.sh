# What the benchmark scripts share; sourced by them (after they set `state`), not run.

# Background processes of a run: `start NAME CMD...` runs CMD with its output in
# $state/NAME.log; `cleanup` stops them all (each script traps it on EXIT).
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
start() { local name=$1; shift; "$@" >"$state/$name.log" 2>&1 & pids+=($!); }

# The Rust benches are built without whole-program optimisation: from cold, each would
# cost another single-threaded fat-LTO link of about 4 minutes, for code that drives the
# API server, times the table in process 10 tokens against 100,000 in the same build
# (its nanoseconds are about 8 % above those of an LTO build), or is a client (the load
# generator, the streams' client), the same for every path it measures. Building a bench
# builds the package's binaries as well (llm-proxy and fake-upstream with fat LTO, as always),
# with the dev-dependencies' features: a separate `cargo build --bin` would compile the
# dependencies a second time without them. Without the default features the kubectl
# plugin, which no bench runs, is left out: one fat-LTO link fewer. bench_bin NAME -> its path.
bench_bin() {
  cargo rustc --release --locked --no-default-features --features fake-upstream --bench "$1" --quiet --message-format=json-render-diagnostics \
    -- -C lto=off -C codegen-units=16 |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("target", {}).get("name") == sys.argv[1] and m.get("executable"): print(m["executable"])' "$1"
}

# What the image sets for llm-proxy (Dockerfile): glibc's malloc asks for transparent
# huge pages, so a large routing table costs fewer TLB misses. Prefix proxy commands with it.
# BENCH_GLIBC_TUNABLES= (empty) measures without it.
image_env=(env "GLIBC_TUNABLES=${BENCH_GLIBC_TUNABLES-glibc.malloc.hugetlb=1}")

# load_percentiles FILE -> "p50 p99 p99.9" in milliseconds, from a report of the load
# generator (benches/load.rs); fails the run if any request failed.
load_percentiles() {
  python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
assert d["errors"] == 0, "%d requests failed, the first: %s" % (d["errors"], d["first_error"])
print("%.3f %.3f %.3f" % (d["p50_ms"], d["p99_ms"], d["p999_ms"]))' "$1"
}

# wrk_chat_script FILE TOKEN: a wrk script that POSTs a small chat completion with TOKEN.
wrk_chat_script() {
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
LUA
}

# bench_cluster OPS APPS KEY PROJECTS: the CRDs (established), namespaces OPS and APPS
# (APPS without the ProxyTokens of earlier runs), and in OPS the key Secret KEY, labelled
# as an API key and bound to PROJECTS (comma-separated names, or '*'). Needs $kubectl.
bench_cluster() {
  $kubectl apply --server-side -f crds/llmproxy.io.yaml >/dev/null
  $kubectl wait --for condition=established crd/projects.llmproxy.io crd/proxytokens.llmproxy.io \
    crd/pricelists.llmproxy.io >/dev/null
  for ns in "$1" "$2"; do $kubectl create namespace "$ns" --dry-run=client -o yaml | $kubectl apply -f - >/dev/null; done
  $kubectl delete proxytokens -n "$2" --all --wait=false >/dev/null 2>&1 || true
  $kubectl -n "$1" create secret generic "$3" --from-literal=apiKey=sk-bench-0123456789abcdefghijklmnop \
    --dry-run=client -o yaml | $kubectl label -f - --local -o yaml llmproxy.io/api-key=true |
    $kubectl annotate -f - --local -o yaml "llmproxy.io/projects=$4" | $kubectl apply -f - >/dev/null
}

# nginx_conf CONF WORKERS PORT UPSTREAM_PORT: starts nginx with $state/CONF, WORKERS
# worker processes, as a plain reverse proxy on PORT to the fake upstream on
# UPSTREAM_PORT (keep-alive, no buffering) with a buffered access log, as llm-proxy's is
# (one write per 64 KiB or 100 ms): both log every request. Its pid is in $state/CONF.pid.
nginx_conf() {
  cat >"$state/$1" <<NGINX
worker_processes $2;
pid $PWD/$state/$1.pid;
error_log $PWD/$state/$1-error.log;
events { worker_connections 1024; }
http {
  access_log $PWD/$state/$1-access.log combined buffer=64k flush=100ms;
  upstream fake { server 127.0.0.1:$4; keepalive 64; }
  server {
    listen 127.0.0.1:$3;
    location / { proxy_pass http://fake; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
NGINX
  nginx -c "$PWD/$state/$1" -p "$PWD/$state"
}

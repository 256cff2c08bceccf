# syntax=docker/dockerfile:1.7
# One image for `llm-proxy controller`, `llm-proxy proxy` and the kubectl plugin.
#   docker build -t llm-proxy:0.1.0 .
# Reproducible: the toolchain and base images are pinned, dependencies come from
# Cargo.lock (--locked), and the build runs as a non-root user in the final image.

FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them. Every target Cargo.toml
# names must exist for cargo to read it: empty stand-ins for the binaries and benches
# (the benches are read from Cargo.toml, so a new one needs no edit here).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/kubectl-llmproxy benches && touch src/lib.rs \
    && benches=$(sed -n '/^\[\[bench\]\]/{n;s/^name = "\(.*\)"$/benches\/\1.rs/p;}' Cargo.toml) \
    && for main in src/main.rs src/bin/fake-upstream.rs src/bin/kubectl-llmproxy/main.rs $benches; do \
         echo 'fn main() {}' > "$main"; done \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
COPY crds ./crds
COPY charts/llm-proxy/files ./charts/llm-proxy/files
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin llm-proxy --bin kubectl-llmproxy \
    && strip target/release/llm-proxy target/release/kubectl-llmproxy

# glibc's libc, libgcc and CA certificates, nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/llm-proxy /usr/local/bin/llm-proxy
COPY --from=build /src/target/release/kubectl-llmproxy /usr/local/bin/kubectl-llmproxy
# The chart's securityContext runs as this user with a read-only root filesystem.
# glibc's malloc asks for transparent huge pages (where the node allows them on request,
# the kernel default): the routing table of 100,000 tokens then costs fewer TLB misses
# per lookup (BENCHMARKS.md, "Scale").
ENV GLIBC_TUNABLES=glibc.malloc.hugetlb=1
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/llm-proxy"]

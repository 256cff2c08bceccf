//! What the Rust benches share: starting the release proxy against the local control plane.

/// A release proxy serving the Projects and ProxyTokens labelled `label=1`, with the
/// key Secrets of `namespace`: the child, its API port and its admin port.
pub fn spawn_proxy(namespace: &str, label: &str) -> (std::process::Child, u16, u16) {
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (port, admin) = (free_port(), free_port());
    let binary = std::env::var("BENCH_PROXY_BIN").unwrap_or_else(|_| "target/release/llm-proxy".into());
    let proxy = std::process::Command::new(binary)
        .args(["proxy", "--namespace", namespace, "--label-selector", &format!("{label}=1")])
        .args(["--listen-addr", &format!("127.0.0.1:{port}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .env("RUST_LOG", "warn")
        // As the image sets it (Dockerfile).
        .env("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
        .spawn()
        .unwrap();
    (proxy, port, admin)
}

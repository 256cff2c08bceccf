//! `fake-upstream`: serves [`llm_proxy::fake_upstream`] on an address, for the local
//! demo and the benchmarks. Usage: `fake-upstream [ADDR] [--tls CERT.pem KEY.pem]
//! [--http1]` (default 127.0.0.1:18080; with `--tls`, HTTPS with that certificate,
//! offering HTTP/2 and HTTP/1.1 by ALPN, or HTTP/1.1 alone with `--http1`).
//!
//! `fake-upstream ADDR --forward-to URL` serves instead [`llm_proxy::bare_forwarder`]
//! on one thread: the proxy's HTTP server and upstream pool with nothing in between,
//! the floor `benches/ab.sh` measures the proxy against.
#![forbid(unsafe_code)]

use llm_proxy::fake_upstream::FakeUpstream;

/// Connections the benchmarks hold open at once here, at most (10,000 streams).
const CONNECTIONS: usize = 16_384;

fn main() -> std::io::Result<()> {
    // While this is the process's only thread, as the proxy does: the direct path and
    // the floor of `benches/streams.sh` would otherwise wait on the descriptor table.
    llm_proxy::descriptors::prepare(CONNECTIONS);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve())
}

async fn serve() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args.first().filter(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| "127.0.0.1:18080".to_string());
    if let Some(at) = args.iter().position(|a| a == "--forward-to") {
        let Some(upstream) = args.get(at + 1) else {
            eprintln!("usage: fake-upstream ADDR --forward-to URL");
            std::process::exit(2);
        };
        let listener = FakeUpstream::listen(&addr)?;
        println!("bare forwarder listening on http://{addr}, forwarding to {upstream}");
        return llm_proxy::bare_forwarder::serve(listener, upstream, 1).await;
    }
    let listener = tokio::net::TcpListener::from_std(FakeUpstream::listen(&addr)?)?;
    let upstream = match args.iter().position(|a| a == "--tls") {
        Some(at) => {
            let (Some(cert), Some(key)) = (args.get(at + 1), args.get(at + 2)) else {
                eprintln!("usage: fake-upstream [ADDR] [--tls CERT.pem KEY.pem] [--http1]");
                std::process::exit(2);
            };
            let mut tls = FakeUpstream::tls_config(cert.as_ref(), key.as_ref())?;
            if args.iter().any(|a| a == "--http1") {
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            }
            FakeUpstream::serve_tls(listener, std::sync::Arc::new(tls), false)
        }
        None => FakeUpstream::serve(listener, false),
    };
    println!("fake upstream listening on {}", upstream.url);
    std::future::pending::<()>().await;
    Ok(())
}

//! `fake-upstream`: serves [`llm_proxy::fake_upstream`] on an address, for the local
//! demo and the benchmarks. Usage: `fake-upstream [ADDR]` (default 127.0.0.1:18080).
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18080".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let upstream = llm_proxy::fake_upstream::FakeUpstream::serve(listener, false);
    println!("fake upstream listening on {}", upstream.url);
    std::future::pending::<()>().await;
    Ok(())
}

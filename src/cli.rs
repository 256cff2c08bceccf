//! Command line: `llm-proxy controller | proxy | crd`, settings by flag or environment.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::controller::{self, lease};
use crate::index::watch::{self, WatchConfig};
use crate::metrics::Metrics;
use crate::proxy::quota::{self, Quota};
use crate::proxy::{Proxy, ProxySettings, server};

/// Kubernetes-native credential proxy for OpenAI-style APIs.
#[derive(Parser, Debug)]
#[command(name = "llm-proxy", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reconcile Projects and ProxyTokens (leader-elected).
    Controller(ControllerArgs),
    /// Serve the OpenAI-compatible API, forwarding with each project's key.
    Proxy(ProxyArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

#[derive(Args, Debug)]
struct Common {
    /// Namespace of the API-key Secrets (the operator's namespace).
    #[arg(long, env = "LLMPROXY_NAMESPACE", default_value = "llm-proxy")]
    namespace: String,
    /// Only handle Projects and ProxyTokens with these labels (e.g. `shard=a`).
    #[arg(long, env = "LLMPROXY_LABEL_SELECTOR")]
    label_selector: Option<String>,
    /// Address of /healthz, /readyz.
    #[arg(long, env = "LLMPROXY_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: SocketAddr,
}

#[derive(Args, Debug)]
struct ControllerArgs {
    #[command(flatten)]
    common: Common,
    /// Proxy URL as workloads reach it; written (with /v1) into token Secrets as OPENAI_BASE_URL.
    #[arg(long, env = "LLMPROXY_PROXY_URL", default_value = "http://llm-proxy.llm-proxy.svc:8080")]
    proxy_url: String,
    /// Elect a leader through a Lease so that only one replica writes.
    #[arg(long, env = "LLMPROXY_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "LLMPROXY_LEASE_NAME", default_value = "llm-proxy-controller")]
    lease_name: String,
    /// This replica's identity in the Lease (default: POD_NAME, else the hostname).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a lease lasts without renewal.
    #[arg(long, env = "LLMPROXY_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
}

#[derive(Args, Debug)]
struct ProxyArgs {
    #[command(flatten)]
    common: Common,
    /// Address of the API listener.
    #[arg(long, env = "LLMPROXY_LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    listen_addr: SocketAddr,
    /// Seconds to wait for the upstream's response headers.
    #[arg(long, env = "LLMPROXY_UPSTREAM_TIMEOUT_SECONDS", default_value_t = 600)]
    upstream_timeout_seconds: u64,
    /// Seconds to wait for a connection to the upstream.
    #[arg(long, env = "LLMPROXY_CONNECT_TIMEOUT_SECONDS", default_value_t = 10)]
    connect_timeout_seconds: u64,
    /// Seconds a streamed response may go without a chunk from the upstream.
    #[arg(long, env = "LLMPROXY_UPSTREAM_IDLE_TIMEOUT_SECONDS", default_value_t = 300)]
    upstream_idle_timeout_seconds: u64,
    /// Largest request body forwarded, in bytes; larger ones get 413.
    #[arg(long, env = "LLMPROXY_MAX_REQUEST_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_request_body_bytes: u64,
    /// Most bytes of a request body read to find its model when a model allowlist
    /// (spec.limits.models) applies; held in memory until the model is checked.
    #[arg(long, env = "LLMPROXY_MODEL_LOOKAHEAD_BYTES", default_value_t = 1024 * 1024)]
    model_lookahead_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM (after the shutdown delay).
    #[arg(long, env = "LLMPROXY_DRAIN_SECONDS", default_value_t = 30)]
    drain_seconds: u64,
    /// Seconds to keep accepting new connections after SIGTERM, reporting not-ready,
    /// before the drain. In Kubernetes, a terminating pod leaves the Service's endpoints
    /// a moment after it is told to stop; clients sent to it meanwhile are still served.
    #[arg(long, env = "LLMPROXY_SHUTDOWN_DELAY_SECONDS", default_value_t = 0)]
    shutdown_delay_seconds: u64,
    /// A PEM file of CA certificates to trust for upstream TLS, besides the public web
    /// roots: for upstreams behind a private CA (a self-hosted model, an internal gateway).
    #[arg(long, env = "LLMPROXY_UPSTREAM_CA_FILE")]
    upstream_ca_file: Option<std::path::PathBuf>,
    /// Offer HTTP/2 to HTTPS upstreams (by ALPN) as well as HTTP/1.1. Off by default:
    /// one HTTP/1.1 connection per concurrent request measured faster (benches/tls.md).
    #[arg(long, env = "LLMPROXY_UPSTREAM_HTTP2")]
    upstream_http2: bool,
    /// Milliseconds between writes of usage (requestCount, lastUsedAt) to token status.
    #[arg(long, env = "LLMPROXY_USAGE_FLUSH_MILLIS", default_value_t = 2000)]
    usage_flush_millis: u64,
    /// Most client connections open at once (over every serving thread); more wait in
    /// the kernel's accept queue until one ends. Each may buffer a 64 KiB request head:
    /// the default bounds that to 256 MiB.
    #[arg(long, env = "LLMPROXY_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Most of those one client address may hold; its further connections are closed at
    /// once, so that no single client fills the proxy and others wait.
    #[arg(long, env = "LLMPROXY_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_client: u32,
    /// Seconds a new client connection gets to send its first request's headers.
    #[arg(long, env = "LLMPROXY_CLIENT_HEADER_TIMEOUT_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    client_header_timeout_seconds: u64,
    /// Seconds a client connection may wait for its next request after a response.
    #[arg(long, env = "LLMPROXY_CLIENT_IDLE_TIMEOUT_SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    client_idle_timeout_seconds: u64,
    /// Threads serving the API (unset or 0: one per CPU the process may use).
    #[arg(long, env = "LLMPROXY_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// This replica's identity in its report Lease (default: POD_NAME, else host and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The uid of this replica's Pod: its report Lease is then owned by the Pod, and
    /// the garbage collector deletes it with the Pod.
    #[arg(long, env = "POD_UID")]
    pod_uid: Option<String>,
    /// Least milliseconds between two writes of this replica's report (what it enforces).
    #[arg(long, env = "LLMPROXY_REPORT_INTERVAL_MILLIS", default_value_t = 100)]
    report_interval_millis: u64,
}

/// Failures that end the process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable kubeconfig or in-cluster config.
    #[error("connecting to the Kubernetes API (set KUBECONFIG or run in a pod)")]
    KubeClient(#[source] kube::Error),
    /// A listener could not bind.
    #[error("listening on {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// The serving threads could not start.
    #[error("starting the serving threads")]
    Serve { source: std::io::Error },
    /// The OS random number generator failed.
    #[error("reading the OS random number generator")]
    Random(#[from] getrandom::Error),
    /// `--upstream-ca-file` could not be read as PEM certificates.
    #[error(
        "reading the upstream CA certificates in {path} (--upstream-ca-file: a PEM file of CERTIFICATE blocks): {reason}"
    )]
    UpstreamCa { path: std::path::PathBuf, reason: String },
}

/// The CA certificates of the PEM file at `path`: at least one, every block parsed.
fn read_upstream_ca(path: &std::path::Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, Error> {
    use rustls::pki_types::pem::PemObject;
    let failed = |reason: String| Error::UpstreamCa { path: path.to_path_buf(), reason };
    let certificates = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| failed(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(e.to_string()))?;
    if certificates.is_empty() {
        return Err(failed("it holds no certificate".into()));
    }
    // A certificate the trust store cannot use would silently trust nothing.
    let (_, unusable) = rustls::RootCertStore::empty().add_parsable_certificates(certificates.iter().cloned());
    if unusable > 0 {
        return Err(failed(format!(
            "{unusable} of its {} certificates are not usable CA certificates",
            certificates.len()
        )));
    }
    Ok(certificates)
}

impl Cli {
    /// The client connections the command may hold at once, if it serves any (the
    /// proxy): what the process's open files must make room for.
    pub fn connections(&self) -> Option<usize> {
        match &self.command {
            Command::Proxy(args) => Some(args.max_connections as usize),
            Command::Controller(_) | Command::Crd => None,
        }
    }
}

/// Entry point of the `llm-proxy` binary.
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Crd => {
            print!("{}", crate::crd::all_yaml());
            Ok(())
        }
        Command::Proxy(args) => run_proxy(args).await,
        Command::Controller(args) => run_controller(args).await,
    }
}

async fn client() -> Result<kube::Client, Error> {
    kube::Client::try_default().await.map_err(Error::KubeClient)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
}

async fn run_proxy(args: ProxyArgs) -> Result<(), Error> {
    let client = client().await?;
    let api = crate::proxy::server::listen(args.listen_addr)
        .map_err(|source| Error::Bind { addr: args.listen_addr, source })?;
    let admin = bind(args.common.admin_addr).await?;
    let metrics = Arc::new(Metrics::new());
    // This process in the usage-flush records: its identity and a suffix per start, since
    // a restarted process numbers its flushes from 1 again.
    let process = format!("{}-{:08x}", args.identity.clone().unwrap_or_else(default_identity), getrandom::u32()?);
    let quota = Arc::new(Quota::new(client.clone(), metrics.clone(), process));
    let table = watch::spawn(
        client.clone(),
        metrics.clone(),
        WatchConfig {
            secrets_namespace: args.common.namespace.clone(),
            label_selector: args.common.label_selector.clone(),
        },
    );
    quota::spawn_flusher(quota.clone(), table.clone(), Duration::from_millis(args.usage_flush_millis));
    let settings = ProxySettings {
        connect_timeout: Duration::from_secs(args.connect_timeout_seconds),
        response_timeout: Duration::from_secs(args.upstream_timeout_seconds),
        idle_timeout: Duration::from_secs(args.upstream_idle_timeout_seconds),
        max_request_body: args.max_request_body_bytes,
        model_lookahead: args.model_lookahead_bytes,
        upstream_ca: args.upstream_ca_file.as_deref().map(read_upstream_ca).transpose()?.unwrap_or_default(),
        upstream_http2: args.upstream_http2,
    };
    let threads = match args.worker_threads {
        Some(threads) if threads > 0 => threads,
        _ => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
    };
    tracing::info!(listen = %api.local_addr().map_or(args.listen_addr, |a| a), admin = %args.common.admin_addr, threads, "proxy started");
    let drain = Duration::from_secs(args.drain_seconds);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let terminating = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Installed once, here: a second signal is never missed between the two waits below.
    let mut signals = StopSignals::new();
    tokio::spawn({
        let terminating = terminating.clone();
        let delay = Duration::from_secs(args.shutdown_delay_seconds);
        async move {
            signals.next().await;
            terminating.store(true, std::sync::atomic::Ordering::Relaxed);
            if !delay.is_zero() {
                tracing::info!(
                    delay_secs = delay.as_secs(),
                    "stopping: serving on, not ready, until endpoints drop this replica (signal again to skip)"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = signals.next() => tracing::info!("stopping now: signalled again during the delay"),
                }
            }
            let _ = stop.send(true);
        }
    });
    let owner = args.identity.clone().zip(args.pod_uid.clone());
    let identity = args.identity.unwrap_or_else(default_identity);
    let reporter = tokio::spawn({
        let (client, table, stopped) = (client.clone(), table.clone(), stopped.clone());
        let settings = crate::enforcement::ReportSettings {
            namespace: args.common.namespace.clone(),
            identity,
            lease_duration: Duration::from_secs(30),
            min_interval: Duration::from_millis(args.report_interval_millis),
            owner,
        };
        async move { crate::enforcement::report(client, settings, &table, stopped).await }
    });
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(server::serve(
        admin,
        server::admin_handler(
            {
                let table = table.clone();
                move || {
                    if terminating.load(std::sync::atomic::Ordering::Relaxed) {
                        Err("shutting down")
                    } else if table.load().ready {
                        Ok(())
                    } else {
                        Err("routing table not synced yet")
                    }
                }
            },
            metrics.clone(),
        ),
        async move {
            let _ = admin_stopped.await;
        },
        Duration::from_secs(1),
        server::Connections::new(server::ConnectionLimits::admin()),
    ));
    let make_handler =
        || server::api_handler(Arc::new(Proxy::new(table.clone(), quota.clone(), metrics.clone(), &settings)));
    let limits = server::ConnectionLimits {
        max_connections: args.max_connections as usize,
        max_per_client: args.max_connections_per_client as usize,
        header_timeout: Duration::from_secs(args.client_header_timeout_seconds),
        idle_timeout: Duration::from_secs(args.client_idle_timeout_seconds),
    };
    let connections = server::Connections::counted(limits, &metrics);
    let served = server::serve_threads(api, threads, make_handler, stopped, drain, connections).await;
    // Counted requests reach the status, unused budget goes back to the other replicas.
    quota.shutdown().await;
    let _ = reporter.await;
    let _ = stop_admin.send(());
    let _ = admin_task.await;
    served.map_err(|source| Error::Serve { source })?;
    tracing::info!("proxy stopped");
    Ok(())
}

async fn run_controller(args: ControllerArgs) -> Result<(), Error> {
    let client = client().await?;
    let admin = bind(args.common.admin_addr).await?;
    let metrics = Arc::new(Metrics::new());
    // The controller's readiness does not depend on leadership: followers are healthy standbys.
    tokio::spawn(server::serve(
        admin,
        server::admin_handler(|| Ok(()), metrics.clone()),
        std::future::pending(),
        Duration::from_secs(1),
        server::Connections::new(server::ConnectionLimits::admin()),
    ));
    let settings = controller::Settings {
        namespace: args.common.namespace.clone(),
        proxy_url: args.proxy_url,
        label_selector: args.common.label_selector,
    };
    if !args.leader_elect {
        tracing::info!("controller started without leader election");
        controller::run(client, settings, metrics.clone(), shutdown_signal()).await;
        return Ok(());
    }
    let identity = args.identity.unwrap_or_else(default_identity);
    let mut elector = lease::Elector::new(
        client.clone(),
        lease::LeaseSettings {
            name: args.lease_name,
            namespace: args.common.namespace,
            identity: identity.clone(),
            lease_duration: Duration::from_secs(args.lease_duration_seconds),
            // Followers look every second (the holder renews as often): after a release,
            // the next leader starts within about a second.
            retry_period: Duration::from_secs((args.lease_duration_seconds / 15).max(1)),
        },
    );
    let renewed = tokio::select! {
        renewed = elector.acquire() => renewed,
        () = shutdown_signal() => return Ok(()),
    };
    tracing::info!(%identity, "leading: reconciling");
    tokio::select! {
        () = controller::run(client, settings, metrics.clone(), shutdown_signal()) => {}
        () = elector.hold(renewed) => {
            // Another replica may lead now; stop writing at once and let the pod restart.
            tracing::error!(%identity, "lost the leader lease; exiting");
            crate::telemetry::flush();
            std::process::exit(1);
        }
    }
    // A clean stop (a rolling update): hand the lease over now, not after it lapses.
    match elector.release().await {
        Ok(()) => tracing::info!(%identity, "released the leader lease"),
        Err(error) => {
            tracing::warn!(error = %crate::telemetry::Chain(&error), "could not release the leader lease; it lapses on its own")
        }
    }
    Ok(())
}

/// HOSTNAME (the pod name in a cluster) and the process id, unique on one machine too.
fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "llm-proxy".to_string());
    format!("{host}-{}", std::process::id())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    StopSignals::new().next().await;
}

/// SIGTERM and SIGINT (Ctrl-C), from the moment this is made: each arrival wakes one
/// [`StopSignals::next`], even one that arrived while nobody waited.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            term: signal(SignalKind::terminate()).expect("installing the SIGTERM handler"),
            interrupt: signal(SignalKind::interrupt()).expect("installing the SIGINT handler"),
        }
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

//! `llm-proxy`: wires the command line to the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = llm_proxy::cli::Cli::parse();
    // While this is the process's only thread: see `descriptors`.
    let descriptors = cli.connections().map(llm_proxy::descriptors::prepare);
    llm_proxy::telemetry::init();
    if let Some(prepared) = descriptors {
        prepared.log();
    }
    let code = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => {
            tracing::error!(%error, "llm-proxy failed to start its runtime");
            std::process::ExitCode::FAILURE
        }
    };
    llm_proxy::telemetry::flush();
    code
}

async fn run(cli: llm_proxy::cli::Cli) -> std::process::ExitCode {
    match llm_proxy::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %llm_proxy::telemetry::Chain(&error), "llm-proxy failed");
            std::process::ExitCode::FAILURE
        }
    }
}

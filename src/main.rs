//! `llm-proxy`: wires the command line to the library.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = llm_proxy::cli::Cli::parse();
    llm_proxy::telemetry::init();
    let code = match llm_proxy::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %llm_proxy::telemetry::Chain(&error), "llm-proxy failed");
            std::process::ExitCode::FAILURE
        }
    };
    llm_proxy::telemetry::flush();
    code
}

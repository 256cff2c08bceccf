//! `kubectl-llmproxy`: the kubectl plugin (`kubectl llmproxy …`). The binary owns its
//! command line and commands (`plugin`); it talks to the cluster only through the API
//! types and the replica reports of the `llm_proxy` library.
#![forbid(unsafe_code)]

mod dashboard;
mod plugin;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = plugin::Cli::parse();
    match plugin::run(cli).await {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", llm_proxy::telemetry::Chain(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

//! `kubectl-llmproxy`: the kubectl plugin (`kubectl llmproxy …`); wires the command line
//! to [`llm_proxy::plugin`].
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = llm_proxy::plugin::Cli::parse();
    match llm_proxy::plugin::run(cli).await {
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

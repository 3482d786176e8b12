//! `meshserve`: parse the command line, set up logging, run, exit.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use meshserve_sidecar::cli::{
    Cli, Command, LogFormat, canary, log_sink, render, serve, transform, up,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)).map_err(|e| e.to_string()),
        Command::Up(args) => runtime.block_on(up(args)).map_err(|e| e.to_string()),
        Command::Canary(args) => canary(args),
        Command::Render(args) => render(args),
        Command::Transform(args) => transform(args),
        Command::LogSink(args) => runtime.block_on(log_sink(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("meshserve: {e}");
            ExitCode::FAILURE
        }
    }
}

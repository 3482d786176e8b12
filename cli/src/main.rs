//! `meshserve`: parse the command line, set up logging, run, exit.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use meshserve_sidecar::telemetry;

use crate::cli::{Cli, Command, canary, log_sink, render, serve, transform, up, wake_scaler};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("meshserve: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let traces = match &cli.command {
        Command::Serve(args) => Some(&args.traces),
        _ => None,
    };
    // The OTLP exporter's channel lives on the runtime; `_telemetry` flushes spans at exit.
    let _telemetry = match runtime.block_on(async { telemetry::init(cli.log_format, traces) }) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("meshserve: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Up(args) => runtime.block_on(up(args)).map_err(|e| e.to_string()),
        Command::Canary(args) => canary(args),
        Command::Render(args) => render(args),
        Command::Transform(args) => transform(args),
        Command::LogSink(args) => runtime.block_on(log_sink(args)),
        Command::WakeScaler(args) => runtime.block_on(wake_scaler(args)),
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

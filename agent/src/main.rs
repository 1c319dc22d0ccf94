//! The `lichen` binary: parses the command line, loads the config, sets up logging and runs.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use lichen::cli::{Cli, Command};
use lichen::config::{AgentConfig, LogFormat};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Version = cli.command {
        println!("lichen {}", env!("CARGO_PKG_VERSION"));
        println!("wasmtime {}", lichen::runtime::WASMTIME_VERSION);
        println!("arch {}", std::env::consts::ARCH);
        return ExitCode::SUCCESS;
    }
    let config = match AgentConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lichen: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Check => {
            let report = lichen::check::check(&config);
            print!("{}", report.text);
            if report.problems > 0 {
                println!("{} problem(s) found", report.problems);
                return ExitCode::FAILURE;
            }
            println!("no problems found");
            ExitCode::SUCCESS
        }
        Command::Run => {
            init_logging(&config);
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("lichen: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Version => ExitCode::SUCCESS,
    }
}

fn init_logging(config: &AgentConfig) {
    // The level was validated with the config; fall back to info rather than run blind.
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn run(config: AgentConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lichen")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(handle_signals(cancel.clone()));
        lichen::app::run(config, cancel).await?;
        Ok(())
    })
}

/// The first SIGTERM or SIGINT stops the agent gracefully; a second one exits at once.
async fn handle_signals(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop lichen with SIGKILL");
        return;
    };
    for round in 0..2 {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if round == 0 {
            tracing::info!(signal = name, "stopping (send it again to exit immediately)");
            cancel.cancel();
        } else {
            tracing::warn!(signal = name, "exiting immediately");
            std::process::exit(130);
        }
    }
}

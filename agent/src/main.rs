//! The `lichen` binary: parses the command line, loads the config, sets up logging and runs.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use lichen::cli::{Cli, Command, LogsArgs, ModulesAction, RegistryLogin};
use lichen::config::AgentConfig;
use lichen::modules::commands::{self, ModuleCommand};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Version = cli.command {
        println!("lichen {}", env!("CARGO_PKG_VERSION"));
        println!("wasmtime {}", lichen::runtime::WASMTIME_VERSION);
        println!("arch {}", std::env::consts::ARCH);
        return ExitCode::SUCCESS;
    }
    let mut config = match AgentConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lichen: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Join(args) = &cli.command {
        // The flags override `[join]`; checked by the same rules as the file.
        let base = std::env::current_dir().unwrap_or_default();
        let j = &mut config.join;
        if let Some(s) = &args.server {
            j.server = s.clone();
        }
        if let Some(f) = &args.ca_cert {
            j.ca_cert = base.join(f);
        }
        if let Some(t) = &args.token {
            j.token = t.clone();
        }
        if let Some(f) = &args.token_file {
            j.token_file = base.join(f);
            j.token.clear();
        }
        if !j.enabled() {
            eprintln!("lichen: join: give --server (or join.server in the config) and --ca-cert");
            return ExitCode::from(2);
        }
        if let Err(e) = config.finish() {
            eprintln!("lichen: {e}");
            return ExitCode::from(2);
        }
    }
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
            lichen::logging::init(&config);
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
        Command::Join(args) => {
            lichen::logging::init(&config);
            match join(config, args.only) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("lichen: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Modules { action } => {
            lichen::logging::init_quiet(&config);
            let login = match &action {
                ModulesAction::Pull { login, .. } => match read_login(login) {
                    Ok(l) => l,
                    Err(e) => return fail(&e),
                },
                _ => None,
            };
            let base = std::env::current_dir().unwrap_or_default();
            let cmd = match action {
                ModulesAction::List => ModuleCommand::List,
                ModulesAction::Pull { image, .. } => {
                    let (username, password) = login.map_or((None, None), |(u, p)| (Some(u), Some(p)));
                    ModuleCommand::Pull { image, username, password, base }
                }
                ModulesAction::Rm { target, force } => ModuleCommand::Remove { target, force },
                ModulesAction::Prune { all } => ModuleCommand::Prune { all },
                ModulesAction::Import { wasm, precompiled, image } => ModuleCommand::Import {
                    wasm: base.join(wasm),
                    precompiled: precompiled.map(|p| base.join(p)),
                    image,
                },
            };
            report(block_on(commands::run_command(&config, cmd)))
        }
        Command::Status { json } => {
            lichen::logging::init_quiet(&config);
            match block_on(lichen::report::node_report(&config)) {
                Ok(r) if json => {
                    report(Ok(format!("{}\n", serde_json::to_string_pretty(&r).unwrap_or_default())))
                }
                Ok(r) => report(Ok(r.text())),
                Err(e) => fail(&e),
            }
        }
        Command::Pods { json } => {
            lichen::logging::init_quiet(&config);
            match block_on(lichen::report::node_report(&config)) {
                Ok(r) if json => {
                    report(Ok(format!("{}\n", serde_json::to_string_pretty(&r.pods).unwrap_or_default())))
                }
                Ok(r) => report(Ok(lichen::report::pods_table(&r.pods, jiff::Timestamp::now()))),
                Err(e) => fail(&e),
            }
        }
        Command::Logs(args) => {
            lichen::logging::init_quiet(&config);
            report(block_on(logs(config, args)).map(|()| String::new()))
        }
        Command::Compile { target, input, output } => {
            report(commands::compile_file(target, &input, output.as_deref()))
        }
        Command::Push { file, reference, login } => {
            lichen::logging::init_quiet(&config);
            let login = match read_login(&login) {
                Ok(l) => l,
                Err(e) => return fail(&e),
            };
            report(block_on(commands::push_file(&config, &file, &reference, login)))
        }
    }
}

fn report(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("lichen: {}", message.trim_end());
    ExitCode::FAILURE
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?
        .block_on(f)
}

/// User name from the flag or LICHEN_REGISTRY_USERNAME; password from stdin (`--password-stdin`)
/// or LICHEN_REGISTRY_PASSWORD, never from a flag, where `ps` would show it.
fn read_login(login: &RegistryLogin) -> Result<Option<(String, String)>, String> {
    let Some(user) = login.username.clone() else {
        if login.password_stdin {
            return Err("--password-stdin needs --username".into());
        }
        return Ok(None);
    };
    let password = if login.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        std::env::var("LICHEN_REGISTRY_PASSWORD")
            .map_err(|_| "give the password with --password-stdin or LICHEN_REGISTRY_PASSWORD".to_string())?
    };
    Ok(Some((user, password)))
}

/// `lichen logs`: prints the log until it ends, or until Ctrl-C (or SIGTERM), which ends it cleanly.
async fn logs(config: AgentConfig, args: LogsArgs) -> Result<(), String> {
    use lichen::pod::logs::{LogOptions, LogsCommand};
    let since = args.since.map(|d| {
        let now = jiff::Timestamp::now();
        jiff::SignedDuration::try_from(d)
            .ok()
            .and_then(|d| now.checked_sub(d).ok())
            .unwrap_or(jiff::Timestamp::MIN)
    });
    let cmd = LogsCommand {
        namespace: args.namespace,
        pod: args.pod,
        container: args.container,
        options: LogOptions {
            follow: args.follow,
            previous: args.previous,
            timestamps: args.timestamps,
            tail_lines: args.tail,
            since,
            limit_bytes: None,
        },
    };
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.cancel();
    });
    let mut out = tokio::io::stdout();
    lichen::pod::logs::run_command(&config, cmd, &mut out, cancel).await
}

fn agent_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lichen")
        .build()
        .context("cannot start the async runtime")
}

fn run(config: AgentConfig) -> anyhow::Result<()> {
    agent_runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(handle_signals(cancel.clone()));
        lichen::app::run(config, cancel).await?;
        Ok(())
    })
}

/// `lichen join`: joins (unless the node already has usable credentials of its own), then runs
/// the agent, or with `only` exits.
fn join(config: AgentConfig, only: bool) -> anyhow::Result<()> {
    agent_runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(handle_signals(cancel.clone()));
        let pki = lichen::bootstrap::NodePki::new(&config.state_dir);
        match lichen::bootstrap::usable(&pki.kubeconfig, jiff::Timestamp::now()) {
            Ok(()) => {
                tracing::info!(kubeconfig = %pki.kubeconfig.display(), "already joined; the node's certificate is valid")
            }
            Err(_) => {
                let (token, token_source) =
                    lichen::bootstrap::find_token(&config.join.token, &config.join.token_file)?;
                let req = lichen::bootstrap::JoinRequest {
                    node_name: config.node_name.clone(),
                    server: config.join.server.clone(),
                    ca_cert: config.join.ca_cert.clone(),
                    token,
                    token_source,
                    approval_timeout: std::time::Duration::from_secs(config.join.approval_timeout_secs),
                    state_dir: config.state_dir.clone(),
                };
                let kubeconfig = lichen::bootstrap::join(&req, &cancel).await?;
                println!("joined as system:node:{}; credentials in {}", config.node_name, kubeconfig.display());
            }
        }
        if !only && !cancel.is_cancelled() {
            lichen::app::run(config, cancel).await?;
        }
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

//! The `lichen` binary: parses the command line, loads the config, sets up logging and runs.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use lichen::cli::{self, Cli, CliError, Command, ModulesAction, block_on};
use lichen::config::AgentConfig;
use lichen::modules::commands::ModuleCommand;
use lichen::upgrade::switch::AgentSwitch;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    lichen::heap::tune_allocator();
    let cli = Cli::parse();
    if let Command::Version = cli.command {
        println!("lichen {}", lichen::version::version());
        println!("wasmtime {}", lichen::runtime::WASMTIME_VERSION);
        println!("arch {}", std::env::consts::ARCH);
        return ExitCode::SUCCESS;
    }
    if let Command::Fleet { action: cli::FleetAction::Upgrade(args) } = &cli.command {
        // An operator's machine: no agent config to read, only the kubeconfig.
        return fleet_upgrade(args, cli.config.kubeconfig.clone());
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
            j.token = lichen::config::TokenSetting::from_text(t);
        }
        if let Some(f) = &args.token_file {
            j.token_file = base.join(f);
            j.token = lichen::config::TokenSetting::Unset;
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
            let report = cli::check::check(&config);
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
            // May exec an upgraded agent and not return.
            let switch = AgentSwitch::start(&config.layout());
            let result = run(config, switch.clone());
            finish(result, &switch)
        }
        Command::Version => ExitCode::SUCCESS,
        Command::Join(args) => {
            lichen::logging::init(&config);
            let switch = AgentSwitch::start(&config.layout());
            let result = join(config, args.only, switch.clone());
            finish(result, &switch)
        }
        Command::Modules { action } => {
            lichen::logging::init_quiet(&config);
            let login = match &action {
                ModulesAction::Pull { login, .. } => match cli::modules::read_login(login) {
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
            report(block_on(cli::modules::run_command(&config, cmd)))
        }
        Command::Status { json } => {
            lichen::logging::init_quiet(&config);
            match block_on(cli::status::node_report(&config)) {
                Ok(r) if json => report(Ok(cli::status::report_json(r, false))),
                Ok(r) => report(Ok(cli::status::render(&r))),
                Err(e) => fail(&e),
            }
        }
        Command::Pods { json, output } => {
            lichen::logging::init_quiet(&config);
            match block_on(cli::status::node_report(&config)) {
                Ok(r) => match output {
                    Some(format) => report(cli::status::pods_output(&r, format)),
                    None if json => report(Ok(cli::status::report_json(r, true))),
                    None => report(Ok(cli::status::pods_table(&r.pods, jiff::Timestamp::now()))),
                },
                Err(e) => fail(&e),
            }
        }
        Command::Logs(args) => {
            lichen::logging::init_quiet(&config);
            report(block_on(cli::logs::print(config, args)).map(|()| String::new()))
        }
        Command::Compile { target, input, output } => {
            report(cli::modules::compile_file(target, &input, output.as_deref()))
        }
        Command::Push { files, reference, agent, sign_key, login } => {
            lichen::logging::init_quiet(&config);
            let login = match cli::modules::read_login(&login) {
                Ok(l) => l,
                Err(e) => return fail(&e),
            };
            if agent {
                let push = cli::publish::push_agent(&config, &files, &reference, sign_key.as_deref(), login);
                return report(block_on(push));
            }
            match files.as_slice() {
                [file] => report(block_on(cli::modules::push_file(&config, file, &reference, login))),
                _ => fail(&CliError::Usage(
                    "a module push takes one .wasm file; to publish agent binaries add --agent",
                )),
            }
        }
        // Handled before the config is loaded.
        Command::Fleet { .. } => ExitCode::SUCCESS,
        Command::Sign { key, reference, login } => {
            lichen::logging::init_quiet(&config);
            let login = match cli::modules::read_login(&login) {
                Ok(l) => l,
                Err(e) => return fail(&e),
            };
            report(block_on(cli::publish::sign(&config, &key, &reference, login)))
        }
    }
}

/// `lichen fleet upgrade`: progress lines while it runs, then the table; exits 1 unless every
/// matching node runs the image.
fn fleet_upgrade(args: &cli::FleetUpgradeArgs, kubeconfig: Option<std::path::PathBuf>) -> ExitCode {
    let req = cli::fleet::FleetUpgrade {
        selector: args.selector.clone(),
        image: args.image.clone(),
        max_unavailable: args.max_unavailable as usize,
        timeout: std::time::Duration::from_secs(args.timeout_secs),
        kubeconfig: kubeconfig.filter(|p| !p.as_os_str().is_empty()),
    };
    match block_on(async { Ok(cli::fleet::upgrade(&req).await?) }) {
        Ok(report) => {
            print!("\n{}", cli::fleet::render(&report.outcomes));
            if report.succeeded() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => fail(&e),
    }
}

/// The agent has stopped: hands over to the launcher if asked (an upgrade, or a rollback), else exits.
fn finish(result: anyhow::Result<()>, switch: &AgentSwitch) -> ExitCode {
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("lichen: {e:#}");
        return ExitCode::FAILURE;
    }
    if !switch.handover_requested() {
        return ExitCode::SUCCESS;
    }
    tracing::info!("handing over to the launcher");
    let e = switch.hand_over();
    // The exec failed; exiting lets systemd start the launcher, which reads the record.
    tracing::error!(error = %e, "cannot hand over to the launcher");
    eprintln!("lichen: cannot hand over to the launcher: {e}");
    ExitCode::FAILURE
}

fn report(result: Result<String, CliError>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(error: &CliError) -> ExitCode {
    eprintln!("lichen: {}", error.to_string().trim_end());
    ExitCode::FAILURE
}

/// Threads of the runtime's blocking pool, at most. Blocking work here is short (store reads and
/// writes, file work, loading a module) except a module's compile and a module's own file reads
/// (WASI runs them there; one reading a device may wait long, hence room to spare). tokio's
/// default, 512, let a burst of 100 static pods start and stop on 200-280 threads, each keeping
/// its stack pages for the 10 s an idle one lives: about 15 MiB on the development machine.
const BLOCKING_THREADS: usize = 16;

fn agent_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lichen")
        .max_blocking_threads(BLOCKING_THREADS)
        // What a thread's store writes retired is freed once the thread has nothing to do, not
        // when it next writes (heap.rs).
        .on_thread_park(lichen::heap::on_thread_idle)
        .build()
        .context("cannot start the async runtime")
}

fn run(config: AgentConfig, switch: Arc<AgentSwitch>) -> anyhow::Result<()> {
    let runtime = agent_runtime()?;
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(handle_signals(cancel.clone()));
        lichen::app::run(config, cancel, switch).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    // Every thread of the runtime ends before a handover's exec.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    Ok(())
}

/// `lichen join`: joins (unless the node already has usable credentials of its own), then runs
/// the agent, or with `only` exits.
fn join(config: AgentConfig, only: bool, switch: Arc<AgentSwitch>) -> anyhow::Result<()> {
    agent_runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(handle_signals(cancel.clone()));
        let pki = lichen::bootstrap::NodePki::new(&config.layout());
        match lichen::bootstrap::usable(&pki.kubeconfig, jiff::Timestamp::now()) {
            Ok(()) => {
                tracing::info!(kubeconfig = %pki.kubeconfig.display(), "already joined; the node's certificate is valid")
            }
            Err(_) => {
                let (token, token_source) =
                    lichen::bootstrap::find_token(config.join.token(), &config.join.token_file)?;
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
            lichen::app::run(config, cancel, switch).await?;
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

//! `lichen modules`, `lichen compile` and `lichen push`: module commands run through the running
//! agent (or on the store when none runs), and the build machine's side of modules.

use std::path::Path;

use super::CliError;
use super::args::RegistryLogin;
use super::client::{Reached, ask_agent_or_open_store, expect_answer};
use crate::config::AgentConfig;
use crate::control::{ControlError, ControlRequest, ControlResponse};
use crate::modules::commands::{ModuleCommand, encode_artifact};
use crate::modules::{Credential, Fetcher, ImageOrigin, ModuleCache, ModuleSource, parse_image};
use crate::runtime::CompileTarget;
use crate::store::{ModuleDigest, StateStore};

/// Runs a `lichen modules` command: through the running agent's control socket, or, when no agent
/// runs, on the store directly.
pub async fn run_command(config: &AgentConfig, cmd: ModuleCommand) -> Result<String, CliError> {
    let layout = config.layout();
    let socket = layout.control_socket();
    let request = ControlRequest::Modules(cmd.clone());
    let store = match ask_agent_or_open_store(&socket, &request, &layout.store()).await? {
        Reached::Agent(answer) => {
            return match expect_answer(&socket, &request, answer)? {
                ControlResponse::Modules(output) => Ok(output),
                other => {
                    Err(ControlError::Unexpected { path: socket, asked: "modules", what: other.name() }
                        .into())
                }
            };
        }
        Reached::Store(store) => store,
    };
    let runtime = crate::runtime::WasmRuntime::new()?;
    // A command's pulls end with it; they are tracked so none is left running when it returns.
    let (tasks, cancel) = (tokio_util::task::TaskTracker::new(), tokio_util::sync::CancellationToken::new());
    let cache = ModuleCache::new(store.clone(), runtime, &config.modules, &tasks, &cancel)?;
    let result = cache.command(cmd).await.map_err(CliError::Modules);
    tasks.close();
    tasks.wait().await;
    let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    result
}

/// `lichen compile`: precompiles `input` for `target` into a `lichen compile` artifact file.
pub fn compile_file(target: CompileTarget, input: &Path, output: Option<&Path>) -> Result<String, CliError> {
    let wasm = std::fs::read(input).map_err(|e| CliError::Read { path: input.to_owned(), source: e })?;
    let (artifact, key) = crate::runtime::precompile(target, &wasm)?;
    let output = output.map(Path::to_path_buf).unwrap_or_else(|| input.with_extension("cwasm"));
    let file = encode_artifact(&ModuleDigest::of(&wasm), &key, &artifact);
    std::fs::write(&output, &file).map_err(|e| CliError::Write { path: output.clone(), source: e })?;
    Ok(format!(
        "compiled {} for {target:?} (engine {key}) -> {} ({} bytes)\n",
        input.display(),
        output.display(),
        file.len()
    ))
}

/// `lichen push`: publishes a `.wasm` file as a CNCF Wasm artifact.
pub async fn push_file(
    config: &AgentConfig,
    file: &Path,
    reference: &str,
    login: Option<(String, String)>,
) -> Result<String, CliError> {
    let wasm =
        tokio::fs::read(file).await.map_err(|e| CliError::Read { path: file.to_owned(), source: e })?;
    if !wasm.starts_with(b"\0asm") {
        return Err(CliError::NotWasm(file.to_owned()));
    }
    let engine = wasmtime::Engine::new(&crate::runtime::engine_config()).map_err(CliError::Engine)?;
    wasmtime::Module::validate(&engine, &wasm)
        .map_err(|source| CliError::InvalidModule { path: file.to_owned(), source })?;
    let Ok(ModuleSource::Oci(r)) = parse_image(reference, ImageOrigin::Cluster, &config.modules) else {
        return Err(CliError::NotOci(reference.to_owned()));
    };
    let credential = credential(login);
    let fetcher = Fetcher::new(&config.modules)?;
    let size = wasm.len();
    let digest = ModuleDigest::of(&wasm);
    let manifest = fetcher.push_oci(&r, wasm, credential.as_ref()).await?;
    Ok(format!(
        "pushed {} ({size} bytes, module {digest}) to {} (manifest {manifest})\n",
        file.display(),
        r.whole()
    ))
}

/// The registry credential of a login [`read_login`] read, for pushes.
pub fn credential(login: Option<(String, String)>) -> Option<Credential> {
    login.map(|(username, password)| Credential::Basic { username, password })
}

/// User name from the flag or LICHEN_REGISTRY_USERNAME; password from stdin (`--password-stdin`)
/// or LICHEN_REGISTRY_PASSWORD, never from a flag, where `ps` would show it.
pub fn read_login(login: &RegistryLogin) -> Result<Option<(String, String)>, CliError> {
    let Some(user) = login.username.clone() else {
        if login.password_stdin {
            return Err(CliError::Login("--password-stdin needs --username"));
        }
        return Ok(None);
    };
    let password = if login.password_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(CliError::ReadPassword)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        std::env::var("LICHEN_REGISTRY_PASSWORD").map_err(|_| {
            CliError::Login("give the password with --password-stdin or LICHEN_REGISTRY_PASSWORD")
        })?
    };
    Ok(Some((user, password)))
}

//! The command line: `lichen run | join | check | version | status | pods | logs | modules | compile |
//! push | sign | fleet`, with every config field as a global flag.
//!
//! The doc comments are `--help` text, written for a terminal (`<digest>`, `<id>.<secret>`), not
//! rustdoc markup.
#![allow(rustdoc::invalid_html_tags)]

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::ConfigArgs;
use crate::runtime::CompileTarget;

/// `lichen pods -o`: the formats kubectl prints objects in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodsFormat {
    /// A `v1 List` of `Pod` objects as JSON.
    Json,
    /// The same as YAML.
    Yaml,
}

/// Lichen: run Kubernetes pods as WebAssembly modules on small edge boards.
#[derive(Debug, Parser)]
#[command(name = "lichen", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Config overrides, usable with every command.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: static pods from `static_pod_dir`, until SIGTERM or Ctrl-C.
    Run,
    /// Join a cluster with a bootstrap token: request a node client certificate (CSR), wait for
    /// approval, install it in the state directory, then run the agent (unless --only).
    Join(JoinArgs),
    /// Validate the config and environment and print what would run; exits 1 on any problem.
    Check,
    /// Print the versions of Lichen and its WebAssembly runtime.
    Version,
    /// Show the node as the agent sees it: pods and their states, the status outbox, the link to
    /// the API server. Works offline, and reads the store when no agent runs.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the pods on this node as `kubectl get pods -A` does: namespace, name, ready containers,
    /// status, restarts and age. Works offline, and reads the store when no agent runs.
    Pods {
        /// Print the report's pod lines as JSON (with each container's full state) instead of a table.
        #[arg(long, conflicts_with = "output")]
        json: bool,
        /// Print the pods as `kubectl get pods -o json|yaml` does: a `v1 List` of `Pod` objects, so
        /// the same jq and yq filters work (`.items[].status.containerStatuses[].state`).
        #[arg(long, short = 'o', value_enum)]
        output: Option<PodsFormat>,
    },
    /// Print a container's log (stdout and stderr), as `kubectl logs` does. The files are read
    /// directly, so it works offline, with or without a running agent.
    Logs(LogsArgs),
    /// Inspect and manage the module cache (through the running agent, or on the store when none runs).
    Modules {
        /// What to do with the cache.
        #[command(subcommand)]
        action: ModulesAction,
    },
    /// Precompile a module for a board, on a fast machine; add the result on the board with
    /// `lichen modules import app.wasm --precompiled app.cwasm`.
    Compile {
        /// The board's architecture (armv7 compiles for Wasmtime's Pulley interpreter).
        #[arg(long, value_enum, default_value = "host")]
        target: CompileTarget,
        /// The module (`.wasm` or `.wat`).
        input: PathBuf,
        /// Where to write the artifact [default: the input with extension .cwasm].
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Publish a module to an OCI registry as a CNCF Wasm artifact (config
    /// application/vnd.wasm.config.v0+json, one application/wasm layer); with --agent, publish
    /// Lichen agent binaries as one agent image (an OCI image index, one entry per platform).
    Push {
        /// The `.wasm` file; with --agent, the agent binaries, one per platform (linux/arm64,
        /// linux/arm/v7, linux/amd64; each platform is read from the binary's ELF header).
        #[arg(value_name = "FILE", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Where to push it, e.g. registry.example:5000/acme/app:1.0.
        #[arg(value_name = "REF")]
        reference: String,
        /// The files are agent binaries: push them as an agent image for `lichen.dev/agent-image`.
        #[arg(long)]
        agent: bool,
        /// With --agent: sign the pushed image with this ECDSA P-256 private key (PEM), as `lichen
        /// sign` does.
        #[arg(long, value_name = "KEY.pem", requires = "agent")]
        sign_key: Option<PathBuf>,
        /// Registry credentials.
        #[command(flatten)]
        login: RegistryLogin,
    },
    /// Sign an agent image pushed with `lichen push --agent`, cosign-style: an ECDSA P-256
    /// signature in the image `sha256-<digest>.sig` of the same repository (another signer's
    /// signature there is kept).
    Sign {
        /// The ECDSA P-256 private key, PEM (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`).
        #[arg(long, value_name = "KEY.pem")]
        key: PathBuf,
        /// The image, pinned by digest: registry/repo@sha256:<digest>.
        #[arg(value_name = "REF@sha256:DIGEST")]
        reference: String,
        /// Registry credentials.
        #[command(flatten)]
        login: RegistryLogin,
    },
    /// Operate on a fleet of nodes from an operator's machine, with a kubeconfig (--kubeconfig, else
    /// $KUBECONFIG or ~/.kube/config); the config file is not read.
    Fleet {
        /// What to do with the fleet.
        #[command(subcommand)]
        action: FleetAction,
    },
}

/// `lichen fleet` subcommands.
#[derive(Debug, Subcommand)]
pub enum FleetAction {
    /// Roll an agent image out in waves: annotate the matching Nodes with lichen.dev/agent-image,
    /// --max-unavailable at a time, wait for each wave to report the outcome, the new version and
    /// Ready, stop at the first wave with a failure, and print a table of nodes and outcomes. Exits 1
    /// unless every node runs the image.
    Upgrade(FleetUpgradeArgs),
}

/// `lichen fleet upgrade`.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetUpgradeArgs {
    /// The Nodes to upgrade, as a label selector (`kubectl get nodes -l`), e.g. site=barn-3.
    #[arg(long, short = 'l')]
    pub selector: String,
    /// The agent image, pinned by digest: registry/repo@sha256:<digest> (`lichen push --agent`
    /// prints it). A tag is refused.
    #[arg(long, value_name = "REF@sha256:DIGEST")]
    pub image: String,
    /// How many nodes upgrade at a time (the size of a wave).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unavailable: u32,
    /// How long one wave may take before its unfinished nodes count as timed out.
    #[arg(long, value_name = "S", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_secs: u64,
}

/// `lichen logs`, with kubectl's flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogsArgs {
    /// The pod. A static pod may be named without its `-<node_name>` suffix.
    pub pod: String,
    /// The container; may be left out when the pod has only one.
    pub container: Option<String>,
    /// The pod's namespace [default: `default`, or the namespace of the only pod of that name].
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Keep printing new lines as they are written, until the container's run ends (or Ctrl-C).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print the log of the container's previous run (before its last restart).
    #[arg(long, short = 'p')]
    pub previous: bool,
    /// Print only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<u64>,
    /// Print only lines newer than this, e.g. 10s, 5m, 1h or 1h30m.
    #[arg(long, value_name = "DURATION", value_parser = parse_since)]
    pub since: Option<std::time::Duration>,
    /// Put each line's RFC 3339 timestamp before it.
    #[arg(long)]
    pub timestamps: bool,
}

/// A `--since` value that is not a kubectl duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: want e.g. 10s, 5m, 1h or 1h30m")]
pub struct InvalidDuration(pub String);

/// A duration as kubectl's `--since` takes it: numbers with units `s`, `m` or `h`, e.g. `1h30m`.
pub fn parse_since(s: &str) -> Result<std::time::Duration, InvalidDuration> {
    let bad = || InvalidDuration(s.to_owned());
    let mut total = 0u64;
    let mut digits = String::new();
    for ch in s.trim().chars() {
        match ch {
            '0'..='9' => digits.push(ch),
            's' | 'm' | 'h' if !digits.is_empty() => {
                let n: u64 = digits.parse().map_err(|_| bad())?;
                let unit = match ch {
                    's' => 1,
                    'm' => 60,
                    _ => 3600,
                };
                total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
                digits.clear();
            }
            _ => return Err(bad()),
        }
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs(total))
}

/// `lichen join`: each flag overrides the config's `[join]` table.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct JoinArgs {
    /// The API server, https://host:port [default: join.server].
    #[arg(long)]
    pub server: Option<String>,
    /// The cluster CA certificate, PEM [default: join.ca_cert].
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// The bootstrap token <id>.<secret>. Visible in `ps` while the join runs: prefer --token-file
    /// or LICHEN_JOIN_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// A file holding the bootstrap token [default: join.token_file].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Exit once the node has its certificate instead of running the agent.
    #[arg(long)]
    pub only: bool,
}

/// `lichen modules` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModulesAction {
    /// List cached modules: digest, size, precompiled size, last use, images and the pods using them.
    List,
    /// Pull an image into the cache and precompile it, ahead of the pods that need it.
    Pull {
        /// The image as a pod names it (registry/repo:tag, https://…@sha256:…, or a file).
        image: String,
        /// Registry credentials.
        #[command(flatten)]
        login: RegistryLogin,
    },
    /// Remove a module by digest (a unique prefix will do) or by image reference.
    Rm {
        /// Digest, digest prefix or image reference.
        target: String,
        /// Remove it even if pods on this node use it (they pull it again when they next start).
        #[arg(long)]
        force: bool,
    },
    /// Remove least recently used modules beyond `modules.cache_size`, or with --all every module
    /// no pod on this node uses.
    Prune {
        /// Remove every unused module.
        #[arg(long)]
        all: bool,
    },
    /// Add a local module to the cache, optionally with its artifact from `lichen compile` and an
    /// image name pods can use (with imagePullPolicy Never or IfNotPresent).
    Import {
        /// The module file.
        wasm: PathBuf,
        /// Its precompiled artifact from `lichen compile --target <this board>`.
        #[arg(long)]
        precompiled: Option<PathBuf>,
        /// The image reference to file it under, e.g. registry.example/acme/app:1.0.
        #[arg(long = "as", value_name = "IMAGE")]
        image: Option<String>,
    },
}

/// Credentials for a registry, given on the command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryLogin {
    /// Registry user name.
    #[arg(long, env = "LICHEN_REGISTRY_USERNAME")]
    pub username: Option<String>,
    /// Read the password (or access token) from standard input.
    #[arg(long)]
    pub password_stdin: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_upgrade_takes_a_selector_an_image_a_wave_size_and_the_global_kubeconfig() {
        let cli = Cli::try_parse_from([
            "lichen",
            "fleet",
            "upgrade",
            "-l",
            "site=barn-3",
            "--image",
            "reg/agent@sha256:00",
            "--max-unavailable",
            "2",
            "--kubeconfig",
            "/home/op/.kube/config",
        ])
        .expect("parse");
        assert_eq!(cli.config.kubeconfig.as_deref(), Some(std::path::Path::new("/home/op/.kube/config")));
        let Command::Fleet { action: FleetAction::Upgrade(a) } = cli.command else { panic!("not fleet") };
        assert_eq!(
            (a.selector.as_str(), a.image.as_str(), a.max_unavailable, a.timeout_secs),
            ("site=barn-3", "reg/agent@sha256:00", 2, 600)
        );
        let zero = ["lichen", "fleet", "upgrade", "-l", "a=b", "--image", "x", "--max-unavailable", "0"];
        assert!(Cli::try_parse_from(zero).is_err(), "a wave of no node");
        assert!(Cli::try_parse_from(["lichen", "fleet", "upgrade", "--image", "x"]).is_err(), "no selector");
    }

    #[test]
    fn since_takes_kubectl_durations() {
        let secs = |s: &str| parse_since(s).map(|d| d.as_secs());
        assert_eq!(secs("10s"), Ok(10));
        assert_eq!(secs("5m"), Ok(300));
        assert_eq!(secs("1h30m"), Ok(5400));
        for bad in ["", "10", "0s", "5x", "m", "-5s", "1.5h"] {
            assert!(parse_since(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn push_takes_one_module_or_agent_binaries() {
        let cli = Cli::try_parse_from(["lichen", "push", "app.wasm", "r.example/app:1"]).expect("parse");
        let Command::Push { files, reference, agent, sign_key, .. } = cli.command else { panic!("not push") };
        assert_eq!(
            (files, reference.as_str(), agent, sign_key),
            (vec![PathBuf::from("app.wasm")], "r.example/app:1", false, None)
        );
        let cli = Cli::try_parse_from([
            "lichen",
            "push",
            "--agent",
            "lichen-arm64",
            "lichen-amd64",
            "r.example/lichen/agent:0.2",
            "--sign-key",
            "k.pem",
        ])
        .expect("parse");
        let Command::Push { files, reference, agent, sign_key, .. } = cli.command else { panic!("not push") };
        assert_eq!(files, [PathBuf::from("lichen-arm64"), PathBuf::from("lichen-amd64")]);
        assert_eq!(
            (reference.as_str(), agent, sign_key),
            ("r.example/lichen/agent:0.2", true, Some(PathBuf::from("k.pem")))
        );
        assert!(
            Cli::try_parse_from(["lichen", "push", "app.wasm", "r/app:1", "--sign-key", "k.pem"]).is_err(),
            "--sign-key needs --agent"
        );
        assert!(Cli::try_parse_from(["lichen", "push", "r/app:1"]).is_err(), "a file is required");
        let cli = Cli::try_parse_from(["lichen", "sign", "--key", "k.pem", "r/a@sha256:00"]).expect("parse");
        assert!(matches!(cli.command, Command::Sign { .. }));
    }

    #[test]
    fn logs_takes_kubectls_flags() {
        let cli = Cli::try_parse_from([
            "lichen",
            "logs",
            "-n",
            "edge",
            "web",
            "app",
            "-f",
            "-p",
            "--tail",
            "3",
            "--since",
            "5m",
            "--timestamps",
        ])
        .expect("parse");
        let Command::Logs(a) = cli.command else { panic!("not logs") };
        assert_eq!(
            (a.pod.as_str(), a.container.as_deref(), a.namespace.as_deref()),
            ("web", Some("app"), Some("edge"))
        );
        assert!(a.follow && a.previous && a.timestamps);
        assert_eq!((a.tail, a.since), (Some(3), Some(std::time::Duration::from_secs(300))));
    }
}

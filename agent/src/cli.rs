//! The command line: `lichen run | check | version`, with every config field as a global flag.

use clap::{Parser, Subcommand};

use crate::config::ConfigArgs;

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
    /// Validate the config and environment and print what would run; exits 1 on any problem.
    Check,
    /// Print the versions of Lichen and its WebAssembly runtime.
    Version,
}

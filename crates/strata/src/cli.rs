//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Overrides};

/// The whole production stack of a Django site in one binary.
#[derive(Debug, Parser)]
#[command(name = "strata", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the selected tiers (all of them by default).
    Run(RunArgs),
    /// Validate the configuration and print what is wrong with it.
    Check(ConfigArgs),
    /// Roll a new generation of workers in with the application's current code; waits for
    /// the outcome, prints it, and exits non-zero if the old generation still serves.
    Reload(ReloadArgs),
}

#[derive(Debug, Args)]
struct ReloadArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Admin listener of the running node (default: admin.bind of the configuration).
    #[arg(long)]
    admin: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// Configuration file (default: ./strata.toml if it exists).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Tiers this node runs, comma-separated (lb,accelerator,app).
    #[arg(long, value_delimiter = ',')]
    tiers: Option<Vec<String>>,
    /// Address of the HTTP listener.
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Origin the accelerator fronts when this node does not run the app tier
    /// (http://host:port).
    #[arg(long)]
    upstream: Option<String>,
    /// WSGI application as module:callable.
    #[arg(long)]
    app: Option<String>,
    /// Directory the application runs in.
    #[arg(long)]
    chdir: Option<PathBuf>,
    /// Virtualenv whose packages the application uses.
    #[arg(long)]
    virtualenv: Option<PathBuf>,
    /// Number of worker processes.
    #[arg(long)]
    workers: Option<usize>,
    /// Address of the admin listener.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Take the listening sockets over from the running master (binary upgrade): it drains
    /// and exits once this one serves.
    #[arg(long)]
    upgrade: bool,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => match config::load(args.config.as_deref(), &Overrides::default()) {
            Ok(_) => {
                println!("configuration ok");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("strata: invalid configuration: {error}");
                ExitCode::from(1)
            }
        },
        Command::Reload(args) => {
            let config = match config::load(args.config.config.as_deref(), &Overrides::default()) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("strata: invalid configuration: {error}");
                    return ExitCode::from(64);
                }
            };
            let admin = args.admin.unwrap_or(config.admin.bind);
            match crate::reload::request(admin, config.admin.token.as_deref()) {
                Ok(outcome) => outcome,
                Err(error) => {
                    eprintln!("strata reload: cannot reach the admin listener at {admin}: {error}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run(args) => {
            let overrides = Overrides {
                tiers: args.tiers,
                bind: args.bind,
                upstream: args.upstream,
                app: args.app,
                chdir: args.chdir,
                virtualenv: args.virtualenv,
                workers: args.workers,
                admin: args.admin,
            };
            let file = args.config.config.clone();
            let config = match config::load(file.as_deref(), &overrides) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("strata: invalid configuration: {error}");
                    return ExitCode::from(64);
                }
            };
            // A reload reads the same file, environment and flags again.
            let load = std::sync::Arc::new(move || config::load(file.as_deref(), &overrides));
            match crate::node::run(config, load, args.upgrade) {
                Ok(code) => code,
                Err(error) => {
                    eprintln!("strata: {error:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

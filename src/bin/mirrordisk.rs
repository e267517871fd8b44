//! `mirrordisk`: the node agent and its tools (agent, serve, demo).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use mirrordisk::shell::agent::{self, AgentArgs};
use mirrordisk::shell::demo::{self, DemoArgs, SIZE_DEFAULT};
use mirrordisk::shell::serve::{self, ServeConfig};

#[derive(Debug, Parser)]
#[command(
    name = "mirrordisk",
    version,
    about = "Userspace synchronous mirror disk served over NBD"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: every mirror set of this node (disk, replication link to
    /// the peer, NBD export while active) and the admin socket mirrorctl talks to.
    Agent {
        /// The cluster configuration (the same file on both nodes).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// This node's name in the configuration. Required unless exactly one
        /// configured node is named like this host (`hostname`).
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// Show the whole thing on this machine, no configuration needed: two agents on
    /// 127.0.0.1 with file-backed disks in a temporary folder, a workload through NBD,
    /// a planned failover, an outage with journaled writes, the differential rebuild,
    /// an online verify, a byte comparison of both disks, and a report.
    Demo {
        /// Work in this folder (created if missing; must be empty) and keep it
        /// afterwards. Default: a new temporary folder, removed at the end.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Size of each node's disk file (sparse), e.g. 256M or 1G.
        #[arg(long, value_name = "SIZE", default_value = SIZE_DEFAULT, value_parser = mirrordisk::config::parse_size)]
        size: u64,
        /// Leave the cluster up after the report, and say how to reach it, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// Export one file or block device over NBD (no mirroring).
    Serve {
        /// Backing regular file or block device; never created, truncated or resized.
        path: PathBuf,
        /// TCP address to listen on, e.g. 127.0.0.1:10809.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<SocketAddr>,
        /// Unix socket path to listen on (a stale socket file is replaced).
        #[arg(long, value_name = "SOCKET")]
        unix: Option<PathBuf>,
        /// Export name; clients asking for the default export ("") also get it.
        #[arg(long, value_name = "EXPORT", default_value = "")]
        name: String,
        /// Refuse writes (the backing is opened read-only; metadata is not touched).
        #[arg(long)]
        read_only: bool,
        /// The CLUSTER partition is on this separate device (see mirrorctl create --metadata).
        #[arg(long, value_name = "DEVICE")]
        metadata: Option<PathBuf>,
        /// Journal every write as during a mirror break: the dirty regions survive a crash.
        /// Needs a device with mirrordisk metadata.
        #[arg(long)]
        broken: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Agent { config, node } => agent::run(AgentArgs { config, node }),
        Command::Demo {
            dir,
            size,
            keep_running,
        } => demo::run(DemoArgs {
            dir,
            size_bytes: size,
            keep_running,
        }),
        Command::Serve {
            path,
            listen,
            unix,
            name,
            read_only,
            metadata,
            broken,
        } => serve::run(ServeConfig {
            path,
            listen,
            unix,
            name,
            read_only,
            metadata,
            broken,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("mirrordisk: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MIRRORDISK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

//! `mirrorctl`: the operator's tool for mirrordisk mirror sets. `create` and `inspect`
//! work on a device directly; every other command talks to the node agent over its
//! admin socket (`--socket PATH`, or the node's `admin_socket` from `--config FILE`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use mirrordisk::config::parse_size;
use mirrordisk::core::meta::{AL_SLOT_COUNT_DEFAULT, GRANULARITY_BYTES_DEFAULT};
use mirrordisk::shell::agent::admin::{Request, Response, call};
use mirrordisk::shell::agent::startup::{choose_node, hostname};
use mirrordisk::shell::agent::status::render;
use mirrordisk::shell::mirrorctl::{
    CreateArgs, create, inspect_device, parse_uuid, render_inspect,
};

/// Where the cluster configuration lives when `--config` and `--socket` are not given.
const CONFIG_DEFAULT: &str = "/etc/mirrordisk/cluster.toml";
/// Status answers at once; a stuck agent should not hang the operator's shell.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Activate and deactivate wait for durable role changes and for NBD clients to drain.
const ROLE_CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// `status --watch` refresh interval.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(name = "mirrorctl", version, about = "Operate mirrordisk mirror sets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn size(text: &str) -> Result<u64, String> {
    parse_size(text)
}

/// Which agent to talk to.
#[derive(Debug, Args)]
struct Target {
    /// The agent's admin socket (overrides --config/--node).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The cluster configuration, to find the node's admin socket
    /// [default: /etc/mirrordisk/cluster.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The node whose agent to ask (default: the node named like this host).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write fresh mirror metadata (a CLUSTER partition) to a device. Run it on both
    /// nodes with the same --mirror and --data-size; the disk starts Inconsistent.
    Create {
        /// The data device (or file). Its head becomes the CLUSTER partition unless
        /// --metadata names another device.
        device: PathBuf,
        /// Mirror name; both nodes' disks of one mirror must use the same name.
        #[arg(long)]
        mirror: String,
        /// This node's id (as in the cluster configuration).
        #[arg(long)]
        node: u32,
        /// The peer node's id.
        #[arg(long)]
        peer: u32,
        /// Put the CLUSTER partition on this device instead of the data device's head.
        #[arg(long, value_name = "DEVICE")]
        metadata: Option<PathBuf>,
        /// Size of the data partition (default: all that fits). Use the same value on
        /// both nodes when their disks differ in size.
        #[arg(long, value_name = "SIZE", value_parser = size)]
        data_size: Option<u64>,
        /// Size of the CLUSTER partition (default: room for the worst-case bitmap).
        #[arg(long, value_name = "SIZE", value_parser = size)]
        cluster_size: Option<u64>,
        /// Bitmap granularity, a power of two from 4K to 1M.
        #[arg(long, value_name = "SIZE", value_parser = size, default_value_t = u64::from(GRANULARITY_BYTES_DEFAULT))]
        granularity: u64,
        /// Activity-log slots (4 MiB extents each).
        #[arg(long, value_name = "N", default_value_t = AL_SLOT_COUNT_DEFAULT)]
        al_extents: u32,
        /// Mirror-set UUID (default: derived from --mirror).
        #[arg(long, value_name = "UUID", value_parser = parse_uuid)]
        uuid: Option<[u8; 16]>,
        /// Overwrite a device that already holds metadata, a filesystem or a partition table.
        #[arg(long)]
        force: bool,
        /// Both disks are brand-new and identical (e.g. all zeros): start them
        /// UpToDate and in sync, skipping the first full copy. Use on both nodes.
        #[arg(long)]
        blank: bool,
    },
    /// Show a device's mirror metadata: identity, generations, states, journal.
    Inspect {
        device: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also list the dirty byte ranges of the data partition.
        #[arg(long)]
        regions: bool,
    },
    /// Show every mirror of a node as its agent sees it: roles, disk states of both
    /// sides, connection and path, generations, in-flight writes, dirty bytes, resync.
    Status {
        /// Machine-readable output (one JSON object; with --watch one per line).
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make the mirror active (exported, writable) on the node: only an UpToDate disk
    /// whose connected peer is inactive, or with --force a disconnected one.
    Activate {
        mirror: String,
        /// forced-permit: activate although the peer is not connected, so this disk
        /// cannot be proven up to date (the operator asserts it).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make the mirror inactive on the node: stop the export, drain and flush, become
    /// Secondary.
    Deactivate {
        mirror: String,
        #[command(flatten)]
        target: Target,
    },
    /// Rebuild (resync) control. `--full --from NODE` copies everything from NODE to
    /// the other node (the first copy after `create`); it is sent to NODE's agent.
    Rebuild {
        mirror: String,
        /// Copy every region, not only the dirty ones.
        #[arg(long, requires = "from", conflicts_with_all = ["pause", "resume"])]
        full: bool,
        /// The source node of a full rebuild.
        #[arg(long, value_name = "NODE", requires = "full")]
        from: Option<String>,
        /// Pause the running resync (on its source node).
        #[arg(long, conflicts_with = "resume")]
        pause: bool,
        /// Resume a paused resync (on its source node).
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        target: Target,
    },
}

/// The admin socket to use: `--socket`, else `--config`'s node (by `--node`, by
/// `preferred`, or named like this host).
fn socket_for(target: &Target, preferred: Option<&str>) -> Result<PathBuf, String> {
    if let Some(socket) = &target.socket {
        return Ok(socket.clone());
    }
    let path = target
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(CONFIG_DEFAULT));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "--config {}: {e} (give --config FILE or --socket PATH to find the agent)",
            path.display()
        )
    })?;
    let config =
        mirrordisk::config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let node_name = target.node.as_deref().or(preferred);
    let node = choose_node(&config, node_name, &hostname())?;
    Ok(node.admin_socket.clone())
}

fn ask(
    target: &Target,
    preferred: Option<&str>,
    request: Request,
    timeout: Duration,
) -> Result<Response, String> {
    let socket = socket_for(target, preferred)?;
    let response = call(&socket, &request, timeout)?;
    if response.ok {
        Ok(response)
    } else {
        Err(response.error.unwrap_or_else(|| "the agent refused".into()))
    }
}

fn status_once(target: &Target, json: bool, compact: bool) -> Result<String, String> {
    let response = ask(target, None, Request::Status {}, STATUS_TIMEOUT)?;
    let status = response.status.ok_or("the agent's answer has no status")?;
    Ok(if json {
        if compact {
            serde_json::to_string(&status)
        } else {
            serde_json::to_string_pretty(&status)
        }
        .expect("status serialises")
    } else {
        render(&status)
    })
}

fn run(command: Command) -> Result<String, String> {
    match command {
        Command::Create {
            device,
            mirror,
            node,
            peer,
            metadata,
            data_size,
            cluster_size,
            granularity,
            al_extents,
            uuid,
            force,
            blank,
        } => match u32::try_from(granularity) {
            Err(_) => Err(format!("--granularity {granularity} is out of range")),
            Ok(granularity_bytes) => create(&CreateArgs {
                device,
                mirror,
                node,
                peer,
                metadata,
                data_bytes: data_size,
                cluster_bytes: cluster_size,
                granularity_bytes,
                al_slot_count: al_extents,
                mirror_uuid: uuid,
                force,
                blank,
            }),
        },
        Command::Inspect {
            device,
            json,
            regions,
        } => inspect_device(&device, regions).map(|report| {
            if json {
                serde_json::to_string_pretty(&report).expect("inspect report serialises")
            } else {
                render_inspect(&report)
            }
        }),
        Command::Status {
            json,
            watch,
            target,
        } => {
            if !watch {
                return status_once(&target, json, false);
            }
            loop {
                // An agent that is down or restarting shows as an error line; keep watching.
                let text =
                    status_once(&target, json, true).unwrap_or_else(|e| format!("error: {e}"));
                if json {
                    println!("{text}");
                } else {
                    print!("\x1b[H\x1b[2J{}", text);
                }
                std::thread::sleep(WATCH_INTERVAL);
            }
        }
        Command::Activate {
            mirror,
            force,
            target,
        } => ask(
            &target,
            None,
            Request::Activate {
                mirror,
                forced: force,
            },
            ROLE_CHANGE_TIMEOUT,
        )
        .map(|r| r.message.unwrap_or_default()),
        Command::Deactivate { mirror, target } => ask(
            &target,
            None,
            Request::Deactivate { mirror },
            ROLE_CHANGE_TIMEOUT,
        )
        .map(|r| r.message.unwrap_or_default()),
        Command::Rebuild {
            mirror,
            full,
            from,
            pause,
            resume,
            target,
        } => {
            let (request, preferred) = match (full, from, pause, resume) {
                (true, Some(from), false, false) => {
                    let preferred = from.clone();
                    (Request::RebuildFull { mirror, from }, Some(preferred))
                }
                (false, None, true, false) => (Request::RebuildPause { mirror }, None),
                (false, None, false, true) => (Request::RebuildResume { mirror }, None),
                _ => {
                    return Err(
                        "rebuild needs one of: --full --from NODE, --pause, --resume".into(),
                    );
                }
            };
            ask(&target, preferred.as_deref(), request, STATUS_TIMEOUT)
                .map(|r| r.message.unwrap_or_default())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("mirrorctl: error: {message}");
            ExitCode::FAILURE
        }
    }
}

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
/// `verify --wait` polls the status this often.
const VERIFY_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why forced-permit needs `--yes`: printed when it is missing.
const FORCED_PERMIT_RISK: &str = "forced-permit makes this node's copy writable although it cannot be proven up to date. \
If the peer holds newer writes (it was active, or received writes this node never saw), \
activating here serves older data, and when the nodes reconnect the writes made on both sides \
since they parted are a split brain: one side's changes will have to be discarded. \
Use it only when the peer is really down (or its data is to be given up). \
Repeat the command with --yes to proceed.";

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
    /// whose connected peer is inactive. `--force --yes` is `forced-permit`.
    Activate {
        mirror: String,
        /// Same as `forced-permit` (needs --yes too).
        #[arg(long)]
        force: bool,
        /// Confirm --force (see `forced-permit`).
        #[arg(long, requires = "force")]
        yes: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make the mirror active here although this disk cannot be proven up to date (the
    /// peer is dead or unreachable). Starts a new generation marked "forced"; refused
    /// while the peer is connected and active. Needs --yes. Logged with who and when.
    ForcedPermit {
        mirror: String,
        /// Confirm: you accept the risk of serving older data and of a split brain.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Resolve a split brain: `--discard-local` on the node whose changes since the
    /// parting are to be dropped. At the next connect it copies (differentially) from
    /// the other node. The node must be inactive.
    Resolve {
        mirror: String,
        /// This node gives up its changes (required: the only resolution there is).
        #[arg(long)]
        discard_local: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Isolate the peer: close the replication link and stop reconnecting, on the node
    /// this is sent to (either node; usually the active one). The active node journals
    /// every write. `mirrorctl rebuild MIRROR` on the same node ends the break and
    /// resyncs differentially. An agent restart also ends it.
    Break {
        mirror: String,
        #[command(flatten)]
        target: Target,
    },
    /// Compare both sides online by per-region SHA-256 hashes (only hashes cross the
    /// wire). Run it on the active node (or either when both are inactive): differing
    /// regions are marked dirty there, and `rebuild` copies them from that node.
    Verify {
        mirror: String,
        /// Wait until the verify ends; print verified bytes and differing regions.
        #[arg(long)]
        wait: bool,
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
    /// Rebuild (resync) control. Without flags: end a `break` (reconnect; the resync
    /// that follows is differential), or, connected, copy the regions marked dirty on
    /// this node (after `verify`). `--full --from NODE` copies everything from NODE to
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
            yes,
            target,
        } => {
            if force && !yes {
                return Err(format!(
                    "activate --force is forced-permit: {FORCED_PERMIT_RISK}"
                ));
            }
            let request = if force {
                Request::ForcedPermit { mirror }
            } else {
                Request::Activate {
                    mirror,
                    forced: false,
                }
            };
            ask(&target, None, request, ROLE_CHANGE_TIMEOUT).map(|r| r.message.unwrap_or_default())
        }
        Command::ForcedPermit {
            mirror,
            yes,
            target,
        } => {
            if !yes {
                return Err(format!("refusing without --yes: {FORCED_PERMIT_RISK}"));
            }
            ask(
                &target,
                None,
                Request::ForcedPermit { mirror },
                ROLE_CHANGE_TIMEOUT,
            )
            .map(|r| r.message.unwrap_or_default())
        }
        Command::Resolve {
            mirror,
            discard_local,
            target,
        } => {
            if !discard_local {
                return Err(
                    "resolve needs --discard-local, run on the node whose changes since the parting are to be dropped"
                        .into(),
                );
            }
            ask(
                &target,
                None,
                Request::ResolveDiscardLocal { mirror },
                STATUS_TIMEOUT,
            )
            .map(|r| r.message.unwrap_or_default())
        }
        Command::Break { mirror, target } => {
            ask(&target, None, Request::Break { mirror }, STATUS_TIMEOUT)
                .map(|r| r.message.unwrap_or_default())
        }
        Command::Verify {
            mirror,
            wait,
            target,
        } => {
            let started = ask(
                &target,
                None,
                Request::Verify {
                    mirror: mirror.clone(),
                },
                STATUS_TIMEOUT,
            )?
            .message
            .unwrap_or_default();
            if !wait {
                return Ok(started);
            }
            wait_for_verify(&target, &mirror)
        }
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
                (false, None, false, false) => (Request::Rebuild { mirror }, None),
                (true, Some(from), false, false) => {
                    let preferred = from.clone();
                    (Request::RebuildFull { mirror, from }, Some(preferred))
                }
                (false, None, true, false) => (Request::RebuildPause { mirror }, None),
                (false, None, false, true) => (Request::RebuildResume { mirror }, None),
                _ => {
                    return Err(
                        "rebuild takes no flag, or one of: --full --from NODE, --pause, --resume"
                            .into(),
                    );
                }
            };
            ask(&target, preferred.as_deref(), request, STATUS_TIMEOUT)
                .map(|r| r.message.unwrap_or_default())
        }
    }
}

/// `verify --wait`: polls the status until the verify is no longer running; the
/// result, or an error if it ended early (the link went down, or the peer became active).
fn wait_for_verify(target: &Target, mirror: &str) -> Result<String, String> {
    loop {
        let response = ask(target, None, Request::Status {}, STATUS_TIMEOUT)?;
        let status = response.status.ok_or("the agent's answer has no status")?;
        let m = status
            .mirrors
            .iter()
            .find(|m| m.name == mirror)
            .ok_or_else(|| format!("no mirror {mirror:?} in the status"))?;
        let Some(v) = &m.verify else {
            return Err(format!("mirror {mirror}: no verify in the status"));
        };
        if v.running {
            std::thread::sleep(VERIFY_POLL_INTERVAL);
            continue;
        }
        let summary = format!(
            "verified {} of {} bytes in {} ms: {} differing regions ({} bytes)",
            v.verified_bytes, v.total_bytes, v.elapsed_ms, v.differing_regions, v.differing_bytes
        );
        if v.verified_bytes < v.total_bytes {
            return Err(format!(
                "mirror {mirror}: verify interrupted (the link went down, or the peer became active): {summary}"
            ));
        }
        let advice = if v.differing_regions > 0 {
            format!(
                "; marked dirty on {}: `mirrorctl rebuild {mirror}` there copies them",
                status.node
            )
        } else {
            String::new()
        };
        return Ok(format!("mirror {mirror}: {summary}{advice}"));
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

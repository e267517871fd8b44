//! The node agent (`mirrordisk agent --config FILE [--node NAME]`): runs every mirror
//! set of one node of the cluster — its disk, its mirror engine, its NBD export and its
//! replication link to the peer — plus the admin socket `mirrorctl` talks to.
//!
//! One data-plane thread (a tokio current-thread runtime and a `LocalSet`) carries
//! everything: sockets, timers, the io_uring rings of every mirror, the admin socket.
//! The mirror engine (`core::mirror`) makes every decision; this module only moves
//! bytes, completions and time in and out of it.
//!
//! - `startup`: choosing the node, reading the secret, opening devices and recovering
//!   their CLUSTER partitions — everything that can fail before anything is written.
//! - `executor`: runs one engine: executes its actions (disk, metadata, sends, replies,
//!   role changes) and feeds back completions, without re-entering it.
//! - `peer_link`: the replication connection: listeners, dialer, handshake, crossed
//!   connects, frame reader and writer, keep-alives, reconnect, two paths.
//! - `reconnect`: the pure backoff schedule and path choice the dialer follows.
//! - `frames`: pure conversion between engine messages and wire frames.
//! - `runtime`: one mirror's wiring: NBD listeners, activation and deactivation, status.
//! - `admin`: the admin socket's JSON-lines protocol, server and client.
//! - `status`: what `mirrorctl status` shows, and its rendering.

pub mod admin;
pub mod executor;
pub mod frames;
pub mod peer_link;
pub mod reconnect;
pub mod runtime;
pub mod startup;
pub mod status;

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::shell::agent::admin::AdminServer;
use crate::shell::agent::runtime::MirrorRuntime;
use crate::shell::agent::startup::Plan;

// ---------------------------------------------------------------------------------------
// Limits and timings of the agent, each named once with the reason for its value.
// ---------------------------------------------------------------------------------------

/// How often the engines' timers are looked at (periodic sync points, peer ack
/// timeouts, resync pacing). 100 ms keeps every engine deadline within 10 % of a
/// second without measurable cost.
pub const TICK_MS: u64 = 100;

/// Longest time a completed write may wait for the sync point that makes it durable on
/// both sides (`EngineConfig::sync_interval_ms`). One second bounds what a crash leaves
/// in the activity log's care, as for `serve`.
pub const SYNC_INTERVAL_MS: u64 = 1000;

/// Longest idle time before a KeepAlive is sent on the replication link. The peer
/// declares the link dead after `peer_timeout_ms` without any frame, so keep-alives go
/// out at least `KEEPALIVE_PER_TIMEOUT` times per timeout, and at most every second.
pub const KEEPALIVE_INTERVAL_MS_MAX: u64 = 1000;
/// See `KEEPALIVE_INTERVAL_MS_MAX`: four chances per timeout ride out a lost segment's
/// retransmission without declaring the link dead.
pub const KEEPALIVE_PER_TIMEOUT: u64 = 4;

/// First reconnect delay after a failed attempt or a lost link. Short, so a peer that
/// restarts is back within a blink; doubled after each failure.
pub const RECONNECT_BACKOFF_INITIAL_MS: u64 = 100;
/// Longest reconnect delay: a peer that is down for long is retried every 5 s, which
/// costs nothing and bounds how long a returning peer waits for us.
pub const RECONNECT_BACKOFF_MAX_MS: u64 = 5000;
/// A link that stayed up this long resets the backoff; one that the engine drops at
/// once (split brain, unrelated disks) keeps backing off instead of reconnecting ten
/// times a second.
pub const LINK_STABLE_MS: u64 = 5000;

/// The node with the higher id waits this much longer before redialling, so the
/// lower id's connection — the one the crossed-connect rule keeps — usually wins the
/// race outright (see `peer_link`). A few handshake round trips on a LAN.
pub const CROSSED_CONNECT_YIELD_MS: u64 = 50;

/// How long a TCP connect to the peer may take before the path counts as failed.
pub const CONNECT_TIMEOUT_MS: u64 = 3000;

/// Handshakes in progress per mirror (dialled and accepted). Only an authenticated peer
/// can take over the link, but an unauthenticated one can hold a handshake slot until
/// its deadline; the bound keeps a flood of such connections from costing memory.
pub const HANDSHAKES_IN_PROGRESS_MAX: usize = 8;

/// Bytes the replication reader reads from its socket at once: a QD32 burst of 4 KiB
/// writes in one system call. Larger payloads go straight into their pooled buffer.
pub const PEER_SOCKET_READ_BYTES: usize = 256 * 1024;

/// Frames per vectored write on the replication link: two slices each (header, data),
/// well under the kernel's IOV_MAX of 1024.
pub const PEER_WRITE_BATCH_FRAMES_MAX: usize = 256;

/// When the link closes, queued frames (acks the peer waits for) get this long to
/// leave before the socket is dropped anyway.
pub const LINK_CLOSE_FLUSH_MS: u64 = 1000;

/// SIGTERM: how long an active mirror may take to drain its clients and become
/// Secondary before the agent gives up on that and exits (the next start then treats
/// the disk as a crashed primary, which is safe, only slower).
pub const SHUTDOWN_DEACTIVATE_TIMEOUT_MS: u64 = 30_000;
/// SIGTERM: how long in-flight metadata and disk I/O may take to finish.
pub const SHUTDOWN_IDLE_TIMEOUT_MS: u64 = 10_000;

/// How long the split-brain hook may run before it is killed (SIGKILL). A hook sends
/// an alert; 30 s is ample for that and bounds a hung script.
pub const SPLIT_BRAIN_HOOK_TIMEOUT_MS: u64 = 30_000;

/// Requests per admin connection line: one JSON object of at most this many bytes. The
/// longest legitimate request is well under 1 KiB.
pub const ADMIN_REQUEST_BYTES_MAX: usize = 64 * 1024;
/// Concurrent admin connections; `mirrorctl` uses one at a time.
pub const ADMIN_CONNECTIONS_MAX: usize = 16;

/// What `mirrordisk agent` was asked to do.
#[derive(Debug, Clone)]
pub struct AgentArgs {
    pub config: PathBuf,
    pub node: Option<String>,
}

/// Monotonic milliseconds since the agent started: the only clock the engines see.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    started: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            started: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Fills `out` from the kernel's random source (getrandom(2)), for handshake nonces
/// and the engines' `random` arguments. Never fails silently: a kernel without
/// getrandom cannot run the agent at all.
pub fn random_bytes(out: &mut [u8]) {
    let mut filled = 0;
    while filled < out.len() {
        let rest = &mut out[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            panic!("getrandom failed: {error}");
        }
        filled += n as usize;
    }
}

pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    random_bytes(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// The running agent: every mirror of this node and the facts the admin socket reports.
#[derive(Debug)]
pub struct Agent {
    pub node_name: String,
    pub node_id: u32,
    pub peer_name: String,
    pub clock: Clock,
    pub mirrors: Vec<Rc<MirrorRuntime>>,
    /// Set once SIGTERM is being handled: admin commands that change state are refused.
    pub stopping: RefCell<bool>,
}

impl Agent {
    pub fn mirror(&self, name: &str) -> Result<&Rc<MirrorRuntime>, String> {
        self.mirrors
            .iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.mirrors.iter().map(|m| m.name()).collect();
                format!(
                    "no mirror named {name:?} on node {} (configured: {})",
                    self.node_name,
                    known.join(", ")
                )
            })
    }
}

/// Runs the agent until SIGTERM/SIGINT. Every error before the agent starts serving is
/// returned as one message, with nothing written to any disk.
pub fn run(args: AgentArgs) -> Result<(), String> {
    let plan = startup::plan(&args)?;
    info!(
        node = plan.node.name,
        id = plan.node.id,
        mirrors = plan.mirrors.len(),
        admin_socket = %plan.node.admin_socket.display(),
        "agent starting"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    let sockets_to_remove = plan.unix_sockets();
    let result = local.block_on(&runtime, run_plan(plan));
    for path in sockets_to_remove {
        let _ = std::fs::remove_file(path);
    }
    result
}

async fn run_plan(plan: Plan) -> Result<(), String> {
    let clock = Clock::new();
    let Plan {
        node,
        peer,
        secret,
        mirrors: planned,
        admin_listener,
    } = plan;
    let mut mirrors = Vec::new();
    for mirror in planned {
        let runtime = MirrorRuntime::start(mirror, &node, &peer, secret.clone(), clock)?;
        mirrors.push(runtime);
    }
    let agent = Rc::new(Agent {
        node_name: node.name.clone(),
        node_id: node.id,
        peer_name: peer.name.clone(),
        clock,
        mirrors,
        stopping: RefCell::new(false),
    });
    let admin = AdminServer::new(agent.clone());
    let admin_task = tokio::task::spawn_local(admin.serve(admin_listener));
    info!(node = agent.node_name, "agent running");
    wait_for_signal().await?;
    info!("shutting down: stopping exports, draining in-flight I/O");
    *agent.stopping.borrow_mut() = true;
    for mirror in &agent.mirrors {
        mirror.stop_accepting();
    }
    for mirror in &agent.mirrors {
        let deactivated = tokio::time::timeout(
            Duration::from_millis(SHUTDOWN_DEACTIVATE_TIMEOUT_MS),
            mirror.deactivate_for_shutdown(),
        )
        .await;
        match deactivated {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(
                mirror = mirror.name(),
                error, "deactivation at shutdown failed"
            ),
            Err(_) => warn!(
                mirror = mirror.name(),
                timeout_ms = SHUTDOWN_DEACTIVATE_TIMEOUT_MS,
                "deactivation at shutdown timed out; the disk will recover as a crashed primary"
            ),
        }
    }
    for mirror in &agent.mirrors {
        mirror.shutdown().await;
    }
    admin_task.abort();
    info!("agent stopped");
    Ok(())
}

async fn wait_for_signal() -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

//! One mirror's data plane on this node: the volume and its three rings (data, shared
//! writes, metadata) driven by the runtime, the engine's timer, the replication link,
//! and the NBD export, which refuses clients (with a message) while the mirror is not
//! active here. Also the switch-mirror hooks: `activate` and `deactivate`, the internal
//! API the admin socket (and later the failover manager) calls.
//!
//! Operator commands of issue 5 live here too: forced-permit, split-brain resolution,
//! break, rebuild, verify; and the split-brain watch, which logs a split brain once per
//! occurrence and runs the configured hook.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{Mirror, MirrorSide, Node};
use crate::constants::{
    BUFFER_POOL_BYTES_MAX, NBD_BLOCK_SIZE_PREFERRED_BYTES, NBD_CONNECTIONS_MAX,
    NBD_PAYLOAD_BYTES_MAX, RESYNC_PREWARM_BYTES_MAX,
};
use crate::core::meta::{Flags, Role};
use crate::core::mirror::{Engine, EngineConfig, RESYNC_IN_FLIGHT_IDLE};
use crate::core::nbd::handshake::ExportInfo;
use crate::core::repl::ClusterSecret;
use crate::shell::agent::admin::{Caller, utc_now};
use crate::shell::agent::executor::Executor;
use crate::shell::agent::peer_link::{LinkConfig, PeerLink};
use crate::shell::agent::startup::MirrorPlan;
use crate::shell::agent::status::{
    MirrorStatus, OperatorView, RuntimeFacts, SplitBrainView, human_bytes, mirror_status,
};
use crate::shell::agent::{
    Clock, SHUTDOWN_IDLE_TIMEOUT_MS, SPLIT_BRAIN_HOOK_TIMEOUT_MS, SYNC_INTERVAL_MS, TICK_MS,
};
use crate::shell::buffers::{BUFFER_ALIGN_BYTES, BufferPool};
use crate::shell::nbd_server::{Export, SplitStream, serve_connection};
use crate::shell::uring::Ring;
use crate::shell::volume::LocalVolume;

/// Ticks between two samples of the resync byte counters (the rate shown in status).
const RATE_SAMPLE_TICKS: u64 = 10;

/// The NBD export's gate: whether new clients are served, and the signal that tells
/// the current clients to finish.
#[derive(Debug)]
struct Gate {
    accepting: bool,
    /// Sent `true` to stop the clients of the current activation.
    stop_clients: watch::Sender<bool>,
}

/// A split brain being reported: from its detection until the mirror replicates again.
#[derive(Debug)]
struct SplitBrain {
    problem: String,
    since_ms: u64,
    /// The hook's outcome, written by its thread: "running", "exit status 0 after
    /// 12 ms", "killed after 30000 ms (timeout)", "could not start: ...".
    hook: Option<Rc<RefCell<String>>>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct MirrorRuntime {
    name: String,
    node_name: String,
    peer_name: String,
    config: Mirror,
    side: MirrorSide,
    executor: Rc<Executor>,
    link: Rc<PeerLink>,
    info: ExportInfo,
    gate: RefCell<Gate>,
    /// Receivers handed to refused connections: never signalled.
    idle_stop: watch::Sender<bool>,
    /// NBD connections being served (not refused ones).
    clients: Cell<usize>,
    clients_changed: Notify,
    /// An activate or deactivate is running: they are serialised.
    role_busy: Cell<bool>,
    data_fd: RawFd,
    clock: Clock,
    /// Resync bytes per second over the last sample, and the sample it came from.
    rate_bytes_per_s: Cell<u64>,
    rate_sample: Cell<(u64, u64)>,
    nbd_tasks: RefCell<Vec<JoinHandle<()>>>,
    background: RefCell<Vec<JoinHandle<()>>>,
    /// Set while a split brain is being reported (see `watch_split_brain`).
    split_brain: RefCell<Option<SplitBrain>>,
    /// The last forced-permit: who and when.
    forced_permit: RefCell<Option<OperatorView>>,
}

impl MirrorRuntime {
    /// Builds the engine and the data plane from a plan and starts every task.
    pub fn start(
        plan: MirrorPlan,
        node: &Node,
        peer: &Node,
        secret: ClusterSecret,
        clock: Clock,
    ) -> Result<Rc<MirrorRuntime>, String> {
        let MirrorPlan {
            config,
            side,
            peer_side,
            disk,
            nbd_tcp,
            nbd_unix,
            replication,
        } = plan;
        let name = config.name.clone();
        let layout = disk.layout;
        let data_fd = disk.backing.file.as_raw_fd();
        let meta_fd = disk
            .meta_device
            .as_ref()
            .map_or(data_fd, |b| b.file.as_raw_fd());
        let ring = |fd: RawFd, what: &str| {
            Ring::new(fd).map_err(|e| format!("mirror {name}: {what} ring: {e}"))
        };
        let data_ring = ring(data_fd, "data")?;
        let write_ring = ring(data_fd, "shared-write")?;
        let meta_ring = ring(meta_fd, "metadata")?;
        let pool = BufferPool::new(BUFFER_POOL_BYTES_MAX);
        // One resync window of region-sized buffers, faulted in now: the differential
        // rebuild that usually follows an agent start (the peer came back) otherwise
        // pays a page fault and a zeroing per buffer on both nodes in its first window
        // (measured: the first 256 scattered 4 KiB regions took ~6 ms, the later ones
        // ~9 us each). RESYNC_PREWARM_BYTES_MAX bounds what this holds.
        let region_buf_bytes = (layout.granularity_bytes as usize).max(BUFFER_ALIGN_BYTES);
        pool.prewarm(
            region_buf_bytes,
            RESYNC_IN_FLIGHT_IDLE.min(RESYNC_PREWARM_BYTES_MAX / region_buf_bytes),
        );
        let volume = LocalVolume::with_window(
            disk.backing,
            layout.data_offset,
            layout.data_bytes,
            data_ring,
            pool,
        );
        let engine = Engine::new(
            EngineConfig {
                lock_alignment_bytes: u64::from(layout.logical_block_bytes),
                sync_interval_ms: SYNC_INTERVAL_MS,
                peer_timeout_ms: config.peer_timeout_ms,
                resync_rate_bytes_per_s: config.resync_rate_bytes_per_s,
            },
            disk.meta,
            clock.now_ms(),
        );
        let executor = Executor::new(
            name.clone(),
            volume,
            layout.data_offset,
            write_ring,
            meta_ring,
            engine,
            clock,
            disk.meta_device,
        );
        executor.set_split_brain_policy(config.after_split_brain);
        let link = PeerLink::start(
            LinkConfig {
                mirror: name.clone(),
                node_id: node.id,
                peer_id: peer.id,
                peer_name: peer.name.clone(),
                listen: side.replication.clone(),
                peer_addrs: peer_side.replication.clone(),
                peer_timeout_ms: config.peer_timeout_ms,
            },
            replication,
            executor.clone(),
            secret,
            clock,
        )?;
        let block_size_min_bytes = layout.logical_block_bytes;
        let info = ExportInfo {
            name: name.clone(),
            description: format!("mirrordisk mirror {name} on node {}", node.name),
            size_bytes: layout.data_bytes,
            read_only: false,
            block_size_min_bytes,
            block_size_preferred_bytes: NBD_BLOCK_SIZE_PREFERRED_BYTES.max(block_size_min_bytes),
            block_size_max_bytes: NBD_PAYLOAD_BYTES_MAX,
            refusal: None,
        };
        let runtime = Rc::new(MirrorRuntime {
            name: name.clone(),
            node_name: node.name.clone(),
            peer_name: peer.name.clone(),
            config,
            side,
            executor: executor.clone(),
            link,
            info,
            gate: RefCell::new(Gate {
                accepting: false,
                stop_clients: watch::channel(false).0,
            }),
            idle_stop: watch::channel(false).0,
            clients: Cell::new(0),
            clients_changed: Notify::new(),
            role_busy: Cell::new(false),
            data_fd,
            clock,
            rate_bytes_per_s: Cell::new(0),
            rate_sample: Cell::new((clock.now_ms(), 0)),
            nbd_tasks: RefCell::new(Vec::new()),
            background: RefCell::new(Vec::new()),
            split_brain: RefCell::new(None),
            forced_permit: RefCell::new(None),
        });
        runtime.start_background();
        let mut nbd_tasks = Vec::new();
        if let Some(listener) = nbd_tcp {
            let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            nbd_tasks.push(tokio::task::spawn_local(
                runtime.clone().accept_tcp(listener),
            ));
        }
        if let Some(listener) = nbd_unix {
            let listener = UnixListener::from_std(listener).map_err(|e| e.to_string())?;
            nbd_tasks.push(tokio::task::spawn_local(
                runtime.clone().accept_unix(listener),
            ));
        }
        runtime.nbd_tasks.replace(nbd_tasks);
        // The engine's first actions (the post-recovery snapshot) go out now.
        executor.drain();
        executor.flush_submissions();
        info!(
            mirror = name,
            data_bytes = layout.data_bytes,
            nbd_listen = ?runtime.side.nbd_listen,
            nbd_unix = ?runtime.side.nbd_unix,
            replication = ?runtime.side.replication,
            "mirror started (inactive)"
        );
        Ok(runtime)
    }

    fn start_background(self: &Rc<Self>) {
        let executor = &self.executor;
        let [data_fd, write_fd, meta_fd] = executor.ring_fds();
        let mut tasks = Vec::new();
        let e = executor.clone();
        tasks.push(tokio::task::spawn_local(drive_ring(data_fd, move || {
            e.volume().process_completions();
            e.flush_submissions();
        })));
        let e = executor.clone();
        tasks.push(tokio::task::spawn_local(drive_ring(write_fd, move || {
            e.process_write_completions();
            e.flush_submissions();
        })));
        let e = executor.clone();
        tasks.push(tokio::task::spawn_local(drive_ring(meta_fd, move || {
            e.process_meta_completions();
            e.flush_submissions();
        })));
        let runtime = self.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(TICK_MS));
            let mut ticks = 0u64;
            loop {
                interval.tick().await;
                runtime.executor.tick();
                runtime.watch_split_brain();
                ticks += 1;
                if ticks.is_multiple_of(RATE_SAMPLE_TICKS) {
                    runtime.sample_rate();
                }
            }
        }));
        self.background.replace(tasks);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn executor(&self) -> &Rc<Executor> {
        &self.executor
    }

    fn sample_rate(&self) {
        let stats = self.executor.with_engine(|e| e.stats());
        let bytes = stats.resync_bytes_sent + stats.resync_bytes_received;
        let now = self.clock.now_ms();
        let (then, before) = self.rate_sample.get();
        let elapsed = now.saturating_sub(then).max(1);
        self.rate_bytes_per_s
            .set(bytes.saturating_sub(before) * 1000 / elapsed);
        self.rate_sample.set((now, bytes));
    }

    pub fn status(&self) -> MirrorStatus {
        let nbd: Vec<String> = self
            .side
            .nbd_listen
            .iter()
            .map(|a| format!("nbd://{a}/{}", self.name))
            .chain(
                self.side
                    .nbd_unix
                    .iter()
                    .map(|p| format!("nbd+unix:///{}?socket={}", self.name, p.display())),
            )
            .collect();
        let now = self.clock.now_ms();
        let split_brain = self.split_brain.borrow().as_ref().map(|sb| SplitBrainView {
            problem: sb.problem.clone(),
            age_ms: now.saturating_sub(sb.since_ms),
            hook: sb.hook.as_ref().map(|h| h.borrow().clone()),
        });
        let facts = RuntimeFacts {
            decision: self.executor.decision(),
            now_ms: now,
            split_brain,
            forced_permit: self.forced_permit.borrow().clone(),
        };
        mirror_status(
            &self.name,
            &self.executor,
            self.link.view(),
            self.gate.borrow().accepting,
            nbd,
            self.clients.get(),
            self.rate_bytes_per_s.get(),
            &self.config,
            facts,
        )
    }

    // ------------------------------------------------------------------------------
    // Split brain: logged once per occurrence, the hook run once per occurrence.
    // ------------------------------------------------------------------------------

    /// Called every tick. An occurrence starts when the engine's problem names a split
    /// brain and ends when the mirror connects and replicates (or resyncs) again; every
    /// reconnect attempt in between meets the same split brain and is not reported again.
    fn watch_split_brain(&self) {
        let status = self.executor.status();
        let (problem, link_state) = (status.problem, status.link.map(|l| l.state));
        let split = problem.filter(|p| p.starts_with("split brain:"));
        let reporting = self.split_brain.borrow().is_some();
        match split {
            Some(problem) if !reporting => {
                error!(
                    mirror = self.name,
                    node = self.node_name,
                    peer = self.peer_name,
                    "SPLIT BRAIN: both nodes wrote while apart; nothing is copied until the operator resolves it \
                     (`mirrorctl resolve {} --discard-local` on the node whose changes are to be dropped): {problem}",
                    self.name
                );
                let hook = self
                    .config
                    .split_brain_hook
                    .clone()
                    .map(|path| self.run_split_brain_hook(path, &problem));
                self.split_brain.replace(Some(SplitBrain {
                    problem,
                    since_ms: self.clock.now_ms(),
                    hook,
                }));
            }
            None if reporting
                && matches!(
                    link_state,
                    Some("connected" | "sync-source" | "sync-target")
                ) =>
            {
                let since = self.split_brain.take().map_or(0, |sb| sb.since_ms);
                info!(
                    mirror = self.name,
                    after_ms = self.clock.now_ms().saturating_sub(since),
                    link = link_state.unwrap_or_default(),
                    "split brain over: the mirror is connected again"
                );
            }
            _ => {}
        }
    }

    /// Starts the hook as a child process watched by a task on this thread: environment
    /// MIRRORDISK_MIRROR, MIRRORDISK_NODE, MIRRORDISK_PEER, MIRRORDISK_EVENT=SPLIT_BRAIN
    /// and MIRRORDISK_PROBLEM; stdin empty, stdout and stderr into the agent's log
    /// stream; killed after `SPLIT_BRAIN_HOOK_TIMEOUT_MS`. Its outcome is logged and kept
    /// for status.
    fn run_split_brain_hook(&self, path: PathBuf, problem: &str) -> Rc<RefCell<String>> {
        let outcome = Rc::new(RefCell::new("starting".to_string()));
        let shared = outcome.clone();
        let mirror = self.name.clone();
        let node = self.node_name.clone();
        let peer = self.peer_name.clone();
        let problem = problem.to_string();
        let task = tokio::task::spawn_local(async move {
            let result = run_hook(&path, &mirror, &node, &peer, &problem, &shared).await;
            match &result {
                Ok(text) => info!(mirror, hook = %path.display(), "split-brain hook: {text}"),
                Err(text) => error!(mirror, hook = %path.display(), "split-brain hook: {text}"),
            }
            *shared.borrow_mut() = match result {
                Ok(text) | Err(text) => text,
            };
        });
        self.background.borrow_mut().push(task);
        outcome
    }

    // ------------------------------------------------------------------------------
    // Operator commands (issue 5).
    // ------------------------------------------------------------------------------

    /// `mirrorctl forced-permit` (and `activate --force`): make this side writable
    /// although it cannot prove it is up to date. The engine refuses while the peer is
    /// connected and active, and while a connection exists that does not replicate yet
    /// (`mirrorctl break` first); disconnected, it makes a new generation marked forced,
    /// durably, before the export opens. Logged (warning) with who and when.
    pub async fn forced_permit(&self, caller: &Caller) -> Result<String, String> {
        let at = utc_now();
        let _guard = self.role_guard()?;
        if self.executor.with_engine(|e| e.role()) == Role::Primary {
            self.open_export();
            return Ok(format!(
                "mirror {} is already active on {}",
                self.name, self.node_name
            ));
        }
        let before = self.executor.with_engine(|e| e.generations());
        // The activation cancels a pending `resolve --discard-local` (it never covers
        // the writes this node acknowledges from now on): say so.
        let discard_pending = self
            .executor
            .with_engine(|e| e.node_state().flags.contains(Flags::DISCARD_LOCAL));
        let waiting = self.executor.activate(true).map_err(|e| {
            warn!(mirror = self.name, by = %caller, at, error = e, "forced-permit refused");
            format!("mirror {}: forced-permit refused: {e}", self.name)
        })?;
        if let Some(rx) = waiting {
            rx.await
                .map_err(|_| format!("mirror {}: the engine dropped the activation", self.name))?
                .map_err(|e| format!("mirror {}: forced-permit failed: {e}", self.name))?;
        }
        let after = self.executor.with_engine(|e| e.generations());
        let mut message = if after.current != before.current {
            warn!(
                mirror = self.name,
                node = self.node_name,
                by = %caller,
                at,
                generation = format!("{:016x}", after.current),
                "FORCED-PERMIT: mirror active here without proof that this disk is up to date; \
                 new generation marked forced (the peer will be behind, or in split brain if it also wrote)"
            );
            self.forced_permit.replace(Some(OperatorView {
                by: caller.to_string(),
                at: at.clone(),
            }));
            format!(
                "mirror {} is active on {} by forced-permit (new generation {:016x} marked forced; by {caller} at {at})",
                self.name, self.node_name, after.current
            )
        } else {
            info!(mirror = self.name, by = %caller, at, "forced-permit with the peer connected and in sync: an ordinary activation");
            format!(
                "mirror {} is active on {} (the peer is connected and this disk is UpToDate: no forced generation was needed)",
                self.name, self.node_name
            )
        };
        if discard_pending {
            warn!(
                mirror = self.name,
                by = %caller,
                "pending split-brain resolution (resolve --discard-local) cancelled by forced-permit: this node's writes are kept"
            );
            message.push_str(
                "; the pending `resolve --discard-local` is cancelled: this node keeps its changes",
            );
        }
        self.open_export();
        Ok(message)
    }

    /// `mirrorctl resolve MIRROR --discard-local`: after a split brain this side gives up
    /// its changes; persisted, applied at the next connect (a differential copy from the
    /// peer over both journals). The dialer is woken so that connect happens now.
    pub fn resolve_discard_local(&self, caller: &Caller) -> Result<String, String> {
        self.executor.resolve_discard_local().map_err(|e| {
            warn!(mirror = self.name, by = %caller, error = e, "resolve --discard-local refused");
            format!("mirror {}: cannot resolve: {e}", self.name)
        })?;
        warn!(
            mirror = self.name,
            node = self.node_name,
            by = %caller,
            at = utc_now(),
            "split brain resolution: this node discards its changes since the parting at the next connect"
        );
        let mut message = format!(
            "mirror {}: {} will discard its changes and copy from {} when they connect",
            self.name, self.node_name, self.peer_name
        );
        if self.link.is_broken() {
            message.push_str(&format!(
                "; the link is broken by the operator: `mirrorctl rebuild {}` on {} reconnects",
                self.name, self.node_name
            ));
        } else {
            self.link.kick();
            message.push_str(" (reconnecting now)");
        }
        Ok(message)
    }

    /// `mirrorctl break MIRROR`: close the replication link and stop dialling and
    /// accepting until `rebuild`. The active side journals every write meanwhile; the
    /// other side keeps its copy as it was (Consistent). Not persisted across a restart.
    pub fn break_link(&self, caller: &Caller) -> Result<String, String> {
        let at = utc_now();
        if !self.link.break_link(caller.to_string(), at.clone()) {
            return Ok(format!(
                "mirror {}: the link is already broken on {} (`mirrorctl rebuild {}` reconnects)",
                self.name, self.node_name, self.name
            ));
        }
        warn!(
            mirror = self.name,
            node = self.node_name,
            by = %caller,
            at,
            "replication link broken by the operator: no connection to the peer until `mirrorctl rebuild`"
        );
        Ok(format!(
            "mirror {}: replication link broken on {}; the active side journals its writes; \
             `mirrorctl rebuild {}` on {} reconnects and resyncs differentially",
            self.name, self.node_name, self.name, self.node_name
        ))
    }

    /// `mirrorctl rebuild MIRROR`: lifts a break (the normal connect path then resyncs
    /// differentially); otherwise, connected with dirty regions here (e.g. after a
    /// verify), copies them to the peer.
    pub fn rebuild(&self, caller: &Caller) -> Result<String, String> {
        if self.link.unbreak() {
            info!(mirror = self.name, by = %caller, "break lifted: reconnecting");
            return Ok(format!(
                "mirror {}: break lifted on {}; reconnecting (the resync runs once connected: see `mirrorctl status`)",
                self.name, self.node_name
            ));
        }
        let status = self.executor.status();
        let Some(link) = status.link else {
            return Err(format!(
                "mirror {}: the peer is not connected; a resync starts by itself when it connects \
                 (`mirrorctl status` shows why it is not)",
                self.name
            ));
        };
        if let Some(resync) = &link.resync {
            return Ok(format!(
                "mirror {}: a resync is already running ({}, this node is its {})",
                self.name,
                if resync.full { "full" } else { "differential" },
                resync.role
            ));
        }
        if link.state == "connected" && status.dirty_bytes == 0 {
            return Ok(format!(
                "mirror {}: nothing to rebuild: no region is marked dirty on {} \
                 (a verify marks differences on the node it ran on: run rebuild there)",
                self.name, self.node_name
            ));
        }
        let dirty = status.dirty_bytes;
        self.executor
            .start_differential_rebuild()
            .map_err(|e| format!("mirror {}: cannot rebuild: {e}", self.name))?;
        info!(mirror = self.name, by = %caller, dirty_bytes = dirty, "differential rebuild started");
        Ok(format!(
            "mirror {}: differential rebuild of {} from {} to {} started",
            self.name,
            human_bytes(dirty),
            self.node_name,
            self.peer_name
        ))
    }

    /// `mirrorctl verify MIRROR`: compare both sides region by region; differing
    /// regions are marked dirty here (rebuild copies them).
    pub fn verify(&self, caller: &Caller) -> Result<String, String> {
        self.executor
            .start_verify()
            .map_err(|e| format!("mirror {}: cannot verify: {e}", self.name))?;
        info!(mirror = self.name, by = %caller, "online verify started");
        Ok(format!(
            "mirror {}: verify started on {} (`mirrorctl status` shows progress)",
            self.name, self.node_name
        ))
    }

    // ------------------------------------------------------------------------------
    // The NBD export.
    // ------------------------------------------------------------------------------

    fn refusal(&self) -> String {
        format!(
            "mirror {} is not active on this node ({})",
            self.name, self.node_name
        )
    }

    async fn accept_tcp(self: Rc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    self.spawn_client(stream, peer.to_string());
                }
                Err(error) => {
                    warn!(mirror = self.name, %error, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(TICK_MS)).await;
                }
            }
        }
    }

    async fn accept_unix(self: Rc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => self.spawn_client(stream, "unix".into()),
                Err(error) => {
                    warn!(mirror = self.name, %error, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(TICK_MS)).await;
                }
            }
        }
    }

    /// Serves a new client if the mirror is active here; otherwise its handshake is
    /// refused with a message saying so.
    fn spawn_client<S: SplitStream>(self: &Rc<Self>, stream: S, peer: String) {
        let (accepting, stop) = {
            let gate = self.gate.borrow();
            (gate.accepting, gate.stop_clients.subscribe())
        };
        if !accepting {
            let mut info = self.info.clone();
            info.refusal = Some(self.refusal());
            let export = Rc::new(Export {
                info,
                volume: self.executor.clone(),
            });
            let stop = self.idle_stop.subscribe();
            tokio::task::spawn_local(serve_connection(stream, export, peer, stop));
            return;
        }
        if self.clients.get() >= NBD_CONNECTIONS_MAX {
            warn!(
                mirror = self.name,
                peer,
                limit = NBD_CONNECTIONS_MAX,
                "too many NBD clients; refusing"
            );
            return;
        }
        let export = Rc::new(Export {
            info: self.info.clone(),
            volume: self.executor.clone(),
        });
        self.clients.set(self.clients.get() + 1);
        let runtime = self.clone();
        tokio::task::spawn_local(async move {
            serve_connection(stream, export, peer, stop).await;
            runtime.clients.set(runtime.clients.get() - 1);
            runtime.clients_changed.notify_waiters();
        });
    }

    fn open_export(&self) {
        let mut gate = self.gate.borrow_mut();
        if gate.accepting {
            return;
        }
        gate.accepting = true;
        gate.stop_clients = watch::channel(false).0;
        self.executor.set_serving(true);
        info!(
            mirror = self.name,
            "export open: mirror active on this node"
        );
    }

    /// Stops accepting clients, tells the current ones to finish (their in-flight
    /// requests are answered first), and waits until they are gone and the engine has
    /// answered everything.
    async fn close_export_and_drain(&self) {
        {
            let mut gate = self.gate.borrow_mut();
            gate.accepting = false;
            let _ = gate.stop_clients.send(true);
        }
        loop {
            let changed = self.clients_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.clients.get() == 0 {
                break;
            }
            changed.await;
        }
        // A client whose socket broke leaves without waiting for its replies.
        while self.executor.requests_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.executor.set_serving(false);
    }

    /// Stops the NBD listeners (SIGTERM): no new client is even refused politely.
    pub fn stop_accepting(&self) {
        for task in self.nbd_tasks.take() {
            task.abort();
        }
        self.gate.borrow_mut().accepting = false;
    }

    // ------------------------------------------------------------------------------
    // Switch-mirror hooks.
    // ------------------------------------------------------------------------------

    fn role_guard(&self) -> Result<RoleGuard<'_>, String> {
        if self.role_busy.replace(true) {
            return Err(format!(
                "mirror {}: another activate/deactivate is in progress",
                self.name
            ));
        }
        Ok(RoleGuard(&self.role_busy))
    }

    /// Makes the mirror active here: only an UpToDate disk whose connected peer is
    /// Secondary, or with `forced` (forced-permit) a disconnected one; the new role is
    /// durable before the export opens.
    pub async fn activate(&self, forced: bool) -> Result<String, String> {
        let _guard = self.role_guard()?;
        let waiting = self
            .executor
            .activate(forced)
            .map_err(|e| format!("mirror {}: cannot activate: {e}", self.name))?;
        let message = match waiting {
            None => format!(
                "mirror {} is already active on {}",
                self.name, self.node_name
            ),
            Some(rx) => {
                rx.await
                    .map_err(|_| {
                        format!("mirror {}: the engine dropped the activation", self.name)
                    })?
                    .map_err(|e| format!("mirror {}: activation failed: {e}", self.name))?;
                info!(mirror = self.name, forced, "activated");
                format!("mirror {} is active on {}", self.name, self.node_name)
            }
        };
        self.open_export();
        Ok(message)
    }

    /// Makes the mirror inactive here: stop accepting requests, drain, flush (a final
    /// sync point on both sides), stop the export, become Secondary (durably).
    pub async fn deactivate(&self) -> Result<String, String> {
        let _guard = self.role_guard()?;
        self.deactivate_locked().await
    }

    async fn deactivate_locked(&self) -> Result<String, String> {
        if self.executor.with_engine(|e| e.role()) == Role::Secondary
            && !self.gate.borrow().accepting
        {
            return Ok(format!(
                "mirror {} is not active on {}",
                self.name, self.node_name
            ));
        }
        self.close_export_and_drain().await;
        let waiting = match self.executor.deactivate() {
            Ok(waiting) => waiting,
            Err(error) => {
                // Still Primary: keep serving rather than leave the clients stranded.
                self.open_export();
                return Err(format!("mirror {}: cannot deactivate: {error}", self.name));
            }
        };
        if let Some(rx) = waiting {
            rx.await
                .map_err(|_| format!("mirror {}: the engine dropped the deactivation", self.name))?
                .map_err(|e| format!("mirror {}: deactivation failed: {e}", self.name))?;
        }
        info!(mirror = self.name, "deactivated");
        Ok(format!(
            "mirror {} is inactive on {}",
            self.name, self.node_name
        ))
    }

    /// SIGTERM: deactivate if active (waiting for a role change already running).
    pub async fn deactivate_for_shutdown(&self) -> Result<(), String> {
        while self.role_busy.get() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.executor.with_engine(|e| e.role()) == Role::Primary {
            let _guard = self.role_guard()?;
            self.deactivate_locked().await?;
        }
        Ok(())
    }

    /// `rebuild --full --from <this node>`.
    pub fn rebuild_full(&self) -> Result<String, String> {
        self.executor
            .start_full_sync()
            .map_err(|e| format!("mirror {}: cannot start a full rebuild: {e}", self.name))?;
        info!(mirror = self.name, "full rebuild started from this node");
        Ok(format!(
            "mirror {}: full rebuild from {} started",
            self.name, self.node_name
        ))
    }

    pub fn set_resync_paused(&self, paused: bool) -> Result<String, String> {
        self.executor
            .set_resync_paused(paused)
            .map_err(|e| format!("mirror {}: {e}", self.name))?;
        let what = if paused { "paused" } else { "resumed" };
        info!(mirror = self.name, "resync {what}");
        Ok(format!("mirror {}: resync {what}", self.name))
    }

    /// SIGTERM, after deactivation: close the link cleanly, let in-flight I/O finish,
    /// make everything durable.
    pub async fn shutdown(&self) {
        self.link.shutdown().await;
        self.executor.begin_shutdown();
        let deadline = self.clock.now_ms() + SHUTDOWN_IDLE_TIMEOUT_MS;
        let done = |e: &Executor| e.idle() && e.shutdown_complete();
        while !done(&self.executor) && self.clock.now_ms() < deadline {
            tokio::time::sleep(Duration::from_millis(TICK_MS)).await;
            self.executor.tick();
        }
        if !done(&self.executor) {
            warn!(
                mirror = self.name,
                "in-flight I/O did not finish before shutdown"
            );
        }
        for task in self.background.take() {
            task.abort();
        }
        // SAFETY: data_fd is the backing's descriptor, owned by the volume the executor
        // keeps alive (this runtime holds the executor).
        if unsafe { libc::fdatasync(self.data_fd) } != 0 {
            warn!(mirror = self.name, error = %std::io::Error::last_os_error(), "final fdatasync failed");
        }
        info!(mirror = self.name, "mirror stopped");
    }
}

/// Runs the split-brain hook to its end or its timeout; the outcome as text (`Err` for
/// anything but exit status 0). The child is killed if this future is dropped (agent
/// shutdown).
async fn run_hook(
    path: &std::path::Path,
    mirror: &str,
    node: &str,
    peer: &str,
    problem: &str,
    outcome: &RefCell<String>,
) -> Result<String, String> {
    let started = tokio::time::Instant::now();
    let log_stream = || {
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    };
    let mut child = tokio::process::Command::new(path)
        .env("MIRRORDISK_MIRROR", mirror)
        .env("MIRRORDISK_NODE", node)
        .env("MIRRORDISK_PEER", peer)
        .env("MIRRORDISK_EVENT", "SPLIT_BRAIN")
        .env("MIRRORDISK_PROBLEM", problem)
        .stdin(Stdio::null())
        .stdout(log_stream())
        .stderr(log_stream())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("could not start: {e}"))?;
    *outcome.borrow_mut() = format!("running (pid {})", child.id().unwrap_or_default());
    let timeout = Duration::from_millis(SPLIT_BRAIN_HOOK_TIMEOUT_MS);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            let ms = started.elapsed().as_millis();
            if status.success() {
                Ok(format!("exit status 0 after {ms} ms"))
            } else {
                Err(format!("failed: {status} after {ms} ms"))
            }
        }
        Ok(Err(e)) => Err(format!("cannot wait for it: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!(
                "killed after {SPLIT_BRAIN_HOOK_TIMEOUT_MS} ms (timeout)"
            ))
        }
    }
}

/// Releases the role-change flag when the operation ends, however it ends.
struct RoleGuard<'a>(&'a Cell<bool>);

impl Drop for RoleGuard<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

#[derive(Debug)]
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Waits for a ring's completion queue to become non-empty and calls `on_ready`.
async fn drive_ring(ring_fd: RawFd, on_ready: impl Fn()) {
    // SAFETY: the ring fd belongs to a ring owned by the executor `on_ready` keeps
    // alive (it holds an `Rc`), for as long as this task — and so the `AsyncFd` — exists.
    let fd = unsafe { AsyncFd::register_with_interest(RingFd(ring_fd), Interest::READABLE) }
        .unwrap_or_else(|e| panic!("registering the io_uring fd with the reactor: {e}"));
    loop {
        let mut guard = fd.readable().await.expect("polling the io_uring fd");
        // Clear first, then drain: a completion posted after the drain raises a new edge.
        guard.clear_ready();
        on_ready();
    }
}

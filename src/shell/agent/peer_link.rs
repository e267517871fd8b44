//! The replication link of one mirror: listens on this node's mirror-connect addresses,
//! dials the peer's, runs the handshake (`core::repl::handshake`), settles crossed
//! connects (`core::repl::tiebreak`), and then carries frames between the socket and
//! the engine until the link ends; then reconnects with backoff, trying the other path
//! after a failure.
//!
//! Per established connection, three futures run in one task: the reader (header,
//! then the payload straight into a pooled buffer for data frames; crc verified; any
//! `FrameError` ends the link and the frame never reaches the engine), the writer
//! (frames in the engine's order, every queued frame in one vectored write, data sent
//! from the shared buffer), and the keep-alive (a KeepAlive when nothing was sent for
//! a while; no frame from the peer within `peer_timeout_ms` ends the link). Whatever
//! ends first ends the connection; the engine is told with `handle_link_down`.
//!
//! Crossed connects: both nodes dial, so two authenticated connections may exist at
//! once. Only one is handed to the engine: the one the lower node id dialled (both
//! nodes compute the same answer). A connection that finishes its handshake while a
//! connection that would beat it is still handshaking waits for that one's outcome,
//! so the engine rarely sees the loser at all. An authenticated connection from the
//! side that dialled the current one replaces it (that side believes the old one dead).
//! Unauthenticated connections never displace anything.
//!
//! Operator break (`mirrorctl break`): the link is closed and this node neither dials
//! nor accepts (an incoming connection is closed at once, before its handshake) until
//! `unbreak` (`mirrorctl rebuild`). Only this node's agent knows: the peer keeps
//! dialling with its backoff and is turned away. Not persisted: an agent restart ends
//! the break.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::core::repl::wire::{FrameType, NodeState, RefuseReason};
use crate::core::repl::{
    ClusterSecret, Established, FRAME_HEADER_BYTES, Failure, Handshake, Initiator, PeerInfo,
    Status, decode_header, keep_connection, verify,
};
use crate::shell::agent::executor::Executor;
use crate::shell::agent::frames::{self, Inbound};
use crate::shell::agent::reconnect::{self, Backoff, Outcome, PathSelector};
use crate::shell::agent::{
    CONNECT_TIMEOUT_MS, CROSSED_CONNECT_YIELD_MS, Clock, HANDSHAKES_IN_PROGRESS_MAX,
    KEEPALIVE_INTERVAL_MS_MAX, KEEPALIVE_PER_TIMEOUT, LINK_CLOSE_FLUSH_MS, LINK_STABLE_MS,
    PEER_SOCKET_READ_BYTES, PEER_WRITE_BATCH_FRAMES_MAX, RECONNECT_BACKOFF_INITIAL_MS,
    RECONNECT_BACKOFF_MAX_MS, random_bytes,
};
use crate::shell::buffers::Buf;
use crate::shell::volume::ReadData;

/// One frame queued for the writer.
#[derive(Debug)]
pub enum OutFrame {
    /// A whole encoded frame (control frames, keep-alives).
    Bytes(Vec<u8>),
    /// A Write frame: header, then `buf[range]`, the buffer the local disk write uses.
    Shared {
        header: [u8; FRAME_HEADER_BYTES],
        buf: Rc<Buf>,
        range: Range<usize>,
    },
    /// A ResyncData frame: header, then the data a resync read returned.
    Read {
        header: [u8; FRAME_HEADER_BYTES],
        data: ReadData,
    },
}

/// The sending side of one established connection, shared by the executor (which
/// queues the engine's messages) and the connection's tasks.
#[derive(Debug)]
pub struct LinkOut {
    conn_id: u64,
    epoch: u64,
    queue: RefCell<VecDeque<OutFrame>>,
    ready: Notify,
    close_reason: RefCell<Option<String>>,
    close: Notify,
    last_sent_ms: Cell<u64>,
    last_received_ms: Cell<u64>,
}

impl LinkOut {
    fn new(conn_id: u64, epoch: u64, now_ms: u64) -> LinkOut {
        LinkOut {
            conn_id,
            epoch,
            queue: RefCell::new(VecDeque::new()),
            ready: Notify::new(),
            close_reason: RefCell::new(None),
            close: Notify::new(),
            last_sent_ms: Cell::new(now_ms),
            last_received_ms: Cell::new(now_ms),
        }
    }

    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Queues a frame; frames leave in the order they are queued.
    pub fn push(&self, frame: OutFrame) {
        if self.close_reason.borrow().is_some() {
            return;
        }
        self.queue.borrow_mut().push_back(frame);
        self.ready.notify_one();
    }

    /// Asks the connection to close (the engine's DropLink, a replacement, shutdown).
    pub fn request_close(&self, reason: String) {
        let mut current = self.close_reason.borrow_mut();
        if current.is_none() {
            *current = Some(reason);
            self.close.notify_one();
            self.ready.notify_one();
        }
    }

    fn close_requested(&self) -> Option<String> {
        self.close_reason.borrow().clone()
    }

    async fn closed(&self) -> String {
        loop {
            if let Some(reason) = self.close_requested() {
                return reason;
            }
            self.close.notified().await;
        }
    }
}

/// What the crossed-connect rule says about a connection that just authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Hand it to the engine.
    Take,
    /// Hand it to the engine after closing the current link.
    Replace,
    /// Close it with Refuse(DuplicateConnection): the current link wins.
    Refuse,
    /// A connection that would beat it is still handshaking: wait for its outcome.
    Wait,
}

/// The crossed-connect decision (pure). `active` is who initiated the connection the
/// engine uses now; `handshaking` who initiated the other connections still in their
/// handshake.
pub fn offer(
    local_id: u32,
    peer_id: u32,
    new: Initiator,
    active: Option<Initiator>,
    handshaking: &[Initiator],
) -> Offer {
    let beats = |a: Initiator, b: Initiator| a != b && keep_connection(local_id, peer_id, a);
    match active {
        // The side that dialled the current connection dialled again: it considers
        // the old one dead.
        Some(current) if current == new => Offer::Replace,
        Some(current) if beats(current, new) => Offer::Refuse,
        Some(_) => Offer::Replace,
        None if handshaking.iter().any(|&h| beats(h, new)) => Offer::Wait,
        None => Offer::Take,
    }
}

#[derive(Debug)]
struct Active {
    conn_id: u64,
    initiator: Initiator,
    path: usize,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    since_ms: u64,
    version: u16,
    out: Rc<LinkOut>,
}

/// What the dialer is doing, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialer {
    Starting,
    Connecting {
        path: usize,
    },
    Handshaking {
        path: usize,
    },
    Linked,
    Waiting {
        path: usize,
        until_ms: u64,
    },
    /// `mirrorctl break`: no dialling, no accepting.
    Broken,
    Stopped,
}

/// Who broke the link, and when (`mirrorctl break`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BreakView {
    /// The operator, from the admin socket's peer credentials.
    pub by: String,
    /// Wall-clock time of the break (UTC, RFC 3339).
    pub at: String,
    /// How long ago.
    pub age_ms: u64,
}

#[derive(Debug)]
struct LinkState {
    active: Option<Active>,
    /// Connections in their handshake: id -> who dialled.
    handshaking: HashMap<u64, Initiator>,
    dialer: Dialer,
    /// Set by `mirrorctl break`: who, when (UTC text) and when (agent clock).
    broken: Option<(String, String, u64)>,
    /// The last problem (failed connect, refused handshake, lost link) and when.
    problem: Option<(String, u64)>,
    /// Problems logged since the link was last up and stable (`LINK_STABLE_MS`): each
    /// is logged once. A link the engine drops at once (split brain, both nodes
    /// active, unrelated disks) does not count, or every retry would log again.
    logged: HashSet<String>,
    links_established: u64,
}

/// What status shows about the link, beyond the engine's view.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LinkView {
    /// connected | connecting | handshaking | retrying | broken | stopped
    pub state: String,
    /// Set while the link is broken by the operator (`mirrorctl break`).
    #[serde(default)]
    pub broken: Option<BreakView>,
    pub path: Option<usize>,
    pub local: Option<String>,
    pub remote: Option<String>,
    pub up_ms: Option<u64>,
    pub epoch: Option<u64>,
    pub protocol_version: Option<u16>,
    pub retry_in_ms: Option<u64>,
    pub last_problem: Option<String>,
    pub last_problem_age_ms: Option<u64>,
    pub links_established: u64,
    pub paths: Vec<String>,
}

/// Who we are and who the peer is, for one mirror's link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub mirror: String,
    pub node_id: u32,
    pub peer_id: u32,
    pub peer_name: String,
    /// Our listen address per path.
    pub listen: Vec<SocketAddr>,
    /// The peer's address per path.
    pub peer_addrs: Vec<SocketAddr>,
    pub peer_timeout_ms: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct PeerLink {
    config: LinkConfig,
    executor: Rc<Executor>,
    secret: ClusterSecret,
    clock: Clock,
    state: RefCell<LinkState>,
    /// Wakes the dialer and parked connections: a link or a handshake ended.
    changed: Notify,
    /// Wakes the dialer out of its backoff (break lifted, split brain resolved).
    kick: Notify,
    stopping: Cell<bool>,
    next_conn_id: Cell<u64>,
    tasks: RefCell<Vec<JoinHandle<()>>>,
}

impl PeerLink {
    /// Starts the listeners (already bound, one per path) and the dialer.
    pub fn start(
        config: LinkConfig,
        listeners: Vec<std::net::TcpListener>,
        executor: Rc<Executor>,
        secret: ClusterSecret,
        clock: Clock,
    ) -> Result<Rc<PeerLink>, String> {
        assert_eq!(config.listen.len(), config.peer_addrs.len());
        let link = Rc::new(PeerLink {
            config,
            executor,
            secret,
            clock,
            state: RefCell::new(LinkState {
                active: None,
                handshaking: HashMap::new(),
                dialer: Dialer::Starting,
                broken: None,
                problem: None,
                logged: HashSet::new(),
                links_established: 0,
            }),
            changed: Notify::new(),
            kick: Notify::new(),
            stopping: Cell::new(false),
            next_conn_id: Cell::new(1),
            tasks: RefCell::new(Vec::new()),
        });
        let mut tasks = Vec::new();
        for (path, listener) in listeners.into_iter().enumerate() {
            let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            tasks.push(tokio::task::spawn_local(
                link.clone().accept(listener, path),
            ));
        }
        tasks.push(tokio::task::spawn_local(link.clone().dial()));
        link.tasks.replace(tasks);
        Ok(link)
    }

    /// Closes the link cleanly (queued frames are sent, then FIN) and stops
    /// reconnecting.
    pub async fn shutdown(&self) {
        self.stopping.set(true);
        let active = self.state.borrow().active.as_ref().map(|a| a.out.clone());
        if let Some(out) = active {
            out.request_close("the agent is shutting down".into());
            let deadline = self.clock.now_ms() + 2 * LINK_CLOSE_FLUSH_MS;
            while self.state.borrow().active.is_some() && self.clock.now_ms() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for task in self.tasks.take() {
            task.abort();
        }
        self.state.borrow_mut().dialer = Dialer::Stopped;
    }

    /// `mirrorctl break`: closes the link (the engine then journals every write) and
    /// stops dialling and accepting until [`PeerLink::unbreak`]. `by` names the
    /// operator, `at` the wall-clock time. Returns false if it was broken already.
    pub fn break_link(&self, by: String, at: String) -> bool {
        let active = {
            let mut st = self.state.borrow_mut();
            if st.broken.is_some() {
                return false;
            }
            st.broken = Some((by, at, self.clock.now_ms()));
            st.active.as_ref().map(|a| a.out.clone())
        };
        if let Some(out) = active {
            out.request_close("broken by operator (mirrorctl break)".into());
        }
        self.changed.notify_waiters();
        self.kick.notify_one();
        true
    }

    /// Lifts an operator break: the dialer connects at once (the normal connect path
    /// then decides the resync). Returns false if the link was not broken.
    pub fn unbreak(&self) -> bool {
        let was = self.state.borrow_mut().broken.take().is_some();
        if was {
            self.kick();
        }
        was
    }

    pub fn is_broken(&self) -> bool {
        self.state.borrow().broken.is_some()
    }

    /// Ends the dialer's backoff wait: the next attempt starts now (after an operator
    /// action that changes what a connect would decide, such as a split-brain
    /// resolution).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    pub fn view(&self) -> LinkView {
        let now = self.clock.now_ms();
        let st = self.state.borrow();
        let paths = self
            .config
            .listen
            .iter()
            .zip(&self.config.peer_addrs)
            .map(|(l, p)| format!("{l} <-> {p}"))
            .collect();
        let (problem, problem_age) = match &st.problem {
            Some((p, at)) => (Some(p.clone()), Some(now.saturating_sub(*at))),
            None => (None, None),
        };
        let broken = st.broken.as_ref().map(|(by, at, since)| BreakView {
            by: by.clone(),
            at: at.clone(),
            age_ms: now.saturating_sub(*since),
        });
        let mut view = LinkView {
            state: String::new(),
            broken,
            path: None,
            local: None,
            remote: None,
            up_ms: None,
            epoch: None,
            protocol_version: None,
            retry_in_ms: None,
            last_problem: problem,
            last_problem_age_ms: problem_age,
            links_established: st.links_established,
            paths,
        };
        if let Some(active) = &st.active {
            view.state = "connected".into();
            view.path = Some(active.path);
            view.local = active.local.map(|a| a.to_string());
            view.remote = active.remote.map(|a| a.to_string());
            view.up_ms = Some(now.saturating_sub(active.since_ms));
            view.epoch = Some(active.out.epoch());
            view.protocol_version = Some(active.version);
            return view;
        }
        match st.dialer {
            Dialer::Starting | Dialer::Linked => view.state = "connecting".into(),
            Dialer::Connecting { path } => {
                view.state = "connecting".into();
                view.path = Some(path);
            }
            Dialer::Handshaking { path } => {
                view.state = "handshaking".into();
                view.path = Some(path);
            }
            Dialer::Waiting { path, until_ms } => {
                view.state = "retrying".into();
                view.path = Some(path);
                view.retry_in_ms = Some(until_ms.saturating_sub(now));
            }
            Dialer::Broken => view.state = "broken".into(),
            Dialer::Stopped => view.state = "stopped".into(),
        }
        if view.broken.is_some() && st.dialer != Dialer::Stopped {
            view.state = "broken".into();
        }
        view
    }

    /// Records a problem; logs it only the first time it is seen since the link was
    /// last up, so a peer that stays away costs one log line, not one per retry.
    fn problem(&self, problem: String) {
        let now = self.clock.now_ms();
        let mut st = self.state.borrow_mut();
        if st.logged.insert(problem.clone()) {
            warn!(
                mirror = self.config.mirror,
                peer = self.config.peer_name,
                "{problem}"
            );
        } else {
            debug!(mirror = self.config.mirror, "{problem}");
        }
        st.problem = Some((problem, now));
    }

    fn set_dialer(&self, dialer: Dialer) {
        self.state.borrow_mut().dialer = dialer;
    }

    /// Extra delay before the node with the higher id redials. Both nodes redial
    /// after a lost link; letting the lower id go first means its connection (the one
    /// the crossed-connect rule keeps) is usually up before the other node dials at
    /// all, so the engines rarely see a link replaced.
    fn crossed_connect_yield_ms(&self) -> u64 {
        if self.config.node_id > self.config.peer_id {
            CROSSED_CONNECT_YIELD_MS
        } else {
            0
        }
    }

    fn has_active(&self) -> bool {
        self.state.borrow().active.is_some()
    }

    // ------------------------------------------------------------------------------
    // Listening and dialling.
    // ------------------------------------------------------------------------------

    async fn accept(self: Rc<Self>, listener: TcpListener, path: usize) {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(mirror = self.config.mirror, %error, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(RECONNECT_BACKOFF_INITIAL_MS)).await;
                    continue;
                }
            };
            if self.stopping.get() {
                return;
            }
            if self.is_broken() {
                // Turned away before the handshake: nothing about our disk is said.
                debug!(mirror = self.config.mirror, %remote, "link broken by the operator; closing an incoming connection");
                drop(stream);
                continue;
            }
            if self.state.borrow().handshaking.len() >= HANDSHAKES_IN_PROGRESS_MAX {
                debug!(mirror = self.config.mirror, %remote, "too many handshakes in progress; dropping");
                continue;
            }
            let link = self.clone();
            tokio::task::spawn_local(async move {
                link.connection(stream, Initiator::Peer, path).await;
            });
        }
    }

    async fn dial(self: Rc<Self>) {
        let mut backoff = Backoff::new(RECONNECT_BACKOFF_INITIAL_MS, RECONNECT_BACKOFF_MAX_MS);
        let mut paths = PathSelector::new(self.config.peer_addrs.len());
        loop {
            if self.stopping.get() {
                return;
            }
            if self.is_broken() {
                self.set_dialer(Dialer::Broken);
                while self.is_broken() && !self.stopping.get() {
                    self.kick.notified().await;
                }
                // Lifted by the operator: dial at once, from the first path.
                backoff.reset();
                continue;
            }
            if self.has_active() {
                self.set_dialer(Dialer::Linked);
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.has_active() {
                    changed.await;
                }
                // The link (dialled by either side) ended: back off before dialling.
                let delay = backoff.next_delay_ms() + self.crossed_connect_yield_ms();
                self.wait_or_kick(delay).await;
                continue;
            }
            let path = paths.current();
            let addr = self.config.peer_addrs[path];
            self.set_dialer(Dialer::Connecting { path });
            let connected = tokio::time::timeout(
                Duration::from_millis(CONNECT_TIMEOUT_MS),
                TcpStream::connect(addr),
            )
            .await;
            let outcome = match connected {
                Ok(Ok(stream)) => {
                    self.set_dialer(Dialer::Handshaking { path });
                    self.clone()
                        .connection(stream, Initiator::Local, path)
                        .await
                }
                Ok(Err(error)) => {
                    self.problem(format!(
                        "cannot connect to {} at {addr} (path {path}): {error}",
                        self.config.peer_name
                    ));
                    Outcome::Failed
                }
                Err(_) => {
                    self.problem(format!(
                        "connecting to {} at {addr} (path {path}) timed out after {CONNECT_TIMEOUT_MS} ms",
                        self.config.peer_name
                    ));
                    Outcome::Failed
                }
            };
            let delay = reconnect::after(outcome, &mut backoff, &mut paths, LINK_STABLE_MS)
                + self.crossed_connect_yield_ms();
            if self.stopping.get() {
                return;
            }
            if self.is_broken() {
                continue;
            }
            self.set_dialer(Dialer::Waiting {
                path: paths.current(),
                until_ms: self.clock.now_ms() + delay,
            });
            if self.wait_or_kick(delay).await {
                backoff.reset();
            }
        }
    }

    /// Sleeps `delay_ms`, or less if kicked (returns true then).
    async fn wait_or_kick(&self, delay_ms: u64) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => false,
            _ = self.kick.notified() => true,
        }
    }

    // ------------------------------------------------------------------------------
    // One connection, from handshake to end.
    // ------------------------------------------------------------------------------

    async fn connection(
        self: Rc<Self>,
        mut stream: TcpStream,
        initiator: Initiator,
        path: usize,
    ) -> Outcome {
        let _ = stream.set_nodelay(true);
        let remote = stream.peer_addr().ok();
        let local = stream.local_addr().ok();
        let conn_id = self.next_conn_id.get();
        self.next_conn_id.set(conn_id + 1);
        self.state
            .borrow_mut()
            .handshaking
            .insert(conn_id, initiator);
        let handshake = self.handshake(&mut stream, remote).await;
        self.state.borrow_mut().handshaking.remove(&conn_id);
        self.changed.notify_waiters();
        let (established, leftover, sent) = match handshake {
            Ok(done) => done,
            Err(problem) => {
                self.problem(problem);
                return Outcome::Failed;
            }
        };
        if self.is_broken() {
            // Broken while this handshake ran: never handed to the engine.
            let _ = stream.shutdown().await;
            return Outcome::Duplicate;
        }
        if !self
            .settle(conn_id, initiator, &mut stream, established.epoch)
            .await
        {
            return Outcome::Duplicate;
        }
        let now = self.clock.now_ms();
        let out = Rc::new(LinkOut::new(conn_id, established.epoch, now));
        {
            let mut st = self.state.borrow_mut();
            st.active = Some(Active {
                conn_id,
                initiator,
                path,
                local,
                remote,
                since_ms: now,
                version: established.version,
                out: out.clone(),
            });
            st.problem = None;
            st.links_established += 1;
        }
        info!(
            mirror = self.config.mirror,
            peer = self.config.peer_name,
            path,
            remote = ?remote,
            epoch = established.epoch,
            version = established.version,
            "replication link up"
        );
        self.executor
            .link_up(out.clone(), sent, node_state(&established.peer));
        let reason = self.run(stream, leftover, &out).await;
        let up_ms = self.clock.now_ms().saturating_sub(now);
        {
            let mut st = self.state.borrow_mut();
            if st.active.as_ref().is_some_and(|a| a.conn_id == conn_id) {
                st.active = None;
            }
            if up_ms >= LINK_STABLE_MS {
                st.logged.clear();
            }
        }
        self.executor.link_down(conn_id);
        info!(mirror = self.config.mirror, up_ms, "replication link down");
        self.problem(format!("replication link down: {reason}"));
        self.changed.notify_waiters();
        Outcome::LinkEnded { up_ms }
    }

    /// Applies the crossed-connect rule to an authenticated connection. Returns whether
    /// it becomes the link (a replaced link is unlinked from the engine first).
    async fn settle(
        &self,
        conn_id: u64,
        initiator: Initiator,
        stream: &mut TcpStream,
        epoch: u64,
    ) -> bool {
        // Bounded by the handshake deadline of the connection waited for.
        let wait_limit =
            Duration::from_millis(crate::core::repl::HANDSHAKE_TIMEOUT_MS_DEFAULT + 1000);
        loop {
            if self.stopping.get() {
                return false;
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let decision = {
                let st = self.state.borrow();
                let handshaking: Vec<Initiator> = st.handshaking.values().copied().collect();
                offer(
                    self.config.node_id,
                    self.config.peer_id,
                    initiator,
                    st.active.as_ref().map(|a| a.initiator),
                    &handshaking,
                )
            };
            match decision {
                Offer::Take => return true,
                Offer::Replace => {
                    let old = self.state.borrow_mut().active.take();
                    if let Some(old) = old {
                        info!(
                            mirror = self.config.mirror,
                            old_path = old.path,
                            "an authenticated connection replaces the current link"
                        );
                        self.executor.link_down(old.conn_id);
                        old.out
                            .request_close("replaced by a newer connection".into());
                    }
                    return true;
                }
                Offer::Refuse => {
                    debug!(
                        mirror = self.config.mirror,
                        conn_id, "crossed connect: closing the duplicate"
                    );
                    let refuse = frames::refuse(
                        RefuseReason::DuplicateConnection,
                        "duplicate connection",
                        epoch,
                    );
                    let _ = tokio::time::timeout(
                        Duration::from_millis(LINK_CLOSE_FLUSH_MS),
                        stream.write_all(&refuse),
                    )
                    .await;
                    return false;
                }
                Offer::Wait => {
                    if tokio::time::timeout(wait_limit, changed).await.is_err() {
                        // The winner never finished: take this one if nothing else did.
                        if !self.has_active() {
                            return true;
                        }
                    }
                }
            }
        }
    }

    /// Runs the handshake. Returns the outcome, any bytes read past the peer's State (the
    /// engine's first frames) and the State we sent (taken when the handshake started:
    /// the engine drops the link if its state changed since), or the problem to log.
    async fn handshake(
        &self,
        stream: &mut TcpStream,
        remote: Option<SocketAddr>,
    ) -> Result<(Established, Vec<u8>, NodeState), String> {
        let peer = &self.config.peer_name;
        // The address without the (ephemeral) port: a retry looks the same in the log.
        let from = remote.map_or_else(|| "?".to_string(), |a| a.ip().to_string());
        let (config, state) = self
            .executor
            .handshake_config(self.config.node_id, self.config.peer_id);
        let mut nonce = [0u8; crate::core::repl::NONCE_BYTES];
        random_bytes(&mut nonce);
        let mut hs = Handshake::new(
            config,
            self.secret.clone(),
            nonce,
            state,
            self.clock.now_ms(),
        );
        let mut input: Vec<u8> = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 4096];
        loop {
            while let Some(bytes) = hs.poll_transmit() {
                stream
                    .write_all(&bytes)
                    .await
                    .map_err(|e| format!("handshake with {peer} ({from}): write failed: {e}"))?;
            }
            match hs.status() {
                Status::InProgress => {}
                Status::Established(established) => return Ok((*established, input, state)),
                Status::Failed(failure) => {
                    let _ = stream.shutdown().await;
                    return Err(describe_failure(failure, peer, &from));
                }
            }
            if input.len() >= FRAME_HEADER_BYTES {
                let header_bytes: [u8; FRAME_HEADER_BYTES] = input[..FRAME_HEADER_BYTES]
                    .try_into()
                    .expect("length checked");
                let header = decode_header(&header_bytes)
                    .map_err(|e| format!("handshake with {peer} ({from}): bad frame: {e}"))?;
                if !matches!(
                    header.kind(),
                    FrameType::Hello | FrameType::Auth | FrameType::Refuse | FrameType::State
                ) {
                    return Err(format!(
                        "handshake with {peer} ({from}): protocol violation: {} frame during the handshake",
                        header.kind()
                    ));
                }
                let total = FRAME_HEADER_BYTES + header.payload_bytes() as usize;
                if input.len() >= total {
                    let frame = verify(&header, &header_bytes, &input[FRAME_HEADER_BYTES..total])
                        .map_err(|e| {
                        format!("handshake with {peer} ({from}): bad frame: {e}")
                    })?;
                    hs.handle_frame(&header, &frame);
                    input.drain(..total);
                    continue;
                }
            }
            let deadline = hs.poll_timeout().expect("in progress");
            let wait_ms = deadline.saturating_sub(self.clock.now_ms());
            tokio::select! {
                read = stream.read(&mut chunk) => match read {
                    Ok(0) => return Err(format!("handshake with {peer} ({from}): the peer closed the connection")),
                    Ok(n) => input.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(format!("handshake with {peer} ({from}): read failed: {e}")),
                },
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {
                    hs.handle_timeout(self.clock.now_ms());
                }
            }
        }
    }

    /// Carries frames until the connection ends; returns why it ended.
    async fn run(&self, stream: TcpStream, leftover: Vec<u8>, out: &Rc<LinkOut>) -> String {
        let (reader, writer) = stream.into_split();
        let read = self.read_frames(reader, leftover, out);
        let write = write_frames(writer, out, self.clock);
        let keepalive = self.keepalive(out);
        let closed = out.closed();
        tokio::pin!(read, write, keepalive, closed);
        tokio::select! {
            reason = &mut read => reason,
            reason = &mut write => reason,
            reason = &mut keepalive => reason,
            reason = &mut closed => {
                // Let the writer send what is queued (acks the peer waits for), then FIN.
                let _ = tokio::time::timeout(Duration::from_millis(LINK_CLOSE_FLUSH_MS), &mut write).await;
                reason
            }
        }
    }

    async fn read_frames<R: AsyncRead + Unpin>(
        &self,
        mut reader: R,
        leftover: Vec<u8>,
        out: &LinkOut,
    ) -> String {
        let executor = &self.executor;
        let pool = executor.volume().pool().clone();
        let conn_id = out.conn_id();
        let epoch = out.epoch();
        let mut buf = vec![0u8; PEER_SOCKET_READ_BYTES.max(leftover.len())];
        let mut start = 0;
        let mut end = leftover.len();
        buf[..end].copy_from_slice(&leftover);
        loop {
            while end - start >= FRAME_HEADER_BYTES {
                let header_bytes: [u8; FRAME_HEADER_BYTES] = buf[start..start + FRAME_HEADER_BYTES]
                    .try_into()
                    .expect("length checked");
                let header = match decode_header(&header_bytes) {
                    Ok(header) => header,
                    Err(error) => return format!("bad frame from the peer: {error}"),
                };
                let payload_bytes = header.payload_bytes() as usize;
                let is_data = matches!(header.kind(), FrameType::Write | FrameType::ResyncData);
                let (inbound, data) = if is_data {
                    // The payload goes straight into a pooled buffer laid out for the
                    // disk write (unaligned writes sit inside their aligned blocks).
                    start += FRAME_HEADER_BYTES;
                    let layout = executor.volume().layout(header.offset(), header.length());
                    let mut data = match pool.try_get(layout.buf_bytes) {
                        Some(data) => data,
                        None => {
                            executor.flush_submissions();
                            pool.get(layout.buf_bytes).await
                        }
                    };
                    let payload = &mut data[layout.data_start..layout.data_start + payload_bytes];
                    let in_buffer = (end - start).min(payload_bytes);
                    payload[..in_buffer].copy_from_slice(&buf[start..start + in_buffer]);
                    start += in_buffer;
                    if in_buffer < payload_bytes {
                        executor.flush_submissions();
                        if let Err(error) = reader.read_exact(&mut payload[in_buffer..]).await {
                            return format!("read failed: {error}");
                        }
                        out.last_received_ms.set(self.clock.now_ms());
                    }
                    let payload = &data[layout.data_start..layout.data_start + payload_bytes];
                    let inbound = match verify(&header, &header_bytes, payload) {
                        Ok(frame) => frames::inbound(&frame),
                        Err(error) => return format!("bad frame from the peer: {error}"),
                    };
                    (inbound, Some(data))
                } else {
                    let total = FRAME_HEADER_BYTES + payload_bytes;
                    if end - start < total {
                        if buf.len() - start < total {
                            // A large control frame (a bitmap chunk): make room for it.
                            buf.copy_within(start..end, 0);
                            end -= start;
                            start = 0;
                            if buf.len() < total {
                                buf.resize(total, 0);
                            }
                        }
                        break;
                    }
                    let payload = &buf[start + FRAME_HEADER_BYTES..start + total];
                    let inbound = match verify(&header, &header_bytes, payload) {
                        Ok(frame) => frames::inbound(&frame),
                        Err(error) => return format!("bad frame from the peer: {error}"),
                    };
                    start += total;
                    (inbound, None)
                };
                if header.epoch() != epoch {
                    // Not this connection's: never applied (docs/replication-protocol.md).
                    debug!(
                        mirror = self.config.mirror,
                        epoch = header.epoch(),
                        "frame of another epoch dropped"
                    );
                    continue;
                }
                match inbound {
                    Err(violation) => {
                        return format!("protocol violation by the peer: {violation}");
                    }
                    Ok(Inbound::Engine(msg)) => {
                        executor.peer_message(conn_id, msg, data);
                    }
                    Ok(Inbound::KeepAlive { nonce }) => {
                        out.push(OutFrame::Bytes(frames::keepalive(nonce, true, epoch)));
                    }
                    Ok(Inbound::KeepAliveAck) => {}
                    Ok(Inbound::Refused { reason, message }) => {
                        return format!("the peer closed the link ({reason}): {message}");
                    }
                }
                if let Some(reason) = out.close_requested() {
                    return reason;
                }
            }
            if start == end {
                start = 0;
                end = 0;
            } else if start > 0 {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            executor.flush_submissions();
            if end == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            match reader.read(&mut buf[end..]).await {
                Ok(0) => return "the peer closed the connection".into(),
                Ok(n) => {
                    end += n;
                    out.last_received_ms.set(self.clock.now_ms());
                }
                Err(error) => return format!("read failed: {error}"),
            }
        }
    }

    async fn keepalive(&self, out: &LinkOut) -> String {
        let timeout_ms = self.config.peer_timeout_ms;
        let interval_ms = (timeout_ms / KEEPALIVE_PER_TIMEOUT).clamp(1, KEEPALIVE_INTERVAL_MS_MAX);
        let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nonce = 0u64;
        loop {
            ticker.tick().await;
            let now = self.clock.now_ms();
            let silent_ms = now.saturating_sub(out.last_received_ms.get());
            if silent_ms > timeout_ms {
                return format!(
                    "no frame from the peer for {silent_ms} ms (peer_timeout_ms = {timeout_ms})"
                );
            }
            if now.saturating_sub(out.last_sent_ms.get()) >= interval_ms {
                nonce += 1;
                out.push(OutFrame::Bytes(frames::keepalive(
                    nonce,
                    false,
                    out.epoch(),
                )));
            }
        }
    }
}

/// Sends queued frames in order, every frame queued at once in one vectored write.
async fn write_frames<W: AsyncWrite + Unpin>(mut writer: W, out: &LinkOut, clock: Clock) -> String {
    let mut batch: Vec<OutFrame> = Vec::new();
    loop {
        {
            let mut queue = out.queue.borrow_mut();
            let count = queue.len().min(PEER_WRITE_BATCH_FRAMES_MAX);
            batch.extend(queue.drain(..count));
        }
        if batch.is_empty() {
            if let Some(reason) = out.close_requested() {
                let _ = writer.shutdown().await;
                return reason;
            }
            out.ready.notified().await;
            continue;
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
        for frame in &batch {
            match frame {
                OutFrame::Bytes(bytes) => slices.push(IoSlice::new(bytes)),
                OutFrame::Shared { header, buf, range } => {
                    slices.push(IoSlice::new(header));
                    slices.push(IoSlice::new(&buf[range.clone()]));
                }
                OutFrame::Read { header, data } => {
                    slices.push(IoSlice::new(header));
                    slices.push(IoSlice::new(data.as_slice()));
                }
            }
        }
        let sent = write_all_vectored(&mut writer, &mut slices).await;
        drop(slices);
        batch.clear();
        if let Err(error) = sent {
            return format!("write failed: {error}");
        }
        out.last_sent_ms.set(clock.now_ms());
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = writer.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

fn node_state(peer: &PeerInfo) -> NodeState {
    NodeState {
        generations: peer.generations,
        disk_state: peer.disk_state,
        role: peer.role,
        flags: peer.flags,
        intent: peer.intent,
        dirty_bytes: peer.dirty_bytes,
    }
}

fn describe_failure(failure: &Failure, peer: &str, from: &str) -> String {
    match failure {
        Failure::PeerFailedAuthentication => format!(
            "peer failed authentication: {peer} ({from}) does not know the cluster secret; refused"
        ),
        Failure::PeerRefused { reason, message } => {
            format!("{peer} ({from}) refused the handshake ({reason}): {message}")
        }
        Failure::Refused { reason, message } => {
            format!("refused {peer} ({from}) ({reason}): {message}")
        }
        Failure::TimedOut { waiting_for } => {
            format!("handshake with {peer} ({from}) timed out waiting for its {waiting_for}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use Initiator::{Local, Peer};

    #[test]
    fn first_connection_is_taken() {
        assert_eq!(offer(1, 2, Local, None, &[]), Offer::Take);
        assert_eq!(offer(2, 1, Local, None, &[]), Offer::Take);
    }

    #[test]
    fn crossed_connects_keep_the_one_the_lower_id_dialled_on_both_nodes() {
        // Node 1 (lower) dialled connection A; node 2 dialled connection B.
        // Node 1 sees A as Local, B as Peer; node 2 sees A as Peer, B as Local.
        // Whatever order they finish in, both end up with A.
        // Node 1, A finished first, then B:
        assert_eq!(offer(1, 2, Local, None, &[Peer]), Offer::Take);
        assert_eq!(offer(1, 2, Peer, Some(Local), &[]), Offer::Refuse);
        // Node 1, B finished first (A still handshaking): B waits for A.
        assert_eq!(offer(1, 2, Peer, None, &[Local]), Offer::Wait);
        // Node 2, B (its Local) finished first while A handshakes: wait.
        assert_eq!(offer(2, 1, Local, None, &[Peer]), Offer::Wait);
        assert_eq!(offer(2, 1, Peer, None, &[Local]), Offer::Take);
        // Node 2 took B before A even arrived: A replaces it.
        assert_eq!(offer(2, 1, Peer, Some(Local), &[]), Offer::Replace);
    }

    #[test]
    fn a_redial_by_the_same_side_replaces_the_link() {
        assert_eq!(offer(1, 2, Peer, Some(Peer), &[]), Offer::Replace);
        assert_eq!(offer(2, 1, Peer, Some(Peer), &[]), Offer::Replace);
    }

    #[test]
    fn losing_handshakes_in_progress_do_not_delay() {
        // Node 2's own dial loses to node 1's: node 1's connection need not wait for it.
        assert_eq!(offer(2, 1, Peer, None, &[Local, Local]), Offer::Take);
    }
}

//! `mirrordisk serve`: one backing file or block device exported over NBD on TCP and/or
//! a unix socket, on a single data-plane thread.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::constants::{
    BUFFER_POOL_BYTES_MAX, NBD_BLOCK_SIZE_PREFERRED_BYTES, NBD_CONNECTIONS_MAX,
    NBD_PAYLOAD_BYTES_MAX,
};
use crate::core::meta::{MetaEngine, Placement};
use crate::core::mirror::{Engine, EngineConfig};
use crate::core::nbd::handshake::ExportInfo;
use crate::shell::buffers::BufferPool;
use crate::shell::disk::Backing;
use crate::shell::disk::open_backing;
use crate::shell::metadata::{has_metadata, read_area};
use crate::shell::mirror_export::MirrorExport;
use crate::shell::nbd_server::{Export, SplitStream, serve_connection};
use crate::shell::uring::Ring;
use crate::shell::volume::{Backend, LocalVolume};

/// What `mirrordisk serve` was asked to do, already parsed.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub path: PathBuf,
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub name: String,
    pub read_only: bool,
    /// The CLUSTER partition lives on this separate device.
    pub metadata: Option<PathBuf>,
    /// Journal every write, as during a mirror break (needs metadata).
    pub broken: bool,
}

/// How long a completed write may wait for the sync point that makes it durable. One
/// second bounds how much a crash can leave in the activity log's care.
const SYNC_INTERVAL_MS: u64 = 1000;
/// How often the engine's timers are looked at.
const TICK_MS: u64 = 100;

/// The metadata found on the device, recovered and ready to serve.
struct MetaPlan {
    engine: Option<Engine>,
    data_offset: u64,
    data_bytes: u64,
    logical_block_bytes: u32,
    /// The metadata device when it is not the data device.
    external: Option<Backing>,
}

/// Reads and recovers the CLUSTER partition if there is one. Read-only serving does
/// not recover (recovery writes), it only learns where the data partition is.
fn plan_metadata(config: &ServeConfig) -> Result<Option<MetaPlan>, String> {
    let meta_path = config.metadata.as_deref().unwrap_or(&config.path);
    let probe =
        std::fs::File::open(meta_path).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    let present = has_metadata(&probe).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    if !present {
        if config.metadata.is_some() {
            return Err(format!(
                "--metadata {}: no mirrordisk metadata there (run mirrorctl create)",
                meta_path.display()
            ));
        }
        if config.broken {
            return Err(
                "--broken needs a device with mirrordisk metadata (see mirrorctl create)".into(),
            );
        }
        return Ok(None);
    }
    let (area, picked) =
        read_area(&probe, 0).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    drop(probe);
    let layout = picked.superblock.layout;
    let internal = layout.placement == Placement::Internal;
    if internal && config.metadata.is_some() {
        return Err(format!(
            "--metadata {}: this metadata belongs at the head of its data device",
            meta_path.display()
        ));
    }
    if !internal && config.metadata.is_none() {
        return Err(format!(
            "{}: holds external metadata; serve its data device with --metadata {}",
            config.path.display(),
            config.path.display()
        ));
    }
    let engine = if config.read_only {
        if config.broken {
            return Err("--broken and --read-only exclude each other".into());
        }
        None
    } else {
        let (meta, report) = MetaEngine::recover(&area, None)
            .map_err(|e| format!("{}: {e}", meta_path.display()))?;
        info!(
            superblock_copy = ?report.superblock_copy,
            al_hot_extents = report.al_hot_extents,
            dirty_regions = report.dirty_regions,
            "metadata recovered"
        );
        // No peer: the timeout and resync rate never come into play.
        let config_engine = EngineConfig {
            lock_alignment_bytes: u64::from(layout.logical_block_bytes),
            sync_interval_ms: SYNC_INTERVAL_MS,
            peer_timeout_ms: crate::config::PEER_TIMEOUT_MS_DEFAULT,
            resync_rate_bytes_per_s: 0,
        };
        let mut engine = Engine::new(config_engine, meta, 0);
        if config.broken {
            engine.set_broken();
        }
        Some(engine)
    };
    let external = if internal {
        None
    } else {
        Some(open_backing(meta_path, config.read_only).map_err(|e| e.to_string())?)
    };
    Ok(Some(MetaPlan {
        engine,
        data_offset: layout.data_offset,
        data_bytes: layout.data_bytes,
        logical_block_bytes: layout.logical_block_bytes,
        external,
    }))
}

/// Runs the server until SIGINT/SIGTERM. Every error before the first client is
/// accepted is returned as one message, with nothing changed on disk.
pub fn run(config: ServeConfig) -> Result<(), String> {
    if config.listen.is_none() && config.unix.is_none() {
        return Err("nothing to listen on: give --listen HOST:PORT and/or --unix SOCKET".into());
    }
    if config.name.len() > 4096 || config.name.contains('\0') {
        return Err("--name: an export name is at most 4096 bytes of UTF-8 without NUL".into());
    }
    let plan = plan_metadata(&config)?;
    let backing = open_backing(&config.path, config.read_only).map_err(|e| e.to_string())?;
    let (data_offset, data_bytes) = match &plan {
        None => (0, backing.size_bytes),
        Some(plan) => {
            if plan.data_offset + plan.data_bytes > backing.size_bytes {
                return Err(format!(
                    "{}: {} bytes, smaller than the data partition its metadata records ({} + {})",
                    config.path.display(),
                    backing.size_bytes,
                    plan.data_offset,
                    plan.data_bytes
                ));
            }
            if backing.logical_block_bytes > plan.logical_block_bytes {
                return Err(format!(
                    "{}: logical block {} bytes, larger than the {} the metadata was created for",
                    config.path.display(),
                    backing.logical_block_bytes,
                    plan.logical_block_bytes
                ));
            }
            (plan.data_offset, plan.data_bytes)
        }
    };
    let ring = Ring::new(backing.file.as_raw_fd()).map_err(|e| e.to_string())?;
    let std_tcp = match config.listen {
        Some(addr) => Some(bind_tcp(addr)?),
        None => None,
    };
    let std_unix = match &config.unix {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let block_size_min_bytes = plan
        .as_ref()
        .map_or(backing.logical_block_bytes, |p| p.logical_block_bytes);
    let info = ExportInfo {
        name: config.name.clone(),
        description: format!("mirrordisk serve {}", config.path.display()),
        size_bytes: data_bytes,
        read_only: config.read_only,
        block_size_min_bytes,
        block_size_preferred_bytes: NBD_BLOCK_SIZE_PREFERRED_BYTES.max(block_size_min_bytes),
        block_size_max_bytes: NBD_PAYLOAD_BYTES_MAX,
        refusal: None,
    };
    info!(
        path = %config.path.display(),
        data_offset,
        data_bytes,
        direct_io = backing.direct_io,
        logical_block_bytes = backing.logical_block_bytes,
        metadata = plan.is_some(),
        journaling = config.broken,
        "serving"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, async move {
        let pool = BufferPool::new(BUFFER_POOL_BYTES_MAX);
        let data_fd = backing.file.as_raw_fd();
        let volume = LocalVolume::with_window(backing, data_offset, data_bytes, ring, pool);
        let mut background = Vec::new();
        let (backend, mirror): (Rc<dyn Backend>, Option<Rc<MirrorExport>>) =
            match plan.and_then(|p| p.engine.map(|e| (e, p.external))) {
                None => {
                    let volume = Rc::new(volume);
                    let v = volume.clone();
                    background.push(tokio::task::spawn_local(drive_ring(
                        volume.ring_fd(),
                        move || {
                            v.process_completions();
                            v.flush_submissions();
                        },
                    )));
                    (volume, None)
                }
                Some((engine, external)) => {
                    let meta_fd = external.as_ref().map_or(data_fd, |b| b.file.as_raw_fd());
                    let meta_ring = Ring::new(meta_fd).map_err(|e| e.to_string())?;
                    let export = MirrorExport::new(volume, meta_ring, 0, engine, external);
                    let e = export.clone();
                    background.push(tokio::task::spawn_local(drive_ring(
                        export.volume().ring_fd(),
                        move || {
                            e.volume().process_completions();
                            e.flush_submissions();
                        },
                    )));
                    let e = export.clone();
                    background.push(tokio::task::spawn_local(drive_ring(
                        export.meta_ring_fd(),
                        move || {
                            e.process_meta_completions();
                            e.flush_submissions();
                        },
                    )));
                    let e = export.clone();
                    background.push(tokio::task::spawn_local(async move {
                        let mut interval =
                            tokio::time::interval(std::time::Duration::from_millis(TICK_MS));
                        loop {
                            interval.tick().await;
                            e.tick();
                        }
                    }));
                    export.drain();
                    export.flush_submissions();
                    (export.clone(), Some(export))
                }
            };
        let export = Rc::new(Export {
            info,
            volume: backend.clone(),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut accepters = Vec::new();
        if let Some(listener) = std_tcp {
            let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            accepters.push(tokio::task::spawn_local(accept_tcp(
                listener,
                export.clone(),
                shutdown_rx.clone(),
            )));
        }
        if let Some(listener) = std_unix {
            let listener = UnixListener::from_std(listener).map_err(|e| e.to_string())?;
            accepters.push(tokio::task::spawn_local(accept_unix(
                listener,
                export.clone(),
                shutdown_rx.clone(),
            )));
        }
        wait_for_signal().await?;
        info!("shutting down: draining in-flight requests");
        let _ = shutdown_tx.send(true);
        for accepter in accepters {
            // Each accepter waits for its connections to drain before returning.
            let _ = accepter.await;
        }
        backend.flush_submissions();
                if let Some(mirror) = &mirror {
            // A final sync point, then the activity log without what is durable, then
            // let metadata writes still in flight (journal, activity log) finish.
            mirror.begin_shutdown();
            for _ in 0..50 {
                if mirror.idle() && mirror.with_engine(|e| e.shutdown_complete()) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(TICK_MS)).await;
                mirror.tick();
            }
        }
                for task in background {
            task.abort();
        }
        if let Some(mirror) = &mirror {
            // One machine-readable line with the engine's counters (activity-log
            // transactions, journal blocks, sync points), for benchmarks and operators.
            let stats = mirror.with_engine(|e| e.status());
            info!(stats = %serde_json::to_string(&stats).unwrap_or_default(), "engine statistics at shutdown");
        }
        // Everything acknowledged is durable before we exit, FUA or not.
        // SAFETY: data_fd is the backing's descriptor, owned by the volume, alive here.
        if unsafe { libc::fdatasync(data_fd) } != 0 {
            warn!(error = %io::Error::last_os_error(), "final fdatasync failed");
        }
        Ok::<(), String>(())
    });
    if let Some(path) = &config.unix {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| format!("--listen {addr}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("--listen {addr}: {e}"))?;
    Ok(listener)
}

/// Binds the unix socket, replacing a stale socket file nobody listens on, but never
/// another kind of file.
fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "--unix {}: exists and is not a socket",
                path.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "--unix {}: another server is listening there",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| format!("--unix {}: {e}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("--unix {}: {e}", path.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("--unix {}: {e}", path.display()))?;
    Ok(listener)
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

#[derive(Debug)]
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Waits for a ring's completion queue to become non-empty and calls `on_ready`. The
/// ring fd is pollable; completions that happen inline during a submit are handled by
/// `flush_submissions` directly, so this task only sees truly asynchronous ones.
async fn drive_ring(ring_fd: RawFd, on_ready: impl Fn()) {
    // SAFETY: the ring fd belongs to a ring owned by the export `on_ready` keeps alive
    // (it holds an `Rc`), for as long as this task — and so the `AsyncFd` — exists.
    let fd = unsafe { AsyncFd::register_with_interest(RingFd(ring_fd), Interest::READABLE) }
        .unwrap_or_else(|e| panic!("registering the io_uring fd with the reactor: {e}"));
    loop {
        let mut guard = fd.readable().await.expect("polling the io_uring fd");
        // Clear first, then drain: a completion posted after the drain raises a new edge.
        guard.clear_ready();
        on_ready();
    }
}

async fn accept_tcp(
    listener: TcpListener,
    export: Rc<Export>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    spawn_connection(&mut connections, stream, peer.to_string(), &export, &shutdown);
                }
                Err(error) => warn!(%error, "accept failed"),
            },
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    while connections.join_next().await.is_some() {}
}

async fn accept_unix(
    listener: UnixListener,
    export: Rc<Export>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_connection(&mut connections, stream, "unix".into(), &export, &shutdown),
                Err(error) => warn!(%error, "accept failed"),
            },
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    while connections.join_next().await.is_some() {}
}

fn spawn_connection<S: SplitStream>(
    connections: &mut tokio::task::JoinSet<()>,
    stream: S,
    peer: String,
    export: &Rc<Export>,
    shutdown: &watch::Receiver<bool>,
) {
    if connections.len() >= NBD_CONNECTIONS_MAX {
        warn!(
            peer,
            limit = NBD_CONNECTIONS_MAX,
            "too many connections; refusing"
        );
        return;
    }
    connections.spawn_local(serve_connection(
        stream,
        export.clone(),
        peer,
        shutdown.clone(),
    ));
}

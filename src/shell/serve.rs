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
use crate::core::nbd::handshake::ExportInfo;
use crate::shell::buffers::BufferPool;
use crate::shell::disk::open_backing;
use crate::shell::nbd_server::{Export, SplitStream, serve_connection};
use crate::shell::uring::Ring;
use crate::shell::volume::LocalVolume;

/// What `mirrordisk serve` was asked to do, already parsed.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub path: PathBuf,
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub name: String,
    pub read_only: bool,
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
    let backing = open_backing(&config.path, config.read_only).map_err(|e| e.to_string())?;
    let ring = Ring::new(backing.file.as_raw_fd()).map_err(|e| e.to_string())?;
    let std_tcp = match config.listen {
        Some(addr) => Some(bind_tcp(addr)?),
        None => None,
    };
    let std_unix = match &config.unix {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let info = ExportInfo {
        name: config.name.clone(),
        description: format!("mirrordisk serve {}", config.path.display()),
        size_bytes: backing.size_bytes,
        read_only: config.read_only,
        block_size_min_bytes: backing.logical_block_bytes,
        block_size_preferred_bytes: NBD_BLOCK_SIZE_PREFERRED_BYTES.max(backing.logical_block_bytes),
        block_size_max_bytes: NBD_PAYLOAD_BYTES_MAX,
        refusal: None,
    };
    info!(
        path = %config.path.display(),
        size_bytes = backing.size_bytes,
        direct_io = backing.direct_io,
        logical_block_bytes = backing.logical_block_bytes,
        "serving"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, async move {
        let pool = BufferPool::new(BUFFER_POOL_BYTES_MAX);
        let volume = Rc::new(LocalVolume::new(backing, ring, pool));
        let export = Rc::new(Export {
            info,
            volume: volume.clone(),
        });
        let ring_task = tokio::task::spawn_local(drive_ring(volume.clone()));
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
        volume.flush_submissions();
        ring_task.abort();
        // Everything acknowledged is durable before we exit, FUA or not.
        let fd = volume.backing().file.as_raw_fd();
        // SAFETY: fd is the backing's open descriptor, owned by `volume`, alive here.
        if unsafe { libc::fdatasync(fd) } != 0 {
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

/// Waits for the ring's completion queue to become non-empty and processes it. The
/// ring fd is pollable; completions that happen inline during a submit are handled by
/// `flush_submissions` directly, so this task only sees truly asynchronous ones.
async fn drive_ring(volume: Rc<LocalVolume>) {
    // SAFETY: the ring fd belongs to `volume.ring`, which this task keeps alive (it owns
    // an `Rc` to the volume) for as long as the `AsyncFd` exists, and never replaces.
    let fd =
        unsafe { AsyncFd::register_with_interest(RingFd(volume.ring_fd()), Interest::READABLE) }
            .unwrap_or_else(|e| panic!("registering the io_uring fd with the reactor: {e}"));
    loop {
        let mut guard = fd.readable().await.expect("polling the io_uring fd");
        // Clear first, then drain: a completion posted after the drain raises a new edge.
        guard.clear_ready();
        volume.process_completions();
        volume.flush_submissions();
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

//! Agent start-up: everything that can fail before the agent writes anything. The
//! configuration is parsed, the node chosen, the secret read and checked, every
//! mirror's devices opened and their CLUSTER partitions read and recovered in memory,
//! and every socket bound. Only then does the data plane start (the first metadata
//! write is the engine's post-recovery snapshot). Any failure is one message naming
//! the field or the file, and leaves nothing behind.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::info;

use crate::config::{self, Config, Mirror, MirrorSide, Node};
use crate::core::meta::{Layout, MetaEngine, Placement};
use crate::core::repl::ClusterSecret;
use crate::shell::agent::AgentArgs;
use crate::shell::disk::{Backing, open_backing};
use crate::shell::metadata::{has_metadata, read_area};

/// Everything the agent needs to run, opened and bound.
#[derive(Debug)]
pub struct Plan {
    pub node: Node,
    pub peer: Node,
    pub secret: ClusterSecret,
    pub mirrors: Vec<MirrorPlan>,
    pub admin_listener: std::os::unix::net::UnixListener,
}

impl Plan {
    /// Unix socket files the agent created (removed at exit).
    pub fn unix_sockets(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.node.admin_socket.clone()];
        paths.extend(self.mirrors.iter().filter_map(|m| m.side.nbd_unix.clone()));
        paths
    }
}

/// One mirror of this node, ready to run.
#[derive(Debug)]
pub struct MirrorPlan {
    pub config: Mirror,
    pub side: MirrorSide,
    pub peer_side: MirrorSide,
    pub disk: DiskPlan,
    pub nbd_tcp: Option<std::net::TcpListener>,
    pub nbd_unix: Option<std::os::unix::net::UnixListener>,
    /// One listener per mirror-connect path, in path order.
    pub replication: Vec<std::net::TcpListener>,
}

/// A mirror's disk: opened, its metadata recovered (in memory only).
#[derive(Debug)]
pub struct DiskPlan {
    pub backing: Backing,
    /// The CLUSTER partition's device when it is not the data device.
    pub meta_device: Option<Backing>,
    pub meta: MetaEngine,
    pub layout: Layout,
}

/// Reads and checks everything, then binds every socket.
pub fn plan(args: &AgentArgs) -> Result<Plan, String> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| format!("--config {}: {e}", args.config.display()))?;
    let config = config::parse(&text).map_err(|e| format!("{}: {e}", args.config.display()))?;
    let hostname = hostname();
    let node = choose_node(&config, args.node.as_deref(), &hostname)?.clone();
    let peer = config
        .peer_of(&node.name)
        .expect("a validated config has two nodes")
        .clone();
    let secret = read_secret(&config.secret_file)?;
    if config.mirrors.is_empty() {
        return Err(format!(
            "{}: no [[mirror]] is configured: nothing to run",
            args.config.display()
        ));
    }
    for mirror in &config.mirrors {
        if let Some(hook) = &mirror.split_brain_hook {
            check_hook(hook).map_err(|e| {
                format!(
                    "mirror {}: split_brain_hook {}: {e}",
                    mirror.name,
                    hook.display()
                )
            })?;
        }
    }
    let mut disks = Vec::new();
    for mirror in &config.mirrors {
        disks.push(open_disk(mirror, &node, &peer)?);
    }
    // Sockets last: a failure above leaves no socket file behind.
    let mut created: Vec<PathBuf> = Vec::new();
    let bound = bind_all(&config, &node, &peer, disks, &mut created);
    match bound {
        Ok((mirrors, admin_listener)) => Ok(Plan {
            node,
            peer,
            secret,
            mirrors,
            admin_listener,
        }),
        Err(error) => {
            for path in created {
                let _ = std::fs::remove_file(path);
            }
            Err(error)
        }
    }
}

fn bind_all(
    config: &Config,
    node: &Node,
    peer: &Node,
    disks: Vec<DiskPlan>,
    created: &mut Vec<PathBuf>,
) -> Result<(Vec<MirrorPlan>, std::os::unix::net::UnixListener), String> {
    let mut mirrors = Vec::new();
    for (mirror, disk) in config.mirrors.iter().zip(disks) {
        let side = mirror.sides[&node.name].clone();
        let peer_side = mirror.sides[&peer.name].clone();
        let field = |what: &str| format!("mirror {}: node.{}.{what}", mirror.name, node.name);
        let nbd_tcp = match side.nbd_listen {
            Some(addr) => {
                Some(bind_tcp(addr).map_err(|e| format!("{} {addr}: {e}", field("nbd_listen")))?)
            }
            None => None,
        };
        let nbd_unix = match &side.nbd_unix {
            Some(path) => {
                let listener = bind_unix(path)
                    .map_err(|e| format!("{} {}: {e}", field("nbd_unix"), path.display()))?;
                created.push(path.clone());
                Some(listener)
            }
            None => None,
        };
        let mut replication = Vec::new();
        for addr in &side.replication {
            replication.push(
                bind_tcp(*addr).map_err(|e| format!("{} {addr}: {e}", field("replication")))?,
            );
        }
        mirrors.push(MirrorPlan {
            config: mirror.clone(),
            side,
            peer_side,
            disk,
            nbd_tcp,
            nbd_unix,
            replication,
        });
    }
    let admin_listener = bind_unix(&node.admin_socket).map_err(|e| {
        format!(
            "node {}: admin_socket {}: {e}",
            node.name,
            node.admin_socket.display()
        )
    })?;
    created.push(node.admin_socket.clone());
    // Only root (the agent's user) may drive the agent: activate, deactivate, rebuild.
    std::fs::set_permissions(&node.admin_socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("admin_socket {}: {e}", node.admin_socket.display()))?;
    Ok((mirrors, admin_listener))
}

/// The node this agent runs as: `--node`, or else the one configured node named like
/// this host.
pub fn choose_node<'a>(
    config: &'a Config,
    requested: Option<&str>,
    hostname: &str,
) -> Result<&'a Node, String> {
    let names = || {
        config
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match requested {
        Some(name) => config.node(name).ok_or_else(|| {
            format!(
                "--node {name}: not a node of this cluster (configured: {})",
                names()
            )
        }),
        None => {
            let matching: Vec<&Node> = config.nodes.iter().filter(|n| n.name == hostname).collect();
            match matching.as_slice() {
                [one] => Ok(one),
                _ => Err(format!(
                    "--node is required: no configured node is named after this host ({hostname:?}); configured: {}",
                    names()
                )),
            }
        }
    }
}

/// This host's name (gethostname), or empty if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`, which is live.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The split-brain hook must be an executable regular file now, not only when a split
/// brain happens (when nobody is looking).
pub fn check_hook(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable (chmod +x it)".into());
    }
    Ok(())
}

/// Reads the cluster secret. The file must be a regular file that only its owner may
/// read or write (mode 0600 or stricter, like an ssh private key): a secret others can
/// read is no secret. Trailing newlines are ignored so `echo`-made and editor-made
/// files agree. The secret's bytes are never logged.
pub fn read_secret(path: &Path) -> Result<ClusterSecret, String> {
    let field = format!("cluster.secret_file {}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| format!("{field}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{field}: not a regular file"));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{field}: {e}"))?;
    secret_from(bytes, meta.permissions().mode()).map_err(|e| format!("{field}: {e}"))
}

/// The pure part of [`read_secret`]: permission bits and contents.
pub fn secret_from(mut bytes: Vec<u8>, mode: u32) -> Result<ClusterSecret, String> {
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {:04o} lets other users read or change it; make it owner-only (chmod 600)",
            mode & 0o7777
        ));
    }
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    ClusterSecret::new(bytes).map_err(|e| e.to_string())
}

/// Opens one mirror's devices and recovers its metadata in memory.
fn open_disk(mirror: &Mirror, node: &Node, peer: &Node) -> Result<DiskPlan, String> {
    let side = &mirror.sides[&node.name];
    let what = format!("mirror {} (node.{})", mirror.name, node.name);
    let meta_path = side.metadata.as_deref().unwrap_or(&side.device);
    let probe =
        File::open(meta_path).map_err(|e| format!("{what}: {}: {e}", meta_path.display()))?;
    if probe.metadata().is_ok_and(|m| {
        let t = m.file_type();
        !t.is_file() && !t.is_block_device()
    }) {
        return Err(format!(
            "{what}: {}: not a regular file or block device",
            meta_path.display()
        ));
    }
    let present =
        has_metadata(&probe).map_err(|e| format!("{what}: {}: {e}", meta_path.display()))?;
    if !present {
        return Err(format!(
            "{what}: {} has no mirrordisk metadata (run `mirrorctl create` on it first)",
            meta_path.display()
        ));
    }
    let (area, picked) =
        read_area(&probe, 0).map_err(|e| format!("{what}: {}: {e}", meta_path.display()))?;
    drop(probe);
    let sb = &picked.superblock;
    let layout = sb.layout;
    let internal = layout.placement == Placement::Internal;
    if internal && side.metadata.is_some() {
        return Err(format!(
            "{what}: metadata {}: this metadata belongs at the head of its data device",
            meta_path.display()
        ));
    }
    if !internal && side.metadata.is_none() {
        return Err(format!(
            "{what}: device {}: holds external metadata; configure it as `metadata` and name the data device",
            side.device.display()
        ));
    }
    check_identity(
        &what,
        meta_path,
        &mirror.name,
        &sb.name,
        (sb.identity.node_id, sb.identity.peer_node_id),
        node,
        peer,
    )?;
    let (meta, report) = MetaEngine::recover(&area, None)
        .map_err(|e| format!("{what}: {}: {e}", meta_path.display()))?;
    info!(
        mirror = mirror.name,
        superblock_copy = ?report.superblock_copy,
        al_hot_extents = report.al_hot_extents,
        dirty_regions = report.dirty_regions,
        "metadata recovered"
    );
    let backing = open_backing(&side.device, false).map_err(|e| format!("{what}: {e}"))?;
    if layout.data_offset + layout.data_bytes > backing.size_bytes {
        return Err(format!(
            "{what}: {}: {} bytes, smaller than the data partition its metadata records ({} + {})",
            side.device.display(),
            backing.size_bytes,
            layout.data_offset,
            layout.data_bytes
        ));
    }
    if backing.logical_block_bytes > layout.logical_block_bytes {
        return Err(format!(
            "{what}: {}: logical block {} bytes, larger than the {} the metadata was created for",
            side.device.display(),
            backing.logical_block_bytes,
            layout.logical_block_bytes
        ));
    }
    let meta_device = if internal {
        None
    } else {
        Some(open_backing(meta_path, false).map_err(|e| format!("{what}: {e}"))?)
    };
    Ok(DiskPlan {
        backing,
        meta_device,
        meta,
        layout,
    })
}

/// The disk must have been created for this mirror, as this node, paired with the
/// configured peer: anything else is a wrong device in the configuration.
pub fn check_identity(
    what: &str,
    path: &Path,
    mirror: &str,
    on_disk_name: &str,
    (node_id, peer_id): (u32, u32),
    node: &Node,
    peer: &Node,
) -> Result<(), String> {
    let path = path.display();
    if on_disk_name != mirror {
        return Err(format!(
            "{what}: {path} holds mirror {on_disk_name:?}, not {mirror:?}"
        ));
    }
    if node_id != node.id {
        return Err(format!(
            "{what}: {path} was created for node id {node_id}, but node {} has id {} (mirrorctl create --node {})",
            node.name, node.id, node.id
        ));
    }
    if peer_id != peer.id {
        return Err(format!(
            "{what}: {path} was created with peer id {peer_id}, but the peer {} has id {} (mirrorctl create --peer {})",
            peer.name, peer.id, peer.id
        ));
    }
    Ok(())
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Binds a unix socket, replacing a stale socket file nobody listens on, but never
/// another kind of file or a socket someone serves.
pub fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err("exists and is not a socket".into());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err("another process is listening there (is an agent already running?)".into());
        }
        std::fs::remove_file(path).map_err(|e| e.to_string())?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[cluster]
name = "t"
secret_file = "/nonexistent"

[[node]]
name = "alpha"
id = 1
admin_socket = "/tmp/a.sock"

[[node]]
name = "beta"
id = 2
admin_socket = "/tmp/b.sock"
"#;

    #[test]
    fn the_shipped_examples_parse() {
        let example = include_str!("../../../tools/example-cluster.toml");
        let config = config::parse(example).unwrap();
        assert_eq!(config.mirrors[0].sides["alpha"].replication.len(), 2);
        let doc = include_str!("../../../docs/configuration.md");
        let start = doc.find("```toml\n").expect("a toml example") + "```toml\n".len();
        let end = start + doc[start..].find("```").expect("closed");
        config::parse(&doc[start..end]).unwrap();
    }

    #[test]
    fn explicit_node_is_used_or_named_in_the_error() {
        let config = config::parse(CONFIG).unwrap();
        assert_eq!(choose_node(&config, Some("beta"), "x").unwrap().id, 2);
        let e = choose_node(&config, Some("gamma"), "x").unwrap_err();
        assert!(
            e.contains("--node gamma") && e.contains("alpha, beta"),
            "{e}"
        );
    }

    #[test]
    fn hostname_picks_the_node_only_when_it_matches_one() {
        let config = config::parse(CONFIG).unwrap();
        assert_eq!(choose_node(&config, None, "alpha").unwrap().name, "alpha");
        let e = choose_node(&config, None, "gamma").unwrap_err();
        assert!(
            e.contains("--node is required") && e.contains("gamma"),
            "{e}"
        );
    }

    #[test]
    fn secret_must_be_owner_only() {
        let bytes = b"0123456789abcdef0123".to_vec();
        assert!(secret_from(bytes.clone(), 0o100600).is_ok());
        assert!(secret_from(bytes.clone(), 0o100400).is_ok());
        let e = secret_from(bytes.clone(), 0o100644).unwrap_err();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        assert!(
            secret_from(bytes, 0o100640).is_err(),
            "group-readable refused"
        );
    }

    #[test]
    fn secret_ignores_trailing_newlines_and_checks_length() {
        let a = secret_from(b"0123456789abcdef\n".to_vec(), 0o600).unwrap();
        let b = secret_from(b"0123456789abcdef".to_vec(), 0o600).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let e = secret_from(b"short\n".to_vec(), 0o600).unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
        assert!(!format!("{a:?}").contains("0123"), "never printed");
    }

    #[test]
    fn identity_mismatches_are_named() {
        let config = config::parse(CONFIG).unwrap();
        let (alpha, beta) = (&config.nodes[0], &config.nodes[1]);
        let p = Path::new("/dev/x");
        assert!(check_identity("m", p, "db", "db", (1, 2), alpha, beta).is_ok());
        let e = check_identity("m", p, "db", "db", (2, 1), alpha, beta).unwrap_err();
        assert!(e.contains("node id 2") && e.contains("--node 1"), "{e}");
        let e = check_identity("m", p, "db", "db", (1, 3), alpha, beta).unwrap_err();
        assert!(e.contains("peer id 3"), "{e}");
        let e = check_identity("m", p, "db", "other", (1, 2), alpha, beta).unwrap_err();
        assert!(e.contains("\"other\""), "{e}");
    }
}

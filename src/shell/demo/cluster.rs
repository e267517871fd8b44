//! The demo's two-node cluster on loopback: a folder with two sparse disk files made
//! by `mirrorctl create --blank`'s code, a secret, a configuration on free ports, and
//! two `mirrordisk agent` child processes of the current executable. Talks to the
//! agents over their admin sockets, like `mirrorctl`. Dropping a `Cluster` stops the
//! agents that still run (SIGTERM, then SIGKILL) and removes a temporary folder.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Deadline, interrupted};
use crate::core::meta::{AL_SLOT_COUNT_DEFAULT, GRANULARITY_BYTES_DEFAULT};
use crate::shell::agent::admin::{Request, call};
use crate::shell::agent::random_bytes;
use crate::shell::agent::status::{MirrorStatus, NodeStatus};
use crate::shell::mirrorctl::{CreateArgs, create, inspect_device};

/// The mirror's name, which is also the NBD export name.
pub const MIRROR: &str = "db";
/// A unix socket path must fit `sockaddr_un.sun_path` (108 bytes with its NUL).
const UNIX_PATH_BYTES_MAX: usize = 107;
/// Admin requests that answer at once (status, break, verify's start).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the state of the agents is polled while waiting for something.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of an agent's log shown when something goes wrong.
const LOG_TAIL_LINES: usize = 15;
/// How long a child agent gets to exit after SIGTERM when cleaning up before SIGKILL.
const CLEANUP_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One node of the demo cluster.
#[derive(Debug)]
pub struct Node {
    pub name: &'static str,
    pub id: u32,
    pub disk: PathBuf,
    pub admin_socket: PathBuf,
    pub nbd: SocketAddr,
    pub replication: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// The folder, the files and the agents.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    /// Remove `dir` when done (it was made by the demo, not given with --dir).
    temporary: bool,
    pub config: PathBuf,
    pub nodes: [Node; 2],
    /// Where the data partition starts in each disk file, and its size.
    pub data_offset: u64,
    pub data_bytes: u64,
    exe: PathBuf,
}

/// `count` distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
fn free_addresses(count: usize) -> Result<Vec<SocketAddr>, String> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map_err(|e| e.to_string()))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes the folder: the one given (created if missing, refused unless empty), or a
/// new one under the system's temporary folder.
fn make_dir(given: Option<&Path>) -> Result<(PathBuf, bool), String> {
    if let Some(dir) = given {
        std::fs::create_dir_all(dir).map_err(|e| format!("--dir {}: {e}", dir.display()))?;
        let mut entries =
            std::fs::read_dir(dir).map_err(|e| format!("--dir {}: {e}", dir.display()))?;
        if entries.next().is_some() {
            return Err(format!(
                "--dir {} is not empty; give a new or empty folder (the demo writes its disks, configuration and logs there)",
                dir.display()
            ));
        }
        let dir =
            std::fs::canonicalize(dir).map_err(|e| format!("--dir {}: {e}", dir.display()))?;
        return Ok((dir, false));
    }
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let mut suffix = [0u8; 4];
        random_bytes(&mut suffix);
        let dir = base.join(format!("mirrordisk-demo.{}", hex(&suffix)));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((dir, true)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot make a folder in {}: {e}", base.display())),
        }
    }
    Err(format!("cannot make a new folder in {}", base.display()))
}

impl Cluster {
    /// Makes the folder and everything in it; starts nothing. On error, a temporary
    /// folder is removed again.
    pub fn create(dir: Option<&Path>, disk_bytes: u64) -> Result<Cluster, String> {
        let (dir, temporary) = make_dir(dir)?;
        let made = Cluster::fill(dir.clone(), temporary, disk_bytes);
        if made.is_err() && temporary {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }

    fn fill(dir: PathBuf, temporary: bool, disk_bytes: u64) -> Result<Cluster, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this program's executable: {e}"))?;
        let addresses = free_addresses(4)?;
        let node = |name: &'static str, id: u32, nbd: SocketAddr, replication: SocketAddr| Node {
            name,
            id,
            disk: dir.join(format!("{name}.img")),
            admin_socket: dir.join(format!("{name}.sock")),
            nbd,
            replication,
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        let nodes = [
            node("alpha", 1, addresses[0], addresses[1]),
            node("beta", 2, addresses[2], addresses[3]),
        ];
        for n in &nodes {
            if n.admin_socket.as_os_str().len() > UNIX_PATH_BYTES_MAX {
                return Err(format!(
                    "the folder path {} is too long for a unix socket in it; use a shorter --dir",
                    dir.display()
                ));
            }
        }
        let mut cluster = Cluster {
            config: dir.join("cluster.toml"),
            dir,
            temporary,
            nodes,
            data_offset: 0,
            data_bytes: 0,
            exe,
        };
        let secret = cluster.dir.join("secret");
        let mut key = [0u8; 32];
        random_bytes(&mut key);
        write_new(&secret, format!("{}\n", hex(&key)).as_bytes(), 0o600)?;
        for n in &cluster.nodes {
            let peer = 3 - n.id;
            let file = write_new(&n.disk, &[], 0o644)?;
            file.set_len(disk_bytes)
                .map_err(|e| format!("{}: {e}", n.disk.display()))?;
            drop(file);
            create(&CreateArgs {
                device: n.disk.clone(),
                mirror: MIRROR.to_string(),
                node: n.id,
                peer,
                metadata: None,
                data_bytes: None,
                cluster_bytes: None,
                granularity_bytes: GRANULARITY_BYTES_DEFAULT,
                al_slot_count: AL_SLOT_COUNT_DEFAULT,
                mirror_uuid: None,
                force: false,
                blank: true,
            })
            .map_err(|e| format!("{}: {e}", n.disk.display()))?;
        }
        let layouts = cluster
            .nodes
            .iter()
            .map(|n| inspect_device(&n.disk, false).map(|r| r.view.layout))
            .collect::<Result<Vec<_>, _>>()?;
        assert_eq!(
            (layouts[0].data_offset, layouts[0].data_bytes),
            (layouts[1].data_offset, layouts[1].data_bytes),
            "two disks of one size get one layout"
        );
        cluster.data_offset = layouts[0].data_offset;
        cluster.data_bytes = layouts[0].data_bytes;
        let text = cluster.config_text(&secret);
        // The configuration is ours, so a refusal is a bug in the demo; say so clearly.
        crate::config::parse(&text)
            .map_err(|e| format!("the demo wrote a bad configuration: {e}"))?;
        write_new(&cluster.config, text.as_bytes(), 0o644)?;
        Ok(cluster)
    }

    fn config_text(&self, secret: &Path) -> String {
        let mut text = format!(
            "# Written by `mirrordisk demo`: two agents on one machine (see docs/configuration.md).\n\
             [cluster]\nname = \"demo\"\nsecret_file = \"{}\"\n",
            secret.display()
        );
        for n in &self.nodes {
            text.push_str(&format!(
                "\n[[node]]\nname = \"{}\"\nid = {}\nadmin_socket = \"{}\"\n",
                n.name,
                n.id,
                n.admin_socket.display()
            ));
        }
        text.push_str(&format!(
            "\n[[mirror]]\nname = \"{MIRROR}\"\nfencing = \"resource-only\"\npeer_timeout_ms = 5000\n"
        ));
        for n in &self.nodes {
            text.push_str(&format!(
                "\n[mirror.node.{}]\ndevice = \"{}\"\nreplication = [\"{}\"]\nnbd_listen = \"{}\"\n",
                n.name,
                n.disk.display(),
                n.replication,
                n.nbd
            ));
        }
        text
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// Starts node `index`'s agent; its output goes to its log file (appended).
    pub fn start(&mut self, index: usize) -> Result<(), String> {
        let node = &self.nodes[index];
        assert!(node.child.is_none(), "agent {} already runs", node.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("{}: {e}", node.log.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new(&self.exe);
        command
            .arg("agent")
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(node.name)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C in the terminal reaches the demo only,
            // which then stops the agents in order.
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // two system calls (prctl, getppid), both async-signal-safe; it touches no
        // memory of the parent's.
        unsafe {
            command.pre_exec(|| {
                // If the demo dies without cleaning up (SIGKILL), its agents get
                // SIGTERM and stop cleanly instead of running on forever.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The demo may have died before prctl: then the parent is init.
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("the demo exited"));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {} agent: {e}", self.exe.display()))?;
        self.nodes[index].child = Some(child);
        Ok(())
    }

    /// Errors if an agent that was started has exited on its own.
    pub fn check_alive(&mut self) -> Result<(), String> {
        for node in &mut self.nodes {
            let Some(child) = node.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                return Err(format!(
                    "agent {} exited unexpectedly ({})",
                    node.name,
                    describe_exit(status)
                ));
            }
        }
        Ok(())
    }

    /// Node `index`'s status, as `mirrorctl status --json` shows it.
    pub fn node_status(&self, index: usize) -> Result<NodeStatus, String> {
        let node = &self.nodes[index];
        let response = call(&node.admin_socket, &Request::Status {}, ADMIN_TIMEOUT)?;
        if !response.ok {
            return Err(response.error.unwrap_or_else(|| "status refused".into()));
        }
        response
            .status
            .ok_or_else(|| format!("agent {}: status without a status", node.name))
    }

    /// The demo mirror's status on node `index`.
    pub fn status(&self, index: usize) -> Result<MirrorStatus, String> {
        let status = self.node_status(index)?;
        status
            .mirrors
            .into_iter()
            .find(|m| m.name == MIRROR)
            .ok_or_else(|| format!("agent {}: no mirror {MIRROR}", self.nodes[index].name))
    }

    /// Sends an admin request to node `index`; the agent's message, or its refusal.
    pub fn admin(
        &self,
        index: usize,
        request: Request,
        timeout: Duration,
    ) -> Result<String, String> {
        let node = &self.nodes[index];
        let response = call(&node.admin_socket, &request, timeout)?;
        if response.ok {
            Ok(response.message.unwrap_or_default())
        } else {
            Err(format!(
                "agent {} refused: {}",
                node.name,
                response.error.unwrap_or_default()
            ))
        }
    }

    /// Polls until `done` says yes, the step's deadline passes (an error naming `what`
    /// and both nodes' states) or the demo is interrupted. An agent that exits
    /// meanwhile ends the wait with an error at once.
    pub fn wait_until(
        &mut self,
        what: &str,
        deadline: &Deadline,
        mut done: impl FnMut(&Cluster) -> Result<bool, String>,
    ) -> Result<(), String> {
        let started = Instant::now();
        loop {
            interrupted()?;
            self.check_alive()?;
            let last_error = match done(self) {
                Ok(true) => return Ok(()),
                Ok(false) => None,
                Err(e) => Some(e),
            };
            if deadline.passed() {
                let detail = last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                return Err(format!(
                    "timed out after {:.1} s waiting for {what}{detail}; {}",
                    started.elapsed().as_secs_f64(),
                    self.summary()
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// One line per running node: role, disk, connection, dirty bytes.
    pub fn summary(&self) -> String {
        (0..2)
            .map(|i| {
                let name = self.nodes[i].name;
                if self.nodes[i].child.is_none() {
                    return format!("{name}: not running");
                }
                match self.status(i) {
                    Ok(m) => format!("{name}: {}", describe(&m)),
                    Err(e) => format!("{name}: status failed: {e}"),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Stops node `index`'s agent with SIGTERM and waits (bounded) for it to exit.
    pub fn stop(&mut self, index: usize, timeout: Duration) -> Result<ExitStatus, String> {
        let name = self.nodes[index].name;
        let child = self.nodes[index]
            .child
            .as_mut()
            .ok_or_else(|| format!("agent {name} is not running"))?;
        let pid = Pid::from_raw(child.id() as i32);
        // Our own unreaped child: the pid cannot have been reused.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.nodes[index].child = None;
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.nodes[index].child = None;
                    return Err(format!(
                        "agent {name} did not exit within {} s of SIGTERM (killed)",
                        timeout.as_secs()
                    ));
                }
                Err(e) => return Err(format!("agent {name}: {e}")),
            }
        }
    }

    /// Stops every agent still running, without judging how they exit. For cleanup.
    pub fn stop_all(&mut self) {
        for index in 0..2 {
            if self.nodes[index].child.is_some() {
                let _ = self.stop(index, CLEANUP_STOP_TIMEOUT);
            }
        }
    }

    /// Whether any agent still runs.
    pub fn any_running(&self) -> bool {
        self.nodes.iter().any(|n| n.child.is_some())
    }

    /// The last lines of node `index`'s log, as text to append to an error (empty if
    /// there is no log).
    pub fn log_tail(&self, index: usize) -> String {
        let node = &self.nodes[index];
        let Ok(mut file) = File::open(&node.log) else {
            return String::new();
        };
        // The tail of a large log is in its last 64 KiB.
        let length = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(64 << 10)));
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        if tail.is_empty() {
            return String::new();
        }
        format!(
            "\n---- last lines of {} ----\n{}",
            node.log.display(),
            tail.join("\n")
        )
    }

    /// Stops what still runs and removes a temporary folder, saying if that failed.
    pub fn finish(mut self) -> Result<(), String> {
        self.stop_all();
        if self.temporary {
            self.temporary = false;
            std::fs::remove_dir_all(&self.dir)
                .map_err(|e| format!("cannot remove {}: {e}", self.dir.display()))?;
        }
        Ok(())
    }

    /// Whether the folder is removed at the end.
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A mirror's state in a few words.
pub fn describe(m: &MirrorStatus) -> String {
    let mut text = format!("{}, {}, {}", m.role, m.disk_state, m.connection.state);
    if let Some(r) = &m.resync {
        text.push_str(&format!(", resync {} {} bytes done", r.role, r.done_bytes));
    }
    if m.dirty_bytes > 0 {
        text.push_str(&format!(", {} dirty bytes", m.dirty_bytes));
    }
    if let Some(problem) = &m.problem {
        text.push_str(&format!(", problem: {problem}"));
    }
    text
}

pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Creates a new file (refusing to overwrite) with `mode`, holding `content`.
fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<File, String> {
    use std::io::Write;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(content)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(file)
}

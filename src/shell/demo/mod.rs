//! `mirrordisk demo`: the whole product in half a minute, with no configuration. Two
//! node agents on loopback with file-backed disks in a temporary folder; a workload
//! through the active node's NBD export; a planned failover; an outage of the other
//! node with writes journaled meanwhile; its return and the differential rebuild; an
//! online verify; a byte-for-byte comparison of both data partitions; and a report.
//!
//! - `cluster`: the folder, disks, configuration and the two agent processes.
//! - `nbd_client`: a small blocking NBD client for the workload.
//! - `workload`: what is written where, and what every block must then hold (pure).
//!
//! Every step has a time limit and fails with an error naming it; on any failure, and
//! on Ctrl-C (SIGINT, also SIGTERM and SIGHUP), the agents are stopped and a temporary
//! folder is removed. With `--keep-running` the cluster stays up after the report
//! until Ctrl-C.

pub mod cluster;
pub mod nbd_client;
pub mod workload;

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::constants::MIB;
use crate::shell::agent::admin::Request;
use crate::shell::agent::status::{MirrorStatus, human_bytes, human_ms};
use cluster::{Cluster, MIRROR, describe, describe_exit};
use nbd_client::NbdClient;
use workload::{
    Model, OUTAGE_WRITE_BYTES, SEQUENTIAL_WRITE_BYTES, VERSION_SEQUENTIAL, Write, first_difference,
    first_workload, outage_workload,
};

/// Smallest disk the demo accepts: room for the CLUSTER partition and a workload that
/// still shows something.
pub const SIZE_BYTES_MIN: u64 = 32 * MIB;
/// Largest: the files are sparse, but the final comparison reads both data partitions
/// and the time limits assume a few hundred MB/s.
pub const SIZE_BYTES_MAX: u64 = 64 * 1024 * MIB;
pub const SIZE_DEFAULT: &str = "256M";

/// Until both agents answer on their admin sockets.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Until two fresh agents are connected and in sync (a few handshake round trips).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// One activate or deactivate (they answer once the new role is durable).
const ROLE_CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Any one NBD socket operation.
const NBD_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// An agent's exit after SIGTERM: it deactivates (up to 30 s, see
/// `SHUTDOWN_DEACTIVATE_TIMEOUT_MS`) and waits for in-flight I/O (10 s).
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(45);
/// Steps whose work grows with the data: this much, plus the bytes at this rate (well
/// below what loopback and a page cache do, so a busy machine still makes it).
const STEP_TIMEOUT_BASE: Duration = Duration::from_secs(60);
const STEP_BYTES_PER_S_MIN: u64 = 10 * MIB;
/// `--keep-running`: how often the agents are checked while waiting for Ctrl-C.
const KEEP_RUNNING_POLL: Duration = Duration::from_millis(200);

/// What `mirrordisk demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    /// Work in this folder (created if missing, must be empty) and keep it afterwards.
    pub dir: Option<PathBuf>,
    /// Size of each disk file.
    pub size_bytes: u64,
    /// Leave the cluster up after the report until Ctrl-C.
    pub keep_running: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (and SIGTERM, SIGHUP) set a flag that every wait and every step checks.
fn install_signal_handlers() -> Result<(), String> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe,
        // and no other handler for these signals is installed in this process.
        unsafe { sigaction(signal, &action) }
            .map_err(|e| format!("cannot handle {signal}: {e}"))?;
    }
    Ok(())
}

fn interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted (Ctrl-C)".into())
    } else {
        Ok(())
    }
}

/// A step's time limit.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: Instant,
    at: Instant,
}

impl Deadline {
    fn new(timeout: Duration) -> Deadline {
        let start = Instant::now();
        Deadline {
            start,
            at: start + timeout,
        }
    }

    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// An error if interrupted or past the limit.
    pub fn check(&self) -> Result<(), String> {
        interrupted()?;
        if self.passed() {
            return Err(format!(
                "timed out after {:.0} s",
                (self.at - self.start).as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// The time limit of a step that moves `bytes`.
fn timeout_for(bytes: u64) -> Duration {
    STEP_TIMEOUT_BASE + Duration::from_secs(bytes / STEP_BYTES_PER_S_MIN)
}

/// Runs one numbered step: prints its name, runs it, prints how long it took and what
/// it found. A failure names the step.
fn step(
    number: &mut usize,
    name: &str,
    timeout: Duration,
    f: impl FnOnce(&Deadline) -> Result<String, String>,
) -> Result<Duration, String> {
    *number += 1;
    print!("{:>3}. {name:<40}", *number);
    let _ = std::io::stdout().flush();
    let deadline = Deadline::new(timeout);
    let result = f(&deadline);
    let elapsed = deadline.start.elapsed();
    match result {
        Ok(detail) => {
            println!(" {:>9}  {detail}", human_ms(elapsed.as_millis() as u64));
            Ok(elapsed)
        }
        Err(error) => {
            println!(" FAILED after {}", human_ms(elapsed.as_millis() as u64));
            Err(format!("demo step {} ({name}) failed: {error}", *number))
        }
    }
}

/// What the steps found, for the report.
#[derive(Debug, Default)]
struct Facts {
    first_writes: u64,
    first_bytes: u64,
    first_rate_bytes_per_s: u64,
    readback_bytes: u64,
    failover: Duration,
    outage_writes: u64,
    outage_bytes: u64,
    outage_dirty_bytes: u64,
    rebuild: Duration,
    rebuild_decision: String,
    resync_bytes_sent: u64,
    verified_bytes: u64,
    differing_regions: u64,
    compared_bytes: u64,
    final_states: String,
}

/// Runs the demo; see the module documentation.
pub fn run(args: DemoArgs) -> Result<(), String> {
    if !(SIZE_BYTES_MIN..=SIZE_BYTES_MAX).contains(&args.size_bytes) {
        return Err(format!(
            "--size {} bytes ({}) is out of range: give {} to {} (e.g. 256M, 1G)",
            args.size_bytes,
            human_bytes(args.size_bytes),
            human_bytes(SIZE_BYTES_MIN),
            human_bytes(SIZE_BYTES_MAX)
        ));
    }
    install_signal_handlers()?;
    let started = Instant::now();
    println!(
        "mirrordisk demo: two nodes (alpha, beta) on 127.0.0.1, {} file-backed disks, one mirror \"{MIRROR}\"",
        human_bytes(args.size_bytes)
    );
    let mut cluster: Option<Cluster> = None;
    let mut facts = Facts::default();
    let outcome = run_steps(&args, &mut cluster, &mut facts);
    let Some(mut cluster) = cluster else {
        return outcome.map(|_| ());
    };
    let outcome = outcome.and_then(|mut number| {
        if args.keep_running {
            print_report(&cluster, &facts, started.elapsed());
            keep_running(&mut cluster)?;
        }
        step(
            &mut number,
            "stop both agents (SIGTERM)",
            AGENT_STOP_TIMEOUT * 2,
            |_| stop_both(&mut cluster),
        )?;
        if !args.keep_running {
            print_report(&cluster, &facts, started.elapsed());
        }
        Ok(())
    });
    match outcome {
        Ok(()) => {
            if cluster.is_temporary() {
                let dir = cluster.dir.clone();
                cluster.finish()?;
                println!("removed {}", dir.display());
            } else {
                println!(
                    "kept {} (disks, cluster.toml, agent logs)",
                    cluster.dir.display()
                );
            }
            Ok(())
        }
        Err(error) => {
            // The agents' last words, while their logs still exist.
            let logs = if INTERRUPTED.load(Ordering::SeqCst) {
                String::new()
            } else {
                format!("{}{}", cluster.log_tail(0), cluster.log_tail(1))
            };
            cluster.stop_all();
            let place = if cluster.is_temporary() {
                format!("removed {}", cluster.dir.display())
            } else {
                format!("kept {} for inspection", cluster.dir.display())
            };
            eprintln!("mirrordisk demo: stopped the agents; {place}{logs}");
            Err(error)
        }
    }
}

/// Every step up to the comparison; returns the number of the last step.
fn run_steps(
    args: &DemoArgs,
    slot: &mut Option<Cluster>,
    facts: &mut Facts,
) -> Result<usize, String> {
    let mut n = 0;
    step(&mut n, "create the disks", Duration::from_secs(30), |_| {
        let c = Cluster::create(args.dir.as_deref(), args.size_bytes)?;
        let detail = format!(
            "{}: alpha.img, beta.img ({} sparse files; CLUSTER partition {}, data partition {}; `mirrorctl create --blank`: in sync from the start)",
            c.dir.display(),
            human_bytes(args.size_bytes),
            human_bytes(c.data_offset),
            human_bytes(c.data_bytes),
        );
        *slot = Some(c);
        Ok(detail)
    })?;
    let c = slot.as_mut().expect("made by the first step");
    let data_bytes = c.data_bytes;
    let mut model = Model::new(data_bytes);

    step(&mut n, "start both agents", AGENT_START_TIMEOUT, |d| {
        c.start(0)?;
        c.start(1)?;
        c.wait_until("both admin sockets to answer", d, |c| {
            Ok(c.node_status(0).is_ok() && c.node_status(1).is_ok())
        })?;
        Ok(c.nodes
            .iter()
            .map(|node| {
                format!(
                    "{} pid {} (replication {}, NBD {})",
                    node.name,
                    node.pid().unwrap_or(0),
                    node.replication,
                    node.nbd
                )
            })
            .collect::<Vec<_>>()
            .join(", "))
    })?;

    step(
        &mut n,
        "wait until they connect in sync",
        CONNECT_TIMEOUT,
        |d| {
            c.wait_until("both nodes connected and UpToDate", d, |c| {
                Ok(in_sync(&c.status(0)?) && in_sync(&c.status(1)?))
            })?;
            Ok(format!(
                "alpha: {}; beta: {}",
                describe(&c.status(0)?),
                describe(&c.status(1)?)
            ))
        },
    )?;

    step(&mut n, "activate alpha", ROLE_CHANGE_TIMEOUT, |d| {
        activate(c, 0, d)
    })?;

    let first = first_workload(data_bytes);
    let first_bytes: u64 = first.iter().map(|w| w.length).sum();
    step(
        &mut n,
        "workload through alpha's NBD export",
        timeout_for(first_bytes),
        |d| {
            let mut client = NbdClient::connect(c.node(0).nbd, MIRROR, NBD_IO_TIMEOUT)?;
            check_export(&client, data_bytes)?;
            let started = Instant::now();
            write_all(&mut client, &first, &mut model, d)?;
            let elapsed = started.elapsed();
            client.disconnect()?;
            facts.first_writes = first.len() as u64;
            facts.first_bytes = first_bytes;
            facts.first_rate_bytes_per_s =
                (first_bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64;
            let sequential = first.iter().filter(|w| w.version == VERSION_SEQUENTIAL);
            Ok(format!(
                "{} writes, {}: {} in {} sequential, {} random 4 KiB; flushed; {}/s",
                first.len(),
                human_bytes(first_bytes),
                human_bytes(sequential.clone().count() as u64 * SEQUENTIAL_WRITE_BYTES),
                human_bytes(SEQUENTIAL_WRITE_BYTES),
                first.len() - sequential.count(),
                human_bytes(facts.first_rate_bytes_per_s)
            ))
        },
    )?;

    facts.failover = step(
        &mut n,
        "planned failover: alpha -> beta",
        ROLE_CHANGE_TIMEOUT * 2,
        |d| {
            let started = Instant::now();
            let message = c.admin(
                0,
                Request::Deactivate {
                    mirror: MIRROR.into(),
                },
                ROLE_CHANGE_TIMEOUT,
            )?;
            let deactivated = started.elapsed();
            // beta activates only once it knows alpha is inactive.
            c.wait_until("beta to see alpha inactive", d, |c| {
                Ok(c.status(1)?.peer.is_some_and(|p| p.role == "Secondary"))
            })?;
            activate(c, 1, d)?;
            Ok(format!(
                "{message}; alpha deactivated in {}, beta active after {}",
                human_ms(deactivated.as_millis() as u64),
                human_ms(started.elapsed().as_millis() as u64)
            ))
        },
    )?;

    let mut beta_client = None;
    let written = model.written_bytes();
    step(
        &mut n,
        "read everything back through beta",
        timeout_for(written),
        |d| {
            let mut client = NbdClient::connect(c.node(1).nbd, MIRROR, NBD_IO_TIMEOUT)?;
            check_export(&client, data_bytes)?;
            let (bytes, reads) = read_back(&mut client, &model, d)?;
            facts.readback_bytes = bytes;
            beta_client = Some(client);
            Ok(format!(
                "{} in {reads} reads: identical to what was written through alpha",
                human_bytes(bytes)
            ))
        },
    )?;
    let mut beta_client = beta_client.expect("set by the read-back step");

    step(
        &mut n,
        "outage: stop alpha's agent",
        AGENT_STOP_TIMEOUT + CONNECT_TIMEOUT,
        |d| {
            let status = c.stop(0, AGENT_STOP_TIMEOUT)?;
            if !status.success() {
                return Err(format!(
                    "alpha's agent stopped with {}",
                    describe_exit(status)
                ));
            }
            c.wait_until("beta to see the link down", d, |c| {
                Ok(c.status(1)?.connection.state == "disconnected")
            })?;
            Ok(format!(
                "alpha: {}; beta: {}, still serving its NBD client",
                describe_exit(status),
                describe(&c.status(1)?)
            ))
        },
    )?;

    let outage = outage_workload(data_bytes);
    let outage_bytes: u64 = outage.iter().map(|w| w.length).sum();
    step(
        &mut n,
        "write through beta while alpha is away",
        timeout_for(outage_bytes),
        |d| {
            write_all(&mut beta_client, &outage, &mut model, d)?;
            let beta = c.status(1)?;
            facts.outage_writes = outage.len() as u64;
            facts.outage_bytes = outage_bytes;
            facts.outage_dirty_bytes = beta.dirty_bytes;
            Ok(format!(
                "{} writes of {} at scattered places, {}, flushed; beta journaled {} as dirty",
                outage.len(),
                human_bytes(OUTAGE_WRITE_BYTES),
                human_bytes(outage_bytes),
                human_bytes(beta.dirty_bytes)
            ))
        },
    )?;

    let sent_before = resync_bytes_sent(&c.status(1)?);
    facts.rebuild = step(
        &mut n,
        "alpha returns: differential rebuild",
        AGENT_START_TIMEOUT + timeout_for(data_bytes),
        |d| {
            c.start(0)?;
            c.wait_until("alpha and beta back in sync", d, |c| {
                let (a, b) = (c.status(0)?, c.status(1)?);
                Ok(in_sync(&a) && in_sync(&b) && b.dirty_bytes == 0 && a.dirty_bytes == 0)
            })?;
            let (alpha, beta) = (c.status(0)?, c.status(1)?);
            facts.resync_bytes_sent = resync_bytes_sent(&beta).saturating_sub(sent_before);
            facts.rebuild_decision = alpha
                .decision
                .as_ref()
                .or(beta.decision.as_ref())
                .map(|d| d.text.clone())
                .unwrap_or_else(|| "no decision recorded".into());
            Ok(format!(
                "alpha pid {} is back; beta sent {} ({:.1} % of the volume); alpha: {}",
                c.node(0).pid().unwrap_or(0),
                human_bytes(facts.resync_bytes_sent),
                percent(facts.resync_bytes_sent, data_bytes),
                describe(&alpha)
            ))
        },
    )?;

    step(
        &mut n,
        "online verify (from beta)",
        timeout_for(data_bytes),
        |d| {
            let message = c.admin(
                1,
                Request::Verify {
                    mirror: MIRROR.into(),
                },
                ROLE_CHANGE_TIMEOUT,
            )?;
            let mut last = None;
            c.wait_until("the verify to end", d, |c| {
                let v = c.status(1)?.verify;
                let done = v.as_ref().is_some_and(|v| !v.running);
                last = v;
                Ok(done)
            })?;
            let v = last.expect("the wait saw a verify");
            if v.verified_bytes < v.total_bytes {
                return Err(format!(
                    "the verify stopped early: {} of {} bytes ({message})",
                    v.verified_bytes, v.total_bytes
                ));
            }
            if v.differing_regions > 0 {
                return Err(format!(
                    "the verify found {} differing regions ({} bytes)",
                    v.differing_regions, v.differing_bytes
                ));
            }
            facts.verified_bytes = v.verified_bytes;
            facts.differing_regions = v.differing_regions;
            Ok(format!(
                "{} compared by SHA-256 per region (only digests cross the link): 0 differing regions",
                human_bytes(v.verified_bytes)
            ))
        },
    )?;

    step(
        &mut n,
        "compare both data partitions",
        timeout_for(2 * data_bytes),
        |d| {
            beta_client.disconnect()?;
            let (a, b) = (c.status(0)?, c.status(1)?);
            facts.final_states = format!("alpha: {}; beta: {}", describe(&a), describe(&b));
            facts.compared_bytes = compare_partitions(c, &model, d)?;
            Ok(format!(
                "{} of alpha.img and beta.img at offset {}: identical, and equal to what was written",
                human_bytes(facts.compared_bytes),
                c.data_offset
            ))
        },
    )?;
    Ok(n)
}

/// Connected, both sides UpToDate, no resync running, nothing in flight.
fn in_sync(m: &MirrorStatus) -> bool {
    m.connection.state == "connected"
        && m.disk_state == "UpToDate"
        && m.resync.is_none()
        && m.peer.as_ref().is_some_and(|p| p.disk_state == "UpToDate")
}

fn resync_bytes_sent(m: &MirrorStatus) -> u64 {
    m.engine_stats
        .get("resync_bytes_sent")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Activates the mirror on node `index` and waits until its export is open.
fn activate(c: &mut Cluster, index: usize, d: &Deadline) -> Result<String, String> {
    let message = c.admin(
        index,
        Request::Activate {
            mirror: MIRROR.into(),
            forced: false,
        },
        ROLE_CHANGE_TIMEOUT,
    )?;
    c.wait_until("the export to open", d, |c| {
        Ok(c.status(index)?.export.open)
    })?;
    Ok(format!("{message}; nbd://{}/{MIRROR}", c.node(index).nbd))
}

fn check_export(client: &NbdClient, data_bytes: u64) -> Result<(), String> {
    if client.size_bytes() != data_bytes {
        return Err(format!(
            "the export has {} bytes, the data partition {data_bytes}",
            client.size_bytes()
        ));
    }
    if client.read_only() {
        return Err("the export is read-only".into());
    }
    Ok(())
}

/// Sends `writes` one at a time, records each acknowledged one, then flushes.
fn write_all(
    client: &mut NbdClient,
    writes: &[Write],
    model: &mut Model,
    d: &Deadline,
) -> Result<(), String> {
    for write in writes {
        d.check()?;
        client.write(write.offset, &Model::content(write))?;
        model.record(write);
    }
    client.flush()
}

/// Reads every written range back and checks it against the model: (bytes, reads).
fn read_back(client: &mut NbdClient, model: &Model, d: &Deadline) -> Result<(u64, u64), String> {
    let mut bytes = 0;
    let mut reads = 0;
    let mut buffer = vec![0u8; SEQUENTIAL_WRITE_BYTES as usize];
    for (offset, length) in model.written_ranges(SEQUENTIAL_WRITE_BYTES) {
        d.check()?;
        let data = &mut buffer[..length as usize];
        client.read(offset, data)?;
        model.check(offset, data)?;
        bytes += length;
        reads += 1;
    }
    Ok((bytes, reads))
}

/// Reads both disk files' data partitions and compares them with each other and with
/// the model. Returns the bytes compared.
fn compare_partitions(c: &Cluster, model: &Model, d: &Deadline) -> Result<u64, String> {
    let open =
        |path: &Path| std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()));
    let (alpha, beta) = (open(&c.node(0).disk)?, open(&c.node(1).disk)?);
    let chunk_bytes = SEQUENTIAL_WRITE_BYTES;
    let mut a = vec![0u8; chunk_bytes as usize];
    let mut b = a.clone();
    let mut offset = 0;
    while offset < c.data_bytes {
        d.check()?;
        let length = chunk_bytes.min(c.data_bytes - offset) as usize;
        let at = c.data_offset + offset;
        alpha
            .read_exact_at(&mut a[..length], at)
            .map_err(|e| format!("{}: {e}", c.node(0).disk.display()))?;
        beta.read_exact_at(&mut b[..length], at)
            .map_err(|e| format!("{}: {e}", c.node(1).disk.display()))?;
        if let Some(i) = first_difference(&a[..length], &b[..length]) {
            return Err(format!(
                "the data partitions differ at data offset {}",
                offset + i as u64
            ));
        }
        model
            .check(offset, &a[..length])
            .map_err(|e| format!("both data partitions agree, but {e}"))?;
        offset += length as u64;
    }
    Ok(offset)
}

/// SIGTERM to both agents (beta, the active one, first: it drains and deactivates),
/// each must exit with status 0.
fn stop_both(c: &mut Cluster) -> Result<String, String> {
    let mut outcomes = Vec::new();
    for index in [1, 0] {
        let status = c.stop(index, AGENT_STOP_TIMEOUT)?;
        if !status.success() {
            return Err(format!(
                "agent {} stopped with {}",
                c.node(index).name,
                describe_exit(status)
            ));
        }
        outcomes.push(format!("{}: {}", c.node(index).name, describe_exit(status)));
    }
    Ok(outcomes.join(", "))
}

fn print_report(c: &Cluster, f: &Facts, total: Duration) {
    let line = |key: &str, value: String| println!("  {key:<20} {value}");
    println!();
    println!("Report");
    line(
        "volume",
        format!(
            "{} data partition on each node ({} CLUSTER partition before it)",
            human_bytes(c.data_bytes),
            human_bytes(c.data_offset)
        ),
    );
    line(
        "written",
        format!(
            "{} through alpha ({} writes, {}/s, synchronously mirrored), {} through beta during the outage ({} writes)",
            human_bytes(f.first_bytes),
            f.first_writes,
            human_bytes(f.first_rate_bytes_per_s),
            human_bytes(f.outage_bytes),
            f.outage_writes
        ),
    );
    line(
        "planned failover",
        format!(
            "alpha -> beta in {}; {} read back identically through beta",
            human_ms(f.failover.as_millis() as u64),
            human_bytes(f.readback_bytes)
        ),
    );
    line(
        "during the outage",
        format!(
            "beta kept serving; its journal marked {} dirty for {} written",
            human_bytes(f.outage_dirty_bytes),
            human_bytes(f.outage_bytes)
        ),
    );
    line(
        "rebuild",
        format!(
            "{} sent for a {} volume ({:.1} %) in {} ({})",
            human_bytes(f.resync_bytes_sent),
            human_bytes(c.data_bytes),
            percent(f.resync_bytes_sent, c.data_bytes),
            human_ms(f.rebuild.as_millis() as u64),
            f.rebuild_decision
        ),
    );
    line(
        "online verify",
        format!(
            "{} differing regions in {}",
            f.differing_regions,
            human_bytes(f.verified_bytes)
        ),
    );
    line("final states", f.final_states.clone());
    line(
        "data partitions",
        format!(
            "identical: {} compared byte for byte, equal to what was written",
            human_bytes(f.compared_bytes)
        ),
    );
    line("total time", human_ms(total.as_millis() as u64));
}

/// `--keep-running`: says how to reach the cluster and waits for Ctrl-C (or an agent
/// exiting on its own, which is an error).
fn keep_running(c: &mut Cluster) -> Result<(), String> {
    let mirrorctl = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("mirrorctl")))
        .filter(|path| path.exists())
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| "mirrorctl".into());
    let (alpha, beta) = (c.node(0), c.node(1));
    let removes = if c.is_temporary() {
        format!(" and removes {}", c.dir.display())
    } else {
        String::new()
    };
    println!();
    println!("The cluster is up (beta is active); Ctrl-C stops it{removes}.");
    let line = |key: &str, value: String| println!("  {key:<8} {value}");
    line("export", format!("nbdinfo nbd://{}/{MIRROR}", beta.nbd));
    line(
        "status",
        format!(
            "{mirrorctl} status --socket {}",
            beta.admin_socket.display()
        ),
    );
    line(
        "",
        format!(
            "{mirrorctl} status --config {} --node alpha",
            c.config.display()
        ),
    );
    line(
        "switch",
        format!(
            "{mirrorctl} deactivate {MIRROR} --socket {} && {mirrorctl} activate {MIRROR} --socket {}",
            beta.admin_socket.display(),
            alpha.admin_socket.display()
        ),
    );
    line(
        "logs",
        format!("{} {}", alpha.log.display(), beta.log.display()),
    );
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            println!();
            return Ok(());
        }
        c.check_alive()?;
        std::thread::sleep(KEEP_RUNNING_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_time_limits_grow_with_the_data() {
        assert_eq!(timeout_for(0), STEP_TIMEOUT_BASE);
        assert_eq!(
            timeout_for(100 * STEP_BYTES_PER_S_MIN),
            STEP_TIMEOUT_BASE + Duration::from_secs(100)
        );
    }

    #[test]
    fn percent_of_nothing_is_zero() {
        assert_eq!(percent(1, 0), 0.0);
        assert_eq!(percent(1, 4), 25.0);
    }
}

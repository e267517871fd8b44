//! What `mirrorctl status` shows: the node and, per mirror, role, both sides' disk
//! states (the peer's as last heard, with its age), the connection and its path,
//! generations, in-flight writes, dirty bytes, resync progress and rate, why the last
//! connect copies what it copies (the generation rules' decision), verify progress, an
//! operator break, a split brain and its hook. Built from
//! `Engine::status()` plus the shell's own facts (link, path, export, rate), sent as
//! JSON over the admin socket, and rendered for humans here.

use serde::{Deserialize, Serialize};

use crate::config::{Fencing, Mirror};
use crate::core::meta::Generations;
use crate::shell::agent::executor::{DecisionRecord, Executor, ShellStats};
use crate::shell::agent::peer_link::LinkView;

/// The agent and all its mirrors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub node_id: u32,
    pub peer: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub mirrors: Vec<MirrorStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub name: String,
    /// Primary (active here) or Secondary.
    pub role: String,
    pub disk_state: String,
    pub generations: GenerationsView,
    pub flags: Vec<String>,
    /// Why the disk refuses writes (a metadata or disk failure).
    pub failure: Option<String>,
    /// Why the mirror does not replicate (split brain, waiting for the operator...).
    pub problem: Option<String>,
    pub export: ExportView,
    /// The peer as last heard of; `None` if never heard of since the agent started.
    pub peer: Option<PeerView>,
    pub connection: ConnectionView,
    pub in_flight: InFlightView,
    pub dirty_bytes: u64,
    pub resync: Option<ResyncView>,
    /// What the generation rules decided at the last connect (or what the operator
    /// started): why a copy runs and whether it is full.
    #[serde(default)]
    pub decision: Option<DecisionView>,
    /// The running or last online verify (since this agent started).
    #[serde(default)]
    pub verify: Option<VerifyView>,
    /// Set from the detection of a split brain until the mirror connects again.
    #[serde(default)]
    pub split_brain: Option<SplitBrainView>,
    /// The last forced-permit on this node (since this agent started).
    #[serde(default)]
    pub forced_permit: Option<OperatorView>,
    pub fencing: String,
    #[serde(default)]
    pub after_split_brain: String,
    pub peer_timeout_ms: u64,
    /// The engine's counters (writes, reads, replicated bytes...).
    pub engine_stats: serde_json::Value,
    /// The metadata engine's gauges (journal fill, hot extents...).
    pub meta_stats: serde_json::Value,
    pub shell_stats: ShellStats,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenerationsView {
    pub current: String,
    pub bitmap: String,
    pub history: [String; 2],
}

impl From<Generations> for GenerationsView {
    fn from(g: Generations) -> Self {
        let hex = |v: u64| format!("{v:016x}");
        GenerationsView {
            current: hex(g.current),
            bitmap: hex(g.bitmap),
            history: [hex(g.history[0]), hex(g.history[1])],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportView {
    /// Clients are served (the mirror is active here).
    pub open: bool,
    pub addresses: Vec<String>,
    pub clients: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerView {
    pub role: String,
    pub disk_state: String,
    pub generations: GenerationsView,
    /// How long ago the peer last told us its state.
    pub age_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionView {
    /// The engine's view while a connection exists (connecting, connected,
    /// sync-source, sync-target, waiting-for-operator, disconnecting), else
    /// "disconnected" (`link.state` then says what the dialer is doing).
    pub state: String,
    pub epoch: Option<u64>,
    /// The shell's side: path, addresses, uptime, retries, last problem.
    pub link: LinkView,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InFlightView {
    /// Client requests the engine is working on.
    pub requests: u64,
    /// Replicated writes the peer has not acknowledged yet.
    pub awaiting_peer_acks: u64,
    /// Replicated writes not yet covered by a peer flush.
    pub transfer_log_writes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResyncView {
    /// source (this node copies to the peer) or target.
    pub role: String,
    pub full: bool,
    /// Known on the source only.
    pub total_bytes: Option<u64>,
    pub done_bytes: u64,
    pub percent: Option<f64>,
    pub paused: bool,
    /// Over the last second.
    pub rate_bytes_per_s: u64,
    pub eta_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DecisionView {
    /// E.g. "rule 60 (history-peer): this node is behind: full copy from the peer".
    pub text: String,
    pub full_copy: bool,
    pub age_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyView {
    pub running: bool,
    pub verified_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    /// Regions (of the bitmap granularity) whose hashes differ; marked dirty here.
    pub differing_regions: u64,
    pub differing_bytes: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SplitBrainView {
    /// The engine's problem text.
    pub problem: String,
    /// Since the detection.
    pub age_ms: u64,
    /// The hook's outcome, if one is configured.
    pub hook: Option<String>,
}

/// Who did something, and when (UTC).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OperatorView {
    pub by: String,
    pub at: String,
}

/// What the mirror's runtime adds to the engine's and the link's views.
#[derive(Debug, Clone, Default)]
pub struct RuntimeFacts {
    pub decision: Option<DecisionRecord>,
    pub now_ms: u64,
    pub split_brain: Option<SplitBrainView>,
    pub forced_permit: Option<OperatorView>,
}

/// Assembles one mirror's status.
#[allow(clippy::too_many_arguments)]
pub fn mirror_status(
    name: &str,
    executor: &Executor,
    link: LinkView,
    export_open: bool,
    addresses: Vec<String>,
    clients: usize,
    rate_bytes_per_s: u64,
    config: &Mirror,
    facts: RuntimeFacts,
) -> MirrorStatus {
    let engine = executor.status();
    let decision_full = facts.decision.as_ref().is_some_and(|d| d.full_copy);
    let (state, epoch, awaiting, tlog, resync) = match &engine.link {
        Some(l) => (
            l.state.to_string(),
            Some(l.epoch),
            l.awaiting_acks,
            l.transfer_log_writes,
            l.resync.as_ref().map(|r| {
                let total = (r.role == "source").then_some(r.total_bytes);
                let percent = total
                    .filter(|t| *t > 0)
                    .map(|t| (r.done_bytes as f64 * 100.0 / t as f64).min(100.0));
                let eta_s = total.and_then(|t| {
                    (rate_bytes_per_s > 0)
                        .then(|| t.saturating_sub(r.done_bytes) / rate_bytes_per_s)
                });
                ResyncView {
                    role: r.role.to_string(),
                    // The engine knows "full" on the source only; the target has the
                    // connect decision.
                    full: r.full || (r.role == "target" && decision_full),
                    total_bytes: total,
                    done_bytes: r.done_bytes,
                    percent,
                    paused: r.paused,
                    rate_bytes_per_s,
                    eta_s,
                }
            }),
        ),
        None => ("disconnected".to_string(), None, 0, 0, None),
    };
    MirrorStatus {
        name: name.to_string(),
        role: format!("{:?}", engine.role),
        disk_state: format!("{:?}", engine.disk_state),
        generations: engine.generations.into(),
        flags: engine.flags.iter().map(|f| f.to_string()).collect(),
        failure: engine.failure.clone(),
        problem: engine.problem.clone(),
        export: ExportView {
            open: export_open,
            addresses,
            clients,
        },
        peer: engine.peer.as_ref().map(|p| PeerView {
            role: format!("{:?}", p.role),
            disk_state: format!("{:?}", p.disk_state),
            generations: p.generations.into(),
            age_ms: p.age_ms,
        }),
        connection: ConnectionView { state, epoch, link },
        in_flight: InFlightView {
            requests: engine.stats.requests_in_flight,
            awaiting_peer_acks: awaiting,
            transfer_log_writes: tlog,
        },
        dirty_bytes: engine.dirty_bytes,
        resync,
        decision: facts.decision.map(|d| DecisionView {
            text: d.text,
            full_copy: d.full_copy,
            age_ms: facts.now_ms.saturating_sub(d.at_ms),
        }),
        verify: engine.verify.as_ref().map(|v| {
            let granularity =
                u64::from(executor.with_engine(|e| e.meta().layout().granularity_bytes));
            VerifyView {
                running: v.running,
                verified_bytes: v.verified_bytes,
                total_bytes: v.total_bytes,
                percent: if v.total_bytes == 0 {
                    100.0
                } else {
                    (v.verified_bytes as f64 * 100.0 / v.total_bytes as f64).min(100.0)
                },
                differing_regions: v.differing_regions,
                differing_bytes: v.differing_regions * granularity,
                elapsed_ms: v.elapsed_ms,
            }
        }),
        split_brain: facts.split_brain,
        forced_permit: facts.forced_permit,
        fencing: match config.fencing {
            Fencing::ResourceOnly => "resource-only".into(),
            Fencing::Off => "off".into(),
        },
        after_split_brain: serde_json::to_value(config.after_split_brain)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        peer_timeout_ms: config.peer_timeout_ms,
        engine_stats: serde_json::to_value(engine.stats).unwrap_or_default(),
        meta_stats: serde_json::to_value(engine.meta).unwrap_or_default(),
        shell_stats: executor.shell_stats(),
    }
}

/// Bytes in binary units, e.g. "1.5 GiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration in the largest sensible unit, e.g. "850 ms", "12.3 s", "5 min 2 s".
pub fn human_ms(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn generations_line(g: &GenerationsView) -> String {
    format!(
        "current {} bitmap {} history {} {}",
        g.current, g.bitmap, g.history[0], g.history[1]
    )
}

/// The human-readable status.
pub fn render(status: &NodeStatus) -> String {
    let mut out = format!(
        "node {} (id {}), peer {}; agent pid {}, up {}\n",
        status.node,
        status.node_id,
        status.peer,
        status.pid,
        human_ms(status.uptime_ms)
    );
    for m in &status.mirrors {
        out.push_str(&render_mirror(m, &status.peer));
    }
    out
}

fn render_mirror(m: &MirrorStatus, peer_name: &str) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: String| out.push_str(&format!("  {key:<12} {value}\n"));
    let active = if m.export.open { "active" } else { "inactive" };
    let head = format!(
        "mirror {}: {} ({active} here), disk {}\n",
        m.name, m.role, m.disk_state
    );
    let peer = match &m.peer {
        Some(p) => format!(
            "{peer_name}: {}, disk {} (as of {} ago)",
            p.role,
            p.disk_state,
            human_ms(p.age_ms)
        ),
        None => format!("{peer_name}: unknown (not heard from since this agent started)"),
    };
    line("peer", peer);
    let c = &m.connection;
    let mut conn = c.state.clone();
    if let Some(b) = &c.link.broken {
        conn.push_str(&format!(
            " (BROKEN BY OPERATOR: {} at {}, {} ago; `mirrorctl rebuild {}` on this node reconnects)",
            b.by,
            b.at,
            human_ms(b.age_ms),
            m.name
        ));
    } else if c.epoch.is_none() {
        conn.push_str(&format!(" ({})", c.link.state));
    }
    if let Some(path) = c.link.path {
        let route = match (&c.link.local, &c.link.remote) {
            (Some(l), Some(r)) => format!(" {l} -> {r}"),
            _ => c
                .link
                .paths
                .get(path)
                .map(|p| format!(" {p}"))
                .unwrap_or_default(),
        };
        conn.push_str(&format!(", path {path}{route}"));
    }
    if let Some(up) = c.link.up_ms {
        conn.push_str(&format!(", up {}", human_ms(up)));
    }
    if let Some(epoch) = c.epoch {
        conn.push_str(&format!(", epoch {epoch}"));
    }
    if let Some(retry) = c.link.retry_in_ms {
        conn.push_str(&format!(", retry in {}", human_ms(retry)));
    }
    line("connection", conn);
    if let Some(problem) = &c.link.last_problem {
        let age = c.link.last_problem_age_ms.map(human_ms).unwrap_or_default();
        line("last error", format!("{problem} ({age} ago)"));
    }
    line("generations", generations_line(&m.generations));
    if let Some(p) = &m.peer {
        line("peer gens", generations_line(&p.generations));
    }
    if !m.flags.is_empty() {
        line("flags", m.flags.join(", "));
    }
    line(
        "in flight",
        format!(
            "{} requests, {} awaiting peer acks, {} in the transfer log",
            m.in_flight.requests, m.in_flight.awaiting_peer_acks, m.in_flight.transfer_log_writes
        ),
    );
    line("dirty", human_bytes(m.dirty_bytes));
    if let Some(r) = &m.resync {
        let progress = match (r.total_bytes, r.percent) {
            (Some(total), Some(pct)) => format!(
                "{} of {} ({pct:.1} %)",
                human_bytes(r.done_bytes),
                human_bytes(total)
            ),
            _ => format!("{} received", human_bytes(r.done_bytes)),
        };
        let mut text = format!(
            "{}{} {progress}, {}/s",
            r.role,
            if r.full { " (full)" } else { "" },
            human_bytes(r.rate_bytes_per_s)
        );
        if let Some(eta) = r.eta_s {
            text.push_str(&format!(", about {} left", human_ms(eta * 1000)));
        }
        if r.paused {
            text.push_str(", PAUSED");
        }
        line("resync", text);
    }
    if let Some(d) = &m.decision {
        line(
            "decision",
            format!("{} ({} ago)", d.text, human_ms(d.age_ms)),
        );
    }
    if let Some(v) = &m.verify {
        let found = format!(
            "{} differing region{} ({})",
            v.differing_regions,
            if v.differing_regions == 1 { "" } else { "s" },
            human_bytes(v.differing_bytes)
        );
        let text = if v.running {
            format!(
                "running: {} of {} ({:.1} %), {found} so far",
                human_bytes(v.verified_bytes),
                human_bytes(v.total_bytes),
                v.percent
            )
        } else if v.verified_bytes < v.total_bytes {
            format!(
                "INTERRUPTED after {} of {} (the link went down, or the peer became active): {found}",
                human_bytes(v.verified_bytes),
                human_bytes(v.total_bytes)
            )
        } else if v.differing_regions > 0 {
            format!(
                "done: {} verified in {}, {found}, marked dirty: `mirrorctl rebuild {}` copies them",
                human_bytes(v.verified_bytes),
                human_ms(v.elapsed_ms),
                m.name
            )
        } else {
            format!(
                "done: {} verified in {}, both sides identical",
                human_bytes(v.verified_bytes),
                human_ms(v.elapsed_ms)
            )
        };
        line("verify", text);
    }
    let export = if m.export.addresses.is_empty() {
        "none configured".to_string()
    } else if m.export.open {
        format!(
            "{} ({} clients)",
            m.export.addresses.join(", "),
            m.export.clients
        )
    } else {
        format!("{} (refusing clients)", m.export.addresses.join(", "))
    };
    line("export", export);
    if let Some(problem) = &m.problem {
        line("problem", problem.clone());
    }
    if let Some(sb) = &m.split_brain {
        let mut text = format!("detected {} ago", human_ms(sb.age_ms));
        if let Some(hook) = &sb.hook {
            text.push_str(&format!("; hook: {hook}"));
        }
        line("SPLIT BRAIN", text);
    }
    if let Some(f) = &m.forced_permit {
        line("forced", format!("forced-permit by {} at {}", f.by, f.at));
    }
    if let Some(failure) = &m.failure {
        line("FAILED", failure.clone());
    }
    format!("{head}{out}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_durations_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
        assert_eq!(human_ms(850), "850 ms");
        assert_eq!(human_ms(12_345), "12.3 s");
        assert_eq!(human_ms(302_000), "5 min 2 s");
        assert_eq!(human_ms(7_200_000), "2 h 0 min");
    }

    #[test]
    fn generations_are_hex() {
        let g = GenerationsView::from(Generations {
            current: 0xabc,
            bitmap: 0,
            history: [1, 2],
        });
        assert_eq!(g.current, "0000000000000abc");
        assert_eq!(g.history[1], "0000000000000002");
    }
}

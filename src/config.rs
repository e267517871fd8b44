//! The cluster configuration: one TOML file, identical on both nodes, parsed and
//! validated into a `Config` without touching the system.
//!
//! Parsing is pure (text in, `Config` or one error naming the field out), so bad
//! configuration is caught before anything is opened, bound or written. The shell
//! reads the file and the secret file; see `docs/configuration.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::core::mirror::engine::SplitBrainPolicy;

/// Most mirror-connect paths per mirror (DESIGN §5: up to two networks).
pub const REPLICATION_PATHS_MAX: usize = 2;
/// Mirror and node names appear in paths, logs and the superblock (64 bytes there).
pub const NAME_BYTES_MAX: usize = 64;

/// What to do with writes the peer lacks while it is unreachable (DESIGN §5 Fencing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fencing {
    /// A write the peer lacks is acknowledged only while the peer cannot be activated
    /// without an operator. A disconnected node activates only with forced-permit, so
    /// writes continue, journaled. The default.
    ResourceOnly,
    /// Writes continue without any fencing guarantee: RPO > 0 if the peer is then
    /// activated by other means. Documented as such.
    Off,
}

/// The whole cluster as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cluster_name: String,
    pub secret_file: PathBuf,
    pub nodes: Vec<Node>,
    pub mirrors: Vec<Mirror>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// The id recorded in each disk's superblock (`mirrorctl create --node`).
    pub id: u32,
    /// `mirrorctl` talks to the agent here.
    pub admin_socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub name: String,
    pub fencing: Fencing,
    /// Resync bandwidth cap in bytes per second; 0 means adaptive only.
    pub resync_rate_bytes_per_s: u64,
    /// How long the peer may leave a write unacknowledged before it is treated as
    /// failed (DRBD's ko-count × timeout).
    pub peer_timeout_ms: u64,
    /// What to do when the generation rules find a split brain (DRBD's
    /// after-sb-0pri): disconnect (the default) or discard the side with no changes.
    pub after_split_brain: SplitBrainPolicy,
    /// Run (bounded by a timeout) once per split-brain occurrence, on each node that
    /// detects it. An absolute path.
    pub split_brain_hook: Option<PathBuf>,
    /// Per node: its devices and addresses for this mirror. Exactly the two nodes.
    pub sides: BTreeMap<String, MirrorSide>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorSide {
    pub device: PathBuf,
    /// A separate device for the CLUSTER partition, if the metadata does not sit at
    /// the head of `device`.
    pub metadata: Option<PathBuf>,
    /// Addresses this node listens on for the mirror connection, one per path; the
    /// peer connects to the same index.
    pub replication: Vec<SocketAddr>,
    pub nbd_listen: Option<SocketAddr>,
    pub nbd_unix: Option<PathBuf>,
}

/// A configuration error: which field, and why. Displayed as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config: {}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn error(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

// The raw TOML shape. `deny_unknown_fields` so a typo is an error, not a silent default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster: RawCluster,
    #[serde(default)]
    node: Vec<RawNode>,
    #[serde(default)]
    mirror: Vec<RawMirror>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    secret_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    id: u32,
    admin_socket: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    name: String,
    #[serde(default = "default_fencing")]
    fencing: Fencing,
    #[serde(default)]
    resync_rate: Option<String>,
    #[serde(default = "default_peer_timeout_ms")]
    peer_timeout_ms: u64,
    #[serde(default)]
    after_split_brain: SplitBrainPolicy,
    #[serde(default)]
    split_brain_hook: Option<PathBuf>,
    #[serde(default)]
    node: BTreeMap<String, RawSide>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSide {
    device: PathBuf,
    #[serde(default)]
    metadata: Option<PathBuf>,
    replication: Vec<String>,
    #[serde(default)]
    nbd_listen: Option<String>,
    #[serde(default)]
    nbd_unix: Option<PathBuf>,
}

fn default_fencing() -> Fencing {
    Fencing::ResourceOnly
}

/// DRBD's default is timeout 6 s × ko-count 7; a synchronous mirror that stalls the
/// application for 42 s is not what our users want. 10 s rides out a switch
/// reconvergence and still bounds the stall.
pub const PEER_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Below this, ordinary scheduling hiccups would break the mirror.
pub const PEER_TIMEOUT_MS_MIN: u64 = 500;

fn default_peer_timeout_ms() -> u64 {
    PEER_TIMEOUT_MS_DEFAULT
}

/// Parses and validates the configuration text. `source` names the file in errors.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let span = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        let message = e.message().to_string();
        error(format!("line {span}"), message)
    })?;
    validate(raw)
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}

fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(error(
            field,
            format!("{name:?} must be 1..={NAME_BYTES_MAX} characters of [A-Za-z0-9._-]"),
        ))
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    check_name("cluster.name", &raw.cluster.name)?;
    if raw.cluster.secret_file.as_os_str().is_empty() {
        return Err(error(
            "cluster.secret_file",
            "must name the shared secret file",
        ));
    }
    if raw.node.len() != 2 {
        return Err(error(
            "node",
            format!(
                "a mirrordisk cluster has exactly two [[node]] entries, found {}",
                raw.node.len()
            ),
        ));
    }
    let mut nodes = Vec::new();
    for (index, node) in raw.node.iter().enumerate() {
        let field = format!("node[{index}]");
        check_name(&format!("{field}.name"), &node.name)?;
        if node.id == 0 {
            return Err(error(
                format!("{field}.id"),
                "node ids start at 1 (0 means none on disk)",
            ));
        }
        if node.admin_socket.as_os_str().is_empty() {
            return Err(error(format!("{field}.admin_socket"), "must be a path"));
        }
        nodes.push(Node {
            name: node.name.clone(),
            id: node.id,
            admin_socket: node.admin_socket.clone(),
        });
    }
    if nodes[0].name == nodes[1].name {
        return Err(error(
            "node[1].name",
            format!("duplicates node[0]'s name {:?}", nodes[0].name),
        ));
    }
    if nodes[0].id == nodes[1].id {
        return Err(error(
            "node[1].id",
            format!("duplicates node[0]'s id {}", nodes[0].id),
        ));
    }
    if nodes[0].admin_socket == nodes[1].admin_socket {
        return Err(error(
            "node[1].admin_socket",
            "both nodes use the same admin socket (two agents on one machine need two sockets)",
        ));
    }
    let mut mirrors: Vec<Mirror> = Vec::new();
    for (index, mirror) in raw.mirror.iter().enumerate() {
        let field = format!("mirror[{index}]");
        check_name(&format!("{field}.name"), &mirror.name)?;
        if mirrors.iter().any(|m| m.name == mirror.name) {
            return Err(error(
                format!("{field}.name"),
                format!("duplicate mirror name {:?}", mirror.name),
            ));
        }
        if mirror.peer_timeout_ms < PEER_TIMEOUT_MS_MIN {
            return Err(error(
                format!("{field}.peer_timeout_ms"),
                format!(
                    "{} is below the minimum {PEER_TIMEOUT_MS_MIN}",
                    mirror.peer_timeout_ms
                ),
            ));
        }
        let resync_rate_bytes_per_s = match &mirror.resync_rate {
            None => 0,
            Some(text) => {
                parse_rate(text).map_err(|reason| error(format!("{field}.resync_rate"), reason))?
            }
        };
        if let Some(hook) = &mirror.split_brain_hook
            && !hook.is_absolute()
        {
            return Err(error(
                format!("{field}.split_brain_hook"),
                format!(
                    "{:?} must be an absolute path (the agent's working directory is not yours)",
                    hook.display().to_string()
                ),
            ));
        }
        let mut sides = BTreeMap::new();
        for node in &nodes {
            let side_field = format!("{field}.node.{}", node.name);
            let raw_side = mirror.node.get(&node.name).ok_or_else(|| {
                error(
                    &side_field,
                    "missing: every mirror needs a section for each node",
                )
            })?;
            sides.insert(node.name.clone(), side(&side_field, raw_side)?);
        }
        if let Some(unknown) = mirror
            .node
            .keys()
            .find(|name| !nodes.iter().any(|n| &n.name == *name))
        {
            return Err(error(
                format!("{field}.node.{unknown}"),
                "not a configured node",
            ));
        }
        let [a, b] = [&sides[&nodes[0].name], &sides[&nodes[1].name]];
        if a.replication.len() != b.replication.len() {
            return Err(error(
                format!("{field}.node.{}.replication", nodes[1].name),
                "both nodes need the same number of replication paths (path i pairs with path i)",
            ));
        }
        mirrors.push(Mirror {
            name: mirror.name.clone(),
            fencing: mirror.fencing,
            resync_rate_bytes_per_s,
            peer_timeout_ms: mirror.peer_timeout_ms,
            after_split_brain: mirror.after_split_brain,
            split_brain_hook: mirror.split_brain_hook.clone(),
            sides,
        });
    }
    check_unique_addresses(&mirrors)?;
    Ok(Config {
        cluster_name: raw.cluster.name,
        secret_file: raw.cluster.secret_file,
        nodes,
        mirrors,
    })
}

fn side(field: &str, raw: &RawSide) -> Result<MirrorSide, ConfigError> {
    if raw.device.as_os_str().is_empty() {
        return Err(error(format!("{field}.device"), "must be a path"));
    }
    if raw.replication.is_empty() || raw.replication.len() > REPLICATION_PATHS_MAX {
        return Err(error(
            format!("{field}.replication"),
            format!("give 1 to {REPLICATION_PATHS_MAX} HOST:PORT addresses"),
        ));
    }
    let replication = raw
        .replication
        .iter()
        .map(|a| address(&format!("{field}.replication"), a))
        .collect::<Result<Vec<_>, _>>()?;
    let nbd_listen = raw
        .nbd_listen
        .as_deref()
        .map(|a| address(&format!("{field}.nbd_listen"), a))
        .transpose()?;
    Ok(MirrorSide {
        device: raw.device.clone(),
        metadata: raw.metadata.clone(),
        replication,
        nbd_listen,
        nbd_unix: raw.nbd_unix.clone(),
    })
}

fn address(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        error(
            field,
            format!("{text:?} is not an IP:PORT address (names are not resolved)"),
        )
    })
}

/// No two listeners of one node may share an address. Different nodes may: two
/// servers both exporting on 127.0.0.1:10809 is the normal case. (Two agents on one
/// machine then need distinct ports; the bind at start-up reports a clash clearly.)
fn check_unique_addresses(mirrors: &[Mirror]) -> Result<(), ConfigError> {
    let nodes: std::collections::BTreeSet<&String> =
        mirrors.iter().flat_map(|m| m.sides.keys()).collect();
    for node in nodes {
        let mut seen: BTreeMap<SocketAddr, String> = BTreeMap::new();
        for mirror in mirrors {
            let Some(side) = mirror.sides.get(node) else {
                continue;
            };
            let listeners = side
                .replication
                .iter()
                .map(|a| (a, "replication"))
                .chain(side.nbd_listen.iter().map(|a| (a, "nbd_listen")));
            for (addr, what) in listeners {
                let here = format!("mirror {}.node.{node}.{what}", mirror.name);
                if let Some(previous) = seen.insert(*addr, here.clone()) {
                    return Err(error(
                        here,
                        format!("address {addr} is already used by {previous}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Parses a rate like "100M", "1G", "512K" or a plain number of bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    parse_size(text.trim_end_matches("/s")).map_err(|e| format!("{e} (examples: 100M, 1G/s)"))
}

/// Parses a size with an optional binary suffix K, M, G, T (also KiB, MiB...).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("{text:?} has an unknown unit {other:?}")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

impl Config {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The other node.
    pub fn peer_of(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name != name)
    }

    pub fn mirror(&self, name: &str) -> Option<&Mirror> {
        self.mirrors.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "demo"
secret_file = "/etc/mirrordisk/secret"

[[node]]
name = "alpha"
id = 1
admin_socket = "/run/mirrordisk/alpha.sock"

[[node]]
name = "beta"
id = 2
admin_socket = "/run/mirrordisk/beta.sock"

[[mirror]]
name = "db"
resync_rate = "100M"

[mirror.node.alpha]
device = "/dev/vdb"
replication = ["10.0.0.1:7789", "10.0.1.1:7789"]
nbd_listen = "127.0.0.1:10809"

[mirror.node.beta]
device = "/dev/vdb"
replication = ["10.0.0.2:7789", "10.0.1.2:7789"]
nbd_listen = "127.0.0.2:10809"
"#;

    fn with(from: &str, to: &str) -> Result<Config, ConfigError> {
        assert!(GOOD.contains(from), "test edits text that exists");
        parse(&GOOD.replacen(from, to, 1))
    }

    #[test]
    fn good_config_parses() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.nodes.len(), 2);
        let mirror = config.mirror("db").unwrap();
        assert_eq!(mirror.fencing, Fencing::ResourceOnly);
        assert_eq!(mirror.resync_rate_bytes_per_s, 100 << 20);
        assert_eq!(mirror.peer_timeout_ms, PEER_TIMEOUT_MS_DEFAULT);
        assert_eq!(mirror.sides["alpha"].replication.len(), 2);
        assert_eq!(config.peer_of("alpha").unwrap().name, "beta");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = with("resync_rate = \"100M\"", "resync_rat = \"100M\"").unwrap_err();
        assert!(e.reason.contains("resync_rat"), "{e}");
    }

    #[test]
    fn three_nodes_refused() {
        let extra = "[[node]]\nname = \"gamma\"\nid = 3\nadmin_socket = \"/g\"\n\n[[mirror]]";
        let e = with("[[mirror]]", extra).unwrap_err();
        assert_eq!(e.field, "node");
    }

    #[test]
    fn duplicate_node_id_refused() {
        let e = with("id = 2", "id = 1").unwrap_err();
        assert_eq!(e.field, "node[1].id");
    }

    #[test]
    fn node_id_zero_refused() {
        let e = with("id = 1", "id = 0").unwrap_err();
        assert_eq!(e.field, "node[0].id");
    }

    #[test]
    fn bad_address_is_named() {
        let e = with("10.0.0.1:7789", "ten:7789").unwrap_err();
        assert_eq!(e.field, "mirror[0].node.alpha.replication");
    }

    #[test]
    fn missing_side_is_named() {
        let e = with("[mirror.node.beta]", "[mirror.node.gamma]").unwrap_err();
        assert!(e.field.starts_with("mirror[0].node."), "{e}");
    }

    #[test]
    fn same_export_address_on_both_nodes_is_fine() {
        assert!(with("127.0.0.2:10809", "127.0.0.1:10809").is_ok());
    }

    #[test]
    fn reused_address_on_one_node_refused() {
        let e = with(
            "nbd_listen = \"127.0.0.1:10809\"",
            "nbd_listen = \"10.0.0.1:7789\"",
        )
        .unwrap_err();
        assert!(e.reason.contains("already used"), "{e}");
    }

    #[test]
    fn mismatched_path_counts_refused() {
        let e = with(
            r#"["10.0.0.2:7789", "10.0.1.2:7789"]"#,
            r#"["10.0.0.2:7789"]"#,
        )
        .unwrap_err();
        assert!(e.reason.contains("same number"), "{e}");
    }

    #[test]
    fn too_many_paths_refused() {
        let three = r#"["10.0.0.1:7789", "10.0.1.1:7789", "10.0.2.1:7789"]"#;
        let e = with(r#"["10.0.0.1:7789", "10.0.1.1:7789"]"#, three).unwrap_err();
        assert_eq!(e.field, "mirror[0].node.alpha.replication");
    }

    #[test]
    fn bad_fencing_value_refused() {
        let e = with("name = \"db\"", "name = \"db\"\nfencing = \"maybe\"").unwrap_err();
        assert!(
            e.reason.contains("maybe") || e.reason.contains("variant"),
            "{e}"
        );
    }

    #[test]
    fn short_peer_timeout_refused() {
        let e = with("name = \"db\"", "name = \"db\"\npeer_timeout_ms = 10").unwrap_err();
        assert_eq!(e.field, "mirror[0].peer_timeout_ms");
    }

    #[test]
    fn bad_rate_refused() {
        let e = with("\"100M\"", "\"fast\"").unwrap_err();
        assert_eq!(e.field, "mirror[0].resync_rate");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = parse("[cluster]\nname = \n").unwrap_err();
        assert!(e.field.starts_with("line "), "{e}");
    }

    #[test]
    fn split_brain_keys_default_to_disconnect_and_no_hook() {
        let config = parse(GOOD).unwrap();
        let mirror = config.mirror("db").unwrap();
        assert_eq!(mirror.after_split_brain, SplitBrainPolicy::Disconnect);
        assert_eq!(mirror.split_brain_hook, None);
    }

    #[test]
    fn split_brain_keys_parse() {
        let config = with(
            "name = \"db\"",
            "name = \"db\"\nafter_split_brain = \"discard-zero-changes\"\nsplit_brain_hook = \"/usr/local/bin/sb-alert\"",
        )
        .unwrap();
        let mirror = config.mirror("db").unwrap();
        assert_eq!(
            mirror.after_split_brain,
            SplitBrainPolicy::DiscardZeroChanges
        );
        assert_eq!(
            mirror.split_brain_hook.as_deref(),
            Some(std::path::Path::new("/usr/local/bin/sb-alert"))
        );
        let config = with(
            "name = \"db\"",
            "name = \"db\"\nafter_split_brain = \"disconnect\"",
        )
        .unwrap();
        assert_eq!(
            config.mirror("db").unwrap().after_split_brain,
            SplitBrainPolicy::Disconnect
        );
    }

    #[test]
    fn unknown_split_brain_policy_refused() {
        let e = with(
            "name = \"db\"",
            "name = \"db\"\nafter_split_brain = \"discard-younger-primary\"",
        )
        .unwrap_err();
        assert!(e.reason.contains("discard-younger-primary"), "{e}");
    }

    #[test]
    fn relative_split_brain_hook_refused() {
        let e = with(
            "name = \"db\"",
            "name = \"db\"\nsplit_brain_hook = \"sb.sh\"",
        )
        .unwrap_err();
        assert_eq!(e.field, "mirror[0].split_brain_hook");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_rate("100M/s").unwrap(), 100 << 20);
    }
}

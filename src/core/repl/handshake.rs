//! The replication connection handshake, as a pure state machine: Hello exchange and
//! checks, version negotiation, mutual HMAC-SHA256 authentication, connection epoch,
//! State exchange, refusals and the deadline.
//!
//! Sans-IO, quinn-style: the shell decodes frames with `wire` and passes them to
//! [`Handshake::handle_frame`]; sends every frame [`Handshake::poll_transmit`] yields;
//! calls [`Handshake::handle_timeout`] at [`Handshake::poll_timeout`]; and reads
//! [`Handshake::status`]. The nonce, the secret and `now_ms` are constructor inputs,
//! so the machine is deterministic.
//!
//! Sequence (both sides run the same machine; there is no client or server):
//! 1. send Hello at once;
//! 2. on the peer's Hello: check it (each mismatch its own refusal), negotiate the
//!    version and the epoch, send Auth (our proof);
//! 3. on the peer's Auth: verify its proof; send State;
//! 4. on the peer's State: `Established`.
//!
//! Nothing about our disk (generations, state, role) is sent before the peer proved it
//! knows the secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::wire::{Frame, FrameHeader, FrameType, Hello, NodeState, RefuseReason, encode};
use super::{
    AUTH_PROOF_BYTES, CLUSTER_SECRET_BYTES_MAX, CLUSTER_SECRET_BYTES_MIN, NONCE_BYTES,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, REFUSE_MESSAGE_BYTES_MAX,
};
use crate::core::meta::{DiskState, Flags, Generations, Role};

/// Domain-separation label that starts every proof: a proof made for anything else
/// (another protocol using the same secret, another version of this construction) can
/// never verify here. Fixed length, so the fields after it cannot be shifted into it.
pub const AUTH_LABEL: &[u8; 32] = b"mirrordisk replication auth v1\0\0";

/// Direction byte of a proof made by the node with the lower id for the higher one.
pub const AUTH_DIRECTION_LOW_TO_HIGH: u8 = 1;
/// Direction byte of a proof made by the node with the higher id for the lower one.
pub const AUTH_DIRECTION_HIGH_TO_LOW: u8 = 2;

/// The message a refused proof gets: the peer learns nothing more.
pub const AUTH_FAILED_MESSAGE: &str = "authentication failed";

/// A range of protocol versions, `min <= max`, never containing 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRange {
    min: u16,
    max: u16,
}

impl VersionRange {
    /// What this build speaks.
    pub const SUPPORTED: VersionRange = VersionRange {
        min: PROTOCOL_VERSION_MIN,
        max: PROTOCOL_VERSION_MAX,
    };

    /// A range from configuration or tests; an empty or zero-based range is a bug.
    pub fn new(min: u16, max: u16) -> VersionRange {
        assert!(min >= 1 && min <= max, "bad version range {min}..={max}");
        VersionRange { min, max }
    }

    pub fn min(self) -> u16 {
        self.min
    }

    pub fn max(self) -> u16 {
        self.max
    }

    /// The highest version both ranges contain, if they overlap.
    pub fn highest_common(self, other: VersionRange) -> Option<u16> {
        let high = self.max.min(other.max);
        (high >= self.min.max(other.min)).then_some(high)
    }
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// The shared cluster secret (read by the shell from the secret file). Never sent, never
/// printed: `Debug` shows only its length.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

/// Why bytes from the secret file are not a usable secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretError {
    TooShort { bytes: usize },
    TooLong { bytes: usize },
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretError::TooShort { bytes } => write!(
                f,
                "cluster secret has {bytes} bytes, at least {CLUSTER_SECRET_BYTES_MIN} are required"
            ),
            SecretError::TooLong { bytes } => write!(
                f,
                "cluster secret has {bytes} bytes, at most {CLUSTER_SECRET_BYTES_MAX} are allowed"
            ),
        }
    }
}

impl std::error::Error for SecretError {}

impl ClusterSecret {
    pub fn new(bytes: Vec<u8>) -> Result<ClusterSecret, SecretError> {
        if bytes.len() < CLUSTER_SECRET_BYTES_MIN {
            return Err(SecretError::TooShort { bytes: bytes.len() });
        }
        if bytes.len() > CLUSTER_SECRET_BYTES_MAX {
            return Err(SecretError::TooLong { bytes: bytes.len() });
        }
        Ok(ClusterSecret(bytes))
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({} bytes, redacted)", self.0.len())
    }
}

/// What this node says about itself in Hello and checks the peer's Hello against. From
/// our own configuration and superblock: invalid values are bugs (asserted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// `VersionRange::SUPPORTED` in the agent; tests vary it to prove the negotiation.
    pub versions: VersionRange,
    pub mirror_uuid: [u8; 16],
    pub node_id: u32,
    pub peer_node_id: u32,
    pub data_bytes: u64,
    pub logical_block_bytes: u32,
    pub granularity_bytes: u32,
    /// This node's last connection epoch + 1 (at least 1).
    pub epoch_proposal: u64,
    /// From construction to Established; usually `HANDSHAKE_TIMEOUT_MS_DEFAULT`.
    pub timeout_ms: u64,
}

impl HandshakeConfig {
    fn assert_valid(&self) {
        assert_ne!(self.node_id, self.peer_node_id, "node is its own peer");
        assert!(self.epoch_proposal >= 1, "epoch proposal 0");
        assert!(self.data_bytes > 0, "empty data partition");
        assert!(
            self.logical_block_bytes.is_power_of_two(),
            "logical block size {} is not a power of two",
            self.logical_block_bytes
        );
        assert!(
            self.granularity_bytes.is_power_of_two(),
            "granularity {} is not a power of two",
            self.granularity_bytes
        );
    }
}

/// What the handshake learned about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: u32,
    pub generations: Generations,
    pub disk_state: DiskState,
    pub role: Role,
    pub flags: Flags,
    pub intent: Role,
    pub dirty_bytes: u64,
}

/// A finished handshake: the engine takes over the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Established {
    /// The highest version both sides speak.
    pub version: u16,
    /// The connection epoch: the larger of the two proposals. Every later frame carries
    /// it; frames with another epoch are dropped.
    pub epoch: u64,
    pub peer: PeerInfo,
}

/// Why a handshake failed. The shell logs it and closes the connection after sending
/// whatever `poll_transmit` still yields (a Refuse, except for `PeerRefused`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// We refused the peer; `message` is what we told it.
    Refused {
        reason: RefuseReason,
        message: String,
    },
    /// The peer's proof did not verify: it does not know the cluster secret (or a
    /// replay or reflection was attempted). The peer was told only "authentication
    /// failed".
    PeerFailedAuthentication,
    /// The peer refused us.
    PeerRefused {
        reason: RefuseReason,
        message: String,
    },
    /// The deadline passed; `waiting_for` names the frame that did not come.
    TimedOut { waiting_for: FrameType },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused { reason, message } => write!(f, "refused peer ({reason}): {message}"),
            Failure::PeerFailedAuthentication => f.write_str("peer failed authentication"),
            Failure::PeerRefused { reason, message } => {
                write!(f, "peer refused us ({reason}): {message}")
            }
            Failure::TimedOut { waiting_for } => {
                write!(
                    f,
                    "handshake timed out waiting for the peer's {waiting_for}"
                )
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    InProgress,
    Established(Established),
    Failed(Failure),
}

/// What the machine waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    PeerHello,
    PeerAuth { version: u16, epoch: u64 },
    PeerState { version: u16, epoch: u64 },
    Done,
}

/// One connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    config: HandshakeConfig,
    secret: ClusterSecret,
    local_state: NodeState,
    hello: Hello,
    peer_hello: Option<Hello>,
    phase: Phase,
    status: Status,
    deadline_ms: u64,
    /// Encoded frames not yet taken by `poll_transmit`, oldest first.
    outbox: std::collections::VecDeque<Vec<u8>>,
}

impl Handshake {
    /// A handshake started at `now_ms`, with our Hello queued. `nonce` must be fresh
    /// random bytes from the shell (never reused); `local_state` is sent once the peer
    /// is authenticated.
    pub fn new(
        config: HandshakeConfig,
        secret: ClusterSecret,
        nonce: [u8; NONCE_BYTES],
        local_state: NodeState,
        now_ms: u64,
    ) -> Handshake {
        config.assert_valid();
        assert!(local_state.generations.is_valid(), "no current generation");
        let hello = Hello {
            version_min: config.versions.min(),
            version_max: config.versions.max(),
            mirror_uuid: config.mirror_uuid,
            node_id: config.node_id,
            expected_peer_id: config.peer_node_id,
            data_bytes: config.data_bytes,
            logical_block_bytes: config.logical_block_bytes,
            granularity_bytes: config.granularity_bytes,
            epoch_proposal: config.epoch_proposal,
            nonce,
        };
        let mut handshake = Handshake {
            config,
            secret,
            local_state,
            hello,
            peer_hello: None,
            phase: Phase::PeerHello,
            status: Status::InProgress,
            deadline_ms: now_ms.saturating_add(config.timeout_ms),
            outbox: std::collections::VecDeque::new(),
        };
        handshake.send(&Frame::Hello(hello), 0);
        handshake
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    /// The next encoded frame to send, if any. After a failure the queue may still hold
    /// a Refuse: send it, then close.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.outbox.pop_front()
    }

    /// When `handle_timeout` must be called, while the handshake is in progress.
    pub fn poll_timeout(&self) -> Option<u64> {
        (self.status == Status::InProgress).then_some(self.deadline_ms)
    }

    /// Fails the handshake (and queues a Refuse) once `now_ms` reaches the deadline.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if self.status != Status::InProgress || now_ms < self.deadline_ms {
            return;
        }
        let waiting_for = self.waiting_for();
        let message = format!(
            "handshake timed out after {} ms waiting for the peer's {waiting_for}",
            self.config.timeout_ms
        );
        self.send_refuse(RefuseReason::Timeout, &message);
        self.fail(Failure::TimedOut { waiting_for });
    }

    /// Handles one verified frame (`wire::verify` returned it, with `header`). Ignores
    /// input once the status is final: frames after the peer's State belong to the
    /// engine, and the shell hands them there.
    pub fn handle_frame(&mut self, header: &FrameHeader, frame: &Frame<'_>) {
        assert_eq!(header.kind(), frame.kind(), "header of another frame");
        if self.status != Status::InProgress {
            return;
        }
        if let Frame::Refuse { reason, message } = *frame {
            self.fail(Failure::PeerRefused {
                reason,
                message: message.to_string(),
            });
            return;
        }
        let expected_epoch = match self.phase {
            Phase::PeerHello => 0,
            Phase::PeerAuth { epoch, .. } | Phase::PeerState { epoch, .. } => epoch,
            Phase::Done => unreachable!("Done implies a final status"),
        };
        if header.epoch() != expected_epoch {
            let message = format!(
                "{} frame with epoch {}, expected {expected_epoch}",
                frame.kind(),
                header.epoch()
            );
            return self.violation(&message);
        }
        match (self.phase, frame) {
            (Phase::PeerHello, Frame::Hello(hello)) => self.handle_hello(hello),
            (Phase::PeerAuth { version, epoch }, Frame::Auth { proof }) => {
                self.handle_auth(proof, version, epoch)
            }
            (Phase::PeerState { version, epoch }, Frame::State(state)) => {
                self.handle_state(state, version, epoch)
            }
            (_, other) => {
                let message = format!(
                    "unexpected {} frame while waiting for the peer's {}",
                    other.kind(),
                    self.waiting_for()
                );
                self.violation(&message);
            }
        }
    }

    fn waiting_for(&self) -> FrameType {
        match self.phase {
            Phase::PeerHello => FrameType::Hello,
            Phase::PeerAuth { .. } => FrameType::Auth,
            Phase::PeerState { .. } | Phase::Done => FrameType::State,
        }
    }

    fn handle_hello(&mut self, peer: &Hello) {
        match check_hello(&self.hello, peer) {
            Err((reason, message)) => {
                self.send_refuse(reason, &message);
                self.fail(Failure::Refused { reason, message });
            }
            Ok(version) => {
                // Each proposal exceeds every epoch its sender used before, so the larger
                // one exceeds every epoch either side used: frames of any earlier
                // connection carry a smaller epoch.
                let epoch = self.hello.epoch_proposal.max(peer.epoch_proposal);
                self.peer_hello = Some(*peer);
                let proof = self.proof(self.config.node_id, self.config.peer_node_id);
                self.send(&Frame::Auth { proof }, epoch);
                self.phase = Phase::PeerAuth { version, epoch };
            }
        }
    }

    fn handle_auth(&mut self, proof: &[u8; AUTH_PROOF_BYTES], version: u16, epoch: u64) {
        let mac = self.proof_mac(self.config.peer_node_id, self.config.node_id);
        // Constant-time comparison: timing tells an attacker nothing about the proof.
        if mac.verify_slice(proof).is_err() {
            self.send_refuse(RefuseReason::AuthenticationFailed, AUTH_FAILED_MESSAGE);
            self.fail(Failure::PeerFailedAuthentication);
            return;
        }
        self.send(&Frame::State(self.local_state), epoch);
        self.phase = Phase::PeerState { version, epoch };
    }

    fn handle_state(&mut self, state: &NodeState, version: u16, epoch: u64) {
        let peer = PeerInfo {
            node_id: self.config.peer_node_id,
            generations: state.generations,
            disk_state: state.disk_state,
            role: state.role,
            flags: state.flags,
            intent: state.intent,
            dirty_bytes: state.dirty_bytes,
        };
        self.phase = Phase::Done;
        self.status = Status::Established(Established {
            version,
            epoch,
            peer,
        });
    }

    /// Our proof: HMAC(secret, label || direction || prover || verifier || mirror uuid ||
    /// nonce of the lower id || nonce of the higher id || Hello of the lower id || Hello
    /// of the higher id). See docs/replication-protocol.md, "Authentication".
    fn proof(&self, prover: u32, verifier: u32) -> [u8; AUTH_PROOF_BYTES] {
        self.proof_mac(prover, verifier)
            .finalize()
            .into_bytes()
            .into()
    }

    fn proof_mac(&self, prover: u32, verifier: u32) -> Hmac<Sha256> {
        let peer = self.peer_hello.expect("proofs need the peer's Hello");
        assert_eq!(peer.node_id, self.config.peer_node_id);
        let (low, high) = if self.hello.node_id < peer.node_id {
            (&self.hello, &peer)
        } else {
            (&peer, &self.hello)
        };
        let direction = if prover < verifier {
            AUTH_DIRECTION_LOW_TO_HIGH
        } else {
            AUTH_DIRECTION_HIGH_TO_LOW
        };
        let mut mac = self.secret.mac();
        mac.update(AUTH_LABEL);
        mac.update(&[direction]);
        mac.update(&prover.to_le_bytes());
        mac.update(&verifier.to_le_bytes());
        mac.update(&self.config.mirror_uuid);
        mac.update(&low.nonce);
        mac.update(&high.nonce);
        mac.update(&low.encode_payload());
        mac.update(&high.encode_payload());
        mac
    }

    fn violation(&mut self, message: &str) {
        self.send_refuse(RefuseReason::ProtocolViolation, message);
        self.fail(Failure::Refused {
            reason: RefuseReason::ProtocolViolation,
            message: message.to_string(),
        });
    }

    fn fail(&mut self, failure: Failure) {
        assert_eq!(self.status, Status::InProgress);
        self.phase = Phase::Done;
        self.status = Status::Failed(failure);
    }

    /// Queues a Refuse, stamped with the agreed epoch if there is one.
    fn send_refuse(&mut self, reason: RefuseReason, message: &str) {
        let epoch = match self.phase {
            Phase::PeerAuth { epoch, .. } | Phase::PeerState { epoch, .. } => epoch,
            Phase::PeerHello | Phase::Done => 0,
        };
        let message = clamp_message(message);
        self.send(&Frame::Refuse { reason, message }, epoch);
    }

    fn send(&mut self, frame: &Frame<'_>, epoch: u64) {
        let mut bytes = Vec::new();
        encode(frame, epoch, &mut bytes);
        self.outbox.push_back(bytes);
    }
}

/// Checks the peer's Hello against ours, in a fixed order (version first: without a
/// common version the other fields may not mean what we think). Returns the negotiated
/// version, or the refusal reason and the message for the peer and the log.
fn check_hello(ours: &Hello, peer: &Hello) -> Result<u16, (RefuseReason, String)> {
    let our_versions = VersionRange::new(ours.version_min, ours.version_max);
    // Decoding guaranteed 1 <= min <= max.
    let peer_versions = VersionRange::new(peer.version_min, peer.version_max);
    let Some(version) = our_versions.highest_common(peer_versions) else {
        return Err((
            RefuseReason::ProtocolVersion,
            format!(
                "no common protocol version: node {} speaks {our_versions}, node {} speaks {peer_versions}",
                ours.node_id, peer.node_id
            ),
        ));
    };
    if peer.mirror_uuid != ours.mirror_uuid {
        return Err((
            RefuseReason::MirrorMismatch,
            format!(
                "disk belongs to another mirror: peer has mirror {}, we have {}",
                uuid_text(&peer.mirror_uuid),
                uuid_text(&ours.mirror_uuid)
            ),
        ));
    }
    if peer.node_id == ours.node_id {
        return Err((
            RefuseReason::NodeIdConflict,
            format!("peer claims our own node id {}", ours.node_id),
        ));
    }
    if peer.node_id != ours.expected_peer_id {
        return Err((
            RefuseReason::UnexpectedPeer,
            format!(
                "peer is node {}, but this mirror's peer is node {}",
                peer.node_id, ours.expected_peer_id
            ),
        ));
    }
    if peer.expected_peer_id != ours.node_id {
        return Err((
            RefuseReason::PeerExpectsOtherNode,
            format!(
                "peer expects node {}, but this is node {}",
                peer.expected_peer_id, ours.node_id
            ),
        ));
    }
    let mismatch = |reason, what: &str, peer_value: u64, our_value: u64| {
        Err((
            reason,
            format!("{what} mismatch: peer has {peer_value} bytes, we have {our_value}"),
        ))
    };
    if peer.data_bytes != ours.data_bytes {
        let reason = RefuseReason::DataSizeMismatch;
        return mismatch(reason, "data size", peer.data_bytes, ours.data_bytes);
    }
    if peer.logical_block_bytes != ours.logical_block_bytes {
        let (peer_value, our_value) = (peer.logical_block_bytes, ours.logical_block_bytes);
        let reason = RefuseReason::BlockSizeMismatch;
        return mismatch(
            reason,
            "logical block size",
            peer_value.into(),
            our_value.into(),
        );
    }
    if peer.granularity_bytes != ours.granularity_bytes {
        let (peer_value, our_value) = (peer.granularity_bytes, ours.granularity_bytes);
        let reason = RefuseReason::GranularityMismatch;
        return mismatch(
            reason,
            "bitmap granularity",
            peer_value.into(),
            our_value.into(),
        );
    }
    if peer.nonce == ours.nonce {
        // Honest nonces are 256 random bits: equal ones mean our Hello was reflected.
        return Err((
            RefuseReason::ProtocolViolation,
            "peer's nonce equals ours (reflected Hello)".to_string(),
        ));
    }
    Ok(version)
}

/// A UUID in its usual 8-4-4-4-12 hex form, for messages.
fn uuid_text(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The longest prefix of `message` that fits a Refuse, cut on a character boundary.
fn clamp_message(message: &str) -> &str {
    if message.len() <= REFUSE_MESSAGE_BYTES_MAX {
        return message;
    }
    let mut end = REFUSE_MESSAGE_BYTES_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::repl::wire::{FRAME_HEADER_BYTES, decode_header, verify};
    use crate::core::repl::{HANDSHAKE_TIMEOUT_MS_DEFAULT, NONCE_BYTES};

    const SECRET: &[u8] = b"correct horse battery staple 42!";
    const UUID: [u8; 16] = [0x5A; 16];

    fn config(node_id: u32, peer_node_id: u32) -> HandshakeConfig {
        HandshakeConfig {
            versions: VersionRange::SUPPORTED,
            mirror_uuid: UUID,
            node_id,
            peer_node_id,
            data_bytes: 1 << 30,
            logical_block_bytes: 512,
            granularity_bytes: 4096,
            epoch_proposal: 1,
            timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
        }
    }

    fn state(current: u64, role: Role) -> NodeState {
        NodeState {
            generations: Generations {
                current,
                bitmap: 0,
                history: [0, 0],
            },
            disk_state: DiskState::UpToDate,
            role,
            flags: Flags::empty(),
            intent: role,
            dirty_bytes: current * 4096,
        }
    }

    fn secret(bytes: &[u8]) -> ClusterSecret {
        ClusterSecret::new(bytes.to_vec()).unwrap()
    }

    fn machine(config: HandshakeConfig, key: &[u8], nonce_byte: u8) -> Handshake {
        let local = state(u64::from(config.node_id) + 100, Role::Secondary);
        Handshake::new(config, secret(key), [nonce_byte; NONCE_BYTES], local, 0)
    }

    /// One encoded frame a machine sent.
    #[derive(Debug)]
    struct Sent {
        bytes: Vec<u8>,
    }

    impl Sent {
        fn header(&self) -> FrameHeader {
            decode_header(self.bytes[..FRAME_HEADER_BYTES].try_into().unwrap()).unwrap()
        }

        fn frame(&self) -> Frame<'_> {
            let header_bytes = self.bytes[..FRAME_HEADER_BYTES].try_into().unwrap();
            verify(
                &self.header(),
                header_bytes,
                &self.bytes[FRAME_HEADER_BYTES..],
            )
            .unwrap()
        }

        fn kind(&self) -> FrameType {
            self.header().kind()
        }
    }

    fn deliver(to: &mut Handshake, bytes: &[u8]) {
        let sent = Sent {
            bytes: bytes.to_vec(),
        };
        to.handle_frame(&sent.header(), &sent.frame());
    }

    fn deliver_frame(to: &mut Handshake, frame: &Frame<'_>, epoch: u64) {
        let mut bytes = Vec::new();
        encode(frame, epoch, &mut bytes);
        deliver(to, &bytes);
    }

    fn drain(machine: &mut Handshake) -> Vec<Sent> {
        std::iter::from_fn(|| machine.poll_transmit())
            .map(|bytes| Sent { bytes })
            .collect()
    }

    /// Runs two machines against each other over a perfect in-memory link until neither
    /// has anything to send. Returns everything each one sent, in order.
    fn drive(a: &mut Handshake, b: &mut Handshake) -> (Vec<Sent>, Vec<Sent>) {
        let (mut sent_a, mut sent_b) = (Vec::new(), Vec::new());
        for _round in 0..16 {
            let from_a = drain(a);
            let from_b = drain(b);
            if from_a.is_empty() && from_b.is_empty() {
                return (sent_a, sent_b);
            }
            for frame in &from_a {
                deliver(b, &frame.bytes);
            }
            for frame in &from_b {
                deliver(a, &frame.bytes);
            }
            sent_a.extend(from_a);
            sent_b.extend(from_b);
        }
        panic!("the handshake did not settle in 16 rounds");
    }

    fn kinds(sent: &[Sent]) -> Vec<FrameType> {
        sent.iter().map(Sent::kind).collect()
    }

    fn established(machine: &Handshake) -> Established {
        match machine.status() {
            Status::Established(established) => *established,
            other => panic!("not established: {other:?}"),
        }
    }

    fn refused(machine: &Handshake) -> (RefuseReason, String) {
        match machine.status() {
            Status::Failed(Failure::Refused { reason, message }) => (*reason, message.clone()),
            other => panic!("not refused: {other:?}"),
        }
    }

    /// The Refuse frame a machine sent last.
    fn last_refuse(sent: &[Sent]) -> (RefuseReason, String) {
        match sent.last().expect("something was sent").frame() {
            Frame::Refuse { reason, message } => (reason, message.to_string()),
            other => panic!("last frame is not a Refuse: {other:?}"),
        }
    }

    #[test]
    fn two_nodes_establish_with_the_highest_version_and_the_larger_epoch() {
        let mut config_a = config(1, 2);
        config_a.epoch_proposal = 7;
        let mut config_b = config(2, 1);
        config_b.epoch_proposal = 12;
        let mut a = machine(config_a, SECRET, 0xA1);
        let mut b = machine(config_b, SECRET, 0xB2);
        assert_eq!(a.poll_timeout(), Some(HANDSHAKE_TIMEOUT_MS_DEFAULT));
        let (sent_a, sent_b) = drive(&mut a, &mut b);

        let (at_a, at_b) = (established(&a), established(&b));
        assert_eq!((at_a.version, at_b.version), (1, 1));
        assert_eq!((at_a.epoch, at_b.epoch), (12, 12));
        assert_eq!(at_a.peer.node_id, 2);
        assert_eq!(at_b.peer.node_id, 1);
        let b_state = state(102, Role::Secondary);
        assert_eq!(at_a.peer.generations, b_state.generations);
        assert_eq!(at_a.peer.dirty_bytes, b_state.dirty_bytes);
        assert_eq!(at_a.peer.disk_state, DiskState::UpToDate);
        assert_eq!(at_b.peer.generations.current, 101);
        for sent in [&sent_a, &sent_b] {
            assert_eq!(
                kinds(sent),
                [FrameType::Hello, FrameType::Auth, FrameType::State]
            );
            // Hello carries epoch 0; everything after it the agreed epoch.
            let epochs: Vec<u64> = sent.iter().map(|s| s.header().epoch()).collect();
            assert_eq!(epochs, [0, 12, 12]);
        }
        assert_eq!(a.poll_timeout(), None);

        // Established is final: later frames (the engine's) change nothing.
        deliver_frame(&mut a, &Frame::KeepAlive { nonce: 1 }, 12);
        assert_eq!(established(&a), at_a);
        assert!(a.poll_transmit().is_none());
    }

    #[test]
    fn either_side_may_hold_the_lower_id_or_the_higher_epoch() {
        for (id_a, id_b, epoch_a, epoch_b) in [(9, 3, 1, 1), (3, 9, 100, 2), (u32::MAX, 0, 5, 6)] {
            let mut config_a = config(id_a, id_b);
            config_a.epoch_proposal = epoch_a;
            let mut config_b = config(id_b, id_a);
            config_b.epoch_proposal = epoch_b;
            let mut a = machine(config_a, SECRET, 1);
            let mut b = machine(config_b, SECRET, 2);
            drive(&mut a, &mut b);
            assert_eq!(established(&a).epoch, epoch_a.max(epoch_b));
            assert_eq!(established(&b).epoch, epoch_a.max(epoch_b));
        }
    }

    fn version_pair(a: (u16, u16), b: (u16, u16)) -> (Handshake, Handshake) {
        let mut config_a = config(1, 2);
        config_a.versions = VersionRange::new(a.0, a.1);
        let mut config_b = config(2, 1);
        config_b.versions = VersionRange::new(b.0, b.1);
        (machine(config_a, SECRET, 1), machine(config_b, SECRET, 2))
    }

    #[test]
    fn partly_overlapping_version_ranges_use_the_highest_common_version() {
        for (range_a, range_b, expected) in [
            ((1, 3), (2, 5), 3),
            ((2, 5), (1, 3), 3),
            ((1, 5), (2, 2), 2),
            ((4, 4), (1, 4), 4),
        ] {
            let (mut a, mut b) = version_pair(range_a, range_b);
            drive(&mut a, &mut b);
            assert_eq!(established(&a).version, expected);
            assert_eq!(established(&b).version, expected);
        }
        assert_eq!(
            VersionRange::new(1, 3).highest_common(VersionRange::new(4, 9)),
            None
        );
    }

    #[test]
    fn disjoint_version_ranges_are_refused_naming_both_ranges() {
        let (mut a, mut b) = version_pair((1, 1), (2, 3));
        let (sent_a, sent_b) = drive(&mut a, &mut b);
        let (reason, message) = refused(&a);
        assert_eq!(reason, RefuseReason::ProtocolVersion);
        assert!(
            message.contains("1..=1") && message.contains("2..=3"),
            "{message}"
        );
        assert_eq!(refused(&b).0, RefuseReason::ProtocolVersion);
        assert_eq!(kinds(&sent_a), [FrameType::Hello, FrameType::Refuse]);
        assert_eq!(last_refuse(&sent_a), (reason, message));
        assert_eq!(kinds(&sent_b), [FrameType::Hello, FrameType::Refuse]);
    }

    /// Runs a pair whose configs differ as `tweak_b` says; both must refuse with the
    /// given reasons, having sent only Hello and Refuse (no proof, no state).
    fn assert_refused(
        tweak_b: impl Fn(&mut HandshakeConfig),
        reason_at_a: RefuseReason,
        reason_at_b: RefuseReason,
        message_words: &[&str],
    ) {
        let config_a = config(1, 2);
        let mut config_b = config(2, 1);
        tweak_b(&mut config_b);
        let mut a = machine(config_a, SECRET, 1);
        let mut b = machine(config_b, SECRET, 2);
        let (sent_a, sent_b) = drive(&mut a, &mut b);
        let (reason, message) = refused(&a);
        assert_eq!(reason, reason_at_a, "{message}");
        for word in message_words {
            assert!(message.contains(word), "{message:?} lacks {word:?}");
        }
        assert_eq!(last_refuse(&sent_a), (reason, message));
        assert_eq!(refused(&b).0, reason_at_b);
        for sent in [&sent_a, &sent_b] {
            assert_eq!(kinds(sent), [FrameType::Hello, FrameType::Refuse]);
        }
    }

    #[test]
    fn another_mirrors_disk_is_refused() {
        assert_refused(
            |b| b.mirror_uuid = [0x11; 16],
            RefuseReason::MirrorMismatch,
            RefuseReason::MirrorMismatch,
            &[
                "disk belongs to another mirror",
                "11111111-1111",
                "5a5a5a5a-5a5a",
            ],
        );
    }

    #[test]
    fn a_peer_that_is_not_the_configured_peer_is_refused() {
        // Node 3 dials node 1 believing node 1 is its peer; node 1's peer is node 2.
        assert_refused(
            |b| b.node_id = 3,
            RefuseReason::UnexpectedPeer,
            RefuseReason::PeerExpectsOtherNode,
            &["peer is node 3", "peer is node 2"],
        );
    }

    #[test]
    fn a_peer_claiming_our_node_id_is_refused() {
        assert_refused(
            |b| {
                b.node_id = 1;
                b.peer_node_id = 2;
            },
            RefuseReason::NodeIdConflict,
            RefuseReason::NodeIdConflict,
            &["our own node id 1"],
        );
    }

    #[test]
    fn a_peer_expecting_another_node_is_refused() {
        // Node 2 is configured with peer 3 (a copy of the wrong config).
        assert_refused(
            |b| b.peer_node_id = 3,
            RefuseReason::PeerExpectsOtherNode,
            RefuseReason::UnexpectedPeer,
            &["peer expects node 3", "this is node 1"],
        );
    }

    #[test]
    fn a_data_size_mismatch_is_refused() {
        assert_refused(
            |b| b.data_bytes = 1 << 31,
            RefuseReason::DataSizeMismatch,
            RefuseReason::DataSizeMismatch,
            &["2147483648", "1073741824"],
        );
    }

    #[test]
    fn a_block_size_mismatch_is_refused() {
        assert_refused(
            |b| b.logical_block_bytes = 4096,
            RefuseReason::BlockSizeMismatch,
            RefuseReason::BlockSizeMismatch,
            &["logical block size", "4096", "512"],
        );
    }

    #[test]
    fn a_granularity_mismatch_is_refused() {
        assert_refused(
            |b| b.granularity_bytes = 65536,
            RefuseReason::GranularityMismatch,
            RefuseReason::GranularityMismatch,
            &["granularity", "65536", "4096"],
        );
    }

    /// A wrong secret on either side: both proofs fail, both sides refuse with exactly
    /// "authentication failed", and neither discloses its State.
    #[test]
    fn a_wrong_secret_on_either_side_fails_authentication() {
        let wrong = b"a different secret of 32 bytes!!";
        for (key_a, key_b) in [(SECRET, &wrong[..]), (&wrong[..], SECRET)] {
            let mut a = machine(config(1, 2), key_a, 1);
            let mut b = machine(config(2, 1), key_b, 2);
            let (sent_a, sent_b) = drive(&mut a, &mut b);
            for (machine, sent) in [(&a, &sent_a), (&b, &sent_b)] {
                assert_eq!(
                    machine.status(),
                    &Status::Failed(Failure::PeerFailedAuthentication)
                );
                assert_eq!(
                    kinds(sent),
                    [FrameType::Hello, FrameType::Auth, FrameType::Refuse]
                );
                assert_eq!(
                    last_refuse(sent),
                    (
                        RefuseReason::AuthenticationFailed,
                        AUTH_FAILED_MESSAGE.to_string()
                    )
                );
            }
        }
    }

    /// An attacker without the secret plays node 2 against node 1 and sends node 1's
    /// own proof back: the proof names node 1 as prover, so it fails.
    #[test]
    fn a_reflected_proof_fails_authentication() {
        let mut victim = machine(config(1, 2), SECRET, 1);
        let victim_hello = drain(&mut victim);
        assert_eq!(kinds(&victim_hello), [FrameType::Hello]);
        let attacker = Hello {
            version_min: 1,
            version_max: 1,
            mirror_uuid: UUID,
            node_id: 2,
            expected_peer_id: 1,
            data_bytes: 1 << 30,
            logical_block_bytes: 512,
            granularity_bytes: 4096,
            epoch_proposal: 1,
            nonce: [0xEE; NONCE_BYTES],
        };
        deliver_frame(&mut victim, &Frame::Hello(attacker), 0);
        let auth = drain(&mut victim);
        assert_eq!(kinds(&auth), [FrameType::Auth]);
        deliver(&mut victim, &auth[0].bytes);
        assert_eq!(
            victim.status(),
            &Status::Failed(Failure::PeerFailedAuthentication)
        );
        let rest = drain(&mut victim);
        assert_eq!(
            kinds(&rest),
            [FrameType::Refuse],
            "no State after a failed proof"
        );
    }

    #[test]
    fn a_reflected_hello_is_refused() {
        // The victim's own Hello sent back: it claims the victim's node id.
        let mut victim = machine(config(1, 2), SECRET, 1);
        let hello = drain(&mut victim);
        deliver(&mut victim, &hello[0].bytes);
        assert_eq!(refused(&victim).0, RefuseReason::NodeIdConflict);

        // A Hello with the right ids but the victim's nonce copied into it.
        let mut victim = machine(config(1, 2), SECRET, 1);
        let mut peer = machine(config(2, 1), SECRET, 1);
        deliver(&mut victim, &drain(&mut peer)[0].bytes);
        let (reason, message) = refused(&victim);
        assert_eq!(reason, RefuseReason::ProtocolViolation);
        assert!(message.contains("reflected"), "{message}");
    }

    /// A recorded genuine session between nodes 1 and 2; then an attacker replays node
    /// 2's Hello and proof against a new session of node 1 (new nonce): the proof
    /// covered the old nonce, so it fails. The attacker re-stamps the epoch (crc32c is
    /// not a MAC), so the proof itself is what is refused.
    #[test]
    fn a_replayed_auth_from_an_earlier_session_fails() {
        let mut a = machine(config(1, 2), SECRET, 1);
        let mut b = machine(config(2, 1), SECRET, 2);
        let (_, sent_b) = drive(&mut a, &mut b);
        established(&a);
        let (old_hello, old_auth) = (sent_b[0].frame(), sent_b[1].frame());

        let mut config_a = config(1, 2);
        config_a.epoch_proposal = 2;
        let mut new_a = machine(config_a, SECRET, 3);
        drain(&mut new_a);
        deliver_frame(&mut new_a, &old_hello, 0);
        let new_epoch = match new_a.phase {
            Phase::PeerAuth { epoch, .. } => epoch,
            other => panic!("old Hello not accepted: {other:?}"),
        };
        deliver_frame(&mut new_a, &old_auth, new_epoch);
        assert_eq!(
            new_a.status(),
            &Status::Failed(Failure::PeerFailedAuthentication)
        );
    }

    #[test]
    fn frames_out_of_order_are_protocol_violations() {
        let some_state = state(5, Role::Primary);
        let cases: [(&[Frame<'_>], &str); 5] = [
            (&[Frame::Auth { proof: [0; 32] }], "unexpected Auth"),
            (&[Frame::State(some_state)], "unexpected State"),
            (&[Frame::Flush { seq: 1 }], "unexpected Flush"),
            (
                &[Frame::KeepAlive { nonce: 1 }],
                "waiting for the peer's Hello",
            ),
            (&[Frame::Ack { seq: 1 }], "unexpected Ack"),
        ];
        for (frames, words) in cases {
            let mut a = machine(config(1, 2), SECRET, 1);
            drain(&mut a);
            for frame in frames {
                deliver_frame(&mut a, frame, 0);
            }
            let (reason, message) = refused(&a);
            assert_eq!(reason, RefuseReason::ProtocolViolation);
            assert!(message.contains(words), "{message}");
            assert_eq!(kinds(&drain(&mut a)), [FrameType::Refuse]);
        }

        // A second Hello, and a State before the peer's Auth.
        let mut a = machine(config(1, 2), SECRET, 1);
        let mut b = machine(config(2, 1), SECRET, 2);
        let hello_b = drain(&mut b);
        deliver(&mut a, &hello_b[0].bytes);
        deliver(&mut a, &hello_b[0].bytes);
        assert!(refused(&a).1.contains("epoch 0, expected 1"));
        let mut a = machine(config(1, 2), SECRET, 1);
        deliver(&mut a, &hello_b[0].bytes);
        deliver_frame(&mut a, &Frame::State(some_state), 1);
        assert!(refused(&a).1.contains("unexpected State"));
    }

    #[test]
    fn a_wrong_epoch_is_a_protocol_violation() {
        // Hello must carry 0.
        let mut a = machine(config(1, 2), SECRET, 1);
        let mut b = machine(config(2, 1), SECRET, 2);
        let hello_b = drain(&mut b).remove(0);
        deliver_frame(&mut a, &hello_b.frame(), 3);
        assert!(
            refused(&a)
                .1
                .contains("Hello frame with epoch 3, expected 0")
        );

        // A genuine Auth stamped with another epoch.
        let mut a = machine(config(1, 2), SECRET, 1);
        let mut b = machine(config(2, 1), SECRET, 2);
        deliver(&mut b, &drain(&mut a)[0].bytes);
        let from_b = drain(&mut b);
        deliver(&mut a, &from_b[0].bytes);
        deliver_frame(&mut a, &from_b[1].frame(), 99);
        let (reason, message) = refused(&a);
        assert_eq!(reason, RefuseReason::ProtocolViolation);
        assert!(message.contains("Auth frame with epoch 99, expected 1"));
        // The refusal after the epoch was agreed carries it.
        let refuse = drain(&mut a).pop().unwrap();
        assert_eq!(refuse.header().epoch(), 1);
    }

    #[test]
    fn a_refusal_from_the_peer_ends_the_handshake() {
        let mut a = machine(config(1, 2), SECRET, 1);
        drain(&mut a);
        let frame = Frame::Refuse {
            reason: RefuseReason::Unknown(400),
            message: "newer peer says no",
        };
        deliver_frame(&mut a, &frame, 0);
        assert_eq!(
            a.status(),
            &Status::Failed(Failure::PeerRefused {
                reason: RefuseReason::Unknown(400),
                message: "newer peer says no".to_string()
            })
        );
        assert!(a.poll_transmit().is_none(), "nothing is sent back");
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn the_deadline_fails_the_handshake_naming_the_missing_frame() {
        let mut config_a = config(1, 2);
        config_a.timeout_ms = 500;
        let local = state(1, Role::Primary);
        let mut a = Handshake::new(config_a, secret(SECRET), [1; 32], local, 1000);
        drain(&mut a);
        assert_eq!(a.poll_timeout(), Some(1500));
        a.handle_timeout(1499);
        assert_eq!(a.status(), &Status::InProgress);
        a.handle_timeout(1500);
        assert_eq!(
            a.status(),
            &Status::Failed(Failure::TimedOut {
                waiting_for: FrameType::Hello
            })
        );
        assert_eq!(last_refuse(&drain(&mut a)).0, RefuseReason::Timeout);
        a.handle_timeout(5000);
        assert!(a.poll_transmit().is_none(), "a timeout fires once");

        // Stuck after the Hello exchange: waiting for the Auth.
        let mut a = Handshake::new(config_a, secret(SECRET), [1; 32], local, 0);
        let mut b = machine(config(2, 1), SECRET, 2);
        deliver(&mut a, &drain(&mut b)[0].bytes);
        a.handle_timeout(500);
        assert_eq!(
            a.status(),
            &Status::Failed(Failure::TimedOut {
                waiting_for: FrameType::Auth
            })
        );
    }

    #[test]
    fn a_finished_handshake_ignores_timeouts() {
        let mut a = machine(config(1, 2), SECRET, 1);
        let mut b = machine(config(2, 1), SECRET, 2);
        drive(&mut a, &mut b);
        let before = established(&a);
        a.handle_timeout(u64::MAX);
        assert_eq!(established(&a), before);
    }

    #[test]
    fn secrets_are_bounded_and_never_printed() {
        assert_eq!(
            ClusterSecret::new(vec![1; CLUSTER_SECRET_BYTES_MIN - 1]).unwrap_err(),
            SecretError::TooShort {
                bytes: CLUSTER_SECRET_BYTES_MIN - 1
            }
        );
        assert_eq!(
            ClusterSecret::new(vec![1; CLUSTER_SECRET_BYTES_MAX + 1]).unwrap_err(),
            SecretError::TooLong {
                bytes: CLUSTER_SECRET_BYTES_MAX + 1
            }
        );
        let debug = format!("{:?}", secret(SECRET));
        assert!(
            !debug.contains("horse") && debug.contains("redacted"),
            "{debug}"
        );
        let handshake = machine(config(1, 2), SECRET, 1);
        assert!(!format!("{handshake:?}").contains("horse"));
    }

    #[test]
    fn the_secret_never_crosses_the_wire() {
        let mut a = machine(config(1, 2), SECRET, 1);
        let mut b = machine(config(2, 1), SECRET, 2);
        let (sent_a, sent_b) = drive(&mut a, &mut b);
        for sent in sent_a.iter().chain(&sent_b) {
            assert!(!sent.bytes.windows(SECRET.len()).any(|w| w == SECRET));
        }
    }

    #[test]
    fn long_refusal_messages_are_clamped_on_a_character_boundary() {
        let long = "é".repeat(REFUSE_MESSAGE_BYTES_MAX);
        let clamped = clamp_message(&long);
        assert_eq!(clamped.len(), REFUSE_MESSAGE_BYTES_MAX);
        let odd = format!("a{long}");
        assert_eq!(clamp_message(&odd).len(), REFUSE_MESSAGE_BYTES_MAX - 1);
        assert_eq!(clamp_message("short"), "short");
    }

    #[test]
    #[should_panic(expected = "node is its own peer")]
    fn a_config_naming_itself_as_peer_is_a_bug() {
        machine(config(1, 1), SECRET, 1);
    }
}

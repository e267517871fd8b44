//! Fuzz checks for the replication protocol: the frame codec (`repl_frame`) and the
//! handshake state machine (`repl_handshake`). Properties, not only "did not panic".

use std::collections::VecDeque;

use crate::constants::NBD_PAYLOAD_BYTES_MAX;
use crate::core::meta::{DiskState, Flags, Generations, Role};
use crate::core::repl::handshake::AUTH_FAILED_MESSAGE;
use crate::core::repl::wire::{
    DataFrame, FRAME_HEADER_BYTES, FRAME_MAGIC, Frame, FrameError, FrameHeader, FrameType, Hello,
    NodeState, RefuseReason, decode_header, encode, encode_data_header, verify,
};
use crate::core::repl::{
    AUTH_PROOF_BYTES, ClusterSecret, Failure, HANDSHAKE_TIMEOUT_MS_DEFAULT, Handshake,
    HandshakeConfig, NONCE_BYTES, Status, VersionRange,
};

/// Offset of the crc32c in the frame header (docs/replication-protocol.md).
const CRC_OFFSET: usize = 44;

/// Rewrites the crc of `header` over `header` and `payload`, the way an encoder would,
/// so fuzzed contents get past the checksum and reach the payload parsers.
fn reseal(header: &mut [u8; FRAME_HEADER_BYTES], payload: &[u8]) {
    header[CRC_OFFSET..].fill(0);
    let crc = crc32c::crc32c_append(crc32c::crc32c(header), payload);
    header[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

/// Input layout: byte 0 settings (bit 0: reseal the crc, bit 1: force the magic), then
/// 48 header bytes, then the payload.
///
/// Checks: decoding never panics; a header error is consistent with the bytes; an
/// accepted header never declares more than `NBD_PAYLOAD_BYTES_MAX`; a resealed frame
/// never fails the checksum; a frame that verifies re-encodes to exactly the input
/// bytes (and, for data frames, `encode_data_header` gives the same header).
pub fn repl_frame(data: &[u8]) {
    let Some((&settings, rest)) = data.split_first() else {
        return;
    };
    let Some((header_bytes, available)) = rest.split_at_checked(FRAME_HEADER_BYTES) else {
        return;
    };
    let mut header_bytes: [u8; FRAME_HEADER_BYTES] = header_bytes.try_into().unwrap();
    if settings & 0b10 != 0 {
        header_bytes[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    }
    let declared = u32::from_le_bytes(header_bytes[12..16].try_into().unwrap()) as usize;
    let resealed = settings & 0b1 != 0 && declared <= available.len();
    if resealed {
        reseal(&mut header_bytes, &available[..declared]);
    }

    let header = match decode_header(&header_bytes) {
        Ok(header) => header,
        Err(error) => return check_header_error(&header_bytes, error),
    };
    assert!(header.payload_bytes() <= NBD_PAYLOAD_BYTES_MAX);
    let Some(payload) = available.get(..header.payload_bytes() as usize) else {
        return; // The shell would wait for more bytes.
    };
    match verify(&header, &header_bytes, payload) {
        Ok(frame) => check_round_trip(&header, &header_bytes, payload, &frame),
        Err(FrameError::Checksum { received, computed }) => {
            assert!(!resealed, "a resealed frame failed its checksum");
            assert_ne!(received, computed);
        }
        Err(FrameError::Malformed { kind, reason }) => {
            assert_eq!(kind, header.kind());
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("verify returned a header error after decode_header: {other}"),
    }
}

fn check_header_error(bytes: &[u8; FRAME_HEADER_BYTES], error: FrameError) {
    let field_u32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    match error {
        FrameError::BadMagic(magic) => {
            assert_ne!(magic, FRAME_MAGIC);
            assert_eq!(magic, field_u32(0));
        }
        FrameError::ReservedNonZero(value) => {
            assert_ne!(value, 0);
            assert_eq!(value, field_u32(8));
        }
        FrameError::UnknownType(code) => assert_eq!(FrameType::from_code(code), None),
        FrameError::PayloadTooLarge { payload_bytes, .. }
        | FrameError::BadPayloadLength { payload_bytes, .. } => {
            assert_eq!(payload_bytes, field_u32(12));
        }
        FrameError::UnknownFlags { flags, .. } => assert_ne!(flags, 0),
        FrameError::UnusedFieldNonZero { .. } | FrameError::BadRange { .. } => {}
        FrameError::Checksum { .. } | FrameError::Malformed { .. } => {
            panic!("decode_header returned a payload error: {error}")
        }
    }
}

fn check_round_trip(
    header: &FrameHeader,
    header_bytes: &[u8; FRAME_HEADER_BYTES],
    payload: &[u8],
    frame: &Frame<'_>,
) {
    assert_eq!(frame.kind(), header.kind());
    let mut out = Vec::new();
    encode(frame, header.epoch(), &mut out);
    assert_eq!(&out[..FRAME_HEADER_BYTES], header_bytes, "header differs");
    assert_eq!(&out[FRAME_HEADER_BYTES..], payload, "payload differs");
    let data_header = match *frame {
        Frame::Write {
            seq,
            offset,
            fua,
            data,
        } => Some(encode_data_header(
            DataFrame::Write { fua },
            header.epoch(),
            seq,
            offset,
            data,
        )),
        Frame::ResyncData { seq, offset, data } => Some(encode_data_header(
            DataFrame::ResyncData,
            header.epoch(),
            seq,
            offset,
            data,
        )),
        _ => None,
    };
    if let Some(data_header) = data_header {
        assert_eq!(&data_header, header_bytes);
    }
}

/// The victim's secret. The fuzzer never sees a proof made with it for the victim's
/// peer role unless the genuine peer (which holds it in same-secret mode) made one.
const VICTIM_SECRET: &[u8] = b"victim secret: 32 random-ish by!";
/// The genuine peer's secret in wrong-secret mode.
const OTHER_SECRET: &[u8] = b"some other secret, also 32 bytes";
const VICTIM_NONCE: [u8; NONCE_BYTES] = [0x11; NONCE_BYTES];
const PEER_NONCE: [u8; NONCE_BYTES] = [0x22; NONCE_BYTES];
const MIRROR_UUID: [u8; 16] = *b"fuzz mirror uuid";

fn fuzz_config(node_id: u32, peer_node_id: u32, epoch_proposal: u64) -> HandshakeConfig {
    HandshakeConfig {
        versions: VersionRange::SUPPORTED,
        mirror_uuid: MIRROR_UUID,
        node_id,
        peer_node_id,
        data_bytes: 1 << 30,
        logical_block_bytes: 512,
        granularity_bytes: 4096,
        epoch_proposal,
        timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
    }
}

fn fuzz_state(current: u64, role: Role) -> NodeState {
    NodeState {
        generations: Generations {
            current,
            bitmap: 0,
            history: [0, 0],
        },
        disk_state: DiskState::Consistent,
        role,
        flags: Flags::WAS_PRIMARY,
        intent: role,
        dirty_bytes: 8192,
    }
}

/// Bytes of fuzz input, read front to back; reads past the end give zeroes so every
/// input is a complete program.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (&first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        first
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn take(&mut self, count: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(count.min(self.0.len()));
        self.0 = tail;
        head
    }
}

/// The victim (node 1) and the genuine peer (node 2), and what passed between them.
struct Harness {
    victim: Handshake,
    peer: Handshake,
    same_secret: bool,
    expected_version: Option<u16>,
    /// The victim's proposal, and the epoch of a connection with the genuine peer.
    victim_epoch: u64,
    expected_epoch: u64,
    /// Epoch proposals of every Hello handed to the victim (genuine or not).
    delivered_proposals: Vec<u64>,
    /// The last State frame handed to the victim.
    last_state_delivered: Option<NodeState>,
    /// Frames the victim sent, not yet delivered to the peer.
    to_peer: VecDeque<Vec<u8>>,
    /// Frames the genuine peer sent, not yet delivered to the victim.
    to_victim: VecDeque<Vec<u8>>,
    /// Every frame the victim sent, in order.
    victim_sent: Vec<Vec<u8>>,
    /// Proofs the genuine peer made.
    genuine_proofs: Vec<[u8; AUTH_PROOF_BYTES]>,
    /// The victim was handed an Auth carrying one of `genuine_proofs`.
    genuine_proof_delivered: bool,
    now_ms: u64,
}

/// Input layout: byte 0 settings (bit 0: the genuine peer holds the victim's secret;
/// bits 1-2: the peer's version range 1..=1, 1..=3, 2..=3 or 1..=2; bit 3: the peer
/// proposes the larger epoch; bit 4: the peer's data size differs), then operations,
/// one byte each (modulo 8) plus arguments: 0/1 a raw frame (u16 length, bytes; 0
/// reseals the crc), 2 deliver the peer's next frame, 3 deliver the victim's next frame
/// to the peer, 4 reflect the victim's last frame, 5 deliver the peer's next frame with
/// a byte changed (u16 index, xor) and the crc resealed, 6 inject a well-formed Hello
/// (tweak selector, u16 value, nonce), 7 advance the clock (u16 × 16 ms).
///
/// Checks: never panics; everything the victim sends decodes, in the order Hello, Auth,
/// State, with at most one Refuse at the end; the victim sends State and reaches
/// Established only after it was handed a proof the genuine peer made with the victim's
/// secret (so never in wrong-secret mode, whatever the fuzzer sends); Established has the
/// expected version, epoch and peer state; a failed authentication is answered with
/// exactly "authentication failed"; a final status never changes and sends no more.
pub fn repl_handshake(data: &[u8]) {
    let mut input = Input(data);
    let settings = input.byte();
    let mut harness = Harness::new(settings);
    let mut steps = 0;
    while !input.0.is_empty() && steps < 256 {
        steps += 1;
        let before = harness.victim.status().clone();
        let sent_before = harness.victim_sent.len();
        harness.step(&mut input);
        harness.pump();
        if before != Status::InProgress {
            assert_eq!(harness.victim.status(), &before, "a final status changed");
            assert_eq!(harness.victim_sent.len(), sent_before, "sent after the end");
        }
        harness.check();
    }
}

impl Harness {
    fn new(settings: u8) -> Harness {
        let same_secret = settings & 1 != 0;
        let peer_versions = match (settings >> 1) & 0b11 {
            0 => VersionRange::new(1, 1),
            1 => VersionRange::new(1, 3),
            2 => VersionRange::new(2, 3),
            _ => VersionRange::new(1, 2),
        };
        let (victim_epoch, peer_epoch) = if settings & 0b1000 != 0 {
            (3, 9)
        } else {
            (9, 3)
        };
        let mut peer_config = fuzz_config(2, 1, peer_epoch);
        peer_config.versions = peer_versions;
        if settings & 0b1_0000 != 0 {
            peer_config.data_bytes += 4096;
        }
        let victim_config = fuzz_config(1, 2, victim_epoch);
        let secret = |bytes: &[u8]| ClusterSecret::new(bytes.to_vec()).unwrap();
        let peer_secret = if same_secret {
            VICTIM_SECRET
        } else {
            OTHER_SECRET
        };
        let victim_state = fuzz_state(0x1234, Role::Primary);
        let peer_state = fuzz_state(0x5678, Role::Secondary);
        let mut harness = Harness {
            victim: Handshake::new(
                victim_config,
                secret(VICTIM_SECRET),
                VICTIM_NONCE,
                victim_state,
                0,
            ),
            peer: Handshake::new(peer_config, secret(peer_secret), PEER_NONCE, peer_state, 0),
            same_secret,
            expected_version: VersionRange::SUPPORTED.highest_common(peer_versions),
            victim_epoch,
            expected_epoch: victim_epoch.max(peer_epoch),
            delivered_proposals: Vec::new(),
            last_state_delivered: None,
            to_peer: VecDeque::new(),
            to_victim: VecDeque::new(),
            victim_sent: Vec::new(),
            genuine_proofs: Vec::new(),
            genuine_proof_delivered: false,
            now_ms: 0,
        };
        harness.pump();
        harness.check();
        harness
    }

    fn step(&mut self, input: &mut Input<'_>) {
        let op = input.byte() % 8;
        match op {
            0 | 1 => {
                let length = usize::from(input.u16());
                let mut bytes = input.take(length).to_vec();
                self.deliver_bytes(&mut bytes, op == 0);
            }
            2 => {
                if let Some(mut bytes) = self.to_victim.pop_front() {
                    self.deliver_bytes(&mut bytes, false);
                }
            }
            3 => {
                if let Some(bytes) = self.to_peer.pop_front() {
                    deliver_to(&mut self.peer, &bytes);
                }
            }
            4 => {
                if let Some(mut bytes) = self.victim_sent.last().cloned() {
                    self.deliver_bytes(&mut bytes, false);
                }
            }
            5 => {
                let (index, xor) = (usize::from(input.u16()), input.byte());
                if let Some(mut bytes) = self.to_victim.pop_front() {
                    let at = index % bytes.len();
                    bytes[at] ^= xor;
                    self.deliver_bytes(&mut bytes, true);
                }
            }
            6 => {
                let hello = self.fuzzed_hello(input);
                let mut bytes = Vec::new();
                encode(&Frame::Hello(hello), 0, &mut bytes);
                self.deliver_bytes(&mut bytes, false);
            }
            _ => {
                // Up to about 17 minutes per step, so the 10 s deadline is reachable.
                self.now_ms = self.now_ms.saturating_add(u64::from(input.u16()) * 16);
                self.victim.handle_timeout(self.now_ms);
            }
        }
    }

    /// A Hello the victim would accept, with one field changed as the input says and a
    /// nonce from the input.
    fn fuzzed_hello(&self, input: &mut Input<'_>) -> Hello {
        let mut hello = Hello {
            version_min: 1,
            version_max: 1,
            mirror_uuid: MIRROR_UUID,
            node_id: 2,
            expected_peer_id: 1,
            data_bytes: 1 << 30,
            logical_block_bytes: 512,
            granularity_bytes: 4096,
            epoch_proposal: 1,
            nonce: [0; NONCE_BYTES],
        };
        let tweak = input.byte();
        let value = input.u16();
        let nonce = input.take(NONCE_BYTES);
        hello.nonce[..nonce.len()].copy_from_slice(nonce);
        match tweak % 8 {
            0 => {}
            1 => hello.version_max = value.max(1),
            2 => hello.node_id = u32::from(value),
            3 => hello.expected_peer_id = u32::from(value),
            4 => hello.data_bytes = u64::from(value),
            5 => hello.logical_block_bytes = u32::from(value),
            6 => hello.granularity_bytes = u32::from(value),
            _ => hello.epoch_proposal = u64::from(value).max(1),
        }
        hello
    }

    /// Decodes `bytes` as one frame (resealing the crc first if asked) and hands it to
    /// the victim if it decodes; bytes that are not a frame would drop the link in the
    /// shell, so the victim never sees them.
    fn deliver_bytes(&mut self, bytes: &mut [u8], resealed: bool) {
        let Some((header_bytes, payload)) = bytes.split_at_mut_checked(FRAME_HEADER_BYTES) else {
            return;
        };
        let header_bytes: &mut [u8; FRAME_HEADER_BYTES] = header_bytes.try_into().unwrap();
        let declared = u32::from_le_bytes(header_bytes[12..16].try_into().unwrap()) as usize;
        let Some(payload) = payload.get(..declared) else {
            return;
        };
        if resealed {
            reseal(header_bytes, payload);
        }
        let Ok(header) = decode_header(header_bytes) else {
            return;
        };
        let Ok(frame) = verify(&header, header_bytes, payload) else {
            return;
        };
        match frame {
            Frame::Auth { proof } => {
                self.genuine_proof_delivered |= self.genuine_proofs.contains(&proof);
            }
            Frame::Hello(hello) => self.delivered_proposals.push(hello.epoch_proposal),
            Frame::State(state) if self.victim.status() == &Status::InProgress => {
                self.last_state_delivered = Some(state);
            }
            _ => {}
        }
        self.victim.handle_frame(&header, &frame);
    }

    /// Moves what both machines sent into the queues.
    fn pump(&mut self) {
        while let Some(bytes) = self.victim.poll_transmit() {
            self.victim_sent.push(bytes.clone());
            self.to_peer.push_back(bytes);
        }
        while let Some(bytes) = self.peer.poll_transmit() {
            if let Some(Frame::Auth { proof }) = decode_whole(&bytes).map(|(_, frame)| frame) {
                self.genuine_proofs.push(proof);
            }
            self.to_victim.push_back(bytes);
        }
    }

    fn check(&self) {
        let kinds: Vec<FrameType> = self
            .victim_sent
            .iter()
            .map(|bytes| {
                decode_whole(bytes)
                    .expect("the victim sent a bad frame")
                    .1
                    .kind()
            })
            .collect();
        let (refuse_count, body) = match kinds.split_last() {
            Some((FrameType::Refuse, body)) => (1, body),
            _ => (0, &kinds[..]),
        };
        let order = [FrameType::Hello, FrameType::Auth, FrameType::State];
        assert!(
            body.len() <= 3 && body == &order[..body.len()],
            "victim sent {kinds:?}"
        );
        assert!(!body.is_empty(), "Hello is always sent first");
        // After Hello, one epoch: the larger of our proposal and the accepted Hello's
        // (a Refuse sent before any Hello was accepted carries 0).
        let mut epochs: Vec<u64> = self.victim_sent[1..]
            .iter()
            .map(|bytes| decode_whole(bytes).unwrap())
            .filter(|(header, frame)| {
                let early = matches!(frame, Frame::Refuse { .. }) && header.epoch() == 0;
                // Only a Refuse right after our Hello may predate the agreement.
                assert!(
                    !early || self.victim_sent.len() == 2,
                    "late Refuse at epoch 0"
                );
                !early
            })
            .map(|(header, _)| header.epoch())
            .collect();
        epochs.dedup();
        assert!(epochs.len() <= 1, "epochs {epochs:?}");
        if let Some(&epoch) = epochs.first() {
            let possible = |proposal: &u64| self.victim_epoch.max(*proposal) == epoch;
            assert!(
                self.delivered_proposals.iter().any(possible),
                "epoch {epoch}"
            );
        }
        let may_trust_peer = self.same_secret && self.genuine_proof_delivered;
        if body.contains(&FrameType::State) {
            assert!(may_trust_peer, "State sent to an unauthenticated peer");
        }
        match self.victim.status() {
            Status::InProgress => assert_eq!(refuse_count, 0, "Refuse while in progress"),
            Status::Established(established) => {
                assert!(may_trust_peer, "Established without a valid proof");
                assert_eq!(Some(established.version), self.expected_version);
                assert_eq!(established.epoch, self.expected_epoch);
                assert_eq!(established.peer.node_id, 2);
                // State frames are not authenticated (nothing after Auth is: see the
                // protocol doc's limits), so the peer's state is the last State handed
                // over, not necessarily the genuine peer's.
                let state = self
                    .last_state_delivered
                    .expect("Established without a State");
                let peer = established.peer;
                assert_eq!(peer.generations, state.generations);
                assert_eq!(
                    (peer.disk_state, peer.role, peer.flags, peer.intent),
                    (state.disk_state, state.role, state.flags, state.intent)
                );
                assert_eq!(peer.dirty_bytes, state.dirty_bytes);
                assert_eq!(refuse_count, 0);
            }
            Status::Failed(Failure::PeerFailedAuthentication) => {
                let last = decode_whole(self.victim_sent.last().unwrap()).unwrap().1;
                let expected = Frame::Refuse {
                    reason: RefuseReason::AuthenticationFailed,
                    message: AUTH_FAILED_MESSAGE,
                };
                assert_eq!(last, expected);
            }
            Status::Failed(Failure::PeerRefused { .. }) => assert_eq!(refuse_count, 0),
            Status::Failed(Failure::Refused { .. } | Failure::TimedOut { .. }) => {
                assert_eq!(refuse_count, 1)
            }
        }
    }
}

fn decode_whole(bytes: &[u8]) -> Option<(FrameHeader, Frame<'_>)> {
    let (header_bytes, payload) = bytes.split_at_checked(FRAME_HEADER_BYTES)?;
    let header_bytes: &[u8; FRAME_HEADER_BYTES] = header_bytes.try_into().unwrap();
    let header = decode_header(header_bytes).ok()?;
    let frame = verify(&header, header_bytes, payload).ok()?;
    Some((header, frame))
}

fn deliver_to(machine: &mut Handshake, bytes: &[u8]) {
    let (header, frame) = decode_whole(bytes).expect("the victim's frames decode");
    machine.handle_frame(&header, &frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_inputs_are_ignored() {
        repl_frame(&[]);
        repl_frame(&[1; 10]);
        repl_handshake(&[]);
        repl_handshake(&[1]);
    }

    #[test]
    fn a_valid_frame_passes_the_frame_checks() {
        for frame in [
            Frame::Ack { seq: 7 },
            Frame::Write {
                seq: 1,
                offset: 4096,
                fua: true,
                data: &[1, 2, 3],
            },
        ] {
            let mut data = vec![0];
            encode(&frame, 3, &mut data);
            repl_frame(&data);
        }
    }

    /// The genuine exchange through the harness: deliver victim→peer and peer→victim
    /// in turn until Established, in same-secret mode.
    #[test]
    fn the_genuine_exchange_establishes_in_same_secret_mode() {
        let program = [1u8, 3, 2, 3, 2, 3, 2, 3, 2];
        let mut harness = Harness::new(program[0]);
        let mut input = Input(&program[1..]);
        while !input.0.is_empty() {
            harness.step(&mut input);
            harness.pump();
            harness.check();
        }
        assert!(matches!(harness.victim.status(), Status::Established(_)));
        // The same program with the wrong secret fails authentication.
        let mut wrong = program;
        wrong[0] = 0;
        repl_handshake(&wrong);
        let mut harness = Harness::new(0);
        let mut input = Input(&wrong[1..]);
        while !input.0.is_empty() {
            harness.step(&mut input);
            harness.pump();
        }
        assert_eq!(
            harness.victim.status(),
            &Status::Failed(Failure::PeerFailedAuthentication)
        );
    }
}

//! Online verify: both sides hash the same ranges region by region and only the
//! digests cross the wire; differing regions are marked dirty on the verifying side,
//! and a differential rebuild then copies them.
//!
//! Run on the node that would be the sync source (the Primary, or either when both are
//! Secondary), so the marked regions copy in the right direction. A verify run from a
//! Secondary ends when the peer becomes Primary (`abort_verify`). Each range is locked
//! on both sides while it is hashed, in the replication stream's order: a client write
//! to it waits on the verifying side, and on the peer the request is ordered after every
//! earlier write to the range — so a difference found is a real one, not a write that
//! was in flight.

use std::collections::BTreeMap;

use crate::core::meta;
use crate::core::meta::Role;
use crate::core::nbd::wire::Errno;
use crate::core::overlap::{Acquire, ByteRange};

use super::engine::{DiskPurpose, Engine};
use super::types::{Action, PeerMsg};

/// Bytes per verify request: 256 digests at the default 4 KiB granularity.
pub const VERIFY_CHUNK_BYTES: u64 = 1 << 20;
/// Verify requests in flight: enough to keep both disks busy, few enough that client
/// writes to a range being hashed rarely wait.
pub const VERIFY_IN_FLIGHT: usize = 4;

/// One SHA-256 digest per region.
pub type Digest = [u8; 32];

#[derive(Debug)]
struct VerifyOp {
    range: ByteRange,
    locked: bool,
    seq: Option<u64>,
    local: Option<Vec<Digest>>,
    remote: Option<Vec<Digest>>,
}

/// The verifying side's progress.
#[derive(Debug)]
pub(super) struct VerifySource {
    cursor: u64,
    ops: BTreeMap<u64, VerifyOp>,
    /// seq -> op key.
    by_seq: BTreeMap<u64, u64>,
    pub(super) verified_bytes: u64,
    pub(super) differing_regions: u64,
    pub(super) started_ms: u64,
}

/// A verify request from the peer being served.
#[derive(Debug)]
pub(super) struct ServeVerify {
    epoch: u64,
    seq: u64,
    range: ByteRange,
    locked: bool,
}

/// Verify status for `mirrorctl status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyStatus {
    pub running: bool,
    pub verified_bytes: u64,
    pub total_bytes: u64,
    pub differing_regions: u64,
    pub elapsed_ms: u64,
}

impl Engine {
    /// Operator: starts comparing both sides. Refused unless connected, in sync, and
    /// this node would be the sync source.
    pub fn start_verify(&mut self) -> Result<(), String> {
        let role = self.role();
        let now = self.now_ms;
        let Some(conn) = self.link.as_mut().filter(|c| c.is_replicating()) else {
            return Err("the mirror is not connected and replicating".into());
        };
        if conn.resync.is_some() || conn.has_target() {
            return Err("a resync is running: verify after it finishes".into());
        }
        if conn.verify.is_some() {
            return Err("a verify is already running".into());
        }
        if role == Role::Secondary && conn.peer.role == Role::Primary {
            return Err("run verify on the active node: differing regions are copied from the node that verifies".into());
        }
        conn.verify = Some(VerifySource {
            cursor: 0,
            ops: BTreeMap::new(),
            by_seq: BTreeMap::new(),
            verified_bytes: 0,
            differing_regions: 0,
            started_ms: now,
        });
        self.last_verify = None;
        self.pump();
        Ok(())
    }

    pub(super) fn verify_status(&self) -> Option<VerifyStatus> {
        let total = self.meta.layout().data_bytes;
        match self.link.as_ref().and_then(|c| c.verify.as_ref()) {
            Some(v) => Some(VerifyStatus {
                running: true,
                verified_bytes: v.verified_bytes,
                total_bytes: total,
                differing_regions: v.differing_regions,
                elapsed_ms: self.now_ms.saturating_sub(v.started_ms),
            }),
            None => self.last_verify.clone(),
        }
    }

    /// Starts verify requests within the in-flight bound; ends the verify when done.
    pub(super) fn verify_step(&mut self) -> bool {
        let data_bytes = self.meta.layout().data_bytes;
        let now = self.now_ms;
        let Some(verify) = self
            .link
            .as_mut()
            .filter(|c| c.is_replicating())
            .and_then(|c| c.verify.as_mut())
        else {
            return false;
        };
        let mut starts = Vec::new();
        while verify.ops.len() + starts.len() < VERIFY_IN_FLIGHT && verify.cursor < data_bytes {
            let length = VERIFY_CHUNK_BYTES.min(data_bytes - verify.cursor);
            starts.push(ByteRange::new(verify.cursor, length).expect("non-empty"));
            verify.cursor += length;
        }
        if starts.is_empty() {
            if verify.cursor >= data_bytes && verify.ops.is_empty() {
                let status = VerifyStatus {
                    running: false,
                    verified_bytes: verify.verified_bytes,
                    total_bytes: data_bytes,
                    differing_regions: verify.differing_regions,
                    elapsed_ms: now.saturating_sub(verify.started_ms),
                };
                self.link.as_mut().expect("checked").verify = None;
                self.last_verify = Some(status);
                return true;
            }
            return false;
        }
        for range in starts {
            let key = self.next_internal();
            let op = VerifyOp {
                range,
                locked: false,
                seq: None,
                local: None,
                remote: None,
            };
            self.link
                .as_mut()
                .and_then(|c| c.verify.as_mut())
                .expect("checked")
                .ops
                .insert(key, op);
            let locked = range.align_out(self.config.lock_alignment_bytes);
            if self.locks.acquire(key, locked) == Acquire::Granted {
                self.verify_locked(key);
            }
        }
        true
    }

    /// Whether `key` is a verify op of the current connection (lock routing).
    pub(super) fn is_verify_op(&self, key: u64) -> bool {
        self.link
            .as_ref()
            .and_then(|c| c.verify.as_ref())
            .is_some_and(|v| v.ops.contains_key(&key))
    }

    /// Our side holds the range: hash it and ask the peer for its digests.
    pub(super) fn verify_locked(&mut self, key: u64) {
        let region_bytes = self.meta.layout().granularity_bytes;
        let conn = self.link.as_mut().expect("verify ops live on a connection");
        let seq = conn.take_seq();
        let verify = conn.verify.as_mut().expect("live");
        let op = verify.ops.get_mut(&key).expect("live");
        op.locked = true;
        op.seq = Some(seq);
        verify.by_seq.insert(seq, key);
        let range = op.range;
        self.issue_digest(DiskPurpose::Digest(key), range, region_bytes);
        self.send(PeerMsg::VerifyRequest { seq, range }, None);
    }

    fn issue_digest(
        &mut self,
        purpose: DiskPurpose,
        range: ByteRange,
        region_bytes: u32,
    ) -> super::types::DiskOpId {
        let id = super::types::DiskOpId(self.next_disk_op);
        self.next_disk_op += 1;
        self.disk_ops.insert(id, purpose);
        self.actions.push_back(Action::Digest {
            id,
            range,
            region_bytes,
        });
        id
    }

    /// The shell computed the digests of a range (or failed to read it).
    pub fn handle_digests(
        &mut self,
        id: super::types::DiskOpId,
        result: Result<Vec<Digest>, Errno>,
    ) {
        let purpose = self.disk_ops.remove(&id).expect("digests of an issued op");
        match purpose {
            DiskPurpose::Digest(key) => match result {
                Ok(digests) => {
                    if let Some(op) = self
                        .link
                        .as_mut()
                        .and_then(|c| c.verify.as_mut())
                        .and_then(|v| v.ops.get_mut(&key))
                    {
                        op.local = Some(digests);
                        self.verify_compare(key);
                    }
                }
                Err(errno) => {
                    self.fail_with(format!(
                        "verify read failed ({errno:?}): the disk is failed"
                    ));
                    self.drop_link("local disk failed during verify".into());
                }
            },
            DiskPurpose::DigestServe(serve) => {
                let Some(request) = self.verify_serving.remove(&serve) else {
                    return;
                };
                if request.locked {
                    self.release_lock(serve);
                }
                let same_link = self.link.as_ref().is_some_and(|c| c.epoch == request.epoch);
                match result {
                    Ok(digests) if same_link => {
                        self.send(
                            PeerMsg::VerifyReply {
                                seq: request.seq,
                                digests,
                            },
                            None,
                        );
                    }
                    Ok(_) => {}
                    Err(errno) => {
                        self.fail_with(format!(
                            "verify read failed ({errno:?}): the disk is failed"
                        ));
                        self.drop_link("local disk failed during verify".into());
                    }
                }
            }
            // Its verify went away with the connection.
            DiskPurpose::DigestOrphan => {}
            other => panic!("digests for a {other:?} op"),
        }
        self.pump();
    }

    /// Ends our verify early (the peer became Primary, see `peer_state`): its ranges
    /// are released at once, digests still being computed are ignored when they
    /// arrive, and so are the replies of requests already sent. The status shows it
    /// interrupted.
    pub(super) fn abort_verify(&mut self) {
        let Some(conn) = self.link.as_mut() else {
            return;
        };
        let Some(verify) = conn.verify.take() else {
            return;
        };
        conn.verify_abandoned.extend(verify.by_seq.keys().copied());
        self.verify_link_lost(Some(verify));
    }

    /// The peer's digests for one of our requests.
    pub(super) fn verify_reply(&mut self, seq: u64, digests: Vec<Digest>) {
        if self
            .link
            .as_mut()
            .is_some_and(|c| c.verify_abandoned.remove(&seq))
        {
            return;
        }
        let key = self
            .link
            .as_mut()
            .and_then(|c| c.verify.as_mut())
            .and_then(|v| v.by_seq.remove(&seq));
        let Some(key) = key else {
            self.drop_link(format!(
                "protocol violation: VerifyReply for unknown request {seq}"
            ));
            return;
        };
        let op = self
            .link
            .as_mut()
            .and_then(|c| c.verify.as_mut())
            .and_then(|v| v.ops.get_mut(&key))
            .expect("indexed");
        op.remote = Some(digests);
        self.verify_compare(key);
    }

    /// Both digests known: mark differing regions dirty, release the range.
    fn verify_compare(&mut self, key: u64) {
        let granularity = u64::from(self.meta.layout().granularity_bytes);
        let data_bytes = self.meta.layout().data_bytes;
        let verify = self
            .link
            .as_mut()
            .and_then(|c| c.verify.as_mut())
            .expect("live");
        let op = verify.ops.get(&key).expect("live");
        let (Some(local), Some(remote)) = (&op.local, &op.remote) else {
            return;
        };
        let range = op.range;
        let regions = range.length().div_ceil(granularity) as usize;
        if local.len() != regions || remote.len() != regions {
            let got = remote.len();
            self.drop_link(format!(
                "protocol violation: {got} digests for {regions} regions"
            ));
            return;
        }
        let mut differing: Vec<meta::ByteRange> = Vec::new();
        for (index, (a, b)) in local.iter().zip(remote.iter()).enumerate() {
            if a != b {
                let start = range.start() + index as u64 * granularity;
                let end = (start + granularity).min(data_bytes);
                differing.push(meta::ByteRange::new(start, end - start));
            }
        }
        let op = verify.ops.remove(&key).expect("live");
        verify.verified_bytes += range.length();
        verify.differing_regions += differing.len() as u64;
        if !differing.is_empty() {
            self.meta.mark_dirty(&differing);
        }
        if op.locked {
            self.release_lock(key);
        }
    }

    /// The peer asks for the digests of a range: lock it in stream order, then hash.
    pub(super) fn serve_verify(&mut self, seq: u64, range: ByteRange) {
        let epoch = self.link.as_ref().expect("a connection").epoch;
        let id = self.next_internal();
        self.verify_serving.insert(
            id,
            ServeVerify {
                epoch,
                seq,
                range,
                locked: false,
            },
        );
        let locked = range.align_out(self.config.lock_alignment_bytes);
        if self.locks.acquire(id, locked) == Acquire::Granted {
            self.serve_verify_locked(id);
        }
    }

    pub(super) fn serve_verify_locked(&mut self, id: u64) {
        let region_bytes = self.meta.layout().granularity_bytes;
        let request = self.verify_serving.get_mut(&id).expect("live");
        request.locked = true;
        let range = request.range;
        self.issue_digest(DiskPurpose::DigestServe(id), range, region_bytes);
    }

    /// Link lost: verify ops release their ranges (or drop out of the lock queue when
    /// granted); digests still being computed are ignored when they arrive.
    pub(super) fn verify_link_lost(&mut self, verify: Option<VerifySource>) {
        let Some(verify) = verify else {
            return;
        };
        self.last_verify = Some(VerifyStatus {
            running: false,
            verified_bytes: verify.verified_bytes,
            total_bytes: self.meta.layout().data_bytes,
            differing_regions: verify.differing_regions,
            elapsed_ms: self.now_ms.saturating_sub(verify.started_ms),
        });
        for (key, op) in verify.ops {
            if op.locked {
                self.release_lock(key);
            } else {
                self.orphaned_resync_locks.insert(key);
            }
            if op.local.is_none() {
                // Its digest op is still in flight; forget it when it returns.
                let ids: Vec<_> = self
                    .disk_ops
                    .iter()
                    .filter(|(_, p)| **p == DiskPurpose::Digest(key))
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.disk_ops.insert(id, DiskPurpose::DigestOrphan);
                }
            }
        }
    }
}

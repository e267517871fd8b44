//! Transmission-phase requests: the 28-byte header codec and the one validator that
//! turns a header into a [`Decision`] (execute, reject with an errno, disconnect, or
//! close the connection).
//!
//! Every spec rule a request can break is checked in [`validate`], in one place, so the
//! shell never sees an unchecked offset, length or flag: a [`Request`] can only be
//! obtained from `validate`. Spec references are to sections of the NBD protocol
//! document ("Request types", "Command flags", "Error values", "Size constraints").

use super::handshake::{ExportInfo, Negotiated};
use super::wire::{Errno, REQUEST_MAGIC, Reader, cmd, cmd_flag, transmission_flag};
use crate::constants::NBD_WRITE_DISCARD_BYTES_MAX;

/// magic 4 + flags 2 + type 2 + cookie 8 + offset 8 + length 4 (spec: Request message).
pub const REQUEST_HEADER_BYTES: usize = 28;

/// A request header as it came off the wire, magic checked, nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// The wire form, magic included (for clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut bytes = [0u8; REQUEST_HEADER_BYTES];
        bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes[4..6].copy_from_slice(&self.flags.to_be_bytes());
        bytes[6..8].copy_from_slice(&self.kind.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.offset.to_be_bytes());
        bytes[24..28].copy_from_slice(&self.length.to_be_bytes());
        bytes
    }
}

/// Input that breaks the framing of the request stream: the connection cannot continue
/// and is closed without a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// The header did not start with NBD_REQUEST_MAGIC (we cannot know where the next
    /// request starts). Carries the magic received.
    BadMagic(u32),
    /// A WRITE longer than `write_discard_bytes_max`: too large to read and drop.
    WritePayloadTooLarge(u32),
}

impl std::fmt::Display for FramingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FramingError::BadMagic(magic) => write!(f, "bad request magic {magic:#010x}"),
            FramingError::WritePayloadTooLarge(length) => {
                write!(
                    f,
                    "NBD_CMD_WRITE payload of {length} bytes is too large to discard"
                )
            }
        }
    }
}

/// Decodes a request header. Only the magic is checked here; everything else is
/// [`validate`]'s job, so this cannot fail on any other field.
pub fn decode_request_header(
    bytes: &[u8; REQUEST_HEADER_BYTES],
) -> Result<RequestHeader, FramingError> {
    let mut reader = Reader::new(bytes);
    // The array has exactly REQUEST_HEADER_BYTES, so none of these reads can fail.
    let truncated = "a request header is 28 bytes";
    let magic = reader.u32().expect(truncated);
    if magic != REQUEST_MAGIC {
        return Err(FramingError::BadMagic(magic));
    }
    let header = RequestHeader {
        flags: reader.u16().expect(truncated),
        kind: reader.u16().expect(truncated),
        cookie: reader.u64().expect(truncated),
        offset: reader.u64().expect(truncated),
        length: reader.u32().expect(truncated),
    };
    assert!(reader.is_empty());
    Ok(header)
}

/// What `validate` needs to know about the connection: fixed when transmission starts.
#[derive(Debug, Clone, Copy)]
pub struct TransmissionParams {
    pub size_bytes: u64,
    pub read_only: bool,
    pub structured_replies: bool,
    /// Exactly the flags sent to the client: a command or flag is accepted only if it
    /// was advertised here.
    pub transmission_flags: u16,
    /// The maximum payload advertised in NBD_INFO_BLOCK_SIZE: READ and WRITE above it
    /// are rejected.
    pub payload_bytes_max: u32,
    /// A rejected WRITE up to this length has its payload read and dropped; above it
    /// the connection is closed.
    pub write_discard_bytes_max: u32,
}

impl TransmissionParams {
    /// The parameters for a connection that negotiated `negotiated` on `export`, with
    /// the WRITE discard cap from `constants`.
    pub fn new(export: &ExportInfo, negotiated: &Negotiated) -> TransmissionParams {
        let params = TransmissionParams {
            size_bytes: export.size_bytes,
            read_only: export.read_only,
            structured_replies: negotiated.structured_replies,
            transmission_flags: negotiated.transmission_flags,
            payload_bytes_max: export.block_size_max_bytes,
            write_discard_bytes_max: NBD_WRITE_DISCARD_BYTES_MAX,
        };
        params.assert_consistent();
        params
    }

    /// The parameters are built by our own code, so an inconsistency is a bug.
    fn assert_consistent(&self) {
        let flags = self.transmission_flags;
        assert!(
            flags & transmission_flag::HAS_FLAGS != 0,
            "HAS_FLAGS MUST be set"
        );
        assert_eq!(
            self.read_only,
            flags & transmission_flag::READ_ONLY != 0,
            "read_only disagrees with the advertised READ_ONLY flag"
        );
        assert!(
            self.payload_bytes_max > 0,
            "payload_bytes_max must be positive"
        );
        assert!(
            self.payload_bytes_max <= self.write_discard_bytes_max,
            "a WRITE we would accept must not be one we would close on"
        );
        // Spec (Transmission flags): SEND_DF MUST be clear without structured replies,
        // and SEND_FAST_ZERO MUST be clear without SEND_WRITE_ZEROES.
        assert!(flags & transmission_flag::SEND_DF == 0 || self.structured_replies);
        assert!(
            flags & transmission_flag::SEND_FAST_ZERO == 0
                || flags & transmission_flag::SEND_WRITE_ZEROES != 0
        );
    }

    fn advertises(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }
}

/// A validated command with the flags that matter to the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    Trim {
        fua: bool,
    },
    WriteZeroes {
        fua: bool,
        /// The area must stay allocated (no hole punching).
        no_hole: bool,
        /// Fail with NBD_ENOTSUP unless the zeroing is faster than a WRITE.
        fast_zero: bool,
    },
    Cache,
}

/// A request that passed [`validate`]: the command is supported and advertised, its
/// flags apply, its length is within limits and `offset + length <= size_bytes`
/// (FLUSH: offset and length are zero). Only `validate` constructs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    cookie: u64,
    offset: u64,
    length: u32,
    command: Command,
}

impl Request {
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn length(&self) -> u32 {
        self.length
    }

    pub fn command(&self) -> Command {
        self.command
    }

    /// Bytes of payload that follow the header on the wire: `length` for WRITE.
    pub fn payload_bytes(&self) -> u32 {
        match self.command {
            Command::Write { .. } => self.length,
            _ => 0,
        }
    }

    /// The reply must wait until this command's writes are durable. FUA on READ,
    /// FLUSH or CACHE is accepted but means nothing: they write nothing (spec: Command
    /// flags, "the server MAY ignore this bit").
    pub fn is_fua(&self) -> bool {
        match self.command {
            Command::Write { fua } | Command::Trim { fua } | Command::WriteZeroes { fua, .. } => {
                fua
            }
            Command::Read | Command::Flush | Command::Cache => false,
        }
    }
}

/// What the shell does with a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run it. For WRITE, exactly `length` payload bytes follow the header.
    Execute(Request),
    /// Read and drop `discard_bytes` of payload (non-zero only for WRITE), then reply
    /// with `errno`. The connection stays usable. `reason` is for logs and for the
    /// structured error message.
    Reject {
        cookie: u64,
        errno: Errno,
        discard_bytes: u32,
        reason: &'static str,
    },
    /// NBD_CMD_DISC: no reply; finish the replies in flight, then close.
    Disconnect,
    /// No reply; close the connection now.
    Close(FramingError),
}

/// Decides what to do with one request. The checks run in this order, and the first
/// that fails decides:
///
/// 1. WRITE longer than `write_discard_bytes_max` → close (we will not read it).
/// 2. DISC → disconnect, whatever its other fields.
/// 3. Unknown or unsupported command type → EINVAL.
/// 4. Write-type command on a read-only export → EPERM.
/// 5. Command flags: unknown, not applicable to the command, or not advertised → EINVAL.
/// 6. Command not advertised (FLUSH, TRIM, WRITE_ZEROES) → EINVAL.
/// 7. FLUSH with a non-zero offset or length → EINVAL; otherwise FLUSH executes.
/// 8. Zero length → EINVAL.
/// 9. READ/WRITE longer than `payload_bytes_max` → EINVAL (EOVERFLOW for a READ with
///    structured replies).
/// 10. Past the end of the export (or `offset + length` overflows) → ENOSPC for WRITE
///     and WRITE_ZEROES, EINVAL otherwise.
///
/// A rejected WRITE always carries `discard_bytes == length`, so the stream stays in
/// step with the client.
pub fn validate(header: &RequestHeader, params: &TransmissionParams) -> Decision {
    params.assert_consistent();
    // Spec (Request message): a WRITE is followed by `length` bytes whatever else is
    // wrong with it, so the payload size decides first whether we can stay in sync.
    // Spec (Size constraints): a server MAY hard-disconnect on a payload large enough
    // to be a denial of service; our cap is well above the 32 MiB it asks us to take.
    if header.kind == cmd::WRITE && header.length > params.write_discard_bytes_max {
        return Decision::Close(FramingError::WritePayloadTooLarge(header.length));
    }
    // Spec (NBD_CMD_DISC): there is no reply, so there is nothing to report a bad
    // offset, length or flag to; the client asked to go, so we go.
    if header.kind == cmd::DISC {
        return Decision::Disconnect;
    }
    match check(header, params) {
        Ok(command) => Decision::Execute(Request {
            cookie: header.cookie,
            offset: header.offset,
            length: header.length,
            command,
        }),
        Err((errno, reason)) => Decision::Reject {
            cookie: header.cookie,
            errno,
            discard_bytes: if header.kind == cmd::WRITE {
                header.length
            } else {
                0
            },
            reason,
        },
    }
}

type Rejection = (Errno, &'static str);

fn check(header: &RequestHeader, params: &TransmissionParams) -> Result<Command, Rejection> {
    check_type(header.kind)?;
    // Spec (Error values): "SHOULD return NBD_EPERM if it receives a write or trim
    // request on a read-only export"; (NBD_CMD_WRITE_ZEROES) likewise EPERM. Checked
    // before the flags so the client's user learns the real reason (read-only
    // exports advertise no FUA, so a FUA write would otherwise read as EINVAL).
    let writes = matches!(header.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && params.read_only {
        return Err((
            Errno::Perm,
            "write, trim or write-zeroes on a read-only export",
        ));
    }
    check_flags(header, params)?;
    check_advertised(header.kind, params)?;

    if header.kind == cmd::FLUSH {
        // Spec (NBD_CMD_FLUSH): "length and offset are reserved, and MUST be set to
        // all-zero". The Linux driver leaves them zero for flushes.
        if header.offset != 0 || header.length != 0 {
            return Err((
                Errno::Inval,
                "NBD_CMD_FLUSH with a non-zero offset or length",
            ));
        }
        return Ok(Command::Flush);
    }

    // Spec (Request types): a zero-length READ, WRITE, TRIM, WRITE_ZEROES or CACHE has
    // unspecified behaviour, and the server SHOULD NOT disconnect. We answer EINVAL
    // (what nbdkit does): it keeps empty requests away from the disk, where
    // fallocate(len = 0) itself fails with EINVAL and a zero-length READ chunk is
    // not encodable (OFFSET_DATA must carry at least one byte).
    if header.length == 0 {
        return Err((Errno::Inval, "zero-length request"));
    }

    check_payload_size(header, params)?;
    check_bounds(header, params)?;
    Ok(command_of(header))
}

/// Spec (Error values): "SHOULD return NBD_EINVAL if it receives an unknown command".
fn check_type(kind: u16) -> Result<(), Rejection> {
    match kind {
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES => Ok(()),
        // Spec (Metadata querying): "Servers SHOULD reply with NBD_EINVAL to clients
        // sending NBD_CMD_BLOCK_STATUS without selecting at least one metadata
        // context"; we never select one (NBD_OPT_SET_META_CONTEXT is unsupported).
        cmd::BLOCK_STATUS => Err((
            Errno::Inval,
            "NBD_CMD_BLOCK_STATUS without a negotiated metadata context",
        )),
        _ => Err((Errno::Inval, "unknown command type")),
    }
}

/// Spec (Command flags): "Clients MUST NOT set a command flag bit that is not
/// documented for the particular command; and whether a flag is valid may depend on
/// negotiation"; (Error values): EINVAL for an unknown flag or one "not explicitly
/// documented as applicable to the given request".
fn check_flags(header: &RequestHeader, params: &TransmissionParams) -> Result<(), Rejection> {
    let flags = header.flags;
    let is_write_zeroes = header.kind == cmd::WRITE_ZEROES;
    if flags & !cmd_flag::KNOWN != 0 {
        return Err((Errno::Inval, "unknown command flag"));
    }
    // FUA "is valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated,
    // in which case the server MUST accept all commands with this bit set".
    if flags & cmd_flag::FUA != 0 && !params.advertises(transmission_flag::SEND_FUA) {
        return Err((
            Errno::Inval,
            "FUA flag but NBD_FLAG_SEND_FUA was not advertised",
        ));
    }
    // NO_HOLE is "valid during NBD_CMD_WRITE_ZEROES" only.
    if flags & cmd_flag::NO_HOLE != 0 && !is_write_zeroes {
        return Err((
            Errno::Inval,
            "NO_HOLE flag on a command other than WRITE_ZEROES",
        ));
    }
    // FAST_ZERO is valid on WRITE_ZEROES only, and "SHOULD fail with NBD_EINVAL" when
    // NBD_FLAG_SEND_FAST_ZERO was not advertised (spec: NBD_CMD_WRITE_ZEROES).
    if flags & cmd_flag::FAST_ZERO != 0 && !is_write_zeroes {
        return Err((
            Errno::Inval,
            "FAST_ZERO flag on a command other than WRITE_ZEROES",
        ));
    }
    if flags & cmd_flag::FAST_ZERO != 0 && !params.advertises(transmission_flag::SEND_FAST_ZERO) {
        return Err((
            Errno::Inval,
            "FAST_ZERO flag but NBD_FLAG_SEND_FAST_ZERO was not advertised",
        ));
    }
    // DF is valid on READ only, and MUST NOT be set unless NBD_FLAG_SEND_DF was sent.
    if flags & cmd_flag::DF != 0 && header.kind != cmd::READ {
        return Err((Errno::Inval, "DF flag on a command other than READ"));
    }
    if flags & cmd_flag::DF != 0 && !params.advertises(transmission_flag::SEND_DF) {
        return Err((
            Errno::Inval,
            "DF flag but NBD_FLAG_SEND_DF was not advertised",
        ));
    }
    // REQ_ONE is valid on BLOCK_STATUS only, which check_type already refused.
    if flags & cmd_flag::REQ_ONE != 0 {
        return Err((
            Errno::Inval,
            "REQ_ONE flag on a command other than BLOCK_STATUS",
        ));
    }
    // PAYLOAD_LEN belongs to extended headers, which we never negotiate.
    if flags & cmd_flag::PAYLOAD_LEN != 0 {
        return Err((Errno::Inval, "PAYLOAD_LEN flag without extended headers"));
    }
    Ok(())
}

/// Spec (Request types): a client MUST NOT send FLUSH, TRIM or WRITE_ZEROES unless the
/// matching transmission flag was set. CACHE is accepted either way: the spec notes
/// clients that send it without NBD_FLAG_SEND_CACHE, and it is a harmless hint.
fn check_advertised(kind: u16, params: &TransmissionParams) -> Result<(), Rejection> {
    let (flag, reason) = match kind {
        cmd::FLUSH => (
            transmission_flag::SEND_FLUSH,
            "NBD_CMD_FLUSH but NBD_FLAG_SEND_FLUSH was not advertised",
        ),
        cmd::TRIM => (
            transmission_flag::SEND_TRIM,
            "NBD_CMD_TRIM but NBD_FLAG_SEND_TRIM was not advertised",
        ),
        cmd::WRITE_ZEROES => (
            transmission_flag::SEND_WRITE_ZEROES,
            "NBD_CMD_WRITE_ZEROES but NBD_FLAG_SEND_WRITE_ZEROES was not advertised",
        ),
        _ => return Ok(()),
    };
    if params.advertises(flag) {
        Ok(())
    } else {
        Err((Errno::Inval, reason))
    }
}

/// Spec (Size constraints): the client MUST NOT send a READ (with simple replies) or
/// WRITE longer than the maximum payload. Over-long WRITE: EINVAL (EOVERFLOW is for
/// commands *without* payload, spec: Error values). Over-long READ with structured
/// replies: EOVERFLOW, which NBD_CMD_READ explicitly permits ("permitted to reject
/// large read requests up front with NBD_EOVERFLOW, so a client should be prepared to
/// retry with smaller requests"); with simple replies such a read "will fail", and
/// EINVAL is the generic answer. TRIM, WRITE_ZEROES and CACHE carry no payload and
/// MAY exceed the maximum; we serve any 32-bit length for them (fallocate and
/// fadvise take any length), as the spec asks ("SHOULD NOT disconnect").
fn check_payload_size(
    header: &RequestHeader,
    params: &TransmissionParams,
) -> Result<(), Rejection> {
    if header.length <= params.payload_bytes_max {
        return Ok(());
    }
    match header.kind {
        cmd::READ if params.structured_replies => Err((
            Errno::Overflow,
            "NBD_CMD_READ longer than the advertised maximum payload",
        )),
        cmd::READ => Err((
            Errno::Inval,
            "NBD_CMD_READ longer than the advertised maximum payload",
        )),
        cmd::WRITE => Err((
            Errno::Inval,
            "NBD_CMD_WRITE longer than the advertised maximum payload",
        )),
        _ => Ok(()),
    }
}

/// Spec (Error values): "SHOULD return NBD_ENOSPC if it receives a write request
/// including one or more sectors beyond the size of the device"; (NBD_CMD_WRITE_ZEROES)
/// likewise ENOSPC; EINVAL for "a read or trim request" beyond the end, and for
/// BLOCK_STATUS; CACHE is read-like, so EINVAL. An `offset + length` that overflows u64
/// is necessarily beyond the end.
fn check_bounds(header: &RequestHeader, params: &TransmissionParams) -> Result<(), Rejection> {
    let end = header.offset.checked_add(u64::from(header.length));
    if end.is_some_and(|end| end <= params.size_bytes) {
        return Ok(());
    }
    match header.kind {
        cmd::WRITE | cmd::WRITE_ZEROES => Err((Errno::NoSpc, "write beyond the end of the export")),
        _ => Err((Errno::Inval, "request beyond the end of the export")),
    }
}

/// The command for a header that passed every check.
fn command_of(header: &RequestHeader) -> Command {
    let fua = header.flags & cmd_flag::FUA != 0;
    match header.kind {
        cmd::READ => Command::Read,
        cmd::WRITE => Command::Write { fua },
        cmd::TRIM => Command::Trim { fua },
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            fua,
            no_hole: header.flags & cmd_flag::NO_HOLE != 0,
            fast_zero: header.flags & cmd_flag::FAST_ZERO != 0,
        },
        cmd::CACHE => Command::Cache,
        // FLUSH returned early and check_type refused every other type.
        other => unreachable!("command_of called for {}", cmd::name(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::{NBD_PAYLOAD_BYTES_MAX, NBD_WRITE_DISCARD_BYTES_MAX};
    use crate::core::nbd::wire::transmission_flag as tf;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 30;
    const ALL_WRITE_FLAGS: u16 = tf::HAS_FLAGS
        | tf::SEND_FLUSH
        | tf::SEND_FUA
        | tf::SEND_TRIM
        | tf::SEND_WRITE_ZEROES
        | tf::SEND_FAST_ZERO
        | tf::SEND_CACHE
        | tf::CAN_MULTI_CONN;

    fn params() -> TransmissionParams {
        TransmissionParams {
            size_bytes: SIZE,
            read_only: false,
            structured_replies: false,
            transmission_flags: ALL_WRITE_FLAGS,
            payload_bytes_max: NBD_PAYLOAD_BYTES_MAX,
            write_discard_bytes_max: NBD_WRITE_DISCARD_BYTES_MAX,
        }
    }

    fn read_only_params() -> TransmissionParams {
        TransmissionParams {
            read_only: true,
            transmission_flags: tf::HAS_FLAGS
                | tf::READ_ONLY
                | tf::SEND_FLUSH
                | tf::SEND_CACHE
                | tf::CAN_MULTI_CONN,
            ..params()
        }
    }

    fn header(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 0xc00c1e,
            offset,
            length,
        }
    }

    /// Asserts a rejection with the given errno and discard, and returns its reason.
    fn expect_reject(
        header: RequestHeader,
        params: &TransmissionParams,
        errno: Errno,
        discard_bytes: u32,
    ) -> &'static str {
        match validate(&header, params) {
            Decision::Reject {
                cookie,
                errno: got_errno,
                discard_bytes: got_discard,
                reason,
            } => {
                assert_eq!(cookie, header.cookie);
                assert_eq!(got_errno, errno, "{reason}");
                assert_eq!(got_discard, discard_bytes, "{reason}");
                reason
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn expect_execute(header: RequestHeader, params: &TransmissionParams) -> Request {
        match validate(&header, params) {
            Decision::Execute(request) => {
                assert_eq!(request.cookie(), header.cookie);
                assert_eq!(request.offset(), header.offset);
                assert_eq!(request.length(), header.length);
                request
            }
            other => panic!("expected execution, got {other:?}"),
        }
    }

    // --- header codec -------------------------------------------------------------

    #[test]
    fn header_encoding_is_byte_exact() {
        let bytes = RequestHeader {
            flags: 0x0001,
            kind: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            length: 0x200,
        }
        .encode();
        assert_eq!(
            bytes,
            [
                0x25, 0x60, 0x95, 0x13, // magic
                0, 1, // flags
                0, 1, // type
                1, 2, 3, 4, 5, 6, 7, 8, // cookie
                0, 0, 0, 0, 0, 0, 0x10, 0, // offset
                0, 0, 2, 0, // length
            ]
        );
    }

    #[test]
    fn decode_rejects_a_bad_magic() {
        let mut bytes = header(cmd::READ, 0, 0, 512).encode();
        bytes[0] = 0x12;
        assert_eq!(
            decode_request_header(&bytes),
            Err(FramingError::BadMagic(0x1260_9513))
        );
    }

    proptest! {
        #[test]
        fn header_round_trips(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let header = RequestHeader { flags, kind, cookie, offset, length };
            prop_assert_eq!(decode_request_header(&header.encode()), Ok(header));
        }

        #[test]
        fn decode_then_encode_is_identity_for_good_magic(mut bytes: [u8; REQUEST_HEADER_BYTES]) {
            bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let header = decode_request_header(&bytes).expect("magic is right");
            prop_assert_eq!(header.encode(), bytes);
        }

        #[test]
        fn validate_never_executes_out_of_bounds(
            flags: u16, kind in 0u16..10, offset: u64, length: u32, size_bytes: u64,
        ) {
            let params = TransmissionParams { size_bytes, ..params() };
            if let Decision::Execute(request) = validate(&header(kind, flags, offset, length), &params) {
                let end = request.offset().checked_add(u64::from(request.length()));
                prop_assert!(end.is_some_and(|end| end <= size_bytes));
            }
        }
    }

    // --- executes ----------------------------------------------------------------

    #[test]
    fn read_executes() {
        let request = expect_execute(header(cmd::READ, 0, 4096, 4096), &params());
        assert_eq!(request.command(), Command::Read);
        assert_eq!(request.payload_bytes(), 0);
        assert!(!request.is_fua());
    }

    #[test]
    fn write_executes_with_its_payload_and_fua() {
        let request = expect_execute(header(cmd::WRITE, cmd_flag::FUA, 0, 512), &params());
        assert_eq!(request.command(), Command::Write { fua: true });
        assert_eq!(request.payload_bytes(), 512);
        assert!(request.is_fua());
    }

    #[test]
    fn write_at_the_very_end_executes() {
        expect_execute(header(cmd::WRITE, 0, SIZE - 512, 512), &params());
    }

    #[test]
    fn flush_trim_cache_write_zeroes_execute() {
        let p = params();
        assert_eq!(
            expect_execute(header(cmd::FLUSH, 0, 0, 0), &p).command(),
            Command::Flush
        );
        assert_eq!(
            expect_execute(header(cmd::TRIM, cmd_flag::FUA, 0, 4096), &p).command(),
            Command::Trim { fua: true }
        );
        assert_eq!(
            expect_execute(header(cmd::CACHE, 0, 0, 4096), &p).command(),
            Command::Cache
        );
        let all = cmd_flag::FUA | cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO;
        let request = expect_execute(header(cmd::WRITE_ZEROES, all, 0, 4096), &p);
        assert_eq!(
            request.command(),
            Command::WriteZeroes {
                fua: true,
                no_hole: true,
                fast_zero: true
            }
        );
        assert!(request.is_fua());
        assert_eq!(request.payload_bytes(), 0);
    }

    #[test]
    fn fua_is_accepted_and_ignored_on_non_writing_commands() {
        // Spec (Command flags): "the server MUST accept all commands with this bit set".
        let p = params();
        for kind in [cmd::READ, cmd::FLUSH, cmd::CACHE] {
            let length = if kind == cmd::FLUSH { 0 } else { 512 };
            assert!(!expect_execute(header(kind, cmd_flag::FUA, 0, length), &p).is_fua());
        }
    }

    #[test]
    fn cache_executes_even_when_not_advertised() {
        let p = TransmissionParams {
            transmission_flags: ALL_WRITE_FLAGS & !tf::SEND_CACHE,
            ..params()
        };
        expect_execute(header(cmd::CACHE, 0, 0, 512), &p);
    }

    #[test]
    fn trim_and_write_zeroes_may_exceed_the_payload_maximum() {
        let p = TransmissionParams {
            size_bytes: u64::MAX,
            ..params()
        };
        expect_execute(header(cmd::TRIM, 0, 0, u32::MAX), &p);
        expect_execute(header(cmd::WRITE_ZEROES, 0, 0, u32::MAX), &p);
        expect_execute(header(cmd::CACHE, 0, 0, u32::MAX), &p);
    }

    #[test]
    fn read_only_export_still_reads_and_flushes() {
        let p = read_only_params();
        expect_execute(header(cmd::READ, 0, 0, 512), &p);
        expect_execute(header(cmd::FLUSH, 0, 0, 0), &p);
    }

    #[test]
    fn read_with_df_executes_when_advertised() {
        let p = TransmissionParams {
            structured_replies: true,
            transmission_flags: ALL_WRITE_FLAGS | tf::SEND_DF,
            ..params()
        };
        expect_execute(header(cmd::READ, cmd_flag::DF, 0, 512), &p);
    }

    // --- disconnect and close -------------------------------------------------------

    #[test]
    fn disc_disconnects_whatever_its_fields() {
        assert_eq!(
            validate(&header(cmd::DISC, 0, 0, 0), &params()),
            Decision::Disconnect
        );
        assert_eq!(
            validate(&header(cmd::DISC, 0xffff, 99, 99), &read_only_params()),
            Decision::Disconnect
        );
    }

    #[test]
    fn write_beyond_the_discard_cap_closes() {
        let length = NBD_WRITE_DISCARD_BYTES_MAX + 1;
        assert_eq!(
            validate(&header(cmd::WRITE, 0, 0, length), &params()),
            Decision::Close(FramingError::WritePayloadTooLarge(length))
        );
    }

    #[test]
    fn write_beyond_the_discard_cap_closes_even_when_otherwise_invalid() {
        let length = u32::MAX;
        assert_eq!(
            validate(
                &header(cmd::WRITE, 0xffff, u64::MAX, length),
                &read_only_params()
            ),
            Decision::Close(FramingError::WritePayloadTooLarge(length))
        );
    }

    // --- rejections, one per rule ---------------------------------------------------

    #[test]
    fn reject_unknown_command_type() {
        for kind in [cmd::RESIZE, 9, 0xffff] {
            let reason = expect_reject(header(kind, 0, 0, 512), &params(), Errno::Inval, 0);
            assert_eq!(reason, "unknown command type");
        }
    }

    #[test]
    fn reject_block_status_without_meta_context() {
        let reason = expect_reject(
            header(cmd::BLOCK_STATUS, 0, 0, 512),
            &params(),
            Errno::Inval,
            0,
        );
        assert!(reason.contains("metadata context"));
    }

    #[test]
    fn reject_write_on_read_only_with_eperm_and_discard() {
        expect_reject(
            header(cmd::WRITE, 0, 0, 4096),
            &read_only_params(),
            Errno::Perm,
            4096,
        );
    }

    #[test]
    fn reject_fua_write_on_read_only_with_eperm() {
        expect_reject(
            header(cmd::WRITE, cmd_flag::FUA, 0, 512),
            &read_only_params(),
            Errno::Perm,
            512,
        );
    }

    #[test]
    fn reject_trim_on_read_only_with_eperm() {
        expect_reject(
            header(cmd::TRIM, 0, 0, 4096),
            &read_only_params(),
            Errno::Perm,
            0,
        );
    }

    #[test]
    fn reject_write_zeroes_on_read_only_with_eperm() {
        expect_reject(
            header(cmd::WRITE_ZEROES, 0, 0, 4096),
            &read_only_params(),
            Errno::Perm,
            0,
        );
    }

    #[test]
    fn reject_unknown_command_flag() {
        let reason = expect_reject(
            header(cmd::READ, 1 << 6, 0, 512),
            &params(),
            Errno::Inval,
            0,
        );
        assert_eq!(reason, "unknown command flag");
        expect_reject(
            header(cmd::WRITE, 1 << 15, 0, 512),
            &params(),
            Errno::Inval,
            512,
        );
    }

    #[test]
    fn reject_fua_when_not_advertised() {
        let reason = expect_reject(
            header(cmd::READ, cmd_flag::FUA, 0, 512),
            &read_only_params(),
            Errno::Inval,
            0,
        );
        assert!(reason.contains("SEND_FUA"));
    }

    #[test]
    fn reject_no_hole_outside_write_zeroes() {
        expect_reject(
            header(cmd::WRITE, cmd_flag::NO_HOLE, 0, 512),
            &params(),
            Errno::Inval,
            512,
        );
        expect_reject(
            header(cmd::TRIM, cmd_flag::NO_HOLE, 0, 512),
            &params(),
            Errno::Inval,
            0,
        );
    }

    #[test]
    fn reject_fast_zero_outside_write_zeroes() {
        expect_reject(
            header(cmd::WRITE, cmd_flag::FAST_ZERO, 0, 512),
            &params(),
            Errno::Inval,
            512,
        );
    }

    #[test]
    fn reject_fast_zero_when_not_advertised() {
        let p = TransmissionParams {
            transmission_flags: ALL_WRITE_FLAGS & !tf::SEND_FAST_ZERO,
            ..params()
        };
        let reason = expect_reject(
            header(cmd::WRITE_ZEROES, cmd_flag::FAST_ZERO, 0, 512),
            &p,
            Errno::Inval,
            0,
        );
        assert!(reason.contains("SEND_FAST_ZERO"));
    }

    #[test]
    fn reject_df_when_not_advertised() {
        let p = TransmissionParams {
            structured_replies: true,
            ..params()
        };
        expect_reject(header(cmd::READ, cmd_flag::DF, 0, 512), &p, Errno::Inval, 0);
    }

    #[test]
    fn reject_df_outside_read() {
        let p = TransmissionParams {
            structured_replies: true,
            transmission_flags: ALL_WRITE_FLAGS | tf::SEND_DF,
            ..params()
        };
        expect_reject(
            header(cmd::WRITE, cmd_flag::DF, 0, 512),
            &p,
            Errno::Inval,
            512,
        );
    }

    #[test]
    fn reject_req_one() {
        expect_reject(
            header(cmd::READ, cmd_flag::REQ_ONE, 0, 512),
            &params(),
            Errno::Inval,
            0,
        );
    }

    #[test]
    fn reject_payload_len_without_extended_headers() {
        expect_reject(
            header(cmd::WRITE, cmd_flag::PAYLOAD_LEN, 0, 512),
            &params(),
            Errno::Inval,
            512,
        );
    }

    #[test]
    fn reject_flush_when_not_advertised() {
        let p = TransmissionParams {
            transmission_flags: ALL_WRITE_FLAGS & !tf::SEND_FLUSH,
            ..params()
        };
        expect_reject(header(cmd::FLUSH, 0, 0, 0), &p, Errno::Inval, 0);
    }

    #[test]
    fn reject_trim_when_not_advertised() {
        let p = TransmissionParams {
            transmission_flags: ALL_WRITE_FLAGS & !tf::SEND_TRIM,
            ..params()
        };
        expect_reject(header(cmd::TRIM, 0, 0, 512), &p, Errno::Inval, 0);
    }

    #[test]
    fn reject_write_zeroes_when_not_advertised() {
        let p = TransmissionParams {
            transmission_flags: ALL_WRITE_FLAGS & !(tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO),
            ..params()
        };
        expect_reject(header(cmd::WRITE_ZEROES, 0, 0, 512), &p, Errno::Inval, 0);
    }

    #[test]
    fn reject_flush_with_offset_or_length() {
        expect_reject(header(cmd::FLUSH, 0, 512, 0), &params(), Errno::Inval, 0);
        expect_reject(header(cmd::FLUSH, 0, 0, 512), &params(), Errno::Inval, 0);
    }

    #[test]
    fn reject_zero_length() {
        for kind in [cmd::READ, cmd::TRIM, cmd::CACHE, cmd::WRITE_ZEROES] {
            let reason = expect_reject(header(kind, 0, 0, 0), &params(), Errno::Inval, 0);
            assert_eq!(reason, "zero-length request");
        }
        expect_reject(header(cmd::WRITE, 0, 0, 0), &params(), Errno::Inval, 0);
    }

    #[test]
    fn reject_oversized_read_with_einval_on_simple_replies() {
        let length = NBD_PAYLOAD_BYTES_MAX + 1;
        expect_reject(header(cmd::READ, 0, 0, length), &params(), Errno::Inval, 0);
    }

    #[test]
    fn reject_oversized_read_with_eoverflow_on_structured_replies() {
        let p = TransmissionParams {
            structured_replies: true,
            ..params()
        };
        expect_reject(
            header(cmd::READ, 0, 0, NBD_PAYLOAD_BYTES_MAX + 1),
            &p,
            Errno::Overflow,
            0,
        );
    }

    #[test]
    fn reject_oversized_write_and_discard_its_payload() {
        let length = NBD_PAYLOAD_BYTES_MAX + 1;
        expect_reject(
            header(cmd::WRITE, 0, 0, length),
            &params(),
            Errno::Inval,
            length,
        );
    }

    #[test]
    fn reject_write_at_exactly_the_discard_cap_keeps_the_connection() {
        let length = NBD_WRITE_DISCARD_BYTES_MAX;
        expect_reject(
            header(cmd::WRITE, 0, 0, length),
            &params(),
            Errno::Inval,
            length,
        );
    }

    #[test]
    fn reject_read_past_the_end_with_einval() {
        expect_reject(
            header(cmd::READ, 0, SIZE - 512, 1024),
            &params(),
            Errno::Inval,
            0,
        );
    }

    #[test]
    fn reject_trim_and_cache_past_the_end_with_einval() {
        expect_reject(header(cmd::TRIM, 0, SIZE, 512), &params(), Errno::Inval, 0);
        expect_reject(header(cmd::CACHE, 0, SIZE, 512), &params(), Errno::Inval, 0);
    }

    #[test]
    fn reject_write_past_the_end_with_enospc() {
        expect_reject(
            header(cmd::WRITE, 0, SIZE, 512),
            &params(),
            Errno::NoSpc,
            512,
        );
    }

    #[test]
    fn reject_write_zeroes_past_the_end_with_enospc() {
        expect_reject(
            header(cmd::WRITE_ZEROES, 0, SIZE - 1, 2),
            &params(),
            Errno::NoSpc,
            0,
        );
    }

    #[test]
    fn reject_offset_overflow() {
        let p = TransmissionParams {
            size_bytes: u64::MAX,
            ..params()
        };
        let offset = u64::MAX - 100;
        expect_reject(header(cmd::READ, 0, offset, 512), &p, Errno::Inval, 0);
        expect_reject(header(cmd::WRITE, 0, offset, 512), &p, Errno::NoSpc, 512);
        expect_reject(
            header(cmd::WRITE_ZEROES, 0, offset, 512),
            &p,
            Errno::NoSpc,
            0,
        );
        expect_reject(header(cmd::TRIM, 0, offset, 512), &p, Errno::Inval, 0);
    }

    // --- params -------------------------------------------------------------------------

    #[test]
    fn params_from_export_and_negotiation() {
        let export = crate::core::nbd::handshake::tests::sample_export();
        let negotiated = Negotiated {
            export_name: export.name.clone(),
            structured_replies: true,
            transmission_flags: export.transmission_flags(),
        };
        let p = TransmissionParams::new(&export, &negotiated);
        assert_eq!(p.size_bytes, export.size_bytes);
        assert!(p.structured_replies);
        assert_eq!(p.payload_bytes_max, export.block_size_max_bytes);
        assert_eq!(p.write_discard_bytes_max, NBD_WRITE_DISCARD_BYTES_MAX);
    }

    #[test]
    #[should_panic(expected = "read_only disagrees")]
    fn inconsistent_params_are_a_bug() {
        let p = TransmissionParams {
            read_only: true,
            ..params()
        };
        validate(&header(cmd::READ, 0, 0, 512), &p);
    }
}

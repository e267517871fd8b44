//! The NBD wire vocabulary: every magic number, flag, option, reply, command and error
//! code as a named constant, the NBD errno type, and a bounds-checked big-endian reader.
//!
//! Values are from the NBD protocol specification ("Values" section and the message
//! layouts under "Handshake" and "Transmission"). All integers on the wire are
//! big-endian. Nothing here does I/O.

/// "NBDMAGIC": first 8 bytes of every server greeting (spec: Newstyle negotiation).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second 8 bytes of the newstyle greeting, and the first 8 bytes of
/// every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// First 8 bytes of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// First 4 bytes of every transmission-phase request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// First 4 bytes of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// First 4 bytes of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Longest string the spec allows (export names, error messages): "MUST be no longer
/// than 4096 bytes" (spec: Conventions). A protocol fact, not a tunable limit, so it
/// lives here rather than in `constants`.
pub const STRING_BYTES_MAX: usize = 4096;

/// Reserved zero bytes that end the NBD_OPT_EXPORT_NAME answer unless the client set
/// NBD_FLAG_C_NO_ZEROES (spec: Newstyle negotiation).
pub const EXPORT_NAME_ZERO_PAD_BYTES: usize = 124;

/// Handshake flags, 16 bits, sent by the server in the greeting.
pub mod handshake_flag {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags, 32 bits, sent by the client after the greeting. The server MUST drop
/// the connection on any other bit (spec: Client flags).
pub mod client_flag {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every bit a client may set given that we advertise both handshake flags.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Option numbers (spec: Option types).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;

    /// The option's spec name, for logs and error messages.
    pub fn name(option: u32) -> &'static str {
        match option {
            EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
            ABORT => "NBD_OPT_ABORT",
            LIST => "NBD_OPT_LIST",
            PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
            STARTTLS => "NBD_OPT_STARTTLS",
            INFO => "NBD_OPT_INFO",
            GO => "NBD_OPT_GO",
            STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
            _ => "unknown option",
        }
    }
}

/// Option reply types (spec: Option reply types). Error replies have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    /// Set in every error reply type.
    pub const ERR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR_BIT + 1;
    pub const ERR_POLICY: u32 = ERR_BIT + 2;
    pub const ERR_INVALID: u32 = ERR_BIT + 3;
    pub const ERR_PLATFORM: u32 = ERR_BIT + 4;
    pub const ERR_TLS_REQD: u32 = ERR_BIT + 5;
    pub const ERR_UNKNOWN: u32 = ERR_BIT + 6;
    pub const ERR_SHUTDOWN: u32 = ERR_BIT + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT + 8;
    pub const ERR_TOO_BIG: u32 = ERR_BIT + 9;
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT + 10;

    /// True for the reply types that end an option's answer with a failure.
    pub fn is_error(reply_type: u32) -> bool {
        reply_type & ERR_BIT != 0
    }
}

/// Information types carried in NBD_REP_INFO replies to NBD_OPT_INFO / NBD_OPT_GO.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;

    /// Exact reply-data length of NBD_INFO_EXPORT: type 2 + size 8 + flags 2.
    pub const EXPORT_REPLY_BYTES: u32 = 12;
    /// Exact reply-data length of NBD_INFO_BLOCK_SIZE: type 2 + three u32.
    pub const BLOCK_SIZE_REPLY_BYTES: u32 = 14;
}

/// Transmission flags, 16 bits, sent with NBD_INFO_EXPORT or the EXPORT_NAME answer
/// (spec: Transmission flags).
pub mod transmission_flag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Request types (spec: Request types).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
    pub const RESIZE: u16 = 8;

    /// The command's spec name, for logs and error messages.
    pub fn name(kind: u16) -> &'static str {
        match kind {
            READ => "NBD_CMD_READ",
            WRITE => "NBD_CMD_WRITE",
            DISC => "NBD_CMD_DISC",
            FLUSH => "NBD_CMD_FLUSH",
            TRIM => "NBD_CMD_TRIM",
            CACHE => "NBD_CMD_CACHE",
            WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
            BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
            RESIZE => "NBD_CMD_RESIZE",
            _ => "unknown command",
        }
    }
}

/// Command flags, 16 bits, in every request (spec: Command flags).
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
    /// Every flag the spec defines; any other bit is unknown.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO | PAYLOAD_LEN;
}

/// Structured reply chunk flags (spec: Structured reply flags).
pub mod reply_flag {
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types (spec: Structured reply types). Error chunks have
/// bit 15 set.
pub mod reply_type {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR_BIT: u16 = 1 << 15;
    pub const ERROR: u16 = ERROR_BIT + 1;
    pub const ERROR_OFFSET: u16 = ERROR_BIT + 2;
}

/// The errors an NBD reply may carry (spec: Error values). The spec restricts the
/// error field to these eight values, so a host errno is mapped with [`Errno::from_os`]
/// before it reaches the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
}

impl Errno {
    /// Every variant, for exhaustive tests.
    pub const ALL: [Errno; 8] = [
        Errno::Perm,
        Errno::Io,
        Errno::NoMem,
        Errno::Inval,
        Errno::NoSpc,
        Errno::Overflow,
        Errno::NotSup,
        Errno::Shutdown,
    ];

    /// The value sent in a reply's error field (never zero: zero means success).
    pub fn wire(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// The inverse of [`Errno::wire`], for clients and tests; `None` for zero and for
    /// values outside the spec's list.
    pub fn from_wire(value: u32) -> Option<Errno> {
        Errno::ALL.into_iter().find(|errno| errno.wire() == value)
    }

    /// Maps a host errno from a failed disk operation to the NBD error the spec asks
    /// for: EDQUOT and EFBIG become ENOSPC (spec: Error values), EROFS becomes EPERM
    /// (a read-only backing is the write-on-read-only case), anything without an NBD
    /// equivalent becomes EIO.
    pub fn from_os(errno: i32) -> Errno {
        match errno {
            libc::EPERM | libc::EROFS => Errno::Perm,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
            libc::EOPNOTSUPP => Errno::NotSup,
            libc::ENOMEM => Errno::NoMem,
            libc::EINVAL => Errno::Inval,
            libc::ESHUTDOWN => Errno::Shutdown,
            libc::EOVERFLOW => Errno::Overflow,
            _ => Errno::Io,
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Errno::Perm => "NBD_EPERM",
            Errno::Io => "NBD_EIO",
            Errno::NoMem => "NBD_ENOMEM",
            Errno::Inval => "NBD_EINVAL",
            Errno::NoSpc => "NBD_ENOSPC",
            Errno::Overflow => "NBD_EOVERFLOW",
            Errno::NotSup => "NBD_ENOTSUP",
            Errno::Shutdown => "NBD_ESHUTDOWN",
        };
        f.write_str(name)
    }
}

/// The longest prefix of `message` that fits the spec's string limit, cut on a
/// character boundary so it stays valid UTF-8. Error messages we send pass through it.
pub fn clamp_string(message: &str) -> &str {
    if message.len() <= STRING_BYTES_MAX {
        return message;
    }
    let mut end = STRING_BYTES_MAX;
    // A UTF-8 character is at most 4 bytes, so this loop runs at most 3 times.
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// A cursor over bytes that came from the wire. Every read is bounds-checked and
/// returns `None` when the bytes run out, so wire-derived lengths never index a slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The next `count` bytes, or `None` (consuming nothing) if fewer remain.
    pub fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.bytes.split_at_checked(count)?;
        self.bytes = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let head = self.take(N)?;
        // `take(N)` returned exactly N bytes, so the conversion cannot fail.
        Some(head.try_into().expect("take(N) returns N bytes"))
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn errno_wire_values_match_the_spec() {
        let expected = [1, 5, 12, 22, 28, 75, 95, 108];
        for (errno, value) in Errno::ALL.into_iter().zip(expected) {
            assert_eq!(errno.wire(), value);
            assert_eq!(Errno::from_wire(value), Some(errno));
        }
        assert_eq!(Errno::from_wire(0), None);
        assert_eq!(Errno::from_wire(2), None);
    }

    #[test]
    fn errno_from_os_follows_the_spec_mapping() {
        assert_eq!(Errno::from_os(libc::EPERM), Errno::Perm);
        assert_eq!(Errno::from_os(libc::EROFS), Errno::Perm);
        assert_eq!(Errno::from_os(libc::ENOSPC), Errno::NoSpc);
        assert_eq!(Errno::from_os(libc::EDQUOT), Errno::NoSpc);
        assert_eq!(Errno::from_os(libc::EFBIG), Errno::NoSpc);
        assert_eq!(Errno::from_os(libc::EOPNOTSUPP), Errno::NotSup);
        assert_eq!(Errno::from_os(libc::ENOTSUP), Errno::NotSup);
        assert_eq!(Errno::from_os(libc::ENOMEM), Errno::NoMem);
        assert_eq!(Errno::from_os(libc::EINVAL), Errno::Inval);
        assert_eq!(Errno::from_os(libc::ESHUTDOWN), Errno::Shutdown);
        assert_eq!(Errno::from_os(libc::EOVERFLOW), Errno::Overflow);
        assert_eq!(Errno::from_os(libc::EIO), Errno::Io);
        assert_eq!(Errno::from_os(libc::EBADF), Errno::Io);
        assert_eq!(Errno::from_os(0), Errno::Io);
        assert_eq!(Errno::from_os(-1), Errno::Io);
    }

    #[test]
    fn clamp_string_keeps_short_strings_and_cuts_on_char_boundaries() {
        assert_eq!(clamp_string("short"), "short");
        let exact = "a".repeat(STRING_BYTES_MAX);
        assert_eq!(clamp_string(&exact), exact);
        // 'é' is two bytes; an odd prefix puts byte 4096 inside a character.
        let long = format!("a{}", "é".repeat(STRING_BYTES_MAX));
        let clamped = clamp_string(&long);
        assert_eq!(clamped.len(), STRING_BYTES_MAX - 1);
        assert!(long.starts_with(clamped));
    }

    #[test]
    fn reader_refuses_to_read_past_the_end() {
        let mut reader = Reader::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(reader.u16(), Some(1));
        assert_eq!(reader.u32(), Some(2));
        assert_eq!(reader.u16(), None);
        assert_eq!(reader.remaining(), 1, "a failed read consumes nothing");
        assert_eq!(reader.take(2), None);
        assert_eq!(reader.take(1), Some(&[9][..]));
        assert!(reader.is_empty());
        assert_eq!(reader.u64(), None);
    }

    #[test]
    fn flag_sets_cover_the_defined_bits() {
        assert_eq!(cmd_flag::KNOWN, 0b11_1111);
        assert_eq!(client_flag::KNOWN, 0b11);
        assert!(rep::is_error(rep::ERR_TOO_BIG));
        assert!(!rep::is_error(rep::ACK));
    }
}

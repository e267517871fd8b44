//! The client side of the NBD protocol, as pure codecs: the greeting check, the
//! client flags, NBD_OPT_GO and its replies, request headers (`RequestHeader::encode`)
//! and simple replies. Enough for a small blocking client (`mirrordisk demo` uses one);
//! no structured replies, no extended headers, no TLS.
//!
//! Every decoder takes bytes that came from a server and returns an error value for
//! anything the spec does not allow, never a panic. Spec references are to sections of
//! the NBD protocol document ("Fixed newstyle negotiation", "Option types",
//! "Option reply types", "Simple reply message").

use super::handshake::{GREETING_BYTES, OPTION_HEADER_BYTES, OPTION_REPLY_HEADER_BYTES};
use super::reply::SIMPLE_REPLY_BYTES;
use super::wire::{
    Errno, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, Reader, SIMPLE_REPLY_MAGIC, STRING_BYTES_MAX,
    client_flag, handshake_flag, info, opt, rep,
};

/// The second 8 bytes of an oldstyle greeting (spec: Oldstyle negotiation), which a
/// newstyle-only client names in its error instead of "bad magic".
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Longest option reply data this client accepts. The replies to NBD_OPT_GO are an
/// error message (at most 4096 bytes plus nothing) or NBD_REP_INFO items of at most a
/// name or description (4096 + 2); anything longer is a broken server.
pub const OPTION_REPLY_DATA_BYTES_MAX: u32 = STRING_BYTES_MAX as u32 + 64;

/// What went wrong on the server's side of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The greeting did not start with NBDMAGIC.
    NotNbd(u64),
    /// An oldstyle server: no options, no export names.
    Oldstyle,
    /// A newstyle server without FIXED_NEWSTYLE: NBD_OPT_GO may not be understood.
    NotFixedNewstyle,
    /// An option reply without its magic.
    BadOptionReplyMagic(u64),
    /// An option reply to an option we did not send.
    WrongOption { sent: u32, got: u32 },
    /// Option reply data longer than `OPTION_REPLY_DATA_BYTES_MAX`.
    OptionReplyTooLong(u32),
    /// NBD_REP_INFO whose data is too short for its type, or NBD_REP_ACK with data.
    MalformedReply(u32),
    /// NBD_REP_ACK to NBD_OPT_GO before the mandatory NBD_INFO_EXPORT.
    NoExportInfo,
    /// A reply type not allowed in answer to NBD_OPT_GO.
    UnexpectedReply(u32),
    /// The server refused the option: error reply type and its message.
    Refused { reply_type: u32, message: String },
    /// A transmission reply without the simple reply magic (a structured reply we
    /// never asked for, or garbage).
    BadReplyMagic(u32),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotNbd(magic) => {
                write!(f, "not an NBD server (greeting starts {magic:#018x})")
            }
            ClientError::Oldstyle => f.write_str("oldstyle NBD server (no export names)"),
            ClientError::NotFixedNewstyle => {
                f.write_str("the server does not speak fixed-newstyle NBD")
            }
            ClientError::BadOptionReplyMagic(magic) => {
                write!(f, "option reply with bad magic {magic:#018x}")
            }
            ClientError::WrongOption { sent, got } => write!(
                f,
                "reply to {} while waiting for {}",
                opt::name(*got),
                opt::name(*sent)
            ),
            ClientError::OptionReplyTooLong(length) => {
                write!(f, "option reply of {length} bytes is too long")
            }
            ClientError::MalformedReply(reply_type) => {
                write!(f, "malformed option reply (type {reply_type:#x})")
            }
            ClientError::NoExportInfo => {
                f.write_str("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
            }
            ClientError::UnexpectedReply(reply_type) => {
                write!(f, "unexpected option reply type {reply_type:#x}")
            }
            ClientError::Refused {
                reply_type,
                message,
            } => {
                let kind = match *reply_type {
                    rep::ERR_UNSUP => "unsupported",
                    rep::ERR_POLICY => "refused by policy",
                    rep::ERR_INVALID => "invalid",
                    rep::ERR_UNKNOWN => "unknown export",
                    rep::ERR_SHUTDOWN => "server shutting down",
                    _ => "refused",
                };
                if message.is_empty() {
                    write!(f, "{kind} (reply type {reply_type:#x})")
                } else {
                    write!(f, "{kind}: {message}")
                }
            }
            ClientError::BadReplyMagic(magic) => {
                write!(f, "reply with bad magic {magic:#010x}")
            }
        }
    }
}

/// Checks the server's greeting and returns the client flags to send: FIXED_NEWSTYLE,
/// and NO_ZEROES when the server offers it (spec: "the client MUST NOT set a flag the
/// server did not advertise").
pub fn client_flags_for(greeting: &[u8; GREETING_BYTES]) -> Result<u32, ClientError> {
    let mut reader = Reader::new(greeting);
    let truncated = "a greeting is 18 bytes";
    let magic = reader.u64().expect(truncated);
    if magic != NBDMAGIC {
        return Err(ClientError::NotNbd(magic));
    }
    let second = reader.u64().expect(truncated);
    if second == OLDSTYLE_MAGIC {
        return Err(ClientError::Oldstyle);
    }
    if second != IHAVEOPT {
        return Err(ClientError::NotNbd(second));
    }
    let flags = reader.u16().expect(truncated);
    if flags & handshake_flag::FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle);
    }
    let mut client = client_flag::FIXED_NEWSTYLE;
    if flags & handshake_flag::NO_ZEROES != 0 {
        client |= client_flag::NO_ZEROES;
    }
    Ok(client)
}

/// NBD_OPT_GO for `export` with no information requests (the server still sends
/// NBD_INFO_EXPORT, which is mandatory), header included. The name is ours, so one
/// longer than the spec allows is a bug.
pub fn encode_opt_go(export: &str) -> Vec<u8> {
    assert!(export.len() <= STRING_BYTES_MAX, "export name too long");
    let data_bytes = 4 + export.len() + 2;
    let mut out = Vec::with_capacity(OPTION_HEADER_BYTES + data_bytes);
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt::GO.to_be_bytes());
    out.extend_from_slice(&(data_bytes as u32).to_be_bytes());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// An option reply header (spec: Option reply types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    /// Bytes of reply data that follow the header.
    pub length: u32,
}

/// Decodes an option reply header to `sent`, refusing a bad magic, a reply to another
/// option and data longer than this client reads.
pub fn decode_option_reply_header(
    bytes: &[u8; OPTION_REPLY_HEADER_BYTES],
    sent: u32,
) -> Result<OptionReplyHeader, ClientError> {
    let mut reader = Reader::new(bytes);
    let truncated = "an option reply header is 20 bytes";
    let magic = reader.u64().expect(truncated);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientError::BadOptionReplyMagic(magic));
    }
    let header = OptionReplyHeader {
        option: reader.u32().expect(truncated),
        reply_type: reader.u32().expect(truncated),
        length: reader.u32().expect(truncated),
    };
    if header.option != sent {
        return Err(ClientError::WrongOption {
            sent,
            got: header.option,
        });
    }
    if header.length > OPTION_REPLY_DATA_BYTES_MAX {
        return Err(ClientError::OptionReplyTooLong(header.length));
    }
    Ok(header)
}

/// The export as NBD_INFO_EXPORT described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportDetails {
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

/// Collects the replies to NBD_OPT_GO until the ACK that starts transmission.
#[derive(Debug, Default)]
pub struct GoReplies {
    export: Option<ExportDetails>,
}

impl GoReplies {
    pub fn new() -> GoReplies {
        GoReplies::default()
    }

    /// Handles one reply (header and its `data`, exactly `header.length` bytes).
    /// `Ok(Some(..))` when the ACK arrived: the transmission phase starts with the
    /// next byte. `Ok(None)`: more replies follow.
    pub fn handle(
        &mut self,
        header: &OptionReplyHeader,
        data: &[u8],
    ) -> Result<Option<ExportDetails>, ClientError> {
        assert_eq!(data.len(), header.length as usize, "caller reads the data");
        match header.reply_type {
            rep::ACK => {
                if !data.is_empty() {
                    return Err(ClientError::MalformedReply(rep::ACK));
                }
                self.export.map(Some).ok_or(ClientError::NoExportInfo)
            }
            rep::INFO => {
                let mut reader = Reader::new(data);
                let kind = reader.u16().ok_or(ClientError::MalformedReply(rep::INFO))?;
                // Other information types (name, description, block size) are
                // allowed unrequested; this client has no use for them.
                if kind == info::EXPORT {
                    if data.len() != info::EXPORT_REPLY_BYTES as usize {
                        return Err(ClientError::MalformedReply(rep::INFO));
                    }
                    let size_bytes = reader.u64().expect("length checked");
                    let transmission_flags = reader.u16().expect("length checked");
                    self.export = Some(ExportDetails {
                        size_bytes,
                        transmission_flags,
                    });
                }
                Ok(None)
            }
            reply_type if rep::is_error(reply_type) => Err(ClientError::Refused {
                reply_type,
                message: String::from_utf8_lossy(data).into_owned(),
            }),
            other => Err(ClientError::UnexpectedReply(other)),
        }
    }
}

/// A simple reply (spec: Simple reply message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub cookie: u64,
    /// Zero on success; else an NBD error value (see [`SimpleReply::error_name`]).
    pub error: u32,
}

impl SimpleReply {
    /// The error for messages: the spec's name, or the raw value if the server sent
    /// one outside the spec's list.
    pub fn error_name(&self) -> String {
        match Errno::from_wire(self.error) {
            Some(errno) => errno.to_string(),
            None => format!("error {}", self.error),
        }
    }
}

/// Decodes a simple reply header; a successful READ's data follows it.
pub fn decode_simple_reply(bytes: &[u8; SIMPLE_REPLY_BYTES]) -> Result<SimpleReply, ClientError> {
    let mut reader = Reader::new(bytes);
    let truncated = "a simple reply is 16 bytes";
    let magic = reader.u32().expect(truncated);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ClientError::BadReplyMagic(magic));
    }
    Ok(SimpleReply {
        error: reader.u32().expect(truncated),
        cookie: reader.u64().expect(truncated),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::nbd::handshake::tests::sample_export;
    use crate::core::nbd::handshake::{ExportInfo, Handshake, Status};
    use crate::core::nbd::reply::encode_simple_reply;
    use crate::core::nbd::request::{RequestHeader, decode_request_header};
    use crate::core::nbd::wire::{STRUCTURED_REPLY_MAGIC, cmd};

    /// Runs this client's side of the handshake against the server's state machine.
    fn go_against(export: ExportInfo, name: &str) -> Result<ExportDetails, ClientError> {
        let mut server = Handshake::new(export);
        let greeting: [u8; GREETING_BYTES] = server.take_output().try_into().unwrap();
        let flags = client_flags_for(&greeting)?;
        let mut input = flags.to_be_bytes().to_vec();
        input.extend_from_slice(&encode_opt_go(name));
        assert_eq!(server.handle_input(&input), input.len());
        let output = server.take_output();
        let mut rest = &output[..];
        let mut replies = GoReplies::new();
        loop {
            let (head, tail) = rest.split_at(OPTION_REPLY_HEADER_BYTES);
            let header = decode_option_reply_header(head.try_into().unwrap(), opt::GO)?;
            let (data, tail) = tail.split_at(header.length as usize);
            rest = tail;
            if let Some(details) = replies.handle(&header, data)? {
                assert!(rest.is_empty(), "nothing after the ACK");
                assert!(matches!(server.status(), Status::Ready(_)));
                return Ok(details);
            }
        }
    }

    #[test]
    fn go_against_the_server_state_machine() {
        let export = sample_export();
        let details = go_against(export.clone(), "disk0").unwrap();
        assert_eq!(details.size_bytes, export.size_bytes);
        assert_eq!(details.transmission_flags, export.transmission_flags());
        // The default export name is served too.
        assert_eq!(go_against(export, "").unwrap().size_bytes, 0x4000_0000);
    }

    #[test]
    fn refusals_carry_the_servers_message() {
        let mut export = sample_export();
        export.refusal = Some("mirror db is not active on this node (beta)".into());
        let error = go_against(export, "disk0").unwrap_err();
        assert_eq!(
            error.to_string(),
            "refused by policy: mirror db is not active on this node (beta)"
        );
        let error = go_against(sample_export(), "other").unwrap_err();
        assert!(matches!(
            error,
            ClientError::Refused {
                reply_type: rep::ERR_UNKNOWN,
                ..
            }
        ));
    }

    fn greeting(second: u64, flags: u16) -> [u8; GREETING_BYTES] {
        let mut bytes = [0u8; GREETING_BYTES];
        bytes[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        bytes[8..16].copy_from_slice(&second.to_be_bytes());
        bytes[16..].copy_from_slice(&flags.to_be_bytes());
        bytes
    }

    #[test]
    fn greetings_we_cannot_use_are_named() {
        let fixed = handshake_flag::FIXED_NEWSTYLE;
        assert_eq!(
            client_flags_for(&greeting(IHAVEOPT, fixed)),
            Ok(client_flag::FIXED_NEWSTYLE),
            "NO_ZEROES only when offered"
        );
        assert_eq!(
            client_flags_for(&greeting(OLDSTYLE_MAGIC, 0)),
            Err(ClientError::Oldstyle)
        );
        assert_eq!(
            client_flags_for(&greeting(IHAVEOPT, 0)),
            Err(ClientError::NotFixedNewstyle)
        );
        assert_eq!(
            client_flags_for(&greeting(7, fixed)),
            Err(ClientError::NotNbd(7))
        );
        let mut http = [b' '; GREETING_BYTES];
        http[..8].copy_from_slice(b"HTTP/1.1");
        assert!(matches!(
            client_flags_for(&http),
            Err(ClientError::NotNbd(_))
        ));
    }

    fn option_reply(option: u32, reply_type: u32, length: u32) -> [u8; 20] {
        let mut bytes = [0u8; 20];
        bytes[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        bytes[8..12].copy_from_slice(&option.to_be_bytes());
        bytes[12..16].copy_from_slice(&reply_type.to_be_bytes());
        bytes[16..].copy_from_slice(&length.to_be_bytes());
        bytes
    }

    #[test]
    fn option_reply_headers_are_checked() {
        let ok = option_reply(opt::GO, rep::ACK, 0);
        assert_eq!(
            decode_option_reply_header(&ok, opt::GO),
            Ok(OptionReplyHeader {
                option: opt::GO,
                reply_type: rep::ACK,
                length: 0
            })
        );
        assert_eq!(
            decode_option_reply_header(&ok, opt::INFO),
            Err(ClientError::WrongOption {
                sent: opt::INFO,
                got: opt::GO
            })
        );
        let long = option_reply(opt::GO, rep::INFO, OPTION_REPLY_DATA_BYTES_MAX + 1);
        assert_eq!(
            decode_option_reply_header(&long, opt::GO),
            Err(ClientError::OptionReplyTooLong(
                OPTION_REPLY_DATA_BYTES_MAX + 1
            ))
        );
        let mut bad = ok;
        bad[0] ^= 1;
        assert!(matches!(
            decode_option_reply_header(&bad, opt::GO),
            Err(ClientError::BadOptionReplyMagic(_))
        ));
    }

    fn header(reply_type: u32, data: &[u8]) -> OptionReplyHeader {
        OptionReplyHeader {
            option: opt::GO,
            reply_type,
            length: data.len() as u32,
        }
    }

    #[test]
    fn go_replies_need_export_info_before_the_ack() {
        let mut replies = GoReplies::new();
        assert_eq!(
            replies.handle(&header(rep::ACK, &[]), &[]),
            Err(ClientError::NoExportInfo)
        );
        // Unrequested information of other types is skipped; a short one is refused.
        let name = [info::NAME.to_be_bytes().as_slice(), b"db".as_slice()].concat();
        assert_eq!(replies.handle(&header(rep::INFO, &name), &name), Ok(None));
        assert_eq!(
            replies.handle(&header(rep::INFO, &[0]), &[0]),
            Err(ClientError::MalformedReply(rep::INFO))
        );
        let short = [0, 0, 1, 2, 3];
        assert_eq!(
            replies.handle(&header(rep::INFO, &short), &short),
            Err(ClientError::MalformedReply(rep::INFO))
        );
        let mut export = info::EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(
            replies.handle(&header(rep::INFO, &export), &export),
            Ok(None)
        );
        assert_eq!(
            replies.handle(&header(rep::ACK, &[1]), &[1]),
            Err(ClientError::MalformedReply(rep::ACK))
        );
        assert_eq!(
            replies.handle(&header(rep::ACK, &[]), &[]),
            Ok(Some(ExportDetails {
                size_bytes: 1 << 20,
                transmission_flags: 3
            }))
        );
        assert_eq!(
            replies.handle(&header(rep::SERVER, &[]), &[]),
            Err(ClientError::UnexpectedReply(rep::SERVER))
        );
    }

    #[test]
    fn requests_decode_as_the_server_reads_them() {
        let sent = RequestHeader {
            flags: 0,
            kind: cmd::WRITE,
            cookie: 42,
            offset: 1 << 30,
            length: 65536,
        };
        assert_eq!(decode_request_header(&sent.encode()), Ok(sent));
    }

    #[test]
    fn simple_replies_round_trip_through_the_server_encoder() {
        let mut bytes = Vec::new();
        encode_simple_reply(&mut bytes, 7, None);
        encode_simple_reply(&mut bytes, 8, Some(Errno::NoSpc));
        let ok = decode_simple_reply(bytes[..16].try_into().unwrap()).unwrap();
        assert_eq!(
            ok,
            SimpleReply {
                cookie: 7,
                error: 0
            }
        );
        let failed = decode_simple_reply(bytes[16..].try_into().unwrap()).unwrap();
        assert_eq!(
            (failed.cookie, failed.error_name()),
            (8, "NBD_ENOSPC".into())
        );
        let odd = SimpleReply {
            cookie: 0,
            error: 2,
        };
        assert_eq!(odd.error_name(), "error 2");
        let mut structured = [0u8; 16];
        structured[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(
            decode_simple_reply(&structured),
            Err(ClientError::BadReplyMagic(STRUCTURED_REPLY_MAGIC))
        );
    }
}

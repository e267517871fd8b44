//! The server side of the fixed-newstyle NBD handshake, as a state machine fed with
//! bytes: greeting, client flags, option haggling, and the transition to transmission
//! (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or to a closed connection.
//!
//! Sans-IO: [`Handshake::handle_input`] takes the bytes received so far and reports how
//! many it consumed; [`Handshake::take_output`] yields the bytes to send. The machine
//! never buffers input, so the shell owns the only copy and hands over the unconsumed
//! tail (which is transmission-phase data once the status is `Ready`).
//!
//! Spec references are to sections of the NBD protocol document: "Newstyle
//! negotiation", "Fixed newstyle negotiation", "Option types", "Option reply types".

use super::wire::{
    EXPORT_NAME_ZERO_PAD_BYTES, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, Reader, STRING_BYTES_MAX,
    clamp_string, client_flag, handshake_flag, info, opt, rep, transmission_flag,
};
use crate::constants::{NBD_OPTION_DATA_BYTES_MAX, NBD_OPTIONS_PER_HANDSHAKE_MAX};

/// Greeting: NBDMAGIC 8 + IHAVEOPT 8 + handshake flags 2.
pub const GREETING_BYTES: usize = 18;
/// Client flags, 32 bits.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Option header: IHAVEOPT 8 + option 4 + length 4.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Option reply header: magic 8 + option 4 + type 4 + length 4.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// EXPORT_NAME answer without padding: size 8 + transmission flags 2.
pub const EXPORT_NAME_REPLY_BYTES: usize = 10;

/// The export this server offers, as the handshake describes it to clients.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// The export's name; a client asking for "" (the default export) gets it too.
    pub name: String,
    /// Sent for NBD_INFO_DESCRIPTION when non-empty and requested, and after the name
    /// in NBD_REP_SERVER.
    pub description: String,
    pub size_bytes: u64,
    pub read_only: bool,
    /// The backing's logical block size (512 or 4096).
    pub block_size_min_bytes: u32,
    /// Usually `constants::NBD_BLOCK_SIZE_PREFERRED_BYTES`.
    pub block_size_preferred_bytes: u32,
    /// Usually `constants::NBD_PAYLOAD_BYTES_MAX`.
    pub block_size_max_bytes: u32,
    /// `Some(message)`: the export exists but may not be used now (for example the
    /// mirror is inactive on this node). GO and INFO get NBD_REP_ERR_POLICY with the
    /// message; EXPORT_NAME, which cannot carry an error, closes the connection.
    ///
    /// Why ERR_POLICY: the export is known and the request is valid, but cluster
    /// policy (a switch-mirror disk is active on one node at a time) forbids serving
    /// it here, which is that code's definition. ERR_UNKNOWN would tell the client
    /// the export does not exist, which is false (NBD_OPT_LIST shows it);
    /// ERR_SHUTDOWN would claim the server is going away and obliges the client to
    /// disconnect; the TLS and block-size codes do not apply.
    pub refusal: Option<String>,
}

impl ExportInfo {
    /// The transmission flags we advertise (spec: Transmission flags).
    ///
    /// Writable: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES,
    /// SEND_FAST_ZERO, SEND_CACHE, CAN_MULTI_CONN. CAN_MULTI_CONN holds because every
    /// connection goes through the same process and backing file, so a FLUSH or FUA on
    /// one connection is visible on all. Not advertised: ROTATIONAL (unknown), SEND_DF
    /// (needs structured replies, which are negotiated after these flags may already
    /// have been sent by NBD_OPT_INFO), SEND_RESIZE and BLOCK_STATUS_PAYLOAD
    /// (extensions we do not implement).
    ///
    /// Read-only: READ_ONLY is set, and the flags that only make sense for writes are
    /// dropped: TRIM, WRITE_ZEROES, FAST_ZERO (which MUST be clear without
    /// WRITE_ZEROES) and FUA (its only effect is on writes). A client that sends them
    /// anyway gets EPERM for the commands and EINVAL for the flag. SEND_FLUSH stays:
    /// a flush writes nothing, so it is harmless, and clients that flush before
    /// closing should not see an error. SEND_CACHE stays: it is a read hint.
    pub fn transmission_flags(&self) -> u16 {
        use transmission_flag as tf;
        let common = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_CACHE | tf::CAN_MULTI_CONN;
        if self.read_only {
            common | tf::READ_ONLY
        } else {
            common | tf::SEND_FUA | tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO
        }
    }

    /// The export description comes from our own configuration, so a value the spec
    /// forbids is a bug (config validation must have refused it).
    fn assert_valid(&self) {
        assert_string_valid("export name", &self.name);
        assert_string_valid("export description", &self.description);
        // Spec (Size constraints): minimum a power of 2, at most 2^16; preferred a
        // power of 2 at least max(minimum, 512); maximum payload at least preferred.
        let min = self.block_size_min_bytes;
        let preferred = self.block_size_preferred_bytes;
        let max = self.block_size_max_bytes;
        assert!(
            min.is_power_of_two() && min <= 1 << 16,
            "bad minimum block size {min}"
        );
        assert!(
            preferred.is_power_of_two() && preferred >= min.max(512),
            "bad preferred block size {preferred}"
        );
        assert!(
            max >= preferred,
            "maximum payload {max} below preferred {preferred}"
        );
    }
}

fn assert_string_valid(what: &str, value: &str) {
    // Spec (Conventions): strings MUST NOT contain NUL and MUST be at most 4096 bytes.
    assert!(
        value.len() <= STRING_BYTES_MAX,
        "{what} longer than 4096 bytes"
    );
    assert!(!value.contains('\0'), "{what} contains NUL");
}

/// The outcome of a successful handshake: what the transmission phase needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export's canonical name (also when the client asked for the default "").
    pub export_name: String,
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged: READ replies and errors use
    /// structured chunks.
    pub structured_replies: bool,
    /// The transmission flags sent to the client.
    pub transmission_flags: u16,
}

/// Why a handshake ended without entering transmission. The shell closes the
/// connection (after sending any pending output) and logs this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// NBD_OPT_ABORT: the ACK is in the output.
    ClientAborted,
    /// An option did not start with IHAVEOPT: we no longer know where messages start.
    BadMagic,
    /// The client set flags we do not know; the spec says the server MUST drop it.
    UnknownClientFlags(u32),
    /// Option data longer than `NBD_OPTION_DATA_BYTES_MAX` (checked on the header,
    /// before any of the data is read).
    OptionTooLarge { option: u32, length: u32 },
    /// More than `NBD_OPTIONS_PER_HANDSHAKE_MAX` options: a denial of service the spec
    /// lets us end.
    TooManyOptions,
    /// NBD_OPT_EXPORT_NAME named an export we do not have (lossily decoded name).
    UnknownExport(String),
    /// NBD_OPT_EXPORT_NAME on a refused export; carries the refusal message.
    Refused(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::ClientAborted => f.write_str("client sent NBD_OPT_ABORT"),
            CloseReason::BadMagic => f.write_str("option without IHAVEOPT magic"),
            CloseReason::UnknownClientFlags(flags) => {
                write!(f, "unknown client flags {flags:#010x}")
            }
            CloseReason::OptionTooLarge { option, length } => write!(
                f,
                "{} ({option}) with {length} bytes of data, limit {NBD_OPTION_DATA_BYTES_MAX}",
                opt::name(*option)
            ),
            CloseReason::TooManyOptions => write!(
                f,
                "more than {NBD_OPTIONS_PER_HANDSHAKE_MAX} options in one handshake"
            ),
            CloseReason::UnknownExport(name) => {
                write!(f, "NBD_OPT_EXPORT_NAME for unknown export {name:?}")
            }
            CloseReason::Refused(message) => {
                write!(f, "NBD_OPT_EXPORT_NAME on a refused export: {message}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Negotiating,
    Ready(Negotiated),
    Closed(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Greeting sent; waiting for the 32-bit client flags.
    ClientFlags,
    /// Option haggling.
    Options,
}

/// The server side of one connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    export: ExportInfo,
    phase: Phase,
    status: Status,
    /// The client set NBD_FLAG_C_NO_ZEROES.
    client_no_zeroes: bool,
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    structured_replies: bool,
    /// Complete options handled so far.
    options_handled_count: u32,
    output: Vec<u8>,
}

/// What the client asked for in NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug)]
struct InfoRequest<'a> {
    name: &'a str,
    wants_name: bool,
    wants_description: bool,
}

impl Handshake {
    /// A handshake for `export`, with the greeting already queued for output.
    pub fn new(export: ExportInfo) -> Handshake {
        export.assert_valid();
        let mut output = Vec::with_capacity(GREETING_BYTES);
        output.extend_from_slice(&NBDMAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        let flags = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;
        output.extend_from_slice(&flags.to_be_bytes());
        Handshake {
            export,
            phase: Phase::ClientFlags,
            status: Status::Negotiating,
            client_no_zeroes: false,
            structured_replies: false,
            options_handled_count: 0,
            output,
        }
    }

    /// Consumes as many complete client messages from `input` as possible and returns
    /// how many bytes it consumed; the caller keeps the rest and appends more. Stops as
    /// soon as the status leaves `Negotiating`: bytes after the final option belong to
    /// the transmission phase. Consumes nothing once the status is final.
    pub fn handle_input(&mut self, input: &[u8]) -> usize {
        let mut consumed = 0;
        while self.status == Status::Negotiating {
            let rest = &input[consumed..];
            let step = match self.phase {
                Phase::ClientFlags => self.handle_client_flags(rest),
                Phase::Options => self.handle_option(rest),
            };
            let Some(step_bytes) = step else { break };
            assert!(step_bytes > 0 && step_bytes <= rest.len());
            consumed += step_bytes;
        }
        assert!(consumed <= input.len());
        consumed
    }

    /// Bytes to send to the client, drained (empty when there are none).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn export(&self) -> &ExportInfo {
        &self.export
    }

    /// Handles the client flags; `None` until all 4 bytes are there.
    fn handle_client_flags(&mut self, input: &[u8]) -> Option<usize> {
        let flags = Reader::new(input).u32()?;
        // Spec (Client flags): "the server MUST drop the TCP connection if the client
        // sets an unknown flag, or a flag that does not match something advertised".
        // We advertise both known flags, so only unknown bits are refused. A client
        // without C_FIXED_NEWSTYLE is served fixed newstyle anyway, as the spec allows
        // (a non-fixed client only ever sends EXPORT_NAME, which is the same in both).
        if flags & !client_flag::KNOWN != 0 {
            self.status = Status::Closed(CloseReason::UnknownClientFlags(flags));
        } else {
            self.client_no_zeroes = flags & client_flag::NO_ZEROES != 0;
            self.phase = Phase::Options;
        }
        Some(CLIENT_FLAGS_BYTES)
    }

    /// Handles one option; `None` until the whole option (header and data) is there.
    /// Framing violations close the connection as soon as the bytes that show them
    /// have arrived, without waiting for more.
    fn handle_option(&mut self, input: &[u8]) -> Option<usize> {
        let mut reader = Reader::new(input);
        if reader.u64()? != IHAVEOPT {
            self.status = Status::Closed(CloseReason::BadMagic);
            return Some(8);
        }
        let option = reader.u32()?;
        let length = reader.u32()?;
        if length > NBD_OPTION_DATA_BYTES_MAX {
            self.status = Status::Closed(CloseReason::OptionTooLarge { option, length });
            return Some(OPTION_HEADER_BYTES);
        }
        if self.options_handled_count >= NBD_OPTIONS_PER_HANDSHAKE_MAX {
            self.status = Status::Closed(CloseReason::TooManyOptions);
            return Some(OPTION_HEADER_BYTES);
        }
        // Bounded by NBD_OPTION_DATA_BYTES_MAX above, so the cast is lossless.
        let data = reader.take(length as usize)?;
        self.options_handled_count += 1;
        self.dispatch(option, data);
        Some(OPTION_HEADER_BYTES + data.len())
    }

    fn dispatch(&mut self, option: u32, data: &[u8]) {
        match option {
            opt::EXPORT_NAME => self.handle_export_name(data),
            opt::ABORT => {
                // Spec (NBD_OPT_ABORT): the server MUST reply with ACK, and SHOULD
                // ignore any data rather than reject it.
                self.reply(option, rep::ACK, &[]);
                self.status = Status::Closed(CloseReason::ClientAborted);
            }
            opt::LIST => self.handle_list(data),
            opt::INFO | opt::GO => self.handle_info_or_go(option, data),
            opt::STRUCTURED_REPLY => self.handle_structured_reply(data),
            // Everything else: STARTTLS (we run NOTLS), the metadata-context options
            // (no contexts), EXTENDED_HEADERS, PEEK_EXPORT and unknown numbers. Spec
            // (Baseline): the server MUST reply NBD_REP_ERR_UNSUP and MUST NOT fail to
            // parse the next message; the data was consumed by the caller.
            _ => self.reply_error(
                option,
                rep::ERR_UNSUP,
                &format!(
                    "{} ({option}) is not supported by this server",
                    opt::name(option)
                ),
            ),
        }
    }

    /// Spec (NBD_OPT_EXPORT_NAME): no error reply is possible; an unknown or refused
    /// export terminates the session (hard disconnect, nothing sent).
    fn handle_export_name(&mut self, data: &[u8]) {
        if !self.names_this_export(data) {
            let name = String::from_utf8_lossy(data).into_owned();
            self.status = Status::Closed(CloseReason::UnknownExport(name));
            return;
        }
        if let Some(message) = &self.export.refusal {
            self.status = Status::Closed(CloseReason::Refused(message.clone()));
            return;
        }
        let flags = self.export.transmission_flags();
        self.output
            .extend_from_slice(&self.export.size_bytes.to_be_bytes());
        self.output.extend_from_slice(&flags.to_be_bytes());
        if !self.client_no_zeroes {
            self.output
                .extend_from_slice(&[0u8; EXPORT_NAME_ZERO_PAD_BYTES]);
        }
        self.enter_transmission();
    }

    /// Spec (NBD_OPT_LIST): one NBD_REP_SERVER per export, then ACK; data MUST be
    /// empty, and the server SHOULD reject data with ERR_INVALID.
    fn handle_list(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.reply_error(opt::LIST, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
            return;
        }
        // Spec (NBD_REP_SERVER): u32 name length, name, then optional text for humans;
        // we put the description there.
        let name = self.export.name.as_bytes();
        let mut payload = Vec::with_capacity(4 + name.len() + self.export.description.len());
        // assert_valid bounded the name at 4096 bytes, so the cast is lossless.
        payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
        payload.extend_from_slice(name);
        payload.extend_from_slice(self.export.description.as_bytes());
        self.reply(opt::LIST, rep::SERVER, &payload);
        self.reply(opt::LIST, rep::ACK, &[]);
    }

    /// Spec (NBD_OPT_STRUCTURED_REPLY): no data allowed (ERR_INVALID otherwise). A
    /// repeat is a state-changing message sent twice, which "the server MAY fail with
    /// NBD_REP_ERR_INVALID" (spec: Fixed newstyle negotiation); we do, as nbdkit does,
    /// and structured replies stay on.
    fn handle_structured_reply(&mut self, data: &[u8]) {
        let option = opt::STRUCTURED_REPLY;
        if !data.is_empty() {
            self.reply_error(
                option,
                rep::ERR_INVALID,
                "NBD_OPT_STRUCTURED_REPLY takes no data",
            );
        } else if self.structured_replies {
            self.reply_error(
                option,
                rep::ERR_INVALID,
                "structured replies already negotiated",
            );
        } else {
            self.structured_replies = true;
            self.reply(option, rep::ACK, &[]);
        }
    }

    /// Spec (NBD_OPT_INFO and NBD_OPT_GO): a malformed request gets ERR_INVALID, an
    /// unknown export ERR_UNKNOWN, a refused one ERR_POLICY (see
    /// [`ExportInfo::refusal`]), all without NBD_REP_INFO. Success sends
    /// NBD_INFO_EXPORT (mandatory), NBD_INFO_NAME and NBD_INFO_DESCRIPTION when
    /// requested, and NBD_INFO_BLOCK_SIZE always (the server "MAY send information
    /// requests back which are not explicitly requested"; the values are correct
    /// whether or not the client honours them), then ACK. After GO's ACK we are in
    /// transmission, with no padding (spec: "MUST NOT send any zero padding bytes").
    fn handle_info_or_go(&mut self, option: u32, data: &[u8]) {
        let request = match parse_info_request(data) {
            Ok(request) => request,
            Err(message) => {
                let message = format!("{}: {message}", opt::name(option));
                self.reply_error(option, rep::ERR_INVALID, &message);
                return;
            }
        };
        if !self.names_this_export(request.name.as_bytes()) {
            let message = format!("unknown export {:?}", request.name);
            self.reply_error(option, rep::ERR_UNKNOWN, &message);
            return;
        }
        if let Some(refusal) = self.export.refusal.clone() {
            self.reply_error(option, rep::ERR_POLICY, &refusal);
            return;
        }

        let mut export_info = Vec::with_capacity(info::EXPORT_REPLY_BYTES as usize);
        export_info.extend_from_slice(&info::EXPORT.to_be_bytes());
        export_info.extend_from_slice(&self.export.size_bytes.to_be_bytes());
        export_info.extend_from_slice(&self.export.transmission_flags().to_be_bytes());
        self.reply(option, rep::INFO, &export_info);

        if request.wants_name {
            let payload = info_string(info::NAME, &self.export.name);
            self.reply(option, rep::INFO, &payload);
        }
        if request.wants_description && !self.export.description.is_empty() {
            let payload = info_string(info::DESCRIPTION, &self.export.description);
            self.reply(option, rep::INFO, &payload);
        }

        let mut block_size = Vec::with_capacity(info::BLOCK_SIZE_REPLY_BYTES as usize);
        block_size.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        block_size.extend_from_slice(&self.export.block_size_min_bytes.to_be_bytes());
        block_size.extend_from_slice(&self.export.block_size_preferred_bytes.to_be_bytes());
        block_size.extend_from_slice(&self.export.block_size_max_bytes.to_be_bytes());
        self.reply(option, rep::INFO, &block_size);

        self.reply(option, rep::ACK, &[]);
        if option == opt::GO {
            self.enter_transmission();
        }
    }

    /// The empty name is the default export (spec: NBD_OPT_EXPORT_NAME), which is
    /// our only export.
    fn names_this_export(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export.name.as_bytes()
    }

    fn enter_transmission(&mut self) {
        self.status = Status::Ready(Negotiated {
            export_name: self.export.name.clone(),
            structured_replies: self.structured_replies,
            transmission_flags: self.export.transmission_flags(),
        });
    }

    /// Queues one option reply (spec: Fixed newstyle negotiation, reply format).
    fn reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) {
        // Every payload we build is bounded (strings at 4096 bytes), so this holds.
        let payload_bytes = u32::try_from(payload.len()).expect("option reply payload fits u32");
        self.output
            .extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&option.to_be_bytes());
        self.output.extend_from_slice(&reply_type.to_be_bytes());
        self.output.extend_from_slice(&payload_bytes.to_be_bytes());
        self.output.extend_from_slice(payload);
    }

    /// Queues an error reply whose data is a message for the client's user (spec:
    /// Option reply types, "All error replies MAY have some data set").
    fn reply_error(&mut self, option: u32, reply_type: u32, message: &str) {
        assert!(rep::is_error(reply_type));
        self.reply(option, reply_type, clamp_string(message).as_bytes());
    }
}

/// The NBD_REP_INFO payload for a string-valued information type.
fn info_string(info_type: u16, value: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + value.len());
    payload.extend_from_slice(&info_type.to_be_bytes());
    payload.extend_from_slice(value.as_bytes());
    payload
}

/// Parses NBD_OPT_INFO / NBD_OPT_GO data (spec: NBD_OPT_INFO):
/// u32 name length (MUST be at most data length - 6), name, u16 request count, that
/// many u16 information types, and nothing after. Lengths must add up exactly.
/// Unknown information types are ignored as the spec requires; a repeated one (which
/// the client MUST NOT send) is tolerated and answered once.
fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, &'static str> {
    let mut reader = Reader::new(data);
    let name_bytes = reader.u32().ok_or("data too short for the name length")?;
    let name_bytes = usize::try_from(name_bytes).map_err(|_| "name length too large")?;
    let name = reader
        .take(name_bytes)
        .ok_or("name length exceeds the option data")?;
    let count = reader
        .u16()
        .ok_or("data too short for the information request count")?;
    let list = reader
        .take(usize::from(count) * 2)
        .ok_or("information request count exceeds the option data")?;
    if !reader.is_empty() {
        return Err("trailing bytes after the information requests");
    }
    // Spec (Conventions): strings are UTF-8, without NUL, at most 4096 bytes.
    if name.len() > STRING_BYTES_MAX {
        return Err("export name longer than 4096 bytes");
    }
    let name = std::str::from_utf8(name).map_err(|_| "export name is not UTF-8")?;
    if name.contains('\0') {
        return Err("export name contains NUL");
    }
    let mut request = InfoRequest {
        name,
        wants_name: false,
        wants_description: false,
    };
    let mut types = Reader::new(list);
    while let Some(info_type) = types.u16() {
        match info_type {
            info::NAME => request.wants_name = true,
            info::DESCRIPTION => request.wants_description = true,
            // EXPORT and BLOCK_SIZE are always sent; others are unknown to us.
            _ => {}
        }
    }
    Ok(request)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::constants::{NBD_BLOCK_SIZE_PREFERRED_BYTES, NBD_PAYLOAD_BYTES_MAX};
    use crate::core::nbd::wire::transmission_flag as tf;

    const SIZE: u64 = 0x4000_0000; // 1 GiB

    pub(crate) fn sample_export() -> ExportInfo {
        ExportInfo {
            name: "disk0".to_string(),
            description: "mirror set disk0".to_string(),
            size_bytes: SIZE,
            read_only: false,
            block_size_min_bytes: 512,
            block_size_preferred_bytes: NBD_BLOCK_SIZE_PREFERRED_BYTES,
            block_size_max_bytes: NBD_PAYLOAD_BYTES_MAX,
            refusal: None,
        }
    }

    const WRITABLE_FLAGS: u16 = tf::HAS_FLAGS
        | tf::SEND_FLUSH
        | tf::SEND_FUA
        | tf::SEND_TRIM
        | tf::SEND_WRITE_ZEROES
        | tf::SEND_CACHE
        | tf::CAN_MULTI_CONN
        | tf::SEND_FAST_ZERO;

    // --- client-side message builders -----------------------------------------------

    fn client_flags(flags: u32) -> Vec<u8> {
        flags.to_be_bytes().to_vec()
    }

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for request in requests {
            data.extend_from_slice(&request.to_be_bytes());
        }
        data
    }

    fn reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&reply_type.to_be_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    const GREETING: [u8; GREETING_BYTES] = [
        b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', // NBDMAGIC
        b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', // IHAVEOPT
        0, 3, // FIXED_NEWSTYLE | NO_ZEROES
    ];

    /// A handshake past the greeting and client flags, output drained.
    fn negotiating(export: ExportInfo, flags: u32) -> Handshake {
        let mut handshake = Handshake::new(export);
        assert_eq!(handshake.take_output(), GREETING);
        assert_eq!(handshake.handle_input(&client_flags(flags)), 4);
        assert_eq!(handshake.status(), &Status::Negotiating);
        handshake
    }

    /// Feeds one complete message and asserts it was consumed whole.
    fn feed(handshake: &mut Handshake, bytes: &[u8]) -> Vec<u8> {
        assert_eq!(handshake.handle_input(bytes), bytes.len());
        handshake.take_output()
    }

    fn ready(structured_replies: bool, transmission_flags: u16) -> Status {
        Status::Ready(Negotiated {
            export_name: "disk0".to_string(),
            structured_replies,
            transmission_flags,
        })
    }

    /// The reply type of the single option reply in `output`.
    fn single_reply_type(output: &[u8]) -> u32 {
        let mut reader = Reader::new(output);
        assert_eq!(reader.u64(), Some(OPTION_REPLY_MAGIC));
        let _option = reader.u32().unwrap();
        let reply_type = reader.u32().unwrap();
        let length = reader.u32().unwrap() as usize;
        assert_eq!(reader.remaining(), length, "exactly one reply");
        reply_type
    }

    /// The exact reply to a successful GO/INFO for `sample_export` with no requests.
    fn expected_info_replies(option: u32, export: &ExportInfo) -> Vec<u8> {
        let mut expected = Vec::new();
        let mut export_info = vec![0, 0];
        export_info.extend_from_slice(&export.size_bytes.to_be_bytes());
        export_info.extend_from_slice(&export.transmission_flags().to_be_bytes());
        expected.extend(reply(option, rep::INFO, &export_info));
        let mut block_size = vec![0, 3];
        block_size.extend_from_slice(&export.block_size_min_bytes.to_be_bytes());
        block_size.extend_from_slice(&export.block_size_preferred_bytes.to_be_bytes());
        block_size.extend_from_slice(&export.block_size_max_bytes.to_be_bytes());
        expected.extend(reply(option, rep::INFO, &block_size));
        expected.extend(reply(option, rep::ACK, &[]));
        expected
    }

    // --- greeting and client flags ------------------------------------------------

    #[test]
    fn greeting_is_queued_on_creation() {
        let mut handshake = Handshake::new(sample_export());
        assert_eq!(handshake.take_output(), GREETING);
        assert!(handshake.take_output().is_empty(), "output is drained");
        assert_eq!(handshake.status(), &Status::Negotiating);
    }

    #[test]
    fn partial_client_flags_consume_nothing() {
        let mut handshake = Handshake::new(sample_export());
        assert_eq!(handshake.handle_input(&[0, 0, 0]), 0);
        assert_eq!(handshake.status(), &Status::Negotiating);
    }

    #[test]
    fn client_without_fixed_newstyle_is_served() {
        let mut handshake = negotiating(sample_export(), 0);
        let output = feed(&mut handshake, &option(opt::EXPORT_NAME, b"disk0"));
        assert_eq!(
            output.len(),
            EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZERO_PAD_BYTES
        );
    }

    #[test]
    fn close_on_unknown_client_flags() {
        let mut handshake = Handshake::new(sample_export());
        handshake.take_output();
        assert_eq!(handshake.handle_input(&client_flags(0b111)), 4);
        assert_eq!(
            handshake.status(),
            &Status::Closed(CloseReason::UnknownClientFlags(0b111))
        );
        assert!(handshake.take_output().is_empty());
    }

    // --- close reasons ------------------------------------------------------------

    #[test]
    fn close_on_bad_option_magic_without_waiting_for_the_rest() {
        let mut handshake = negotiating(sample_export(), 3);
        assert_eq!(handshake.handle_input(b"IHAVEOPX"), 8);
        assert_eq!(handshake.status(), &Status::Closed(CloseReason::BadMagic));
        assert!(handshake.take_output().is_empty());
    }

    #[test]
    fn close_on_option_too_large_at_the_header() {
        let mut handshake = negotiating(sample_export(), 3);
        let mut header = IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&opt::GO.to_be_bytes());
        let length = NBD_OPTION_DATA_BYTES_MAX + 1;
        header.extend_from_slice(&length.to_be_bytes());
        assert_eq!(handshake.handle_input(&header), OPTION_HEADER_BYTES);
        assert_eq!(
            handshake.status(),
            &Status::Closed(CloseReason::OptionTooLarge {
                option: opt::GO,
                length
            })
        );
    }

    #[test]
    fn option_at_the_size_limit_is_accepted() {
        let mut handshake = negotiating(sample_export(), 3);
        let data = vec![0u8; NBD_OPTION_DATA_BYTES_MAX as usize];
        let output = feed(&mut handshake, &option(opt::STARTTLS, &data));
        assert_eq!(single_reply_type(&output), rep::ERR_UNSUP);
    }

    #[test]
    fn close_on_too_many_options() {
        let mut handshake = negotiating(sample_export(), 3);
        let one = option(99, &[]);
        let many = one.repeat(NBD_OPTIONS_PER_HANDSHAKE_MAX as usize);
        feed(&mut handshake, &many);
        assert_eq!(handshake.status(), &Status::Negotiating);
        assert_eq!(handshake.handle_input(&one), OPTION_HEADER_BYTES);
        assert_eq!(
            handshake.status(),
            &Status::Closed(CloseReason::TooManyOptions)
        );
        assert!(handshake.take_output().is_empty());
    }

    #[test]
    fn close_on_abort_after_the_ack() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::ABORT, b"ignored"));
        assert_eq!(output, reply(opt::ABORT, rep::ACK, &[]));
        assert_eq!(
            handshake.status(),
            &Status::Closed(CloseReason::ClientAborted)
        );
    }

    #[test]
    fn close_on_export_name_for_an_unknown_export() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::EXPORT_NAME, b"other"));
        assert!(output.is_empty(), "EXPORT_NAME cannot carry an error");
        assert_eq!(
            handshake.status(),
            &Status::Closed(CloseReason::UnknownExport("other".to_string()))
        );
    }

    #[test]
    fn close_on_export_name_for_a_refused_export() {
        let export = ExportInfo {
            refusal: Some("mirror inactive on this node".to_string()),
            ..sample_export()
        };
        let mut handshake = negotiating(export, 3);
        let output = feed(&mut handshake, &option(opt::EXPORT_NAME, b"disk0"));
        assert!(output.is_empty());
        assert_eq!(
            handshake.status(),
            &Status::Closed(CloseReason::Refused(
                "mirror inactive on this node".to_string()
            ))
        );
    }

    #[test]
    fn nothing_is_consumed_after_the_handshake_ends() {
        let mut handshake = negotiating(sample_export(), 3);
        let mut input = option(opt::ABORT, &[]);
        input.extend_from_slice(&option(opt::LIST, &[]));
        assert_eq!(handshake.handle_input(&input), OPTION_HEADER_BYTES);
        assert_eq!(handshake.handle_input(&input[OPTION_HEADER_BYTES..]), 0);
        assert_eq!(handshake.take_output(), reply(opt::ABORT, rep::ACK, &[]));
    }

    // --- EXPORT_NAME ------------------------------------------------------------------

    #[test]
    fn export_name_with_zero_padding_is_byte_exact() {
        let mut handshake = negotiating(sample_export(), client_flag::FIXED_NEWSTYLE);
        let output = feed(&mut handshake, &option(opt::EXPORT_NAME, b"disk0"));
        let mut expected = vec![0, 0, 0, 0, 0x40, 0, 0, 0]; // size: 1 GiB
        expected.extend_from_slice(&[0x0d, 0x6d]); // flags
        expected.extend_from_slice(&[0u8; 124]);
        assert_eq!(output, expected);
        assert_eq!(handshake.status(), &ready(false, WRITABLE_FLAGS));
    }

    #[test]
    fn export_name_with_no_zeroes_is_byte_exact() {
        let mut handshake = negotiating(sample_export(), client_flag::KNOWN);
        let output = feed(&mut handshake, &option(opt::EXPORT_NAME, b"disk0"));
        assert_eq!(output, [0, 0, 0, 0, 0x40, 0, 0, 0, 0x0d, 0x6d]);
        assert_eq!(handshake.status(), &ready(false, WRITABLE_FLAGS));
    }

    #[test]
    fn export_name_empty_selects_the_default_export() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::EXPORT_NAME, b""));
        assert_eq!(output.len(), EXPORT_NAME_REPLY_BYTES);
        assert_eq!(handshake.status(), &ready(false, WRITABLE_FLAGS));
    }

    #[test]
    fn export_name_keeps_structured_replies_negotiated_before_it() {
        let mut handshake = negotiating(sample_export(), 3);
        feed(&mut handshake, &option(opt::STRUCTURED_REPLY, &[]));
        feed(&mut handshake, &option(opt::EXPORT_NAME, b"disk0"));
        assert_eq!(handshake.status(), &ready(true, WRITABLE_FLAGS));
    }

    #[test]
    fn export_name_leaves_transmission_bytes_unconsumed() {
        let mut handshake = negotiating(sample_export(), 3);
        let mut input = option(opt::EXPORT_NAME, b"disk0");
        let option_bytes = input.len();
        input.extend_from_slice(&[0x25, 0x60, 0x95, 0x13]); // a request starts
        assert_eq!(handshake.handle_input(&input), option_bytes);
    }

    // --- GO and INFO ------------------------------------------------------------------

    #[test]
    fn go_is_byte_exact() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::GO, &info_data("disk0", &[])));
        let mut expected = Vec::new();
        expected.extend(reply(
            opt::GO,
            rep::INFO,
            &[0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0x0d, 0x6d],
        ));
        expected.extend(reply(
            opt::GO,
            rep::INFO,
            &[0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0],
        ));
        expected.extend(reply(opt::GO, rep::ACK, &[]));
        assert_eq!(output, expected);
        assert_eq!(output, expected_info_replies(opt::GO, &sample_export()));
        assert_eq!(handshake.status(), &ready(false, WRITABLE_FLAGS));
    }

    #[test]
    fn info_is_byte_exact_and_keeps_negotiating() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::INFO, &info_data("disk0", &[])));
        assert_eq!(output, expected_info_replies(opt::INFO, &sample_export()));
        assert_eq!(handshake.status(), &Status::Negotiating);
        // INFO then GO with the same parameters MUST give the same information.
        let output = feed(&mut handshake, &option(opt::GO, &info_data("disk0", &[])));
        assert_eq!(output, expected_info_replies(opt::GO, &sample_export()));
    }

    #[test]
    fn go_with_name_description_and_block_size_requests() {
        let mut handshake = negotiating(sample_export(), 3);
        let requests = [info::BLOCK_SIZE, info::DESCRIPTION, info::NAME, 0x7777];
        let output = feed(&mut handshake, &option(opt::GO, &info_data("", &requests)));
        let mut expected = Vec::new();
        let mut export_info = vec![0, 0];
        export_info.extend_from_slice(&SIZE.to_be_bytes());
        export_info.extend_from_slice(&WRITABLE_FLAGS.to_be_bytes());
        expected.extend(reply(opt::GO, rep::INFO, &export_info));
        expected.extend(reply(opt::GO, rep::INFO, b"\0\x01disk0"));
        expected.extend(reply(opt::GO, rep::INFO, b"\0\x02mirror set disk0"));
        expected.extend(reply(
            opt::GO,
            rep::INFO,
            &[0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0],
        ));
        expected.extend(reply(opt::GO, rep::ACK, &[]));
        assert_eq!(output, expected);
        assert_eq!(handshake.status(), &ready(false, WRITABLE_FLAGS));
    }

    #[test]
    fn go_skips_an_empty_description() {
        let export = ExportInfo {
            description: String::new(),
            ..sample_export()
        };
        let mut handshake = negotiating(export.clone(), 3);
        let output = feed(
            &mut handshake,
            &option(opt::GO, &info_data("disk0", &[info::DESCRIPTION])),
        );
        assert_eq!(output, expected_info_replies(opt::GO, &export));
    }

    #[test]
    fn go_with_duplicate_requests_answers_once() {
        let mut handshake = negotiating(sample_export(), 3);
        let data = info_data("disk0", &[info::NAME, info::NAME]);
        let output = feed(&mut handshake, &option(opt::GO, &data));
        let name_reply = reply(opt::GO, rep::INFO, b"\0\x01disk0");
        let count = output
            .windows(name_reply.len())
            .filter(|w| *w == name_reply)
            .count();
        assert_eq!(count, 1);
    }

    #[test]
    fn go_read_only_export_advertises_read_only_flags() {
        let export = ExportInfo {
            read_only: true,
            ..sample_export()
        };
        let flags =
            tf::HAS_FLAGS | tf::READ_ONLY | tf::SEND_FLUSH | tf::SEND_CACHE | tf::CAN_MULTI_CONN;
        assert_eq!(export.transmission_flags(), flags);
        let mut handshake = negotiating(export.clone(), 3);
        let output = feed(&mut handshake, &option(opt::GO, &info_data("disk0", &[])));
        assert_eq!(output, expected_info_replies(opt::GO, &export));
        assert_eq!(handshake.status(), &ready(false, flags));
    }

    #[test]
    fn go_unknown_export_gets_err_unknown_and_negotiation_continues() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::GO, &info_data("nope", &[])));
        assert_eq!(
            output,
            reply(opt::GO, rep::ERR_UNKNOWN, b"unknown export \"nope\"")
        );
        assert_eq!(handshake.status(), &Status::Negotiating);
    }

    #[test]
    fn info_unknown_export_gets_err_unknown() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::INFO, &info_data("nope", &[])));
        assert_eq!(single_reply_type(&output), rep::ERR_UNKNOWN);
    }

    #[test]
    fn go_and_info_on_a_refused_export_get_err_policy_with_the_message() {
        let export = ExportInfo {
            refusal: Some("mirror is inactive on this node".to_string()),
            ..sample_export()
        };
        let mut handshake = negotiating(export, 3);
        for option_number in [opt::INFO, opt::GO] {
            let output = feed(
                &mut handshake,
                &option(option_number, &info_data("disk0", &[])),
            );
            assert_eq!(
                output,
                reply(
                    option_number,
                    rep::ERR_POLICY,
                    b"mirror is inactive on this node"
                )
            );
            assert_eq!(handshake.status(), &Status::Negotiating);
        }
    }

    fn assert_go_invalid(data: &[u8]) {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::GO, data));
        assert_eq!(
            single_reply_type(&output),
            rep::ERR_INVALID,
            "data {data:?}"
        );
        assert_eq!(handshake.status(), &Status::Negotiating);
    }

    #[test]
    fn go_malformed_data_gets_err_invalid() {
        let good = info_data("disk0", &[info::NAME]);
        // Every strict prefix is malformed.
        for cut in 0..good.len() {
            assert_go_invalid(&good[..cut]);
        }
        // Trailing garbage.
        let mut trailing = good.clone();
        trailing.push(0);
        assert_go_invalid(&trailing);
        // Name length pointing past the data.
        let mut long_name = good.clone();
        long_name[3] = 200;
        assert_go_invalid(&long_name);
        // Name length u32::MAX.
        let mut huge_name = good;
        huge_name[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_go_invalid(&huge_name);
    }

    #[test]
    fn go_with_an_invalid_name_string_gets_err_invalid() {
        let mut not_utf8 = 2u32.to_be_bytes().to_vec();
        not_utf8.extend_from_slice(&[0xff, 0xfe, 0, 0]);
        assert_go_invalid(&not_utf8);

        let mut with_nul = 2u32.to_be_bytes().to_vec();
        with_nul.extend_from_slice(&[b'a', 0, 0, 0]);
        assert_go_invalid(&with_nul);

        assert_go_invalid(&info_data(&"n".repeat(STRING_BYTES_MAX + 1), &[]));
    }

    // --- LIST, STRUCTURED_REPLY, unsupported --------------------------------------

    #[test]
    fn list_sends_one_server_reply_then_ack() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::LIST, &[]));
        let mut expected = reply(opt::LIST, rep::SERVER, b"\0\0\0\x05disk0mirror set disk0");
        expected.extend(reply(opt::LIST, rep::ACK, &[]));
        assert_eq!(output, expected);
        assert_eq!(handshake.status(), &Status::Negotiating);
    }

    #[test]
    fn list_with_data_gets_err_invalid() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::LIST, b"x"));
        assert_eq!(single_reply_type(&output), rep::ERR_INVALID);
    }

    #[test]
    fn structured_reply_is_acked_once_then_invalid() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::STRUCTURED_REPLY, &[]));
        assert_eq!(output, reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        let output = feed(&mut handshake, &option(opt::STRUCTURED_REPLY, &[]));
        assert_eq!(single_reply_type(&output), rep::ERR_INVALID);
        feed(&mut handshake, &option(opt::GO, &info_data("disk0", &[])));
        assert_eq!(handshake.status(), &ready(true, WRITABLE_FLAGS));
    }

    #[test]
    fn structured_reply_with_data_gets_err_invalid_and_stays_off() {
        let mut handshake = negotiating(sample_export(), 3);
        let output = feed(&mut handshake, &option(opt::STRUCTURED_REPLY, b"x"));
        assert_eq!(single_reply_type(&output), rep::ERR_INVALID);
        feed(&mut handshake, &option(opt::GO, &info_data("disk0", &[])));
        assert_eq!(handshake.status(), &ready(false, WRITABLE_FLAGS));
    }

    #[test]
    fn unsupported_options_get_err_unsup_and_their_data_is_skipped() {
        let mut handshake = negotiating(sample_export(), 3);
        for option_number in [
            opt::PEEK_EXPORT,
            opt::STARTTLS,
            opt::LIST_META_CONTEXT,
            opt::SET_META_CONTEXT,
            opt::EXTENDED_HEADERS,
            0,
            12,
            u32::MAX,
        ] {
            let output = feed(&mut handshake, &option(option_number, b"some data"));
            assert_eq!(
                single_reply_type(&output),
                rep::ERR_UNSUP,
                "option {option_number}"
            );
            assert_eq!(handshake.status(), &Status::Negotiating);
        }
        feed(&mut handshake, &option(opt::GO, &info_data("disk0", &[])));
        assert!(matches!(handshake.status(), Status::Ready(_)));
    }

    // --- chunking -----------------------------------------------------------------

    /// A realistic client session: flags, STRUCTURED_REPLY, LIST, INFO, GO, then the
    /// first request's bytes.
    fn full_go_session() -> (Vec<u8>, usize) {
        let mut input = client_flags(client_flag::KNOWN);
        input.extend(option(opt::STRUCTURED_REPLY, &[]));
        input.extend(option(opt::LIST, &[]));
        input.extend(option(opt::INFO, &info_data("disk0", &[info::BLOCK_SIZE])));
        input.extend(option(
            opt::GO,
            &info_data("", &[info::NAME, info::BLOCK_SIZE]),
        ));
        let handshake_bytes = input.len();
        input.extend_from_slice(&[0x25, 0x60, 0x95, 0x13, 0, 0]); // transmission data
        (input, handshake_bytes)
    }

    /// Feeds `input` the way the shell does: keep the unconsumed tail, append more.
    fn drive(input: &[u8], split_points: &[usize]) -> (Handshake, Vec<u8>, usize) {
        let mut handshake = Handshake::new(sample_export());
        let mut output = handshake.take_output();
        let mut pending = Vec::new();
        let mut consumed_total = 0;
        let mut start = 0;
        for &end in split_points.iter().chain(std::iter::once(&input.len())) {
            pending.extend_from_slice(&input[start..end]);
            start = end;
            let consumed = handshake.handle_input(&pending);
            pending.drain(..consumed);
            consumed_total += consumed;
            output.extend(handshake.take_output());
        }
        (handshake, output, consumed_total)
    }

    #[test]
    fn chunked_input_gives_the_same_result_at_every_split_point() {
        let (input, handshake_bytes) = full_go_session();
        let (whole, whole_output, whole_consumed) = drive(&input, &[]);
        assert_eq!(whole_consumed, handshake_bytes);
        assert_eq!(whole.status(), &ready(true, WRITABLE_FLAGS));
        for split in 0..=input.len() {
            let (chunked, output, consumed) = drive(&input, &[split]);
            assert_eq!(output, whole_output, "split at {split}");
            assert_eq!(consumed, whole_consumed, "split at {split}");
            assert_eq!(chunked.status(), whole.status(), "split at {split}");
        }
        let every_byte: Vec<usize> = (1..input.len()).collect();
        let (_, output, consumed) = drive(&input, &every_byte);
        assert_eq!((output, consumed), (whole_output, whole_consumed));
    }

    // --- preconditions ------------------------------------------------------------

    #[test]
    #[should_panic(expected = "bad minimum block size")]
    fn non_power_of_two_block_size_is_a_bug() {
        Handshake::new(ExportInfo {
            block_size_min_bytes: 1000,
            ..sample_export()
        });
    }

    #[test]
    #[should_panic(expected = "contains NUL")]
    fn export_name_with_nul_is_a_bug() {
        Handshake::new(ExportInfo {
            name: "a\0b".to_string(),
            ..sample_export()
        });
    }

    #[test]
    fn close_reasons_display_for_logs() {
        let reasons = [
            CloseReason::ClientAborted,
            CloseReason::BadMagic,
            CloseReason::UnknownClientFlags(4),
            CloseReason::OptionTooLarge {
                option: 7,
                length: 1 << 20,
            },
            CloseReason::TooManyOptions,
            CloseReason::UnknownExport("x".to_string()),
            CloseReason::Refused("inactive".to_string()),
        ];
        for reason in reasons {
            assert!(!reason.to_string().is_empty());
        }
    }
}

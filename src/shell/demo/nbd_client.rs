//! A small blocking NBD client for the demo's workload: fixed-newstyle handshake with
//! NBD_OPT_GO, then one request at a time (WRITE, READ, FLUSH) with simple replies, and
//! NBD_CMD_DISC. The codecs are `core::nbd::client`; this file only moves bytes. The
//! real clients (qemu, nbdcopy, fio, libnbd) are tested in `tests/interop`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::core::nbd::client::{
    ExportDetails, GoReplies, client_flags_for, decode_option_reply_header, decode_simple_reply,
    encode_opt_go,
};
use crate::core::nbd::handshake::{GREETING_BYTES, OPTION_REPLY_HEADER_BYTES};
use crate::core::nbd::reply::SIMPLE_REPLY_BYTES;
use crate::core::nbd::request::RequestHeader;
use crate::core::nbd::wire::{cmd, opt, transmission_flag};

/// One connection to one export.
#[derive(Debug)]
pub struct NbdClient {
    stream: TcpStream,
    export: ExportDetails,
    next_cookie: u64,
    what: String,
}

impl NbdClient {
    /// Connects and negotiates `export`. Every socket operation (connect, each read and
    /// write) fails after `io_timeout`, so a stuck server cannot hang the caller.
    pub fn connect(
        address: SocketAddr,
        export: &str,
        io_timeout: Duration,
    ) -> Result<NbdClient, String> {
        let what = format!("nbd://{address}/{export}");
        let stream = TcpStream::connect_timeout(&address, io_timeout)
            .map_err(|e| format!("{what}: connect: {e}"))?;
        stream
            .set_read_timeout(Some(io_timeout))
            .and_then(|()| stream.set_write_timeout(Some(io_timeout)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| format!("{what}: {e}"))?;
        let mut client = NbdClient {
            stream,
            export: ExportDetails {
                size_bytes: 0,
                transmission_flags: 0,
            },
            next_cookie: 1,
            what,
        };
        client.export = client.handshake(export)?;
        Ok(client)
    }

    fn handshake(&mut self, export: &str) -> Result<ExportDetails, String> {
        let mut greeting = [0u8; GREETING_BYTES];
        self.read_exact(&mut greeting, "greeting")?;
        let flags = client_flags_for(&greeting).map_err(|e| format!("{}: {e}", self.what))?;
        let mut hello = flags.to_be_bytes().to_vec();
        hello.extend_from_slice(&encode_opt_go(export));
        self.write_all(&hello, "NBD_OPT_GO")?;
        let mut replies = GoReplies::new();
        loop {
            let mut head = [0u8; OPTION_REPLY_HEADER_BYTES];
            self.read_exact(&mut head, "option reply")?;
            let header = decode_option_reply_header(&head, opt::GO)
                .map_err(|e| format!("{}: {e}", self.what))?;
            let mut data = vec![0u8; header.length as usize];
            self.read_exact(&mut data, "option reply data")?;
            if let Some(details) = replies
                .handle(&header, &data)
                .map_err(|e| format!("{}: {e}", self.what))?
            {
                return Ok(details);
            }
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.export.size_bytes
    }

    pub fn read_only(&self) -> bool {
        self.export.transmission_flags & transmission_flag::READ_ONLY != 0
    }

    /// Writes `data` at `offset` and waits for the reply.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let header = self.header(cmd::WRITE, offset, data.len());
        // One send for header and payload: no small segment waiting on the peer's
        // delayed ack (TCP_NODELAY is set anyway).
        let mut message = Vec::with_capacity(header.len() + data.len());
        message.extend_from_slice(&header);
        message.extend_from_slice(data);
        self.write_all(&message, "NBD_CMD_WRITE")?;
        self.reply(cmd::WRITE, offset, data.len())
    }

    /// Reads `buffer.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buffer: &mut [u8]) -> Result<(), String> {
        let header = self.header(cmd::READ, offset, buffer.len());
        self.write_all(&header, "NBD_CMD_READ")?;
        self.reply(cmd::READ, offset, buffer.len())?;
        self.read_exact(buffer, "NBD_CMD_READ data")
    }

    /// Makes every completed write durable (on both nodes, for a mirror).
    pub fn flush(&mut self) -> Result<(), String> {
        let header = self.header(cmd::FLUSH, 0, 0);
        self.write_all(&header, "NBD_CMD_FLUSH")?;
        self.reply(cmd::FLUSH, 0, 0)
    }

    /// Ends the session politely (NBD_CMD_DISC has no reply) and closes the socket.
    pub fn disconnect(mut self) -> Result<(), String> {
        let header = self.header(cmd::DISC, 0, 0);
        self.write_all(&header, "NBD_CMD_DISC")?;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        Ok(())
    }

    fn header(&mut self, kind: u16, offset: u64, length: usize) -> [u8; 28] {
        let length = u32::try_from(length).expect("demo requests are small");
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        RequestHeader {
            flags: 0,
            kind,
            cookie,
            offset,
            length,
        }
        .encode()
    }

    /// Reads the simple reply to the request just sent (one at a time: its cookie is
    /// the last one handed out).
    fn reply(&mut self, kind: u16, offset: u64, length: usize) -> Result<(), String> {
        let mut bytes = [0u8; SIMPLE_REPLY_BYTES];
        self.read_exact(&mut bytes, "reply")?;
        let reply = decode_simple_reply(&bytes).map_err(|e| format!("{}: {e}", self.what))?;
        let expected = self.next_cookie - 1;
        if reply.cookie != expected {
            return Err(format!(
                "{}: reply for cookie {} while waiting for {expected}",
                self.what, reply.cookie
            ));
        }
        if reply.error != 0 {
            return Err(format!(
                "{}: {} of {length} bytes at offset {offset} failed: {}",
                self.what,
                cmd::name(kind),
                reply.error_name()
            ));
        }
        Ok(())
    }

    fn read_exact(&mut self, buffer: &mut [u8], what: &str) -> Result<(), String> {
        self.stream
            .read_exact(buffer)
            .map_err(|e| format!("{}: reading the {what}: {e}", self.what))
    }

    fn write_all(&mut self, bytes: &[u8], what: &str) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("{}: sending {what}: {e}", self.what))
    }
}

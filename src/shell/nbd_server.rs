//! The NBD server shell: listeners, and per connection the handshake and the
//! transmission loop (socket bytes in, validated requests to the volume, replies out).
//!
//! Each connection runs as two tasks on the data-plane thread: a reader that parses
//! requests and submits them (it stops reading when the connection's queue depth or
//! the shared buffer pool is exhausted — that is the backpressure), and a writer that
//! sends completed replies, batching every reply ready at once into one `writev`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::rc::Rc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::constants::{
    NBD_OPTION_DATA_BYTES_MAX, NBD_PAYLOAD_BYTES_MAX, NBD_QUEUE_DEPTH_MAX, NBD_SOCKET_READ_BYTES,
    NBD_WRITE_DISCARD_BYTES_MAX,
};
use crate::core::nbd::handshake::{ExportInfo, Handshake, Negotiated, Status};
use crate::core::nbd::reply;
use crate::core::nbd::request::{
    Command, Decision, REQUEST_HEADER_BYTES, TransmissionParams, decode_request_header, validate,
};
use crate::core::nbd::wire::Errno;
use crate::shell::buffers::Buf;
use crate::shell::volume::{Backend, BlockRequest, IoSink, ReadData, ReplyTag};

/// The export as the front end sees it: its description for the handshake and the
/// volume executing its requests.
#[derive(Debug)]
pub struct Export {
    pub info: ExportInfo,
    pub volume: Rc<dyn Backend>,
}

/// A reply ready to be sent.
#[derive(Debug)]
struct Reply {
    tag: ReplyTag,
    result: Result<(), Errno>,
    data: Option<ReadData>,
}

/// State shared by a connection's reader and writer and by the volume's completions.
#[derive(Debug)]
struct Connection {
    structured: bool,
    replies: RefCell<VecDeque<Reply>>,
    /// Wakes the writer when a reply is queued.
    reply_ready: Notify,
    /// Requests accepted and not yet answered (including rejections).
    in_flight: Cell<usize>,
    /// Wakes the reader when `in_flight` drops or the connection dies.
    slot_free: Notify,
    /// Set when the socket failed or the reader is done; the writer exits once drained.
    closing: Cell<bool>,
    broken: Cell<bool>,
}

impl IoSink for Connection {
    fn complete(&self, tag: ReplyTag, result: Result<(), Errno>, data: Option<ReadData>) {
        self.replies
            .borrow_mut()
            .push_back(Reply { tag, result, data });
        self.reply_ready.notify_one();
    }
}

impl Connection {
    fn push_error(&self, cookie: u64, is_read: bool, errno: Errno) {
        self.in_flight.set(self.in_flight.get() + 1);
        self.complete(ReplyTag { cookie, is_read }, Err(errno), None);
    }
}

/// Runs the handshake on `stream`. Returns the negotiated parameters and any bytes the
/// client sent past the end of the handshake, or `None` when the connection ended.
async fn handshake<S>(
    stream: &mut S,
    export: &Export,
    peer: &str,
) -> io::Result<Option<(Negotiated, Vec<u8>)>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hs = Handshake::new(export.info.clone());
    let mut input: Vec<u8> = Vec::with_capacity(4096);
    // One option header plus the largest option payload we accept.
    let input_bytes_max = NBD_OPTION_DATA_BYTES_MAX as usize + 16;
    let mut chunk = vec![0u8; 4096];
    loop {
        let output = hs.take_output();
        if !output.is_empty() {
            stream.write_all(&output).await?;
        }
        match hs.status() {
            Status::Negotiating => {}
            Status::Ready(negotiated) => return Ok(Some((negotiated.clone(), input))),
            Status::Closed(reason) => {
                info!(peer, ?reason, "handshake ended");
                return Ok(None);
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            debug!(peer, "client closed during handshake");
            return Ok(None);
        }
        input.extend_from_slice(&chunk[..n]);
        let consumed = hs.handle_input(&input);
        input.drain(..consumed);
        if input.len() > input_bytes_max {
            warn!(peer, "handshake input exceeds any valid option; closing");
            return Ok(None);
        }
    }
}

/// A stream that splits into independently owned halves without a lock between them
/// (`tokio::io::split` would take a lock on every poll).
pub trait SplitStream: AsyncRead + AsyncWrite + Unpin + 'static {
    type Reader: AsyncRead + Unpin + 'static;
    type Writer: AsyncWrite + Unpin + 'static;
    fn split_owned(self) -> (Self::Reader, Self::Writer);
}

impl SplitStream for tokio::net::TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;
    fn split_owned(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl SplitStream for tokio::net::UnixStream {
    type Reader = tokio::net::unix::OwnedReadHalf;
    type Writer = tokio::net::unix::OwnedWriteHalf;
    fn split_owned(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

/// Serves one client connection to the end.
pub async fn serve_connection<S: SplitStream>(
    mut stream: S,
    export: Rc<Export>,
    peer: String,
    shutdown: watch::Receiver<bool>,
) {
    let (negotiated, leftover) = match handshake(&mut stream, &export, &peer).await {
        Ok(Some(done)) => done,
        Ok(None) => return,
        Err(error) => {
            debug!(peer, %error, "handshake failed");
            return;
        }
    };
    info!(
        peer,
        export = negotiated.export_name,
        structured = negotiated.structured_replies,
        "client connected"
    );
    let params = TransmissionParams {
        size_bytes: export.info.size_bytes,
        read_only: export.info.read_only,
        structured_replies: negotiated.structured_replies,
        transmission_flags: negotiated.transmission_flags,
        payload_bytes_max: NBD_PAYLOAD_BYTES_MAX,
        write_discard_bytes_max: NBD_WRITE_DISCARD_BYTES_MAX,
    };
    let conn = Rc::new(Connection {
        structured: negotiated.structured_replies,
        replies: RefCell::new(VecDeque::new()),
        reply_ready: Notify::new(),
        in_flight: Cell::new(0),
        slot_free: Notify::new(),
        closing: Cell::new(false),
        broken: Cell::new(false),
    });
    let (reader, writer) = stream.split_owned();
    let writer_task = tokio::task::spawn_local(write_replies(writer, conn.clone()));
    let outcome = read_requests(reader, leftover, &export, &conn, params, shutdown).await;
    // The reader batches ring submissions until it would wait; whatever it queued before
    // stopping must still reach the kernel, or those requests would never be answered.
    export.volume.flush_submissions();
    match &outcome {
        Ok(reason) => debug!(peer, reason, "reader finished"),
        Err(error) => debug!(peer, %error, "reader failed"),
    }
    // Every accepted request still gets its reply: wait for the volume to finish them.
    while conn.in_flight.get() > 0 && !conn.broken.get() {
        conn.slot_free.notified().await;
    }
    conn.closing.set(true);
    conn.reply_ready.notify_one();
    let _ = writer_task.await;
    info!(peer, "client disconnected");
}

/// Reads, validates and submits requests until the client disconnects, the server
/// shuts down or the stream breaks. Returns why it stopped.
async fn read_requests<R>(
    mut reader: R,
    leftover: Vec<u8>,
    export: &Export,
    conn: &Rc<Connection>,
    params: TransmissionParams,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<&'static str>
where
    R: AsyncRead + Unpin,
{
    let volume = &export.volume;
    let pool = volume.pool().clone();
    let sink: Rc<dyn IoSink> = conn.clone();
    let mut buf = vec![0u8; NBD_SOCKET_READ_BYTES.max(leftover.len())];
    let mut start = 0;
    let mut end = leftover.len();
    buf[..end].copy_from_slice(&leftover);
    loop {
        // Handle every complete request header already buffered.
        while end - start >= REQUEST_HEADER_BYTES {
            let header_bytes: &[u8; REQUEST_HEADER_BYTES] = buf
                [start..start + REQUEST_HEADER_BYTES]
                .try_into()
                .expect("slice length");
            let header = match decode_request_header(header_bytes) {
                Ok(header) => header,
                Err(error) => {
                    warn!(?error, "framing violation; closing connection");
                    conn.broken.set(true);
                    return Ok("framing violation");
                }
            };
            let request = match validate(&header, &params) {
                Decision::Execute(request) => request,
                Decision::Reject {
                    cookie,
                    errno,
                    discard_bytes,
                    reason,
                } => {
                    debug!(cookie, ?errno, reason, "request rejected");
                    start += REQUEST_HEADER_BYTES;
                    let in_buffer = (end - start).min(discard_bytes as usize);
                    start += in_buffer;
                    discard(
                        &mut reader,
                        discard_bytes as usize - in_buffer,
                        &mut buf[end..],
                    )
                    .await?;
                    conn.push_error(
                        cookie,
                        header.kind == crate::core::nbd::wire::cmd::READ,
                        errno,
                    );
                    continue;
                }
                Decision::Disconnect => return Ok("client sent NBD_CMD_DISC"),
                Decision::Close(error) => {
                    warn!(?error, "request beyond the sanity cap; closing connection");
                    conn.broken.set(true);
                    return Ok("oversized write");
                }
            };
            // Queue depth bound: stop reading until a reply frees a slot.
            while conn.in_flight.get() >= NBD_QUEUE_DEPTH_MAX {
                volume.flush_submissions();
                conn.slot_free.notified().await;
                if conn.broken.get() {
                    return Ok("connection broken");
                }
            }
            start += REQUEST_HEADER_BYTES;
            let (offset, length) = (request.offset(), request.length());
            let tag = ReplyTag {
                cookie: request.cookie(),
                is_read: request.command() == Command::Read,
            };
            let block_request = match request.command() {
                Command::Read => {
                    let layout = volume.layout(offset, length);
                    let data = get_buffer(&pool, volume, layout.buf_bytes).await;
                    BlockRequest::Read {
                        offset,
                        length,
                        buf: data,
                    }
                }
                Command::Write { fua } => {
                    let layout = volume.layout(offset, length);
                    let mut data = get_buffer(&pool, volume, layout.buf_bytes).await;
                    let payload = &mut data[layout.data_start..layout.data_start + length as usize];
                    let in_buffer = (end - start).min(payload.len());
                    payload[..in_buffer].copy_from_slice(&buf[start..start + in_buffer]);
                    start += in_buffer;
                    if in_buffer < payload.len() {
                        // Large payloads go straight from the socket into their buffer.
                        volume.flush_submissions();
                        reader.read_exact(&mut payload[in_buffer..]).await?;
                    }
                    BlockRequest::Write {
                        offset,
                        length,
                        buf: data,
                        fua,
                    }
                }
                Command::Flush => BlockRequest::Flush,
                Command::Trim { fua } => BlockRequest::Trim {
                    offset,
                    length,
                    fua,
                },
                Command::WriteZeroes {
                    fua,
                    no_hole,
                    fast_zero,
                } => BlockRequest::WriteZeroes {
                    offset,
                    length,
                    fua,
                    no_hole,
                    fast_zero,
                },
                Command::Cache => BlockRequest::Cache { offset, length },
            };
            conn.in_flight.set(conn.in_flight.get() + 1);
            volume.submit(block_request, tag, sink.clone());
        }
        // Need more bytes: keep the partial header at the front of the buffer.
        if start == end {
            start = 0;
            end = 0;
        } else if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        volume.flush_submissions();
        if buf.len() < NBD_SOCKET_READ_BYTES {
            buf.resize(NBD_SOCKET_READ_BYTES, 0);
        }
        let n = tokio::select! {
            biased;
            read = reader.read(&mut buf[end..]) => read?,
            _ = shutdown.changed() => return Ok("server shutting down"),
        };
        if n == 0 {
            return Ok("client closed the connection");
        }
        end += n;
    }
}

/// A pooled buffer, waiting (and so not reading the socket) while the pool is empty.
async fn get_buffer(
    pool: &Rc<crate::shell::buffers::BufferPool>,
    volume: &Rc<dyn Backend>,
    bytes: usize,
) -> Buf {
    if let Some(buf) = pool.try_get(bytes) {
        return buf;
    }
    volume.flush_submissions();
    pool.get(bytes).await
}

/// Reads and drops `count` bytes (the payload of a rejected write).
async fn discard<R: AsyncRead + Unpin>(
    reader: &mut R,
    mut count: usize,
    scratch: &mut [u8],
) -> io::Result<()> {
    let mut own = Vec::new();
    let scratch = if scratch.len() >= 4096 {
        scratch
    } else {
        own.resize(64 * 1024, 0);
        &mut own[..]
    };
    while count > 0 {
        let take = count.min(scratch.len());
        reader.read_exact(&mut scratch[..take]).await?;
        count -= take;
    }
    Ok(())
}

/// Sends replies as they complete, every ready reply in one vectored write.
async fn write_replies<W>(mut writer: W, conn: Rc<Connection>)
where
    W: AsyncWrite + Unpin,
{
    let mut headers: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut batch: Vec<Reply> = Vec::new();
    let mut spans: Vec<(usize, usize, Option<usize>)> = Vec::new();
    loop {
        {
            let mut queue = conn.replies.borrow_mut();
            batch.extend(queue.drain(..));
        }
        if batch.is_empty() {
            if conn.closing.get() {
                let _ = writer.shutdown().await;
                return;
            }
            conn.reply_ready.notified().await;
            continue;
        }
        headers.clear();
        spans.clear();
        for (index, reply) in batch.iter().enumerate() {
            let from = headers.len();
            let cookie = reply.tag.cookie;
            match (&reply.result, &reply.data) {
                (Ok(()), Some(data)) if conn.structured => {
                    let length = data.as_slice().len() as u32;
                    reply::encode_read_chunk_header(&mut headers, cookie, data.offset(), length);
                }
                (Ok(()), Some(_)) => reply::encode_simple_reply(&mut headers, cookie, None),
                (result, _) => {
                    let result = result.map_err(|errno| (errno, errno_message(errno)));
                    reply::encode_reply(
                        &mut headers,
                        conn.structured,
                        reply.tag.is_read,
                        cookie,
                        result,
                    );
                }
            }
            let data = reply.data.as_ref().map(|_| index);
            spans.push((from, headers.len(), data));
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(spans.len() * 2);
        for (from, to, data) in &spans {
            slices.push(IoSlice::new(&headers[*from..*to]));
            if let Some(index) = data {
                let bytes = batch[*index]
                    .data
                    .as_ref()
                    .expect("data present")
                    .as_slice();
                slices.push(IoSlice::new(bytes));
            }
        }
        let sent = write_all_vectored(&mut writer, &mut slices).await;
        let answered = batch.len();
        drop(slices);
        batch.clear(); // returns read buffers to the pool
        conn.in_flight.set(conn.in_flight.get() - answered);
        conn.slot_free.notify_one();
        if let Err(error) = sent {
            debug!(%error, "reply write failed; connection broken");
            conn.broken.set(true);
            conn.slot_free.notify_one();
            // Keep draining so in-flight counts reach zero and buffers return.
            loop {
                let drained = conn.replies.borrow_mut().drain(..).count();
                conn.in_flight.set(conn.in_flight.get() - drained);
                if conn.closing.get() && conn.in_flight.get() == 0 {
                    return;
                }
                conn.reply_ready.notified().await;
            }
        }
    }
}

fn errno_message(errno: Errno) -> &'static str {
    match errno {
        Errno::Perm => "operation not permitted on this export",
        Errno::Io => "input/output error on the backing device",
        Errno::NoMem => "out of memory",
        Errno::Inval => "invalid request",
        Errno::NoSpc => "no space left on the backing device",
        Errno::Overflow => "request too large",
        Errno::NotSup => "operation not supported by the backing device",
        Errno::Shutdown => "server is shutting down",
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = writer.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

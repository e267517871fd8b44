//! Every limit in mirrordisk, named once, with the reason for its value.
//!
//! A limit lives here when more than one module relies on it or when an operator or a
//! reviewer would want to find it. Units are the last word of each name.

/// Size of one KiB/MiB, so limits read as arithmetic rather than magic numbers.
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// Largest READ or WRITE payload we accept and advertise as the NBD maximum block size.
/// 32 MiB matches nbdkit and qemu-nbd, is far above what any client issues by default
/// (the Linux nbd driver sends at most 128 KiB... 1 MiB), and bounds one request's
/// buffer so the pool below can always serve at least two of them.
pub const NBD_PAYLOAD_BYTES_MAX: u32 = 32 * MIB as u32;

/// Preferred block size advertised in NBD_INFO_BLOCK_SIZE: the page size, which is
/// also the journal's default granularity, so client I/O never straddles a region.
pub const NBD_BLOCK_SIZE_PREFERRED_BYTES: u32 = 4096;

/// A WRITE whose length exceeds `NBD_PAYLOAD_BYTES_MAX` but not this cap has its payload
/// read and discarded and is answered with an error, keeping the connection usable;
/// beyond this cap we close rather than read gigabytes of garbage (a framing violation
/// in all but name).
pub const NBD_WRITE_DISCARD_BYTES_MAX: u32 = 2 * NBD_PAYLOAD_BYTES_MAX;

/// Largest option payload accepted during the handshake. The longest legitimate one is
/// NBD_OPT_GO/INFO: a 4096-byte name (the spec's hard limit on strings) plus a few info
/// requests; 64 KiB leaves room and still bounds memory per handshaking connection.
pub const NBD_OPTION_DATA_BYTES_MAX: u32 = 64 * KIB as u32;

/// Options one handshake may send before we hang up: real clients send fewer than ten;
/// an unbounded loop of options is a denial of service the spec lets us end.
pub const NBD_OPTIONS_PER_HANDSHAKE_MAX: u32 = 1024;

/// Requests in flight per NBD connection. The Linux nbd driver's default queue depth is
/// 128; deeper queues add latency without adding throughput on one data-plane thread.
/// When reached, the connection stops reading its socket (backpressure).
pub const NBD_QUEUE_DEPTH_MAX: usize = 128;

/// Concurrent NBD connections per export. Multi-connection clients (nbdcopy, qemu with
/// multi-conn) open up to 16; the cap bounds per-connection memory.
pub const NBD_CONNECTIONS_MAX: usize = 64;

/// Bytes of I/O buffers (aligned, pooled) the data plane may hold at once, across all
/// connections. Two maximum-size requests fit; at QD128 with 4 KiB requests only 512 KiB
/// is used. When exhausted, connections stop reading their sockets until buffers return;
/// nothing allocates beyond it.
pub const BUFFER_POOL_BYTES_MAX: usize = 64 * MIB as usize;

/// At most this much of the pool is allocated and faulted in when a mirror starts, for
/// one resync window of region-sized buffers (256 x 4 KiB at the default granularity):
/// the first window of a differential rebuild then runs on warm memory. Small against
/// the pool; a larger granularity gets fewer buffers.
pub const RESYNC_PREWARM_BYTES_MAX: usize = 4 * MIB as usize;

/// Bytes each connection reads from its socket at once. Large enough to take a QD32
/// burst of 4 KiB writes in one read system call; large WRITE payloads bypass it and
/// are read straight into their pooled buffer.
pub const NBD_SOCKET_READ_BYTES: usize = 256 * KIB as usize;

/// Entries in the io_uring submission queue. Covers NBD_QUEUE_DEPTH_MAX for a few
/// connections per batch; completions beyond it wait in the kernel's overflow list.
pub const URING_ENTRIES: u32 = 512;

/// Reads and writes up to this size on a memory-backed file (tmpfs) are done
/// inline with preadv2/pwritev2 on the data-plane thread instead of through io_uring.
/// Such a file has no non-blocking path, so io_uring hands every read and write to an
/// io-wq worker thread; for a small transfer the hop (a wake-up, two context switches,
/// the worker's bookkeeping) costs more CPU than the copy itself: a differential rebuild
/// of scattered 4 KiB regions on tmpfs took 25-27 ms inline against 29-31 ms through the
/// workers (bench/rebuild-bench.sh, Linux 6.18). A 64 KiB copy takes a few microseconds,
/// which the thread can afford; larger transfers still go to a worker, which copies on
/// another CPU while this thread serves the network. Block devices and O_DIRECT files
/// on disk filesystems always use the ring: there io_uring issues inline by itself and
/// the device completes the I/O asynchronously.
pub const INLINE_IO_BYTES_MAX: usize = 64 * KIB as usize;

//! The bounded pool of 4096-aligned I/O buffers the data plane reads and writes through.
//!
//! One pool serves the whole data-plane thread (`Rc`, `Cell`, `RefCell`: no locks). A
//! buffer's capacity is its size class: the request length rounded up to a power of two
//! of at least 4096 bytes (clamped to the budget), aligned to 4096 so any O_DIRECT
//! backing accepts it. Freed buffers are cached per class and handed out again without
//! zeroing. The budget (`bytes_max`) caps what is handed out *plus* what is cached, so
//! the pool never holds more memory than it was given; when a class needs room, cached
//! buffers of other classes are freed first. When the budget is exhausted `try_get`
//! returns `None` and `get` waits, which is the data plane's backpressure.

use std::alloc::{self, Layout};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;

use tokio::sync::Notify;

/// Alignment of every buffer: the page size, which satisfies the DIO memory alignment of
/// every backing we open (disk.rs falls back to buffered I/O when a backing asks for
/// more).
pub const BUFFER_ALIGN_BYTES: usize = 4096;

/// Smallest size class. Smaller requests still take one page: O_DIRECT needs whole
/// logical blocks anyway, and fewer classes mean more reuse.
pub const BUFFER_CLASS_MIN_BYTES: usize = 4096;

const CLASS_MIN_SHIFT: u32 = BUFFER_CLASS_MIN_BYTES.trailing_zeros();

/// A bounded, single-threaded pool of aligned I/O buffers.
pub struct BufferPool {
    bytes_max: usize,
    /// Capacity of the buffers handed out and not yet dropped.
    bytes_in_use: Cell<usize>,
    /// Capacity of the buffers cached in `free`.
    bytes_cached: Cell<usize>,
    /// Cached buffers per class; index 0 is `BUFFER_CLASS_MIN_BYTES`. Every buffer in
    /// `free[i]` has capacity `class_capacity_bytes(i)`.
    free: RefCell<Vec<Vec<NonNull<u8>>>>,
    /// Tasks parked in `get`; drops only touch `notify` when this is non-zero.
    waiters_count: Cell<usize>,
    notify: Notify,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("bytes_max", &self.bytes_max)
            .field("bytes_in_use", &self.bytes_in_use.get())
            .field("bytes_cached", &self.bytes_cached.get())
            .field("waiters_count", &self.waiters_count.get())
            .finish()
    }
}

impl BufferPool {
    /// A pool that never holds more than `bytes_max` bytes of buffers (handed out plus
    /// cached). Panics unless `bytes_max` is a non-zero multiple of 4096: every buffer's
    /// capacity is, so any other budget could never be used exactly.
    pub fn new(bytes_max: usize) -> Rc<BufferPool> {
        assert!(
            bytes_max >= BUFFER_CLASS_MIN_BYTES && bytes_max.is_multiple_of(BUFFER_ALIGN_BYTES),
            "buffer pool budget {bytes_max} must be a non-zero multiple of {BUFFER_ALIGN_BYTES}"
        );
        let classes_count = class_index(bytes_max.next_power_of_two()) + 1;
        Rc::new(BufferPool {
            bytes_max,
            bytes_in_use: Cell::new(0),
            bytes_cached: Cell::new(0),
            free: RefCell::new((0..classes_count).map(|_| Vec::new()).collect()),
            waiters_count: Cell::new(0),
            notify: Notify::new(),
        })
    }

    /// A buffer of `len` bytes (capacity rounded up to a power-of-two size class >= 4096,
    /// or to `bytes_max` when that class would exceed it; aligned to 4096 for O_DIRECT),
    /// or `None` when handing it out would exceed `bytes_max`.
    ///
    /// The contents are NOT zeroed: a reused buffer holds whatever its previous user left
    /// (a fresh one holds zeroes). Callers always fully overwrite the `len` bytes (a disk
    /// read or a socket read) before using them.
    ///
    /// Panics (a caller bug) if `len == 0` or `len > bytes_max`.
    pub fn try_get(self: &Rc<Self>, len: usize) -> Option<Buf> {
        assert!(len > 0, "zero-length buffer requested");
        assert!(
            len <= self.bytes_max,
            "buffer of {len} bytes requested from a pool of {} bytes",
            self.bytes_max
        );
        let capacity = self.capacity_for(len);
        let index = class_index(capacity);
        let cached = self.free.borrow_mut()[index].pop();
        let ptr = match cached {
            Some(ptr) => {
                self.bytes_cached.set(self.bytes_cached.get() - capacity);
                ptr
            }
            None => {
                if self.bytes_in_use.get() + capacity > self.bytes_max {
                    return None;
                }
                self.evict_until_room_for(capacity);
                allocate(capacity)
            }
        };
        self.bytes_in_use.set(self.bytes_in_use.get() + capacity);
        debug_assert!(self.bytes_allocated() <= self.bytes_max);
        Some(Buf {
            ptr,
            len,
            capacity,
            pool: Some(Rc::clone(self)),
        })
    }

    /// Waits until `try_get(len)` succeeds. Meant for backpressure: the caller stops
    /// reading its socket while it waits. Waiters are woken whenever a buffer returns;
    /// there is no queueing order between them.
    pub async fn get(self: &Rc<Self>, len: usize) -> Buf {
        loop {
            if let Some(buf) = self.try_get(len) {
                return buf;
            }
            // Single-threaded: nothing can return a buffer between the failed try_get
            // above and the registration below, so no wake-up is lost. `Notified`
            // created before `notify_waiters` is woken by it even if not yet polled.
            let _waiting = WaiterGuard::new(self);
            self.notify.notified().await;
        }
    }

    /// Allocates `count` buffers of `len` bytes (as many as the budget allows) and puts
    /// them in the cache, so the first burst that needs them finds memory that is
    /// already faulted in rather than paying a page fault and a zeroing per page on the
    /// data path. Returns how many were cached.
    pub fn prewarm(self: &Rc<Self>, len: usize, count: usize) -> usize {
        let bufs: Vec<Buf> = (0..count).map_while(|_| self.try_get(len)).collect();
        bufs.len()
    }

    /// Capacity of the buffers handed out and not yet dropped.
    pub fn bytes_in_use(&self) -> usize {
        self.bytes_in_use.get()
    }

    /// Buffers in use plus buffers cached for reuse; never exceeds `bytes_max`.
    pub fn bytes_allocated(&self) -> usize {
        self.bytes_in_use.get() + self.bytes_cached.get()
    }

    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    /// The capacity a request of `len` bytes gets.
    fn capacity_for(&self, len: usize) -> usize {
        len.next_power_of_two()
            .max(BUFFER_CLASS_MIN_BYTES)
            .min(self.bytes_max)
    }

    /// Frees cached buffers (largest classes first: fewest frees) until `capacity` more
    /// bytes fit in the budget. The caller has checked that the buffers in use leave room.
    fn evict_until_room_for(&self, capacity: usize) {
        let mut free = self.free.borrow_mut();
        for index in (0..free.len()).rev() {
            while self.bytes_allocated() + capacity > self.bytes_max {
                let Some(ptr) = free[index].pop() else { break };
                let class_bytes = class_capacity_bytes(index, self.bytes_max);
                deallocate(ptr, class_bytes);
                self.bytes_cached.set(self.bytes_cached.get() - class_bytes);
            }
        }
        assert!(self.bytes_allocated() + capacity <= self.bytes_max);
    }

    fn put_back(&self, ptr: NonNull<u8>, capacity: usize) {
        self.free.borrow_mut()[class_index(capacity)].push(ptr);
        self.bytes_in_use.set(self.bytes_in_use.get() - capacity);
        self.bytes_cached.set(self.bytes_cached.get() + capacity);
        if self.waiters_count.get() > 0 {
            self.notify.notify_waiters();
        }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // Every Buf holds an Rc to its pool, so none is outstanding here.
        assert_eq!(self.bytes_in_use.get(), 0);
        let bytes_max = self.bytes_max;
        for (index, list) in self.free.get_mut().iter_mut().enumerate() {
            for ptr in list.drain(..) {
                deallocate(ptr, class_capacity_bytes(index, bytes_max));
            }
        }
    }
}

/// Counts a task parked in `get`, also when its future is dropped mid-wait.
struct WaiterGuard<'a>(&'a BufferPool);

impl<'a> WaiterGuard<'a> {
    fn new(pool: &'a BufferPool) -> Self {
        pool.waiters_count.set(pool.waiters_count.get() + 1);
        WaiterGuard(pool)
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.waiters_count.set(self.0.waiters_count.get() - 1);
    }
}

fn class_index(capacity: usize) -> usize {
    (capacity.next_power_of_two().trailing_zeros() - CLASS_MIN_SHIFT) as usize
}

/// Capacity of the buffers in class `index` (the top class is clamped to the budget).
fn class_capacity_bytes(index: usize, bytes_max: usize) -> usize {
    (BUFFER_CLASS_MIN_BYTES << index).min(bytes_max)
}

fn layout(capacity: usize) -> Layout {
    Layout::from_size_align(capacity, BUFFER_ALIGN_BYTES).expect("buffer layout")
}

/// Fresh memory is zeroed once so that every byte a `Buf` exposes is initialized; reuse
/// never zeroes again.
fn allocate(capacity: usize) -> NonNull<u8> {
    let layout = layout(capacity);
    // SAFETY: layout has a non-zero size (capacity >= 4096) and a valid power-of-two
    // alignment.
    let ptr = unsafe { alloc::alloc_zeroed(layout) };
    NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout))
}

fn deallocate(ptr: NonNull<u8>, capacity: usize) {
    // SAFETY: ptr came from `allocate(capacity)`, i.e. alloc_zeroed with this same
    // layout, and is no longer referenced by any live Buf.
    unsafe { alloc::dealloc(ptr.as_ptr(), layout(capacity)) }
}

/// An aligned I/O buffer: derefs to its first `len()` bytes. A pooled buffer returns to
/// its pool's cache when dropped and is not zeroed on reuse (see `try_get`); an unpooled
/// one (`new_unpooled`) is freed.
pub struct Buf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    /// `None` for a buffer made by `new_unpooled`.
    pool: Option<Rc<BufferPool>>,
}

impl Buf {
    /// A zeroed, 4096-aligned buffer of `len` bytes outside any pool's budget (capacity
    /// rounded up to a multiple of 4096), freed on drop. For the few long-lived buffers
    /// allocated once at start-up (e.g. a shared zero buffer); never on the data path.
    /// Panics if `len == 0`.
    pub fn new_unpooled(len: usize) -> Buf {
        assert!(len > 0, "zero-length buffer requested");
        let capacity = len.next_multiple_of(BUFFER_ALIGN_BYTES);
        Buf {
            ptr: allocate(capacity),
            len,
            capacity,
            pool: None,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the length (for reuse). Panics if `len > capacity()`. Bytes that become
    /// visible hold whatever they held before (initialized, not zeroed).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "buffer length {len} exceeds its capacity {}",
            self.capacity
        );
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to `capacity` bytes owned by this Buf, all initialized
        // (zeroed at allocation, only ever overwritten since), and len <= capacity.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for Buf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        match &self.pool {
            Some(pool) => pool.put_back(self.ptr, self.capacity),
            None => deallocate(self.ptr, self.capacity),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    const MIB: usize = 1024 * 1024;

    #[test]
    fn prewarm_caches_faulted_buffers_within_the_budget() {
        let pool = BufferPool::new(16 * 4096);
        assert_eq!(pool.prewarm(4096, 10), 10);
        assert_eq!(pool.bytes_in_use(), 0);
        assert_eq!(pool.bytes_allocated(), 10 * 4096);
        // The cached buffers are handed out again, not new ones.
        let reused: Vec<Buf> = (0..10).map(|_| pool.try_get(4096).unwrap()).collect();
        assert_eq!(pool.bytes_allocated(), 10 * 4096);
        drop(reused);
        let small = BufferPool::new(4 * 4096);
        assert_eq!(small.prewarm(4096, 10), 4, "the budget bounds it");
        assert_eq!(small.bytes_allocated(), 4 * 4096);
    }

    #[test]
    fn sizes_round_up_to_power_of_two_classes_and_are_aligned() {
        let pool = BufferPool::new(MIB);
        for (len, capacity) in [(1, 4096), (4096, 4096), (4097, 8192), (65536, 65536)] {
            let buf = pool.try_get(len).unwrap();
            assert_eq!(buf.len(), len);
            assert_eq!(buf.capacity(), capacity);
            assert_eq!(buf.as_ptr() as usize % BUFFER_ALIGN_BYTES, 0);
        }
        assert_eq!(pool.bytes_in_use(), 0);
    }

    #[test]
    fn top_class_is_clamped_to_a_budget_that_is_not_a_power_of_two() {
        let pool = BufferPool::new(48 * 1024);
        let buf = pool.try_get(40 * 1024).unwrap();
        assert_eq!(buf.capacity(), 48 * 1024);
        assert!(pool.try_get(1).is_none());
        drop(buf);
        let again = pool.try_get(33 * 1024).unwrap();
        assert_eq!(again.capacity(), 48 * 1024);
        assert_eq!(pool.bytes_allocated(), 48 * 1024);
    }

    #[test]
    fn budget_is_enforced_and_released_by_drop() {
        let pool = BufferPool::new(64 * 1024);
        let bufs: Vec<Buf> = (0..16).map(|_| pool.try_get(4096).unwrap()).collect();
        assert_eq!(pool.bytes_in_use(), 64 * 1024);
        assert!(pool.try_get(1).is_none());
        drop(bufs);
        assert_eq!(pool.bytes_in_use(), 0);
        assert_eq!(pool.bytes_allocated(), 64 * 1024);
        assert!(pool.try_get(4096).is_some());
    }

    #[test]
    fn freed_buffers_are_reused_without_zeroing() {
        let pool = BufferPool::new(MIB);
        let mut buf = pool.try_get(8192).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "fresh memory is zeroed");
        buf.fill(0xab);
        let ptr = buf.as_ptr();
        drop(buf);
        let again = pool.try_get(5000).unwrap();
        assert_eq!(again.as_ptr(), ptr, "same class reuses the cached buffer");
        assert!(again.iter().all(|&b| b == 0xab));
        assert_eq!(pool.bytes_allocated(), 8192);
    }

    #[test]
    fn a_new_class_evicts_cached_buffers_of_other_classes() {
        let pool = BufferPool::new(64 * 1024);
        let small: Vec<Buf> = (0..16).map(|_| pool.try_get(4096).unwrap()).collect();
        drop(small);
        assert_eq!(pool.bytes_allocated(), 64 * 1024);
        let big = pool.try_get(32 * 1024).unwrap();
        assert_eq!(pool.bytes_in_use(), 32 * 1024);
        assert_eq!(pool.bytes_allocated(), 64 * 1024);
        let big2 = pool.try_get(32 * 1024).unwrap();
        assert_eq!(pool.bytes_allocated(), 64 * 1024);
        assert!(pool.try_get(4096).is_none());
        drop((big, big2));
    }

    #[test]
    fn bytes_allocated_never_exceeds_budget_under_a_mixed_workload() {
        let budget = 256 * 1024;
        let pool = BufferPool::new(budget);
        let mut held: Vec<Buf> = Vec::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..10_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = 1 + (seed as usize % (budget / 2));
            if seed & 0x100 != 0 && !held.is_empty() {
                let victim = (seed >> 20) as usize % held.len();
                held.swap_remove(victim);
            } else if let Some(buf) = pool.try_get(len) {
                held.push(buf);
            }
            assert!(pool.bytes_allocated() <= budget);
            assert_eq!(
                pool.bytes_in_use(),
                held.iter().map(|b| b.capacity()).sum::<usize>()
            );
        }
    }

    #[test]
    fn set_len_reuses_within_capacity() {
        let pool = BufferPool::new(MIB);
        let mut buf = pool.try_get(100).unwrap();
        buf.set_len(4096);
        assert_eq!(buf.len(), 4096);
        assert_eq!(buf[..].len(), 4096);
    }

    #[test]
    #[should_panic(expected = "exceeds its capacity")]
    fn set_len_beyond_capacity_panics() {
        let pool = BufferPool::new(MIB);
        pool.try_get(100).unwrap().set_len(4097);
    }

    #[test]
    #[should_panic(expected = "requested from a pool")]
    fn request_larger_than_budget_panics() {
        BufferPool::new(64 * 1024).try_get(64 * 1024 + 1);
    }

    #[test]
    #[should_panic(expected = "zero-length")]
    fn zero_length_request_panics() {
        BufferPool::new(64 * 1024).try_get(0);
    }

    #[test]
    fn unpooled_buffers_are_aligned_zeroed_and_outside_every_budget() {
        let pool = BufferPool::new(4096);
        let mut buf = Buf::new_unpooled(5000);
        assert_eq!((buf.len(), buf.capacity()), (5000, 8192));
        assert_eq!(buf.as_ptr() as usize % BUFFER_ALIGN_BYTES, 0);
        assert!(buf.iter().all(|&b| b == 0));
        buf.set_len(8192);
        buf.fill(1);
        drop(buf);
        assert_eq!(pool.bytes_allocated(), 0);
    }

    #[test]
    fn get_waits_until_a_buffer_is_dropped() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let pool = BufferPool::new(8192);
            let held = pool.try_get(8192).unwrap();
            let waiter = {
                let pool = Rc::clone(&pool);
                tokio::task::spawn_local(async move { pool.get(4096).await.capacity() })
            };
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            assert_eq!(pool.waiters_count.get(), 1);
            drop(held);
            assert_eq!(waiter.await.unwrap(), 4096);
            assert_eq!(pool.waiters_count.get(), 0);
        });
    }

    #[test]
    fn a_cancelled_get_leaves_no_waiter_behind() {
        let pool = BufferPool::new(4096);
        let held = pool.try_get(4096).unwrap();
        {
            let mut future = pin!(pool.get(4096));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(future.as_mut().poll(&mut cx).is_pending());
            assert_eq!(pool.waiters_count.get(), 1);
        }
        assert_eq!(pool.waiters_count.get(), 0);
        drop(held);
        let mut future = pin!(pool.get(4096));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(future.as_mut().poll(&mut cx), Poll::Ready(_)));
    }
}

//! The one module of the project allowed `unsafe`: the io_uring itself.
//!
//! With readiness I/O the kernel only *tells* us a socket is ready and we
//! make the system call ourselves, from our own buffer, on our own time.
//! With completion I/O we hand the kernel an operation that names memory
//! ("send these bytes", "receive into one of these buffers") and it does
//! the work later, after `io_uring_enter` has returned. From submission to
//! completion that memory belongs to the kernel: moving, freeing or
//! writing it is a use-after-free the compiler cannot see. That is why the
//! `io-uring` crate marks pushing an entry `unsafe`, and why everything that
//! names memory lives here, behind a safe interface that makes the rule
//! impossible to break from outside:
//!
//! - **Sends** take a [`Batch`] by value. The ring keeps it (in `flights`)
//!   until the send's completion, then hands it back in [`Event::Sent`].
//!   The caller cannot touch the bytes in between because it does not own
//!   them.
//! - **Receives** use a *provided buffer ring*: one pool of buffers for all
//!   connections, registered once. The kernel picks a free buffer when data
//!   arrives, so an idle connection owns no buffer at all. A completion
//!   hands out a [`RecvBuf`] (constructible only here) that names the
//!   buffer; its bytes can be read through [`Ring::bytes`] until it is
//!   given back with [`Ring::recycle`], which is the only way the buffer
//!   returns to the kernel. Where the kernel allows it (6.12 on), buffers
//!   are consumed *incrementally*: a completion takes only the bytes it
//!   needs from the buffer at the head, the next one continues behind it,
//!   and the buffer goes back once a completion says it is used up. So a
//!   buffer can be large (one completion carries a 64 KiB burst) while a
//!   64-byte message still costs 64 bytes of pool.
//! - **Accepts** return new descriptors as `OwnedFd`, made here from the
//!   kernel's number.
//! - Every other operation names no memory (cancel, poll).
//!
//! Nothing here is freed while the kernel may still hold it: on drop the
//! pool and any send still in flight are leaked on purpose (the ring's
//! teardown in the kernel finishes asynchronously after `close`, and the
//! process is about to exit anyway).
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use slab::Slab;

/// `user_data` = operation kind in the top byte, the caller's tag below.
const KIND_SHIFT: u32 = 56;
/// Tags must fit below the kind byte.
pub const TAG_MAX: u64 = (1 << KIND_SHIFT) - 1;

/// The `user_data` of an operation of `kind` for `tag`. A tag above
/// [`TAG_MAX`] would spill into the kind byte and make, say, a receive's
/// completion read as a send's, handing back a batch the kernel is still
/// sending from: refused outright.
fn user_data(kind: u64, tag: u64) -> u64 {
    assert!(tag <= TAG_MAX, "io_uring tag {tag:#x} is above TAG_MAX");
    kind << KIND_SHIFT | tag
}

const ACCEPT: u64 = 1;
const RECV: u64 = 2;
const SEND: u64 = 3;
const POLL: u64 = 4;
const CANCEL: u64 = 5;

/// Batches of completions in a row that must run out of receive buffers
/// before the pool grows.
const STARVED_BATCHES: u32 = 3;

/// The pool grows to at most this many bytes per connection receiving
/// (eight of echo's 64 KiB buffers, two readiness-engine read budgets):
/// more buffers serve more connections at once, not one connection
/// faster. Grown for whoever ran it dry, a single client sending as fast
/// as it can took the pool to its most, 32 MiB for echo, where the
/// readiness engine holds that client to `--max-buffer` and a read; so
/// did one such client among many idle ones, had idle ones counted.
/// (At 128 KiB, uring failed `chat_drops_the_biggest_reader_at_the_memory_cap`
/// every time: the talker's two readers reached the cap with exactly the
/// same bytes queued and the one keeping up was dropped. The pool size
/// only decided whether the cap was reached while the two were tied (the
/// watcher's last send, already taken by the kernel, still counted). Chat
/// now judges the cap once a wake-up's completions are handled and asks
/// the kernel who is behind, [`unsent`], whatever the pool (see
/// `uring/memory.rs`). 512 KiB stays as measured.)
pub const POOL_SHARE: usize = 512 * 1024;

/// Numbers the rings of this process (one, in practice).
static NEXT_RING_ID: AtomicU32 = AtomicU32::new(0);

/// The buffer group id of the one provided-buffer ring.
const BGID: u16 = 0;

/// `IOU_PBUF_RING_INC`: buffers of the ring are consumed incrementally.
const PBUF_RING_INC: u16 = 2;

/// A receive buffer pool: `buffers` of `size` bytes at most, `initial` of
/// them provided at first.
#[derive(Debug, Clone, Copy)]
pub struct PoolShape {
    /// Most buffers (a power of two).
    pub buffers: u16,
    /// Bytes each.
    pub size: usize,
    /// Provided at start.
    pub initial: u16,
}

/// One piece of output: owned bytes, or a chunk shared by every recipient
/// of a chat broadcast (one allocation, many sends).
#[derive(Debug)]
pub enum Chunk {
    /// Bytes for one connection.
    Owned(Vec<u8>),
    /// A broadcast chunk.
    Shared(Rc<[u8]>),
}

impl Chunk {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Shared(r) => r,
        }
    }

    /// What it occupies, counted against `--max-memory`: an owned buffer
    /// by capacity, a shared one by length (once per holder).
    pub fn held(&self) -> usize {
        match self {
            Chunk::Owned(v) => v.capacity(),
            Chunk::Shared(r) => r.len(),
        }
    }
}

/// Output handed to one send: `chunks` in order, the first from byte
/// `head` on.
#[derive(Debug, Default)]
pub struct Batch {
    /// The chunks.
    pub chunks: Vec<Chunk>,
    /// Bytes of the first chunk already sent.
    pub head: usize,
}

impl Batch {
    /// Bytes still to send.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(|c| c.bytes().len()).sum::<usize>() - self.head
    }

    /// Nothing left to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What its chunks occupy (see [`Chunk::held`]).
    pub fn held(&self) -> usize {
        self.chunks.iter().map(Chunk::held).sum()
    }

    /// Drops `n` sent bytes from the front.
    pub fn consume(&mut self, mut n: usize) {
        let mut done = 0;
        for c in &self.chunks {
            let left = c.bytes().len() - self.head;
            if n < left {
                self.head += n;
                break;
            }
            n -= left;
            self.head = 0;
            done += 1;
        }
        self.chunks.drain(..done);
    }
}

/// A send the kernel is working on, with everything its entry points at.
struct Flight {
    tag: u64,
    batch: Batch,
    /// One `iovec` per chunk (`SendMsg` only); their buffers are the
    /// batch's chunks.
    iov: Vec<libc::iovec>,
    /// Boxed so that its address stays put while the slab grows.
    msg: Box<libc::msghdr>,
}

/// A filled receive buffer, named by a completion. Read it with
/// [`Ring::bytes`]; give it back with [`Ring::recycle`].
#[derive(Debug)]
pub struct RecvBuf {
    bid: u16,
    /// Where its bytes start in the buffer (incremental buffers only).
    off: u32,
    len: u32,
    /// The kernel is done with the buffer: recycling it provides it again.
    last: bool,
    /// The ring whose pool it names: a `RecvBuf` from another ring would
    /// name a buffer of this pool that the kernel may be filling.
    ring: u32,
}

impl RecvBuf {
    /// Bytes received into it.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// No bytes (a receive never hands out an empty buffer; EOF is `None`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A completion, translated.
#[derive(Debug)]
pub enum Event {
    /// A multishot accept produced a connection or failed. `more`: the
    /// accept is still armed.
    Accepted {
        /// The caller's tag.
        tag: u64,
        /// The new socket.
        result: io::Result<OwnedFd>,
        /// Further completions will follow from the same request.
        more: bool,
    },
    /// A multishot receive delivered bytes (`Ok(Some)`), saw EOF
    /// (`Ok(None)`) or ended with an error.
    Received {
        /// The caller's tag.
        tag: u64,
        /// The bytes, EOF, or the error.
        result: io::Result<Option<RecvBuf>>,
        /// The receive is still armed.
        more: bool,
    },
    /// A send finished: how many bytes went out, and the batch back.
    Sent {
        /// The caller's tag.
        tag: u64,
        /// Bytes sent, or the error.
        result: io::Result<usize>,
        /// The batch, whole (the caller drops what was sent).
        batch: Batch,
    },
    /// A one-shot poll armed with `tag` fired (the server's signal pipe,
    /// metrics endpoint and UDP socket); a cancelled one is not reported.
    Polled {
        /// The caller's tag.
        tag: u64,
    },
}

/// The provided-buffer ring: `count` buffers of `size` bytes, of which the
/// first `provided` have been handed to the kernel.
struct Pool {
    /// The ring of entries the kernel takes buffers from (page aligned).
    entries: *mut BufRingEntry,
    entries_layout: Layout,
    /// Our producer index; the kernel owns the consumer index.
    tail: u16,
    /// The buffers, one region.
    mem: *mut u8,
    size: usize,
    /// Buffers ever provided; grows on `ENOBUFS` up to `count`.
    provided: u16,
    count: u16,
    /// Consumed incrementally: then `used[bid]` is how far the kernel has
    /// filled buffer `bid` since it was last provided.
    inc: bool,
    used: Vec<u32>,
    /// `RecvBuf`s handed out and not yet recycled, per buffer, and whether
    /// the kernel has used the buffer up: it is provided again only once
    /// both say so, so no `RecvBuf` ever names bytes the kernel may be
    /// writing again, whatever order the caller recycles them in.
    lent: Vec<u16>,
    spent: Vec<bool>,
}

impl Pool {
    fn new(count: u16, size: usize, inc: bool) -> io::Result<Pool> {
        assert!(count.is_power_of_two());
        let entries_layout =
            Layout::from_size_align(count as usize * std::mem::size_of::<BufRingEntry>(), 4096)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // Buffers need no alignment of their own. Asking for none more than
        // malloc's lets the allocator use calloc, which maps fresh zero
        // pages rather than writing zeroes: a buffer's pages cost RSS only
        // once the kernel first fills it. (A 4096 alignment here went
        // through aligned_alloc and memset, and touched all 32 MiB.)
        let mem_layout = Layout::from_size_align(count as usize * size, 16)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both layouts have a non-zero size.
        let (entries, mem) = unsafe {
            (
                alloc::alloc_zeroed(entries_layout) as *mut BufRingEntry,
                alloc::alloc_zeroed(mem_layout),
            )
        };
        if entries.is_null() || mem.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // With transparent huge pages on "always", one byte written into
        // an untouched 2 MiB stretch of the pool could cost 2 MiB of RSS;
        // the pool is meant to cost a page per buffer used. Advice only:
        // if the kernel refuses it, nothing is wrong.
        // SAFETY: madvise on memory this allocation owns, whole; it does
        // not change the memory's contents or validity.
        unsafe {
            let start = (mem as usize).next_multiple_of(4096);
            let end = (mem as usize + mem_layout.size()) & !4095;
            if end > start {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_NOHUGEPAGE,
                );
            }
        }
        Ok(Pool {
            entries,
            entries_layout,
            tail: 0,
            mem,
            size,
            provided: 0,
            count,
            inc,
            used: if inc {
                vec![0; count as usize]
            } else {
                Vec::new()
            },
            lent: vec![0; count as usize],
            spent: vec![false; count as usize],
        })
    }

    /// Puts buffer `bid` at the ring's tail: the kernel may fill it from now on.
    fn provide(&mut self, bid: u16) {
        let mask = self.count - 1;
        // SAFETY: `tail & mask` is below `count`, the number of entries
        // allocated; bid is below `count`, so its buffer lies inside `mem`.
        // The kernel only reads entries between its head and our tail, and
        // this one is past the tail until the store below publishes it.
        unsafe {
            let e = &mut *self.entries.add((self.tail & mask) as usize);
            e.set_addr(self.mem.add(bid as usize * self.size) as u64);
            e.set_len(self.size as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in the first entry's reserved word,
        // inside the allocation; the kernel reads it concurrently, so it is
        // written atomically, with Release so the entry above is visible
        // before the new tail is.
        unsafe {
            let tail = BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Provides more buffers (doubling), up to `most` and the cap. False
    /// when none were added.
    fn grow(&mut self, most: usize) -> bool {
        let next = (self.provided.max(1) as u32 * 2)
            .min(self.count as u32)
            .min(most.min(u16::MAX as usize) as u32) as u16;
        if next <= self.provided {
            return false;
        }
        for bid in self.provided..next {
            self.provide(bid);
        }
        self.provided = next;
        true
    }
}

/// The ring, the buffer pool and every send in flight.
pub struct Ring {
    uring: IoUring,
    pool: Pool,
    flights: Slab<Flight>,
    /// Kept from one submission to the next so `io_uring_enter` gets a
    /// stable pointer; only read by the kernel during the call.
    timeout: Timespec,
    /// The pool grew during this batch of completions.
    grown: bool,
    /// Batches in a row in which a receive ran out of buffers, and whether
    /// this one did.
    starved: u32,
    starved_now: bool,
    /// The last call of [`Ring::complete`] took completions: the next call
    /// ends that batch. The loops call it until it takes none, and such an
    /// empty call is no batch (counted as one, it broke every run of
    /// starved batches in two, and the pool never grew).
    took_any: bool,
    /// Completions as reaped, before translation (kept for its capacity).
    raw: Vec<(u64, i32, u32)>,
    /// Tells this ring's `RecvBuf`s from another's.
    id: u32,
}

impl Ring {
    /// A ring with `sq` submission entries and `cq` completion entries,
    /// and a pool of up to `buffers` receive buffers of `size` bytes
    /// (`initial` of them provided at first).
    ///
    /// Asks for `SINGLE_ISSUER` and `DEFER_TASKRUN` (completions are
    /// processed only when this thread enters the kernel to wait, so they
    /// come in batches and never interrupt the loop) and falls back to a
    /// plain ring on kernels that refuse them.
    ///
    /// The pool is `inc`, consumed incrementally, if asked for and the
    /// kernel allows it; otherwise `whole`, each completion taking a whole
    /// buffer.
    pub fn new(sq: u32, cq: u32, inc: Option<PoolShape>, whole: PoolShape) -> io::Result<Ring> {
        let uring = match IoUring::builder()
            .setup_cqsize(cq)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(sq)
        {
            Ok(u) => u,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::info!("io_uring: DEFER_TASKRUN refused ({e}); using a plain ring");
                IoUring::builder().setup_cqsize(cq).build(sq)?
            }
            Err(e) => return Err(e),
        };
        let register = |pool: &Pool, flags: u16| {
            // SAFETY: `pool.entries` points at `pool.count` entries, page
            // aligned, and is never freed (see the module docs): it
            // outlives the registration, which ends only with the ring.
            unsafe {
                uring.submitter().register_buf_ring_with_flags(
                    pool.entries as u64,
                    pool.count,
                    BGID,
                    flags,
                )
            }
        };
        let shape = inc.unwrap_or(whole);
        let mut pool = Pool::new(shape.buffers, shape.size, inc.is_some())?;
        let mut initial = shape.initial;
        match register(&pool, if inc.is_some() { PBUF_RING_INC } else { 0 }) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && inc.is_some() => {
                log::info!(
                    "io_uring: incremental receive buffers refused ({e}); \
                     using buffers of {} bytes whole",
                    whole.size
                );
                // The first pool was never registered; it is left unused.
                pool = Pool::new(whole.buffers, whole.size, false)?;
                initial = whole.initial;
                register(&pool, 0)?;
            }
            Err(e) => return Err(e),
        }
        pool.provided = 0;
        while pool.provided < initial.min(pool.count) {
            pool.grow(initial as usize);
        }
        Ok(Ring {
            uring,
            pool,
            flights: Slab::new(),
            timeout: Timespec::new(),
            grown: false,
            starved: 0,
            starved_now: false,
            took_any: false,
            raw: Vec::new(),
            id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// A receive found no buffer; `receivers` says how many connections
    /// are receiving (asked only when the pool may grow, so it may walk
    /// the connections). Provides more (doubling, up to [`POOL_SHARE`]
    /// per receiving connection and the most) once receives have run dry in [`STARVED_BATCHES`]
    /// batches of completions in a row, and at most once per batch: a
    /// one-off burst (every idle client speaking at once) only waits a
    /// turn for recycled buffers, while sustained load on many connections
    /// still gets the buffers it needs. True when buffers were added.
    pub fn grow_pool(&mut self, receivers: impl FnOnce() -> usize) -> bool {
        self.starved_now = true;
        if self.grown || self.starved < STARVED_BATCHES {
            return false;
        }
        self.grown = true;
        let most = receivers()
            .saturating_mul(POOL_SHARE)
            .div_ceil(self.pool.size);
        let grew = self.pool.grow(most);
        if grew {
            log::debug!("io_uring: {} receive buffers provided", self.pool.provided);
        }
        grew
    }

    /// Completion queue entries.
    pub fn cq_entries(&self) -> u32 {
        self.uring.params().cq_entries()
    }

    /// Receive buffers provided so far.
    pub fn buffers_provided(&self) -> usize {
        self.pool.provided as usize
    }

    /// Bytes per receive buffer, and whether they are consumed incrementally.
    pub fn buffer_size(&self) -> (usize, bool) {
        (self.pool.size, self.pool.inc)
    }

    /// Queues an entry, handing queued entries to the kernel first when
    /// the submission queue is full.
    ///
    /// # Safety
    /// Every buffer the entry points at must stay valid until its
    /// completion. Only this module builds entries, and each names memory
    /// owned by `self` (a flight, the pool) or none at all.
    unsafe fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller's promise, passed on.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.uring.submit()?;
        }
    }

    /// Arms a multishot accept on `fd`: one completion per new connection.
    pub fn accept_multi(&mut self, fd: BorrowedFd<'_>, tag: u64) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(Fd(fd.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(ACCEPT, tag));
        // SAFETY: an accept without an address names no memory.
        unsafe { self.push(e) }
    }

    /// Arms a multishot receive on `fd` into the buffer pool: one
    /// completion per arrival, until EOF, an error, `ENOBUFS` or a cancel.
    pub fn recv_multi(&mut self, fd: BorrowedFd<'_>, tag: u64) -> io::Result<()> {
        let e = opcode::RecvMulti::new(Fd(fd.as_raw_fd()), BGID)
            .build()
            .user_data(user_data(RECV, tag));
        // SAFETY: the kernel writes only into pool buffers it took from the
        // ring; the pool is never freed while the ring lives.
        unsafe { self.push(e) }
    }

    /// Arms one receive of at most `max` bytes on `fd` into the buffer
    /// pool: a single completion (without `more`), the rest of the input
    /// left in the socket. For a client served at `--max-memory`, where a
    /// multishot receive would queue everything already arrived.
    pub fn recv_once(&mut self, fd: BorrowedFd<'_>, tag: u64, max: u32) -> io::Result<()> {
        // With a selected buffer, the length caps what the kernel takes
        // from it (for an incremental buffer, what it consumes).
        let e = opcode::Recv::new(Fd(fd.as_raw_fd()), std::ptr::null_mut(), max)
            .buf_group(BGID)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data(RECV, tag));
        // SAFETY: as for `recv_multi`: the kernel writes only into a pool
        // buffer it took from the ring.
        unsafe { self.push(e) }
    }

    /// Sends `batch` on `fd`. It comes back in [`Event::Sent`].
    pub fn send(&mut self, fd: BorrowedFd<'_>, batch: Batch, tag: u64) -> io::Result<()> {
        let entry = self.flights.vacant_entry();
        let key = entry.key() as u64;
        let flight = entry.insert(Flight {
            tag,
            batch,
            iov: Vec::new(),
            msg: Box::new(
                // SAFETY: msghdr is plain old data; all zeroes is a valid
                // empty header.
                unsafe { std::mem::zeroed() },
            ),
        });
        let fd = Fd(fd.as_raw_fd());
        let e = if flight.batch.chunks.len() == 1 {
            let bytes = &flight.batch.chunks[0].bytes()[flight.batch.head..];
            opcode::Send::new(fd, bytes.as_ptr(), bytes.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        } else {
            let mut skip = flight.batch.head;
            for c in &flight.batch.chunks {
                let b = &c.bytes()[skip..];
                skip = 0;
                flight.iov.push(libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                });
            }
            flight.msg.msg_iov = flight.iov.as_mut_ptr();
            flight.msg.msg_iovlen = flight.iov.len() as _;
            opcode::SendMsg::new(fd, &*flight.msg as *const libc::msghdr)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        };
        let e = e.user_data(user_data(SEND, key));
        // SAFETY: the entry points at the flight's chunks (heap bytes that
        // do not move when the chunk or the slab moves), its iovec array
        // (heap) and its boxed msghdr. The flight stays in `flights` until
        // this send's completion is reaped in `complete`, and on drop it is
        // leaked, never freed.
        let pushed = unsafe { self.push(e) };
        if pushed.is_err() {
            // Never reached the kernel: safe to take back.
            self.flights.remove(key as usize);
        }
        pushed
    }

    /// Arms a one-shot poll for input on `fd`. The entry names `fd` by
    /// number: it must stay open until the entry is submitted (the next
    /// [`Ring::submit`] or [`Ring::submit_and_wait`]); from then on the
    /// kernel holds its own reference to the file until the poll completes
    /// or is cancelled. A poll names no memory.
    pub fn poll_readable(&mut self, fd: &impl AsRawFd, tag: u64) -> io::Result<()> {
        let e = opcode::PollAdd::new(Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(user_data(POLL, tag));
        // SAFETY: a poll names no memory.
        unsafe { self.push(e) }
    }

    /// Cancels every operation on `fd` (its receive, a send in flight).
    /// Each ends with `ECANCELED` unless it finished first. The descriptor
    /// must stay open until the next [`Ring::submit_and_wait`].
    pub fn cancel_fd(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd.as_raw_fd())).all())
            .build()
            .user_data(CANCEL << KIND_SHIFT);
        // SAFETY: a cancel names no memory.
        unsafe { self.push(e) }
    }

    /// Cancels the multishot receive armed with `tag`.
    pub fn cancel_recv(&mut self, tag: u64) -> io::Result<()> {
        self.cancel_user_data(user_data(RECV, tag))
    }

    /// Cancels the one-shot poll armed with `tag`.
    pub fn cancel_poll(&mut self, tag: u64) -> io::Result<()> {
        self.cancel_user_data(user_data(POLL, tag))
    }

    /// Cancels the multishot accept armed with `tag`.
    pub fn cancel_accept(&mut self, tag: u64) -> io::Result<()> {
        self.cancel_user_data(user_data(ACCEPT, tag))
    }

    fn cancel_user_data(&mut self, user_data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(CANCEL << KIND_SHIFT);
        // SAFETY: a cancel names no memory.
        unsafe { self.push(e) }
    }

    /// Nothing queued is left unsubmitted (a submission cut short by a
    /// signal leaves some): only then may descriptors whose cancels were
    /// queued be closed, or a cancel could meet a new socket with the same
    /// number.
    pub fn all_submitted(&mut self) -> bool {
        self.uring.submission().is_empty()
    }

    /// Submits everything queued without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        match self.uring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits everything queued and waits for at least one completion,
    /// at most `timeout` (`None`: as long as it takes). One system call.
    /// A timeout or a signal is not an error.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let r = match timeout {
            None => self.uring.submit_and_wait(1),
            Some(t) => {
                self.timeout = Timespec::from(t);
                let args = SubmitArgs::new().timespec(&self.timeout);
                self.uring.submitter().submit_with_args(1, &args)
            }
        };
        waited(r)
    }

    /// [`Ring::submit_and_wait`] for several completions: waits until
    /// `want` are there or, once `min_wait` has passed, until at least one
    /// is (`timeout` bounds the whole wait; `None`: as long as it takes).
    /// One system call, and one wake-up for a batch rather than for its
    /// first completion. Kernels before 6.12 have no such minimum wait:
    /// there it waits for one.
    pub fn submit_and_wait_for(
        &mut self,
        want: usize,
        min_wait: Duration,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        if want <= 1 || !self.uring.params().is_feature_min_timeout() {
            return self.submit_and_wait(timeout);
        }
        // Without a timeout the kernel ends the whole wait at the minimum
        // wait, completions or not: "as long as it takes" is a long one.
        self.timeout = Timespec::from(timeout.unwrap_or(Duration::from_secs(3600)));
        let usec = min_wait.as_micros().clamp(1, u32::MAX as u128) as u32;
        let args = SubmitArgs::new()
            .timespec(&self.timeout)
            .min_wait_usec(usec);
        waited(self.uring.submitter().submit_with_args(want, &args))
    }

    /// Reaps up to `max` completions into `out` (the rest wait for the
    /// next call: the caller's buffers stay small however many came).
    pub fn complete(&mut self, out: &mut Vec<Event>, max: usize) {
        if self.took_any {
            self.grown = false;
            self.starved = if self.starved_now {
                self.starved + 1
            } else {
                0
            };
            self.starved_now = false;
        }
        // Collected first: translating a send needs `self.flights` while
        // the completion queue borrows the ring.
        let mut raw = std::mem::take(&mut self.raw);
        raw.clear();
        raw.extend(
            self.uring
                .completion()
                .take(max)
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(user_data, res, flags) in &raw {
            if let Some(e) = self.translate(user_data, res, flags) {
                out.push(e);
            }
        }
        self.took_any = !raw.is_empty();
        self.raw = raw;
    }

    fn translate(&mut self, user_data: u64, res: i32, flags: u32) -> Option<Event> {
        let tag = user_data & TAG_MAX;
        let more = cqueue::more(flags);
        let err = || io::Error::from_raw_os_error(-res);
        match user_data >> KIND_SHIFT {
            ACCEPT => Some(Event::Accepted {
                tag,
                // SAFETY: a non-negative accept result is a descriptor the
                // kernel just opened for us; nothing else owns it.
                result: if res >= 0 {
                    Ok(unsafe { OwnedFd::from_raw_fd(res) })
                } else {
                    Err(err())
                },
                more,
            }),
            RECV => {
                let result = if res < 0 {
                    Err(err())
                } else {
                    match cqueue::buffer_select(flags) {
                        // A zero-byte completion may still name a buffer.
                        // A whole buffer was taken anyway: give it back. An
                        // incremental one was not (the kernel consumed none
                        // of it, and it stays at the head for the next
                        // receive): providing it again would put it on the
                        // ring twice. Either way EOF is reported, so every
                        // RecvBuf holds bytes.
                        Some(bid) if res == 0 => {
                            if !self.pool.inc {
                                self.pool.provide(bid);
                            }
                            Ok(None)
                        }
                        Some(bid) => {
                            let (off, last) = if self.pool.inc {
                                // The bytes follow what earlier completions
                                // took from this buffer; without BUF_MORE
                                // the kernel has moved on to the next one.
                                let used = &mut self.pool.used[bid as usize];
                                let off = *used;
                                *used += res as u32;
                                let last = !cqueue::buffer_more(flags);
                                if last {
                                    *used = 0;
                                }
                                (off, last)
                            } else {
                                (0, true)
                            };
                            assert!(
                                off as usize + res as usize <= self.pool.size,
                                "a receive past its buffer's end"
                            );
                            self.pool.lent[bid as usize] += 1;
                            Ok(Some(RecvBuf {
                                bid,
                                off,
                                len: res as u32,
                                last,
                                ring: self.id,
                            }))
                        }
                        None if res == 0 => Ok(None),
                        None => Err(io::ErrorKind::InvalidData.into()),
                    }
                };
                Some(Event::Received { tag, result, more })
            }
            SEND => {
                let flight = self.flights.try_remove(tag as usize)?;
                Some(Event::Sent {
                    tag: flight.tag,
                    result: if res >= 0 {
                        Ok(res as usize)
                    } else {
                        Err(err())
                    },
                    batch: flight.batch,
                })
            }
            POLL if res == -libc::ECANCELED => None,
            POLL => Some(Event::Polled { tag }),
            _ => None,
        }
    }

    /// The bytes of a filled buffer.
    pub fn bytes(&self, b: &RecvBuf) -> &[u8] {
        assert_eq!(b.ring, self.id, "a receive buffer of another ring");
        // SAFETY: `b` came from a completion, so the kernel has finished
        // writing bytes `b.off..b.off + b.len` of buffer `b.bid` (inside the
        // buffer: checked in `translate`). It does not write them again
        // until the buffer is provided anew, which `recycle` does only once
        // the kernel has used it up and every `RecvBuf` naming it, `b`
        // included, has been recycled (`Pool::lent`); `b` is borrowed here,
        // so it has not been. The pool is never freed while the ring lives.
        unsafe {
            std::slice::from_raw_parts(
                self.pool
                    .mem
                    .add(b.bid as usize * self.pool.size + b.off as usize),
                b.len as usize,
            )
        }
    }

    /// Gives a buffer back to the kernel (an incremental one once its
    /// last completion is recycled; until then the kernel still fills it).
    pub fn recycle(&mut self, b: RecvBuf) {
        assert_eq!(b.ring, self.id, "a receive buffer of another ring");
        let bid = b.bid as usize;
        self.pool.lent[bid] -= 1;
        self.pool.spent[bid] |= b.last;
        if self.pool.spent[bid] && self.pool.lent[bid] == 0 {
            self.pool.spent[bid] = false;
            self.pool.provide(b.bid);
        }
    }
}

/// What a wait's result means: a timeout or a signal is not an error.
fn waited(r: io::Result<usize>) -> io::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
        // EBUSY: completions are waiting in the kernel's overflow list;
        // reaping them makes room.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `SIOCOUTQNSD` (linux/sockios.h; not in the `libc` crate): a TCP
/// socket's bytes queued but not yet sent.
const SIOCOUTQNSD: libc::Ioctl = 0x894B;

/// Bytes the kernel still holds in a socket's send queue that the peer
/// has not been sent (TCP: `SIOCOUTQNSD`, so bytes on the wire to a far
/// reader that keeps up do not count) or has not read (Unix, which has no
/// wire: `SIOCOUTQ`, counted with the kernel's per-buffer overhead). A
/// client that reads nothing has here whatever its kernel send buffer
/// took once its window closed; one that keeps up, nothing or little.
///
/// Not an io_uring operation: it lives here because this is the one module
/// allowed `unsafe`. The uring engine needs it where its own counts cannot
/// tell two chat readers apart (see `MemoryCap::victim`).
pub fn unsent(fd: BorrowedFd<'_>) -> io::Result<usize> {
    match queued(fd, SIOCOUTQNSD) {
        // Not TCP (a Unix socket: EOPNOTSUPP, or ENOTTY/EINVAL elsewhere).
        Err(e) if e.raw_os_error() != Some(libc::EBADF) => queued(fd, libc::TIOCOUTQ),
        r => r,
    }
}

fn queued(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD and SIOCOUTQ (TIOCOUTQ's number) write one int
    // through the pointer, which points at `n`, alive for the whole call;
    // the borrowed descriptor stays open for it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// The one line that says why [`Ring::new`] failed with `e` and what to
/// use instead (the default, readiness, engine needs nothing of io_uring).
pub fn unavailable(e: &io::Error) -> String {
    let why = match e.raw_os_error() {
        Some(libc::EPERM) => {
            " (refused: kernel.io_uring_disabled, or a seccomp filter such as a container's)"
        }
        Some(libc::ENOSYS) => " (this kernel has no io_uring)",
        Some(libc::EINVAL) => " (this kernel's io_uring lacks a feature it needs)",
        _ => "",
    };
    format!("io_uring unavailable: {e}{why}; use --engine reactor, which needs only epoll")
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel finishes tearing the ring down after close returns, so
        // memory it may still reach is leaked, not freed: the sends in
        // flight here; the pool has no Drop at all.
        let _ = self.pool.entries_layout;
        std::mem::forget(std::mem::take(&mut self.flights));
        // The pool stays allocated, but its pages go back to the system: a
        // program that makes rings one after another (`reactor load
        // --find-max-rate`, a step each) would otherwise keep every filled
        // buffer of every ring it ever had.
        let (start, len) = (
            self.pool.mem as usize,
            self.pool.size * self.pool.count as usize,
        );
        let from = start.next_multiple_of(4096);
        let to = (start + len) & !4095;
        if to > from {
            // SAFETY: only whole pages inside the pool's own allocation,
            // which is never freed, so no other data lives there. Its
            // contents become zero pages; nothing reads them again (every
            // `RecvBuf` borrows the ring being dropped), and a write the
            // kernel might still make lands in a fresh page of this range.
            unsafe {
                libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::Shutdown;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn unsent_is_what_the_peer_has_not_read_yet() {
        let (a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(unsent(a.as_fd()).unwrap(), 0);
        (&a).write_all(&[7; 1000]).unwrap();
        assert!(unsent(a.as_fd()).unwrap() >= 1000);
        let mut got = [0; 1000];
        std::io::Read::read_exact(&mut b, &mut got).unwrap();
        assert_eq!(unsent(a.as_fd()).unwrap(), 0, "read: nothing held");
    }

    #[test]
    fn on_tcp_unsent_is_what_could_not_be_sent_yet() {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        // Sent at once to a peer with room: nothing unsent.
        (&a).write_all(&[7; 1000]).unwrap();
        let mut got = [0; 1000];
        std::io::Read::read_exact(&mut b, &mut got).unwrap();
        assert_eq!(unsent(a.as_fd()).unwrap(), 0);
        // A peer that reads nothing: once its window is shut, what the
        // send buffer took stays unsent.
        a.set_nonblocking(true).unwrap();
        let chunk = [7; 65536];
        let mut wrote = 0usize;
        loop {
            match (&a).write(&chunk) {
                Ok(n) => wrote += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let n = unsent(a.as_fd()).unwrap();
        assert!(n > 0 && n < wrote, "{n} unsent of {wrote}");
    }

    const WHOLE: PoolShape = PoolShape {
        buffers: 4,
        size: 4096,
        initial: 4,
    };

    /// A ring whose pool is two incremental buffers of 64 KiB; `None`
    /// (the test says SKIP) on a kernel before 6.12, which refuses them:
    /// the engine then uses whole buffers, which these tests are not about.
    fn two_buffer_ring() -> Option<Ring> {
        let inc = PoolShape {
            buffers: 4,
            size: 64 * 1024,
            initial: 2,
        };
        let ring = Ring::new(8, 64, Some(inc), WHOLE).unwrap();
        if ring.buffer_size() != (64 * 1024, true) {
            eprintln!("SKIP: this kernel refuses incremental buffer rings (6.12 or later)");
            return None;
        }
        assert_eq!(ring.buffers_provided(), 2);
        Some(ring)
    }

    /// Waits for the next completion of a receive.
    fn next_received(ring: &mut Ring) -> (u64, io::Result<Option<RecvBuf>>) {
        let mut events = Vec::new();
        loop {
            ring.complete(&mut events, 1);
            if let Some(e) = events.pop() {
                match e {
                    Event::Received { tag, result, .. } => return (tag, result),
                    other => panic!("unexpected {other:?}"),
                }
            }
            ring.submit_and_wait(Some(Duration::from_secs(5))).unwrap();
        }
    }

    fn armed_pair(ring: &mut Ring, tag: u64) -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        ring.recv_multi(b.as_fd(), tag).unwrap();
        (a, b)
    }

    #[test]
    fn small_receives_are_packed_one_after_another_in_one_buffer() {
        let Some(mut ring) = two_buffer_ring() else {
            return;
        };
        let (mut a, _a) = armed_pair(&mut ring, 1);
        let (mut b, _b) = armed_pair(&mut ring, 2);
        a.write_all(b"hello").unwrap();
        let (tag, first) = next_received(&mut ring);
        let first = first.unwrap().unwrap();
        assert_eq!((tag, ring.bytes(&first)), (1, &b"hello"[..]));
        b.write_all(b"world!").unwrap();
        let (tag, second) = next_received(&mut ring);
        let second = second.unwrap().unwrap();
        assert_eq!((tag, ring.bytes(&second)), (2, &b"world!"[..]));
        assert_eq!((first.bid, first.off), (second.bid, 0));
        assert_eq!(second.off, 5, "right behind the first");
        assert!(!first.last && !second.last, "the buffer is not used up");
        ring.recycle(first);
        ring.recycle(second);
    }

    #[test]
    fn a_wait_for_several_returns_with_fewer_once_the_minimum_wait_is_over() {
        let mut ring = Ring::new(8, 64, None, WHOLE).unwrap();
        let (mut a, _a) = armed_pair(&mut ring, 1);
        a.write_all(b"one").unwrap();
        // Five wanted, one coming: after 10 ms the one is enough. Without
        // the minimum wait it would sit out the whole 20 s.
        let started = std::time::Instant::now();
        let mut events = Vec::new();
        while events.is_empty() {
            ring.submit_and_wait_for(5, Duration::from_millis(10), Some(Duration::from_secs(20)))
                .unwrap();
            ring.complete(&mut events, 8);
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        let Some(Event::Received {
            tag: 1,
            result: Ok(Some(buf)),
            ..
        }) = events.pop()
        else {
            panic!("not the receive");
        };
        assert_eq!(ring.bytes(&buf), b"one");
        ring.recycle(buf);
    }

    #[test]
    fn a_wait_for_several_without_a_timeout_lasts_until_a_completion() {
        let mut ring = Ring::new(8, 64, None, WHOLE).unwrap();
        let (mut a, _a) = armed_pair(&mut ring, 1);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            a.write_all(b"late").unwrap();
            a
        });
        // Nothing has come when the 1 ms minimum wait is over: one call
        // still returns only with the receive.
        ring.submit_and_wait_for(5, Duration::from_millis(1), None)
            .unwrap();
        let mut events = Vec::new();
        ring.complete(&mut events, 8);
        let _a = writer.join().unwrap();
        let Some(Event::Received {
            result: Ok(Some(buf)),
            ..
        }) = events.pop()
        else {
            panic!("returned without the receive: {events:?}");
        };
        assert_eq!(ring.bytes(&buf), b"late");
        ring.recycle(buf);
    }

    #[test]
    fn a_single_receive_takes_at_most_its_length_and_ends() {
        let Some(mut ring) = two_buffer_ring() else {
            return;
        };
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[7; 3000]).unwrap();
        ring.recv_once(b.as_fd(), 1, 1000).unwrap();
        let mut events = Vec::new();
        while events.is_empty() {
            ring.submit_and_wait(Some(Duration::from_secs(5))).unwrap();
            ring.complete(&mut events, 8);
        }
        assert_eq!(events.len(), 1);
        let Event::Received { tag, result, more } = events.pop().unwrap() else {
            panic!("not a receive");
        };
        let buf = result.unwrap().unwrap();
        assert_eq!((tag, ring.bytes(&buf).len(), more), (1, 1000, false));
        ring.recycle(buf);
        // The rest is still in the socket, and nothing more completes.
        ring.submit().unwrap();
        ring.complete(&mut events, 8);
        assert!(events.is_empty(), "{events:?}");
        b.set_nonblocking(true).unwrap();
        let mut rest = vec![0; 4096];
        assert_eq!(std::io::Read::read(&mut &b, &mut rest).unwrap(), 2000);
    }

    #[test]
    fn eof_leaves_an_incremental_buffer_where_it_is() {
        let Some(mut ring) = two_buffer_ring() else {
            return;
        };
        let (mut a, _a) = armed_pair(&mut ring, 1);
        a.write_all(&[7; 100]).unwrap();
        let (_, got) = next_received(&mut ring);
        let got = got.unwrap().unwrap();
        assert_eq!(ring.bytes(&got), &[7; 100][..]);
        let bid = got.bid;
        ring.recycle(got);
        a.shutdown(Shutdown::Write).unwrap();
        let (tag, eof) = next_received(&mut ring);
        assert!(matches!((tag, eof), (1, Ok(None))));
        // The buffer is still the kernel's, once, whatever the EOF's
        // completion named (on 6.18 it names no buffer): the next receive
        // continues in it (had the EOF used it up, the bytes would start
        // the other buffer; had it been provided twice, they would start
        // this one again at 0).
        let (mut b, _b) = armed_pair(&mut ring, 2);
        b.write_all(&[9; 200]).unwrap();
        let (tag, next) = next_received(&mut ring);
        let next = next.unwrap().unwrap();
        assert_eq!(tag, 2);
        assert_eq!(ring.bytes(&next), &[9; 200][..]);
        assert_eq!((next.bid, next.off), (bid, 100));
        ring.recycle(next);
    }

    #[test]
    fn a_used_up_buffer_is_provided_again_and_filled_from_its_start() {
        let Some(mut ring) = two_buffer_ring() else {
            return;
        };
        let (mut a, _a) = armed_pair(&mut ring, 1);
        // Exactly both buffers' worth, in pieces the socket takes whole.
        let data: Vec<u8> = (0..128 * 1024).map(|i| (i % 251) as u8).collect();
        let (mut got, mut used_up) = (Vec::new(), Vec::new());
        for piece in data.chunks(8192) {
            a.write_all(piece).unwrap();
            let mut have = 0;
            while have < piece.len() {
                let (_, r) = next_received(&mut ring);
                let buf = r.unwrap().unwrap();
                have += buf.len();
                got.extend_from_slice(ring.bytes(&buf));
                if buf.last {
                    used_up.push(buf.bid);
                }
                ring.recycle(buf);
            }
        }
        assert!(got == data);
        assert_eq!(used_up.len(), 2, "both buffers used up, once each");
        // Both were provided again; the first comes round first.
        a.write_all(b"again").unwrap();
        let (_, r) = next_received(&mut ring);
        let buf = r.unwrap().unwrap();
        assert_eq!(ring.bytes(&buf), b"again");
        assert_eq!((buf.bid, buf.off), (used_up[0], 0));
        ring.recycle(buf);
    }

    #[test]
    fn a_used_up_buffer_waits_for_every_receive_that_names_it() {
        let Some(mut ring) = two_buffer_ring() else {
            return;
        };
        let (mut a, _a) = armed_pair(&mut ring, 1);
        a.write_all(b"held").unwrap();
        let (_, r) = next_received(&mut ring);
        let held = r.unwrap().unwrap();
        assert!(!held.last);
        // Fill the rest of that buffer, recycling every later receive,
        // the one that uses it up among them.
        let mut rest = 64 * 1024 - 4;
        let mut last = false;
        while rest > 0 {
            let n = rest.min(8192);
            a.write_all(&vec![5; n]).unwrap();
            let mut have = 0;
            while have < n {
                let (_, r) = next_received(&mut ring);
                let buf = r.unwrap().unwrap();
                have += buf.len();
                if buf.bid == held.bid {
                    last |= buf.last;
                }
                ring.recycle(buf);
            }
            rest -= n;
        }
        assert!(last, "the buffer was used up");
        let tail = ring.pool.tail;
        assert_eq!(tail, 2, "not provided again while `held` names it");
        assert_eq!(ring.bytes(&held), b"held");
        ring.recycle(held);
        assert_eq!(ring.pool.tail, tail + 1, "provided once the last is back");
    }

    /// Drives a receiver that never recycles, so every wake-up runs dry,
    /// as both loops drive the ring: `complete` until it takes nothing,
    /// ENOBUFS answered by `grow_pool(receivers)` and a new receive.
    /// Returns the buffers provided before and after.
    fn starve(shape: PoolShape, receivers: usize) -> (usize, usize) {
        let mut ring = Ring::new(8, 64, None, shape).unwrap();
        let first = ring.buffers_provided();
        let (mut a, b) = UnixStream::pair().unwrap();
        // What the pool cannot take stays in the socket until it is full;
        // past that, writes are dropped (the test needs dry runs, not data).
        a.set_nonblocking(true).unwrap();
        ring.recv_multi(b.as_fd(), 1).unwrap();
        let mut held = Vec::new();
        let mut events = Vec::new();
        let chunk = vec![3; shape.size];
        for _ in 0..16 {
            let _ = a.write(&chunk);
            ring.submit_and_wait(Some(Duration::from_secs(5))).unwrap();
            loop {
                ring.complete(&mut events, 8);
                if events.is_empty() {
                    break;
                }
                for e in events.drain(..) {
                    let Event::Received { result, more, .. } = e else {
                        continue;
                    };
                    match result {
                        Ok(Some(buf)) => held.push(buf),
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            ring.grow_pool(|| receivers);
                        }
                        other => panic!("{other:?}"),
                    }
                    if !more {
                        ring.recv_multi(b.as_fd(), 1).unwrap();
                    }
                }
            }
        }
        let last = ring.buffers_provided();
        for buf in held {
            ring.recycle(buf);
        }
        (first, last)
    }

    #[test]
    fn the_pool_grows_when_receives_run_dry_wake_up_after_wake_up() {
        // Few buffers at first, at most four, for many receivers.
        let shape = PoolShape {
            buffers: 4,
            size: 4096,
            initial: 1,
        };
        let (first, last) = starve(shape, 100);
        assert!(first < 4);
        assert!(last > first, "the pool stayed at {first} buffer(s)");
    }

    #[test]
    fn one_receiver_running_the_pool_dry_does_not_grow_it_past_its_share() {
        // Eight 64 KiB buffers at first, room for 64: one receiver's share
        // is eight, so the pool stays as it was.
        let shape = PoolShape {
            buffers: 64,
            size: 64 * 1024,
            initial: 8,
        };
        assert_eq!(POOL_SHARE, 8 * shape.size);
        assert_eq!(starve(shape, 1), (8, 8));
        // Two receivers' share is sixteen.
        assert_eq!(starve(shape, 2), (8, 16));
    }
}

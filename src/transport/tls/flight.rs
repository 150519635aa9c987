//! Bytes in flight and the per-thread pool their buffers come from and go back to, so that
//! an idle session holds none.

use std::cell::RefCell;
use std::mem;

use super::{InFlight, MAX_RECORD};

// ----- buffers lent while bytes are in flight -----

/// Buffers at most this big are kept for reuse (the largest: a handshake's input).
const POOL_MAX: usize = 128 * 1024;
/// Smaller buffers are not kept (exact-size copies of a few bytes).
const POOL_MIN: usize = 4 * 1024;
/// The least a buffer is allocated with, so that it is worth keeping: a record's worth.
const POOL_ALLOC: usize = MAX_RECORD;
/// Buffers kept per thread: enough for the one connection the loop serves at a time (its
/// input, output, plaintext, and a write's gathered plaintext).
const POOL_BUFFERS: usize = 4;
/// Emptied [`InFlight`] boxes kept per thread.
const POOL_BOXES: usize = 4;

/// What the thread keeps for the next connection that has bytes in flight.
struct Pool {
    /// Each with its length initialised, so that a reused one is not zeroed again.
    buffers: Vec<Vec<u8>>,
    /// Empty, holding no buffer: the allocations themselves are what is reused.
    #[allow(clippy::vec_box)]
    boxes: Vec<Box<InFlight>>,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            buffers: Vec::new(),
            boxes: Vec::new(),
        })
    };
}

/// A spare buffer with room for at least `n` bytes (its length says how much of it is
/// initialised).
pub(super) fn pool_take(n: usize) -> Vec<u8> {
    let mut buf = POOL
        .with(|p| p.borrow_mut().buffers.pop())
        .unwrap_or_default();
    if buf.capacity() < n {
        buf.reserve_exact(n.max(POOL_ALLOC) - buf.len());
    }
    buf
}

/// Returns a buffer to the pool, or frees it.
pub(super) fn pool_give(buf: Vec<u8>) {
    if (POOL_MIN..=POOL_MAX).contains(&buf.capacity()) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.buffers.len() < POOL_BUFFERS {
                p.buffers.push(buf);
            }
        });
    }
}

pub(super) fn pool_take_box() -> Box<InFlight> {
    POOL.with(|p| p.borrow_mut().boxes.pop())
        .unwrap_or_default()
}

/// Takes an idle box back (its buffers already released).
pub(super) fn pool_give_box(b: Box<InFlight>) {
    debug_assert!(b.is_idle() && b.buffered() == 0);
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.boxes.len() < POOL_BOXES {
            p.boxes.push(b);
        }
    });
}

/// Bytes in flight, `data[start..end]`; `data` is initialised up to its length. Empty, it
/// holds no allocation ([`Flight::settle`] returns the buffer to the pool).
#[derive(Default)]
pub(super) struct Flight {
    pub(super) data: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl Flight {
    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.end]
    }

    /// Room for `n` more bytes after the ones held (moved to the front if that makes room, or
    /// into a pooled buffer if that is bigger), to be filled and then [`Flight::commit`]ted.
    pub(super) fn spare(&mut self, n: usize) -> &mut [u8] {
        if self.data.len() - self.end < n {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.capacity() < self.end + n {
                let mut pooled = pool_take(self.end + n);
                if pooled.len() < self.end {
                    pooled.resize(self.end, 0);
                }
                pooled[..self.end].copy_from_slice(&self.data[..self.end]);
                pool_give(mem::replace(&mut self.data, pooled));
            }
            if self.data.len() < self.end + n {
                self.data.resize(self.end + n, 0);
            }
        }
        &mut self.data[self.end..self.end + n]
    }

    pub(super) fn commit(&mut self, n: usize) {
        self.end += n;
    }

    /// Drops `n` bytes from the front.
    pub(super) fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends `bytes`.
    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.spare(bytes.len()).copy_from_slice(bytes);
        self.commit(bytes.len());
    }

    /// Empty: the buffer goes back to the pool. Holding a few bytes in a big buffer: they
    /// move to one of their size (held bytes may wait long: a partial record, a refused
    /// write's tail).
    pub(super) fn settle(&mut self) {
        if self.is_empty() {
            self.release();
        } else if self.data.capacity() > 2 * self.len().max(POOL_MIN) {
            let kept = self.bytes().to_vec();
            self.end = kept.len();
            self.start = 0;
            pool_give(mem::replace(&mut self.data, kept));
        }
    }

    pub(super) fn release(&mut self) {
        self.start = 0;
        self.end = 0;
        if self.data.capacity() > 0 {
            pool_give(mem::take(&mut self.data));
        }
    }
}

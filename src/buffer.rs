//! Byte ring buffers and the pool they come from.
//!
//! A connection holds a read or write buffer only while it has bytes in flight: when a buffer
//! empties it goes back to the [`BufPool`], so an idle connection holds no buffer memory at all.
//!
//! Invariants (checked with `debug_assert!`):
//! - `len <= capacity`, `head < capacity` (or both 0 for an empty buffer with no storage);
//! - the readable bytes are `buf[head..head+len]`, wrapping at `capacity`;
//! - an empty buffer always has `head == 0`, so a buffer that is filled and drained whole (the
//!   read side, which only ever holds one partial frame) never wraps and stays contiguous.
//!
//! As in smoltcp's `RingBuffer`, `head` + `len` (rather than two cursors) keeps "empty" and "full"
//! distinct without wasting a slot.

/// A growable byte ring buffer.
#[derive(Debug, Default)]
pub struct RingBuf {
    buf: Box<[u8]>,
    head: u32,
    len: u32,
}

impl RingBuf {
    /// A buffer with `capacity` bytes of storage (rounded up to a power of two).
    pub fn with_capacity(capacity: usize) -> Self {
        RingBuf {
            buf: vec![0; capacity.max(1).next_power_of_two()].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }

    /// Readable bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether there is nothing to read.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of storage.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    fn check(&self) {
        debug_assert!(self.len() <= self.capacity());
        debug_assert!(self.head == 0 || (self.head as usize) < self.capacity());
        debug_assert!(self.len != 0 || self.head == 0);
    }

    /// The readable bytes, in order, as at most two slices.
    pub fn as_slices(&self) -> (&[u8], &[u8]) {
        let head = self.head as usize;
        let len = self.len();
        let first = (self.capacity() - head).min(len);
        (&self.buf[head..head + first], &self.buf[..len - first])
    }

    /// Drops `n` bytes from the front (all of them if `n >= len`).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len());
        self.len -= n as u32;
        self.head = if self.len == 0 {
            0
        } else {
            ((self.head as usize + n) % self.capacity()) as u32
        };
        self.check();
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    /// Appends `data`, growing the storage (to the next power of two) if it does not fit.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        let need = self.len() + data.len();
        if need > self.capacity() {
            self.grow(need);
        }
        let cap = self.capacity();
        let tail = (self.head as usize + self.len()) % cap;
        let first = (cap - tail).min(data.len());
        self.buf[tail..tail + first].copy_from_slice(&data[..first]);
        self.buf[..data.len() - first].copy_from_slice(&data[first..]);
        self.len += data.len() as u32;
        self.check();
    }

    fn grow(&mut self, need: usize) {
        let mut bigger = vec![0; need.next_power_of_two()].into_boxed_slice();
        let (a, b) = self.as_slices();
        bigger[..a.len()].copy_from_slice(a);
        bigger[a.len()..a.len() + b.len()].copy_from_slice(b);
        self.buf = bigger;
        self.head = 0;
    }

    /// Rearranges the storage so the readable bytes are one slice, and returns it.
    pub fn make_contiguous(&mut self) -> &[u8] {
        let head = self.head as usize;
        if head + self.len() > self.capacity() {
            self.buf.rotate_left(head);
            self.head = 0;
        }
        self.as_slices().0
    }
}

/// A pool of equally sized ring buffers.
///
/// `get` hands out a pooled buffer (or allocates one); `put` takes it back, cleared. Buffers that
/// grew beyond the pool's size are freed rather than pooled, and at most `max_pooled` are kept,
/// so the pool's own memory is bounded by `buf_size * max_pooled`.
#[derive(Debug)]
pub struct BufPool {
    free: Vec<RingBuf>,
    buf_size: usize,
    max_pooled: usize,
    in_use: usize,
}

impl BufPool {
    /// A pool of `buf_size`-byte buffers that keeps at most `max_pooled` idle ones.
    pub fn new(buf_size: usize, max_pooled: usize) -> Self {
        BufPool {
            free: Vec::new(),
            buf_size: buf_size.max(1).next_power_of_two(),
            max_pooled,
            in_use: 0,
        }
    }

    /// An empty buffer.
    pub fn get(&mut self) -> RingBuf {
        self.in_use += 1;
        self.free
            .pop()
            .unwrap_or_else(|| RingBuf::with_capacity(self.buf_size))
    }

    /// Returns a buffer to the pool.
    pub fn put(&mut self, mut buf: RingBuf) {
        debug_assert!(self.in_use > 0, "BufPool::put without a matching get");
        self.in_use = self.in_use.saturating_sub(1);
        if buf.capacity() == self.buf_size && self.free.len() < self.max_pooled {
            buf.clear();
            self.free.push(buf);
        }
    }

    /// Buffers handed out and not yet returned.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Idle buffers held by the pool.
    pub fn pooled(&self) -> usize {
        self.free.len()
    }

    /// The size of a pooled buffer in bytes.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn contents(r: &RingBuf) -> Vec<u8> {
        let (a, b) = r.as_slices();
        [a, b].concat()
    }

    #[test]
    fn wraps_around() {
        let mut r = RingBuf::with_capacity(8);
        r.extend_from_slice(b"abcdef");
        r.consume(4);
        r.extend_from_slice(b"ghij");
        let (a, b) = r.as_slices();
        assert_eq!((a, b), (&b"efgh"[..], &b"ij"[..]));
        assert_eq!(r.capacity(), 8);
        assert_eq!(r.make_contiguous(), b"efghij");
        r.consume(6);
        assert!(r.is_empty());
        assert_eq!(r.as_slices(), (&[][..], &[][..]));
    }

    #[test]
    fn grows_keeping_order() {
        let mut r = RingBuf::with_capacity(4);
        r.extend_from_slice(b"abc");
        r.consume(2);
        r.extend_from_slice(b"defghij");
        assert_eq!(contents(&r), b"cdefghij");
        assert_eq!(r.capacity(), 8);
    }

    #[test]
    fn empty_resets_head_so_whole_fills_stay_contiguous() {
        let mut r = RingBuf::with_capacity(8);
        r.extend_from_slice(b"abcde");
        r.consume(5);
        r.extend_from_slice(b"1234567");
        assert_eq!(r.as_slices().0, b"1234567");
    }

    #[test]
    fn pool_reuses_and_bounds() {
        let mut p = BufPool::new(16, 2);
        let a = p.get();
        let mut b = p.get();
        let c = p.get();
        assert_eq!(p.in_use(), 3);
        b.extend_from_slice(&[1; 40]); // grew past the pool size: freed, not pooled
        p.put(a);
        p.put(b);
        p.put(c);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.pooled(), 2);
        let d = p.get();
        assert!(d.is_empty());
        assert_eq!(d.capacity(), 16);
        assert_eq!(p.pooled(), 1);
        p.put(d);
    }

    proptest! {
        #[test]
        fn behaves_like_a_deque(ops in proptest::collection::vec((any::<bool>(), 0usize..40), 0..200)) {
            let mut r = RingBuf::with_capacity(8);
            let mut model = std::collections::VecDeque::new();
            let mut next = 0u8;
            for (push, n) in ops {
                if push {
                    let data: Vec<u8> = (0..n).map(|_| { next = next.wrapping_add(1); next }).collect();
                    r.extend_from_slice(&data);
                    model.extend(data);
                } else {
                    r.consume(n);
                    for _ in 0..n.min(model.len()) { model.pop_front(); }
                }
                prop_assert_eq!(contents(&r), model.iter().copied().collect::<Vec<_>>());
            }
        }
    }
}

//! Single-producer/single-consumer byte rings over a [`Region`] (SPEC §4.2–§4.8).
//!
//! The same semantics as the C core it replaces: free-running u64 positions, acquire loads of
//! the other side's counter, release stores of our own, every record header validated before
//! use, and out-of-order release (SPEC §4.7): `head` moves over the longest prefix of released
//! records.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::layout::{
    RecordHeader, CTL_HEAD, CTL_SIZE, CTL_TAIL, KIND_PAD, MIN_CAPACITY, RECORD_HEADER,
};
use crate::region::{Region, RegionError};

/// Where a ring lives in a region: its control block and its buffer.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub region: Region,
    /// Offset of the ring's 128-byte control block.
    pub ctl: u64,
    /// Offset of the ring's buffer.
    pub ring: u64,
    /// Buffer bytes: a power of two, at least 64.
    pub cap: u64,
}

/// Why a ring cannot be set up over a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GeometryError {
    Capacity(u64),
    Region(RegionError),
}

impl fmt::Display for GeometryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GeometryError::Capacity(cap) => {
                write!(f, "ring capacity {cap} is not a power of two >= 64")
            }
            GeometryError::Region(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for GeometryError {}

impl From<RegionError> for GeometryError {
    fn from(e: RegionError) -> Self {
        GeometryError::Region(e)
    }
}

impl Geometry {
    /// Checks that the buffer and the control block lie inside the region, in the C core's
    /// order (so the same bad argument gets the same message).
    pub fn new(region: Region, ctl: u64, ring: u64, cap: u64) -> Result<Geometry, GeometryError> {
        if cap < MIN_CAPACITY || !cap.is_power_of_two() {
            return Err(GeometryError::Capacity(cap));
        }
        region.check(ring, cap)?;
        region.atomic_u64(ctl)?;
        region.check(ctl, CTL_SIZE)?;
        Ok(Geometry { region, ctl, ring, cap })
    }

    #[inline]
    fn word(&self, at: u64) -> &AtomicU64 {
        // Checked in new(): the whole control block is inside and ctl is 8-aligned.
        self.region.atomic_u64(self.ctl + at).expect("control block checked at construction")
    }

    /// The ring's `tail` word (written by the producer).
    pub fn tail_word(&self) -> &AtomicU64 {
        self.word(CTL_TAIL)
    }

    /// The ring's `head` word (written by the consumer).
    pub fn head_word(&self) -> &AtomicU64 {
        self.word(CTL_HEAD)
    }
}

/// The producer broke SPEC §4.2/§4.8: the session must end with BAD_RECORD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Corrupt {
    Tail { tail: u64, seen: u64, head: u64, cap: u64 },
    Length { position: u64, len: u32, tail: u64, cap: u64 },
    Descriptor { request_id: u64, desc_len: u32, len: u32 },
    Kind { position: u64, kind: u32 },
}

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Corrupt::Tail { tail, seen, head, cap } => write!(
                f,
                "ring tail {tail} is impossible (seen up to {seen}, head {head}, capacity {cap})"
            ),
            Corrupt::Length { position, len, tail, cap } => write!(
                f,
                "record at ring position {position} has length {len} (published up to {tail}, \
                 capacity {cap})"
            ),
            Corrupt::Descriptor { request_id, desc_len, len } => write!(
                f,
                "record {request_id}: descriptor length {desc_len} exceeds its record length {len}"
            ),
            Corrupt::Kind { position, kind } => {
                write!(f, "record at ring position {position} has kind {kind}")
            }
        }
    }
}

impl std::error::Error for Corrupt {}

/// A validated record: `record_len` is a multiple of 64, inside the buffer and within what was
/// published; `desc_len <= record_len - 24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    /// Free-running ring position (the key for [`Consumer::release`]).
    pub position: u64,
    /// Offset of the record in the region.
    pub offset: u64,
    pub request_id: u64,
    pub desc_len: u32,
    pub record_len: u32,
}

impl RecordInfo {
    /// Lowest offset (from the record start) tensor bytes may use.
    pub fn data_start(&self) -> u64 {
        crate::layout::align64(RECORD_HEADER as u64 + self.desc_len as u64)
    }
}

#[derive(Clone, Copy, Debug)]
struct Held {
    position: u64,
    len: u32,
    released: bool,
}

/// The consumer of one ring: validated reads, out-of-order release.
pub struct Consumer {
    g: Geometry,
    kind: u32,
    read: u64,
    head: u64,
    tail_seen: u64,
    /// Records read and not yet behind `head`, in ring order (PADs included, pre-released).
    held: VecDeque<Held>,
}

/// A [`Consumer::release`] of a position that is not held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotHeld(pub u64);

impl fmt::Display for NotHeld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record at {} is not held", self.0)
    }
}

impl Consumer {
    /// A consumer of records of `kind` (PADs are skipped); starts at the ring's current `head`.
    pub fn new(g: Geometry, kind: u32) -> Consumer {
        let head = g.head_word().load(Ordering::Acquire);
        Consumer { g, kind, read: head, head, tail_seen: head, held: VecDeque::with_capacity(64) }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.g
    }

    /// Ring position read up to.
    pub fn read(&self) -> u64 {
        self.read
    }

    /// Ring position released up to (what `head` holds).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Records (PADs included) read and not yet behind `head`.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn capacity(&self) -> u64 {
        self.g.cap
    }

    /// Whether the producer has published records not read yet.
    pub fn published(&self) -> bool {
        self.g.tail_word().load(Ordering::Acquire) != self.read
    }

    /// Appends to `out` the records of our kind published since the last poll, reading at most
    /// `limit` records (PADs count, so one call costs bounded work whatever the ring holds).
    /// On `Err` the ring is corrupt and the session must end; `out` may hold records read
    /// before the corrupt one.
    pub fn poll(&mut self, limit: usize, out: &mut Vec<RecordInfo>) -> Result<(), Corrupt> {
        let cap = self.g.cap;
        let tail = self.g.tail_word().load(Ordering::Acquire);
        if tail < self.tail_seen || tail > self.head.saturating_add(cap) || tail % 64 != 0 {
            return Err(Corrupt::Tail { tail, seen: self.tail_seen, head: self.head, cap });
        }
        self.tail_seen = tail;
        let mut taken = 0;
        while self.read < tail && taken < limit {
            let idx = self.read & (cap - 1);
            let mut raw = [0u8; RECORD_HEADER];
            // idx is a multiple of 64 below cap when positions stayed 64-aligned (tail and every
            // accepted length are); a head word that was not when this consumer started is
            // caught here rather than read past the buffer.
            let fits = idx + RECORD_HEADER as u64 <= cap
                && self.g.region.copy_out(self.g.ring + idx, &mut raw).is_ok();
            let h = RecordHeader::parse(&raw);
            let n = h.record_len as u64;
            if !fits || n < 64 || n % 64 != 0 || self.read + n > tail || idx + n > cap {
                return Err(Corrupt::Length { position: self.read, len: h.record_len, tail, cap });
            }
            if h.kind == KIND_PAD {
                self.held.push_back(Held {
                    position: self.read,
                    len: h.record_len,
                    released: true,
                });
            } else if h.kind == self.kind {
                if h.desc_len as u64 > n - RECORD_HEADER as u64 {
                    return Err(Corrupt::Descriptor {
                        request_id: h.request_id,
                        desc_len: h.desc_len,
                        len: h.record_len,
                    });
                }
                out.push(RecordInfo {
                    position: self.read,
                    offset: self.g.ring + idx,
                    request_id: h.request_id,
                    desc_len: h.desc_len,
                    record_len: h.record_len,
                });
                self.held.push_back(Held {
                    position: self.read,
                    len: h.record_len,
                    released: false,
                });
            } else {
                return Err(Corrupt::Kind { position: self.read, kind: h.kind });
            }
            self.read += n;
            taken += 1;
        }
        self.advance();
        Ok(())
    }

    /// Marks the record at `position` done; returns whether `head` moved (space was freed).
    pub fn release(&mut self, position: u64) -> Result<bool, NotHeld> {
        match self.held.iter_mut().find(|h| h.position == position) {
            Some(h) => {
                h.released = true;
                Ok(self.advance())
            }
            None => Err(NotHeld(position)),
        }
    }

    /// Moves `head` over the longest released prefix; returns whether it moved.
    fn advance(&mut self) -> bool {
        let mut moved = false;
        while let Some(h) = self.held.front() {
            if !h.released {
                break;
            }
            self.head = h.position + h.len as u64;
            self.held.pop_front();
            moved = true;
        }
        if moved {
            self.g.head_word().store(self.head, Ordering::Release);
        }
        moved
    }
}

/// A record length a producer cannot write: not a multiple of 64 in 64..=capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadLength {
    pub len: u64,
    pub cap: u64,
}

impl fmt::Display for BadLength {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record length {} is not a multiple of 64 in 64..{}", self.len, self.cap)
    }
}

/// The producer of one ring: reserve, fill, publish.
pub struct Producer {
    g: Geometry,
    /// Reserved up to; published by [`Producer::publish`].
    tail: u64,
}

impl Producer {
    /// A producer that continues from the ring's current `tail`.
    pub fn new(g: Geometry) -> Producer {
        let tail = g.tail_word().load(Ordering::Acquire);
        Producer { g, tail }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.g
    }

    pub fn tail(&self) -> u64 {
        self.tail
    }

    pub fn capacity(&self) -> u64 {
        self.g.cap
    }

    /// The consumer's `head` (acquire).
    pub fn head(&self) -> u64 {
        self.g.head_word().load(Ordering::Acquire)
    }

    fn check_len(&self, n: u64) -> Result<(), BadLength> {
        if n < 64 || n % 64 != 0 || n > self.g.cap {
            return Err(BadLength { len: n, cap: self.g.cap });
        }
        Ok(())
    }

    /// Bytes `n` needs from the current tail (a PAD first when it would cross the end).
    fn need(&self, n: u64) -> u64 {
        let rest = self.g.cap - (self.tail & (self.g.cap - 1));
        if n <= rest {
            n
        } else {
            rest + n
        }
    }

    fn room(&self, n: u64) -> bool {
        let head = self.head();
        // A consumer that moved head past our tail is corrupt: treat it as no space.
        if head > self.tail {
            return false;
        }
        self.tail + self.need(n) - head <= self.g.cap
    }

    /// Whether [`Producer::reserve`] of `n` bytes would succeed now.
    pub fn fits(&self, n: u64) -> Result<bool, BadLength> {
        self.check_len(n)?;
        Ok(self.room(n))
    }

    /// Claims `n` bytes (a multiple of 64, at most the capacity); returns the record's offset in
    /// the region, or `None` while the consumer has not released enough. A PAD fills the rest
    /// of the buffer first when the record would cross its end.
    pub fn reserve(&mut self, n: u64) -> Result<Option<u64>, BadLength> {
        self.check_len(n)?;
        if !self.room(n) {
            return Ok(None);
        }
        let cap = self.g.cap;
        let mut idx = self.tail & (cap - 1);
        let rest = cap - idx;
        if n > rest {
            let pad = RecordHeader {
                record_len: rest as u32,
                kind: KIND_PAD,
                request_id: 0,
                desc_len: 0,
            };
            self.g
                .region
                .copy_in(self.g.ring + idx, &pad.bytes())
                .expect("ring buffer checked at construction");
            self.tail += rest;
            idx = 0;
        }
        self.tail += n;
        Ok(Some(self.g.ring + idx))
    }

    /// Publishes everything reserved so far (release store of `tail`).
    pub fn publish(&self) {
        self.g.tail_word().store(self.tail, Ordering::Release);
    }
}

/// Why [`write_record`] refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteError {
    /// The record cannot hold its header and descriptor, or is longer than a u32.
    TooShort {
        record_len: u64,
        desc_len: usize,
    },
    Region(RegionError),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::TooShort { record_len, desc_len } => {
                write!(f, "a {record_len}-byte record cannot hold a {desc_len}-byte descriptor")
            }
            WriteError::Region(e) => e.fmt(f),
        }
    }
}

/// Writes a record's header and descriptor at region offset `off` (tensor bytes are the
/// caller's).
pub fn write_record(
    region: &Region,
    off: u64,
    kind: u32,
    request_id: u64,
    record_len: u64,
    desc: &[u8],
) -> Result<(), WriteError> {
    if record_len < (RECORD_HEADER + desc.len()) as u64 || record_len > u32::MAX as u64 {
        return Err(WriteError::TooShort { record_len, desc_len: desc.len() });
    }
    region.check(off, record_len).map_err(WriteError::Region)?;
    let h = RecordHeader {
        record_len: record_len as u32,
        kind,
        request_id,
        desc_len: desc.len() as u32,
    };
    region.copy_in(off, &h.bytes()).map_err(WriteError::Region)?;
    region.copy_in(off + RECORD_HEADER as u64, desc).map_err(WriteError::Region)?;
    Ok(())
}

/// The four header fields of the record at `off`, unvalidated.
pub fn read_header(region: &Region, off: u64) -> Result<RecordHeader, RegionError> {
    let mut raw = [0u8; RECORD_HEADER];
    region.copy_out(off, &mut raw)?;
    Ok(RecordHeader::parse(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{KIND_REQUEST, KIND_RESPONSE};

    const CAP: u64 = 4096;

    /// A control block at 0 and a ring at 128, in one aligned buffer.
    struct Mem(Vec<u64>);

    impl Mem {
        fn new() -> Mem {
            Mem(vec![0u64; (128 + CAP as usize) / 8])
        }
        fn region(&mut self) -> Region {
            unsafe { Region::new(self.0.as_mut_ptr() as *mut u8, self.0.len() * 8).unwrap() }
        }
        fn geometry(&mut self) -> Geometry {
            Geometry::new(self.region(), 0, 128, CAP).unwrap()
        }
    }

    fn put(p: &mut Producer, n: u64, rid: u64, dlen: u32) -> u64 {
        let off = p.reserve(n).unwrap().expect("space");
        let h = RecordHeader {
            record_len: n as u32,
            kind: KIND_REQUEST,
            request_id: rid,
            desc_len: dlen,
        };
        p.geometry().region.copy_in(off, &h.bytes()).unwrap();
        p.publish();
        off
    }

    #[test]
    fn geometry_is_checked() {
        let mut m = Mem::new();
        let r = m.region();
        assert_eq!(Geometry::new(r, 0, 128, 100).unwrap_err(), GeometryError::Capacity(100));
        assert_eq!(Geometry::new(r, 0, 128, 32).unwrap_err(), GeometryError::Capacity(32));
        assert!(matches!(Geometry::new(r, 0, 256, CAP), Err(GeometryError::Region(_))));
        assert!(matches!(Geometry::new(r, 4, 128, 64), Err(GeometryError::Region(_))));
        assert!(matches!(Geometry::new(r, CAP + 64, 128, 64), Err(GeometryError::Region(_))));
        assert_eq!(
            GeometryError::Capacity(100).to_string(),
            "ring capacity 100 is not a power of two >= 64"
        );
    }

    #[test]
    fn records_round_trip_and_wrap_behind_a_pad() {
        let mut m = Mem::new();
        let g = m.geometry();
        let mut p = Producer::new(g);
        let mut c = Consumer::new(g, KIND_REQUEST);
        let first = put(&mut p, CAP - 1024, 1, 10);
        assert_eq!(first, 128);
        let mut got = vec![];
        c.poll(usize::MAX, &mut got).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data_start(), 64);
        assert!(c.release(got[0].position).unwrap());
        let second = put(&mut p, 2048, 2, 0);
        assert_eq!(second, 128, "wrapped to the buffer start");
        let pad = read_header(&g.region, 128 + CAP - 1024).unwrap();
        assert_eq!((pad.kind, pad.record_len), (KIND_PAD, 1024));
        got.clear();
        c.poll(usize::MAX, &mut got).unwrap();
        assert_eq!(got[0].request_id, 2);
        assert_eq!(got[0].offset, 128);
        assert_eq!(c.held(), 1, "the PAD is released at once, the record is held");
    }

    #[test]
    fn head_moves_over_the_released_prefix_only() {
        let mut m = Mem::new();
        let g = m.geometry();
        let mut p = Producer::new(g);
        let mut c = Consumer::new(g, KIND_REQUEST);
        for i in 0..4 {
            put(&mut p, 1024, i, 0);
        }
        assert_eq!(p.reserve(64).unwrap(), None, "full");
        let mut got = vec![];
        c.poll(usize::MAX, &mut got).unwrap();
        assert!(!c.release(got[2].position).unwrap());
        assert!(!c.release(got[1].position).unwrap());
        assert_eq!(g.head_word().load(Ordering::Relaxed), 0);
        assert!(c.release(got[0].position).unwrap());
        assert_eq!(g.head_word().load(Ordering::Relaxed), 3072);
        assert_eq!(c.release(12345), Err(NotHeld(12345)));
        assert!(p.fits(3072).unwrap());
        assert!(!p.fits(4096).unwrap());
        assert_eq!(p.fits(100), Err(BadLength { len: 100, cap: CAP }));
        assert!(c.release(got[3].position).unwrap());
        assert!(p.fits(4096).unwrap());
    }

    #[test]
    fn poll_reads_at_most_limit_records() {
        let mut m = Mem::new();
        let g = m.geometry();
        let mut p = Producer::new(g);
        let mut c = Consumer::new(g, KIND_REQUEST);
        for i in 0..3 {
            put(&mut p, 64, i, 0);
        }
        let mut got = vec![];
        c.poll(2, &mut got).unwrap();
        assert_eq!(got.len(), 2);
        assert!(c.published());
        c.poll(2, &mut got).unwrap();
        assert_eq!(got.len(), 3);
        assert!(!c.published());
    }

    fn corrupt_after(write: impl Fn(&Region)) -> Corrupt {
        let mut m = Mem::new();
        let g = m.geometry();
        write(&g.region);
        let mut c = Consumer::new(g, KIND_REQUEST);
        c.poll(usize::MAX, &mut vec![]).unwrap_err()
    }

    fn header_and_tail(len: u32, kind: u32, dlen: u32, tail: u64) -> impl Fn(&Region) {
        move |r: &Region| {
            let h = RecordHeader { record_len: len, kind, request_id: 9, desc_len: dlen };
            r.copy_in(128, &h.bytes()).unwrap();
            r.store_u64(CTL_TAIL, tail).unwrap();
        }
    }

    #[test]
    fn every_impossible_header_or_tail_is_corrupt() {
        for len in [0, 100, 8192] {
            assert!(matches!(
                corrupt_after(header_and_tail(len, KIND_REQUEST, 0, 128)),
                Corrupt::Length { .. }
            ));
        }
        // longer than what was published
        assert!(matches!(
            corrupt_after(header_and_tail(256, KIND_REQUEST, 0, 128)),
            Corrupt::Length { .. }
        ));
        assert!(matches!(
            corrupt_after(header_and_tail(128, KIND_RESPONSE, 0, 128)),
            Corrupt::Kind { kind: 2, .. }
        ));
        let e = corrupt_after(header_and_tail(128, KIND_REQUEST, 200, 128));
        assert_eq!(e.to_string(), "record 9: descriptor length 200 exceeds its record length 128");
        assert!(matches!(
            corrupt_after(header_and_tail(128, KIND_REQUEST, 0, 65)),
            Corrupt::Tail { .. }
        ));
        assert!(matches!(
            corrupt_after(header_and_tail(128, KIND_REQUEST, 0, 3 * CAP)),
            Corrupt::Tail { .. }
        ));
    }

    #[test]
    fn a_tail_moving_backwards_is_corrupt() {
        let mut m = Mem::new();
        let g = m.geometry();
        let mut p = Producer::new(g);
        let mut c = Consumer::new(g, KIND_REQUEST);
        for i in 0..3 {
            put(&mut p, 128, i, 0);
        }
        c.poll(1, &mut vec![]).unwrap();
        g.tail_word().store(256, Ordering::Release);
        assert!(matches!(c.poll(9, &mut vec![]), Err(Corrupt::Tail { tail: 256, seen: 384, .. })));
    }

    #[test]
    fn write_record_checks_its_lengths() {
        let mut m = Mem::new();
        let r = m.region();
        assert_eq!(
            write_record(&r, 128, KIND_REQUEST, 1, 64, &[0; 41]).unwrap_err().to_string(),
            "a 64-byte record cannot hold a 41-byte descriptor"
        );
        assert!(matches!(write_record(&r, 128 + CAP, 1, 1, 64, &[]), Err(WriteError::Region(_))));
        write_record(&r, 128, KIND_REQUEST, 7, 64, &[0xaa; 40]).unwrap();
        let h = read_header(&r, 128).unwrap();
        assert_eq!((h.record_len, h.kind, h.request_id, h.desc_len), (64, 1, 7, 40));
    }
}

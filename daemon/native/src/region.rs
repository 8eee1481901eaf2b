//! A bounds-checked view of a shared mapping.
//!
//! Every access names a byte offset and a length, both checked against the mapping before any
//! byte is touched, so whatever a client wrote into the segment (a tail, a record length, a
//! tensor offset) can make an access fail but never read or write outside the mapping.
//!
//! The other process writes the same memory concurrently, so the bytes behind a `Region` are
//! never handed out as `&[u8]`: control words are reached through atomics, and everything else
//! is copied in or out (a snapshot, validated afterwards, so no check can be raced).

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Why an access was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// `[off, off + n)` is not inside the `size`-byte mapping.
    OutOfRange { off: u64, n: u64, size: u64 },
    /// An atomic word at an offset that is not a multiple of its width.
    Misaligned { off: u64, width: u64 },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RegionError::OutOfRange { off, n, size } => write!(
                f,
                "range [{}, {}) lies outside the {}-byte segment",
                off,
                off as u128 + n as u128,
                size
            ),
            RegionError::Misaligned { off, width } => {
                write!(f, "offset {off} is not {width}-byte aligned")
            }
        }
    }
}

impl std::error::Error for RegionError {}

/// A shared mapping: base address and length. Cheap to copy; it owns nothing.
///
/// Safety contract (taken on by [`Region::new`]'s caller): the mapping stays mapped, readable
/// and writable for as long as any copy of the `Region` (or anything built on it: a
/// [`crate::ring::Consumer`], a [`crate::ring::Producer`]) is used.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    base: NonNull<u8>,
    len: usize,
}

// The mapping is shared memory: every access goes through atomics or explicit copies, which are
// as safe from several threads as from several processes.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    /// # Safety
    /// `base..base+len` must be one mapping that outlives every use of this `Region` and its
    /// copies. `base` must be 8-byte aligned, so that aligned offsets are aligned addresses.
    pub unsafe fn new(base: *mut u8, len: usize) -> Option<Region> {
        let base = NonNull::new(base)?;
        if (base.as_ptr() as usize) % 8 != 0 || len > isize::MAX as usize {
            return None;
        }
        Some(Region { base, len })
    }

    /// A region over memory the caller owns (tests, fuzzing, private buffers).
    ///
    /// # Safety
    /// As [`Region::new`]: `buf` must stay alive and unmoved while the Region is used.
    pub unsafe fn from_slice(buf: &mut [u8]) -> Option<Region> {
        Region::new(buf.as_mut_ptr(), buf.len())
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping's address (for cudaHostRegister and for views the caller manages).
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// `off` as an index when `[off, off + n)` lies inside the mapping; `n` may be 0.
    #[inline]
    pub fn check(&self, off: u64, n: u64) -> Result<usize, RegionError> {
        let size = self.len as u64;
        if off > size || n > size - off {
            return Err(RegionError::OutOfRange { off, n, size });
        }
        Ok(off as usize)
    }

    #[inline]
    fn word(&self, off: u64, width: u64) -> Result<usize, RegionError> {
        let i = self.check(off, width)?;
        if off % width != 0 {
            return Err(RegionError::Misaligned { off, width });
        }
        Ok(i)
    }

    /// The u64 at `off` as an atomic (checked: inside, 8-byte aligned).
    #[inline]
    pub fn atomic_u64(&self, off: u64) -> Result<&AtomicU64, RegionError> {
        let i = self.word(off, 8)?;
        // Safety: inside the mapping and aligned (base is 8-aligned); AtomicU64 has u64's layout.
        Ok(unsafe { &*(self.base.as_ptr().add(i) as *const AtomicU64) })
    }

    /// The u32 at `off` as an atomic (checked: inside, 4-byte aligned).
    #[inline]
    pub fn atomic_u32(&self, off: u64) -> Result<&AtomicU32, RegionError> {
        let i = self.word(off, 4)?;
        // Safety: as atomic_u64.
        Ok(unsafe { &*(self.base.as_ptr().add(i) as *const AtomicU32) })
    }

    /// Acquire-load of the u64 at `off`.
    pub fn load_u64(&self, off: u64) -> Result<u64, RegionError> {
        Ok(self.atomic_u64(off)?.load(Ordering::Acquire))
    }

    /// Release-store of the u64 at `off`.
    pub fn store_u64(&self, off: u64, v: u64) -> Result<(), RegionError> {
        self.atomic_u64(off)?.store(v, Ordering::Release);
        Ok(())
    }

    /// Acquire-load of the u32 at `off`.
    pub fn load_u32(&self, off: u64) -> Result<u32, RegionError> {
        Ok(self.atomic_u32(off)?.load(Ordering::Acquire))
    }

    /// Release-store of the u32 at `off`.
    pub fn store_u32(&self, off: u64, v: u32) -> Result<(), RegionError> {
        self.atomic_u32(off)?.store(v, Ordering::Release);
        Ok(())
    }

    /// Copy `src` into the mapping at `off`.
    pub fn copy_in(&self, off: u64, src: &[u8]) -> Result<(), RegionError> {
        let i = self.check(off, src.len() as u64)?;
        // Safety: the range is inside the mapping; `src` is private memory, so no overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(i), src.len())
        };
        Ok(())
    }

    /// Copy `dst.len()` bytes out of the mapping at `off`.
    pub fn copy_out(&self, off: u64, dst: &mut [u8]) -> Result<(), RegionError> {
        let i = self.check(off, dst.len() as u64)?;
        // Safety: as copy_in.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(i), dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    /// `n` bytes at `off` in a new vector.
    pub fn read_vec(&self, off: u64, n: u64) -> Result<Vec<u8>, RegionError> {
        self.check(off, n)?;
        let mut v = vec![0u8; n as usize];
        self.copy_out(off, &mut v)?;
        Ok(v)
    }

    /// Fill `[off, off + n)` with `byte`.
    pub fn fill(&self, off: u64, n: u64, byte: u8) -> Result<(), RegionError> {
        let i = self.check(off, n)?;
        // Safety: inside the mapping.
        unsafe { std::ptr::write_bytes(self.base.as_ptr().add(i), byte, n as usize) };
        Ok(())
    }

    /// Address of `[off, off + n)` after checking it, for callers that build their own views
    /// (the serving core's zero-copy tensors). Reading or writing through it is the caller's
    /// `unsafe`.
    pub fn ptr(&self, off: u64, n: u64) -> Result<*mut u8, RegionError> {
        let i = self.check(off, n)?;
        // Safety: inside the mapping (add of an in-bounds offset).
        Ok(unsafe { self.base.as_ptr().add(i) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf() -> Vec<u64> {
        vec![0u64; 16] // 128 bytes, 8-aligned
    }

    fn region(b: &mut [u64]) -> Region {
        unsafe { Region::new(b.as_mut_ptr() as *mut u8, b.len() * 8).unwrap() }
    }

    #[test]
    fn atomics_round_trip_and_are_little_endian() {
        let mut b = buf();
        let r = region(&mut b);
        r.store_u64(8, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(r.load_u64(8).unwrap(), 0x0102_0304_0506_0708);
        let mut out = [0u8; 2];
        r.copy_out(8, &mut out).unwrap();
        assert_eq!(out, [8, 7]);
        r.store_u32(124, 7).unwrap();
        assert_eq!(r.load_u32(124).unwrap(), 7);
    }

    #[test]
    fn nothing_outside_the_mapping_is_reachable() {
        let mut b = buf();
        let r = region(&mut b);
        assert!(r.load_u64(120).is_ok());
        assert_eq!(r.load_u64(128), Err(RegionError::OutOfRange { off: 128, n: 8, size: 128 }));
        assert!(r.load_u64(u64::MAX - 3).is_err()); // no wrap-around
        assert!(r.load_u32(126).is_err());
        assert_eq!(r.load_u64(4), Err(RegionError::Misaligned { off: 4, width: 8 }));
        assert!(r.copy_in(127, &[1, 2]).is_err());
        assert!(r.copy_in(128, &[]).is_ok());
        assert!(r.copy_in(129, &[]).is_err());
        assert!(r.read_vec(1, u64::MAX).is_err());
        assert!(r.fill(0, 129, 0).is_err());
        assert!(r.ptr(u64::MAX, 1).is_err());
        assert_eq!(
            RegionError::OutOfRange { off: 120, n: 16, size: 128 }.to_string(),
            "range [120, 136) lies outside the 128-byte segment"
        );
    }

    #[test]
    fn unaligned_bases_are_refused() {
        let mut b = buf();
        let p = b.as_mut_ptr() as *mut u8;
        assert!(unsafe { Region::new(p.add(1), 64) }.is_none());
        assert!(unsafe { Region::new(std::ptr::null_mut(), 64) }.is_none());
    }
}

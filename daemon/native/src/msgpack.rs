//! msgpack exactly as the daemon's Python side reads and writes it (msgpack-python 1.x with
//! `raw=False, strict_map_key=True`, and `use_bin_type=True` for writing).
//!
//! Why not a general msgpack crate: the request decoder must accept and refuse *exactly* what
//! the Python path does, and the rules that decide it are msgpack-python's, not msgpack's:
//! every str anywhere (ignored fields included) must be valid UTF-8, every map key must be a
//! str or a bin, containers nest at most 1024 deep, and an ext of type -1 must be a valid
//! timestamp. A general reader would need all of that added around it; this reader is those
//! rules and nothing else, over a byte slice, with every length checked before use.

use std::fmt;

/// msgpack-python's unpacker stack: at most this many containers open at once.
pub const MAX_DEPTH: usize = 1024;

/// Why bytes are not one msgpack value as msgpack-python reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// The data ends inside a value (or is empty).
    Truncated,
    /// The reserved byte 0xc1.
    Reserved,
    /// A str that is not UTF-8.
    Utf8,
    /// A map key that is not a str or a bin (msgpack-python's `strict_map_key`).
    MapKey(&'static str),
    /// Containers nested deeper than [`MAX_DEPTH`].
    Depth,
    /// An ext of type -1 that is not a valid timestamp.
    Timestamp,
    /// An ext of another negative type (reserved; msgpack-python's ExtType takes 0..=127).
    ExtType(i8),
    /// Bytes after the value.
    Trailing(usize),
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::Truncated => f.write_str("the data ends inside a value"),
            Invalid::Reserved => f.write_str("the reserved byte 0xc1"),
            Invalid::Utf8 => f.write_str("a string that is not UTF-8"),
            Invalid::MapKey(t) => write!(f, "a map key of type {t}; keys must be strings"),
            Invalid::Depth => write!(f, "containers nested deeper than {MAX_DEPTH}"),
            Invalid::Timestamp => f.write_str("an invalid timestamp"),
            Invalid::ExtType(t) => write!(f, "an ext of the reserved type {t}"),
            Invalid::Trailing(n) => write!(f, "{n} bytes after the value"),
        }
    }
}

/// One value's head: scalars whole, containers as their item count (the cursor then sits on
/// the first item).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Head<'a> {
    Nil,
    Bool(bool),
    /// Every msgpack integer: -2^63 ..= 2^64-1 (see [`Int`]).
    Int(Int),
    Float,
    Str(&'a str),
    Bin(&'a [u8]),
    Array(u32),
    Map(u32),
    Ext(i8, &'a [u8]),
}

impl Head<'_> {
    /// The Python type msgpack-python decodes this to (for error messages that match).
    pub fn python_type(&self) -> &'static str {
        match self {
            Head::Nil => "NoneType",
            Head::Bool(_) => "bool",
            Head::Int(_) => "int",
            Head::Float => "float",
            Head::Str(_) => "str",
            Head::Bin(_) => "bytes",
            Head::Array(_) => "list",
            Head::Map(_) => "dict",
            Head::Ext(-1, _) => "Timestamp",
            Head::Ext(..) => "ExtType",
        }
    }
}

/// A msgpack integer, kept in 9 bytes rather than an i128 (whose 16-byte alignment makes every
/// [`Head`] copy slow on the hot path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int {
    bits: u64,
    negative: bool,
}

impl Int {
    pub fn from_u64(v: u64) -> Int {
        Int { bits: v, negative: false }
    }

    pub fn from_i64(v: i64) -> Int {
        Int { bits: v as u64, negative: v < 0 }
    }

    pub fn get(self) -> i128 {
        if self.negative {
            self.bits as i64 as i128
        } else {
            self.bits as i128
        }
    }
}

/// A reader over a byte slice; every read is bounds-checked.
#[derive(Clone, Copy, Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The bytes passed [`validate`] and every read starts on a value boundary: strings are
    /// not checked for UTF-8 again (the decoder reads each descriptor twice: validation, then
    /// the fields).
    trusted: bool,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0, trusted: false }
    }

    pub fn at(buf: &'a [u8], pos: usize) -> Cursor<'a> {
        Cursor { buf, pos, trusted: false }
    }

    /// A cursor over bytes [`validate`] accepted.
    ///
    /// # Safety
    /// `pos` must be the start of a value (or of a map key) of that msgpack structure, as
    /// positions taken from a cursor that walked it are: a string read from the middle of
    /// another value could be invalid UTF-8, which a trusted cursor does not check.
    pub unsafe fn trusted(v: Valid<'a>, pos: usize) -> Cursor<'a> {
        Cursor { buf: v.0, pos, trusted: true }
    }

    /// A cursor like this one at another position (same trust).
    ///
    /// # Safety
    /// As [`Cursor::trusted`] when this cursor is trusted.
    pub unsafe fn moved(&self, pos: usize) -> Cursor<'a> {
        Cursor { buf: self.buf, pos, trusted: self.trusted }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn rest(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], Invalid> {
        if n > self.buf.len() - self.pos {
            return Err(Invalid::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, Invalid> {
        Ok(self.take(1)?[0])
    }

    #[inline]
    fn be(&mut self, n: usize) -> Result<u64, Invalid> {
        Ok(self.take(n)?.iter().fold(0u64, |v, &b| (v << 8) | b as u64))
    }

    fn str(&mut self, n: usize) -> Result<Head<'a>, Invalid> {
        let b = self.take(n)?;
        if self.trusted {
            // Safety: validate() checked this very string (see Cursor::trusted).
            return Ok(Head::Str(unsafe { std::str::from_utf8_unchecked(b) }));
        }
        std::str::from_utf8(b).map(Head::Str).map_err(|_| Invalid::Utf8)
    }

    fn ext(&mut self, n: usize) -> Result<Head<'a>, Invalid> {
        let t = self.byte()? as i8;
        let data = self.take(n)?;
        if t == -1 && !valid_timestamp(data) {
            return Err(Invalid::Timestamp);
        }
        if t < -1 {
            return Err(Invalid::ExtType(t));
        }
        Ok(Head::Ext(t, data))
    }

    /// Reads one value's head (see [`Head`]).
    pub fn head(&mut self) -> Result<Head<'a>, Invalid> {
        let b = self.byte()?;
        Ok(match b {
            0x00..=0x7f => Head::Int(Int::from_u64(b as u64)),
            0x80..=0x8f => Head::Map((b & 0x0f) as u32),
            0x90..=0x9f => Head::Array((b & 0x0f) as u32),
            0xa0..=0xbf => return self.str((b & 0x1f) as usize),
            0xc0 => Head::Nil,
            0xc1 => return Err(Invalid::Reserved),
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xc4..=0xc6 => {
                let n = self.be(1 << (b - 0xc4))? as usize;
                Head::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.be(1 << (b - 0xc7))? as usize;
                return self.ext(n);
            }
            0xca => {
                self.take(4)?;
                Head::Float
            }
            0xcb => {
                self.take(8)?;
                Head::Float
            }
            0xcc..=0xcf => Head::Int(Int::from_u64(self.be(1 << (b - 0xcc))?)),
            0xd0 => Head::Int(Int::from_i64(self.be(1)? as u8 as i8 as i64)),
            0xd1 => Head::Int(Int::from_i64(self.be(2)? as u16 as i16 as i64)),
            0xd2 => Head::Int(Int::from_i64(self.be(4)? as u32 as i32 as i64)),
            0xd3 => Head::Int(Int::from_i64(self.be(8)? as i64)),
            0xd4..=0xd8 => return self.ext(1 << (b - 0xd4)),
            0xd9..=0xdb => {
                let n = self.be(1 << (b - 0xd9))? as usize;
                return self.str(n);
            }
            0xdc | 0xdd => Head::Array(self.be(2 << (b - 0xdc))? as u32),
            0xde | 0xdf => Head::Map(self.be(2 << (b - 0xde))? as u32),
            0xe0..=0xff => Head::Int(Int::from_i64(b as i8 as i64)),
        })
    }

    /// Skips one whole value, validating it as msgpack-python would; `depth` is the number of
    /// containers already open around it. Works on bytes, without building a [`Head`]: it
    /// runs over every byte of every descriptor.
    pub fn skip(&mut self, depth: usize) -> Result<(), Invalid> {
        let b = self.byte()?;
        match b {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => Ok(()),
            0x80..=0x8f => self.skip_map((b & 0x0f) as u32, depth),
            0x90..=0x9f => self.skip_array((b & 0x0f) as u32, depth),
            0xa0..=0xbf => self.skip_str((b & 0x1f) as usize),
            0xc1 => Err(Invalid::Reserved),
            0xc4..=0xc6 => {
                let n = self.be(1 << (b - 0xc4))? as usize;
                self.take(n).map(|_| ())
            }
            0xc7..=0xc9 => {
                let n = self.be(1 << (b - 0xc7))? as usize;
                self.ext(n).map(|_| ())
            }
            0xca => self.take(4).map(|_| ()),
            0xcb => self.take(8).map(|_| ()),
            0xcc..=0xcf => self.take(1 << (b - 0xcc)).map(|_| ()),
            0xd0..=0xd3 => self.take(1 << (b - 0xd0)).map(|_| ()),
            0xd4..=0xd8 => self.ext(1 << (b - 0xd4)).map(|_| ()),
            0xd9..=0xdb => {
                let n = self.be(1 << (b - 0xd9))? as usize;
                self.skip_str(n)
            }
            0xdc | 0xdd => {
                let n = self.be(2 << (b - 0xdc))? as u32;
                self.skip_array(n, depth)
            }
            0xde | 0xdf => {
                let n = self.be(2 << (b - 0xde))? as u32;
                self.skip_map(n, depth)
            }
        }
    }

    fn skip_str(&mut self, n: usize) -> Result<(), Invalid> {
        let b = self.take(n)?;
        if self.trusted || b.is_ascii() {
            return Ok(());
        }
        std::str::from_utf8(b).map(|_| ()).map_err(|_| Invalid::Utf8)
    }

    fn skip_array(&mut self, n: u32, depth: usize) -> Result<(), Invalid> {
        if depth >= MAX_DEPTH {
            return Err(Invalid::Depth);
        }
        for _ in 0..n {
            // Each item is at least one byte: a count beyond the data ends here, not after
            // 2^32 iterations.
            if self.rest() == 0 {
                return Err(Invalid::Truncated);
            }
            self.skip(depth + 1)?;
        }
        Ok(())
    }

    fn skip_map(&mut self, n: u32, depth: usize) -> Result<(), Invalid> {
        if depth >= MAX_DEPTH {
            return Err(Invalid::Depth);
        }
        for _ in 0..n {
            match self.buf.get(self.pos) {
                None => return Err(Invalid::Truncated),
                // str or bin: the keys msgpack-python's strict_map_key allows
                Some(0xa0..=0xbf | 0xd9..=0xdb | 0xc4..=0xc6) => self.skip(depth + 1)?,
                Some(_) => {
                    let k = self.head()?;
                    // msgpack-python reads the whole key before refusing its type.
                    self.skip_items(k, depth + 1)?;
                    return Err(Invalid::MapKey(k.python_type()));
                }
            }
            self.skip(depth + 1)?;
        }
        Ok(())
    }

    /// Skips the items of a container whose head was just read (nothing for a scalar).
    pub fn skip_items(&mut self, h: Head<'a>, depth: usize) -> Result<(), Invalid> {
        match h {
            Head::Array(n) => self.skip_array(n, depth),
            Head::Map(n) => self.skip_map(n, depth),
            _ => Ok(()),
        }
    }
}

/// msgpack-python's timestamp rules: 4 bytes (seconds), 8 bytes (30-bit nanoseconds, 34-bit
/// seconds) or 12 bytes (u32 nanoseconds, i64 seconds), nanoseconds at most 999 999 999.
fn valid_timestamp(d: &[u8]) -> bool {
    const MAX_NS: u64 = 999_999_999;
    match d.len() {
        4 => true,
        8 => (u64::from_be_bytes(d.try_into().unwrap()) >> 34) <= MAX_NS,
        12 => u32::from_be_bytes(d[0..4].try_into().unwrap()) as u64 <= MAX_NS,
        _ => false,
    }
}

/// Bytes that are exactly one msgpack value msgpack-python accepts (made by [`validate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Valid<'a>(&'a [u8]);

impl<'a> Valid<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }
}

/// Whether `buf` is exactly one msgpack value that msgpack-python accepts.
pub fn validate(buf: &[u8]) -> Result<Valid<'_>, Invalid> {
    let mut c = Cursor::new(buf);
    c.skip(0)?;
    if c.rest() != 0 {
        return Err(Invalid::Trailing(c.rest()));
    }
    Ok(Valid(buf))
}

// -- writing, in msgpack-python's canonical forms (the smallest that holds the value) ------

pub fn write_uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= 0xff {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= 0xffff {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= 0xffff_ffff {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

pub fn write_int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        write_uint(out, v as u64);
    } else if v >= -32 {
        out.push(v as i8 as u8);
    } else if v >= i8::MIN as i64 {
        out.extend_from_slice(&[0xd0, v as i8 as u8]);
    } else if v >= i16::MIN as i64 {
        out.push(0xd1);
        out.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= i32::MIN as i64 {
        out.push(0xd2);
        out.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n <= 0xff {
        out.extend_from_slice(&[0xd9, n as u8]);
    } else if n <= 0xffff {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

fn write_container(out: &mut Vec<u8>, n: usize, fix: u8, c16: u8) {
    if n < 16 {
        out.push(fix | n as u8);
    } else if n <= 0xffff {
        out.push(c16);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(c16 + 1);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

pub fn write_array_len(out: &mut Vec<u8>, n: usize) {
    write_container(out, n, 0x90, 0xdc);
}

pub fn write_map_len(out: &mut Vec<u8>, n: usize) {
    write_container(out, n, 0x80, 0xde);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(b: &[u8]) -> bool {
        validate(b).is_ok()
    }

    #[test]
    fn what_msgpack_python_refuses() {
        assert_eq!(validate(b""), Err(Invalid::Truncated));
        assert_eq!(validate(b"\xc1"), Err(Invalid::Reserved));
        assert_eq!(validate(b"\x91\xc1"), Err(Invalid::Reserved));
        assert_eq!(validate(b"\x81\x01\x02"), Err(Invalid::MapKey("int")));
        assert_eq!(validate(b"\x81\xc0\x02"), Err(Invalid::MapKey("NoneType")));
        assert!(ok(b"\x81\xc4\x01a\x02"), "bin keys are allowed");
        assert_eq!(validate(b"\x81\xa1a\x01\x00"), Err(Invalid::Trailing(1)));
        assert_eq!(validate(b"\xa2\xff\xfe"), Err(Invalid::Utf8));
        assert_eq!(validate(b"\xa3\xed\xa0\x80"), Err(Invalid::Utf8), "surrogates");
        assert!(ok(b"\xd6\xff\0\0\0\0"));
        assert_eq!(validate(b"\xd7\xff\xff\xff\xff\xff\xff\xff\xff\xff"), Err(Invalid::Timestamp));
        assert_eq!(validate(b"\xc7\x03\xff\0\0\0"), Err(Invalid::Timestamp));
        assert_eq!(validate(b"\xd4\xff\0"), Err(Invalid::Timestamp));
        assert!(ok(b"\xd4\x05\x00"));
        assert!(ok(b"\xd5\x7f\x00\x00"));
        assert_eq!(validate(b"\xd5\x80\x00\x00"), Err(Invalid::ExtType(-128)));
        assert_eq!(validate(b"\xc7\x01\xfe\x00"), Err(Invalid::ExtType(-2)));
        assert_eq!(validate(b"\xdd\xff\xff\xff\xff"), Err(Invalid::Truncated));
        assert!(ok(b"\xca\0\0\0\0"));
    }

    #[test]
    fn nesting_stops_at_msgpack_pythons_stack() {
        let nest = |n: usize, inner: &[u8]| [vec![0x91u8; n], inner.to_vec()].concat();
        assert!(ok(&nest(1024, b"\xc0")));
        assert_eq!(validate(&nest(1025, b"\xc0")), Err(Invalid::Depth));
        assert!(ok(&nest(1023, b"\x90")));
        assert_eq!(validate(&nest(1024, b"\x90")), Err(Invalid::Depth), "empty ones count");
    }

    #[test]
    fn every_width_of_every_form_is_read() {
        for (b, want) in [
            (&b"\x05"[..], Head::Int(Int::from_i64(5))),
            (b"\xcc\xff", Head::Int(Int::from_i64(255))),
            (b"\xcd\x01\x00", Head::Int(Int::from_i64(256))),
            (b"\xce\x00\x01\x00\x00", Head::Int(Int::from_i64(65536))),
            (b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", Head::Int(Int::from_u64(u64::MAX))),
            (b"\xff", Head::Int(Int::from_i64(-1))),
            (b"\xd0\x80", Head::Int(Int::from_i64(-128))),
            (b"\xd1\x80\x00", Head::Int(Int::from_i64(-32768))),
            (b"\xd2\x80\x00\x00\x00", Head::Int(Int::from_i64(i32::MIN.into()))),
            (b"\xd3\x80\0\0\0\0\0\0\0", Head::Int(Int::from_i64(i64::MIN))),
            (b"\xd9\x01a", Head::Str("a")),
            (b"\xda\x00\x01a", Head::Str("a")),
            (b"\xdb\x00\x00\x00\x01a", Head::Str("a")),
            (b"\xdc\x00\x03", Head::Array(3)),
            (b"\xdd\x00\x00\x00\x03", Head::Array(3)),
            (b"\xde\x00\x02", Head::Map(2)),
            (b"\xdf\x00\x00\x00\x02", Head::Map(2)),
        ] {
            assert_eq!(Cursor::new(b).head(), Ok(want), "{b:x?}");
        }
    }

    #[test]
    fn writes_the_smallest_form() {
        let enc = |v: i64| {
            let mut o = vec![];
            write_int(&mut o, v);
            o
        };
        assert_eq!(enc(127), [0x7f]);
        assert_eq!(enc(128), [0xcc, 0x80]);
        assert_eq!(enc(65536), [0xce, 0, 1, 0, 0]);
        assert_eq!(enc(-32), [0xe0]);
        assert_eq!(enc(-33), [0xd0, 0xdf]);
        assert_eq!(enc(i64::MIN)[0], 0xd3);
        let mut o = vec![];
        write_str(&mut o, &"x".repeat(40));
        assert_eq!(&o[..2], [0xd9, 40]);
        o.clear();
        write_array_len(&mut o, 16);
        assert_eq!(o, [0xdc, 0, 16]);
    }
}

//! Byte layout constants of the session segment (SPEC §4.1–§4.3), shared by every module.

/// Bytes of a record header: `record_len` u32, `kind` u32, `request_id` u64, `desc_len` u32,
/// reserved u32 (SPEC §4.3).
pub const RECORD_HEADER: usize = 24;
/// Records, tensor offsets and ring positions are multiples of this.
pub const ALIGN: u64 = 64;

pub const KIND_PAD: u32 = 0;
pub const KIND_REQUEST: u32 = 1;
pub const KIND_RESPONSE: u32 = 2;

/// Offsets inside a 128-byte ring control block (SPEC §4.2): two cache lines, one writer each.
pub const CTL_TAIL: u64 = 0;
pub const CTL_PRODUCER_WAITING: u64 = 8;
pub const CTL_HEAD: u64 = 64;
pub const CTL_CONSUMER_WAITING: u64 = 72;
pub const CTL_SIZE: u64 = 128;

/// The smallest ring capacity a Consumer or Producer accepts (one record).
pub const MIN_CAPACITY: u64 = 64;

/// `n` rounded up to a multiple of 64 (`n` must be below `u64::MAX - 63`).
pub const fn align64(n: u64) -> u64 {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

/// A record header's four fields, as read (not yet validated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub record_len: u32,
    pub kind: u32,
    pub request_id: u64,
    pub desc_len: u32,
}

impl RecordHeader {
    pub fn parse(b: &[u8; RECORD_HEADER]) -> RecordHeader {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut rid = [0u8; 8];
        rid.copy_from_slice(&b[8..16]);
        RecordHeader {
            record_len: u32_at(0),
            kind: u32_at(4),
            request_id: u64::from_le_bytes(rid),
            desc_len: u32_at(16),
        }
    }

    /// The 24 header bytes, reserved word 0.
    pub fn bytes(&self) -> [u8; RECORD_HEADER] {
        let mut b = [0u8; RECORD_HEADER];
        b[0..4].copy_from_slice(&self.record_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.desc_len.to_le_bytes());
        b
    }

    /// Lowest offset (from the record start) tensor bytes may use: `align64(24 + desc_len)`.
    pub fn data_start(&self) -> u64 {
        align64(RECORD_HEADER as u64 + self.desc_len as u64)
    }
}

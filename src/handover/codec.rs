//! The snapshot's primitives: little-endian integers, LEB128 varints and length-prefixed
//! bytes, written to a buffer and read back with the offset of whatever is wrong.

use super::HandoverError;

/// Appends little-endian values.
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
    }
    /// LEB128: 7 bits a byte, small numbers (run lengths, gaps) in one or two bytes.
    pub(crate) fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
}

/// Reads little-endian values, failing with the offset where the input ran out.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], HandoverError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let Some(end) = end else {
            return Err(HandoverError::Truncated { at: self.at as u64 });
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, HandoverError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, HandoverError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, HandoverError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn varint(&mut self) -> Result<u64, HandoverError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.malformed("a number longer than 64 bits"))
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], HandoverError> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| HandoverError::Truncated { at: self.at as u64 })?;
        self.take(n)
    }
    /// A count of records of at least `record` bytes each, checked against what is left.
    pub(crate) fn count(&mut self, record: usize) -> Result<usize, HandoverError> {
        let at = self.at;
        let n = self.u64()?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(record as u64) > left {
            return Err(HandoverError::Malformed {
                at: at as u64,
                what: format!("{n} records announced, {left} bytes left"),
            });
        }
        Ok(n as usize)
    }
    pub(crate) fn malformed(&self, what: impl Into<String>) -> HandoverError {
        HandoverError::Malformed {
            at: self.at as u64,
            what: what.into(),
        }
    }
    pub(crate) fn finished(&self) -> Result<(), HandoverError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(self.malformed(format!(
                "{} bytes after the end",
                self.bytes.len() - self.at
            )))
        }
    }
}

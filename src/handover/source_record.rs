//! The memory source's record in a snapshot.

use pfnstore_hugetlb::SourceRecord;

use super::HandoverError;
use super::snapshot::{Reader, Writer};

pub(crate) fn encode(record: &SourceRecord, w: &mut Writer) {
    w.bytes(&record.to_bytes());
}

pub(crate) fn decode(r: &mut Reader<'_>) -> Result<SourceRecord, HandoverError> {
    Ok(SourceRecord::from_bytes(r.bytes()?)?)
}

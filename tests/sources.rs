//! A memory source implemented outside pfnstore ([`MemorySource`]) whose chunks cannot be
//! managed is refused with [`StoreError::BadSource`], naming the chunk and carrying the refusing
//! layer's typed error as its source; nothing is left behind.

use std::error::Error as _;

use pfnstore::core::{Geometry, Pfn};
use pfnstore::hugetlb::{
    Chunk, ChunkIndex, ChunkLocation, HugetlbError, MemorySource, SourceReport, SyntheticSource,
};
use pfnstore::{LayerError, Store, StoreError, StoreOptions};

/// A synthetic source whose chunk list is edited by the test.
#[derive(Debug)]
struct EditedSource {
    inner: SyntheticSource,
    chunks: Vec<Chunk>,
    index: ChunkIndex,
}

impl EditedSource {
    fn new(edit: impl FnOnce(&mut Vec<Chunk>, Geometry)) -> EditedSource {
        let geometry = Geometry::new(3, 9).unwrap();
        let inner = SyntheticSource::new(geometry, Pfn(1 << 20), 3).unwrap();
        let mut chunks = inner.chunks().to_vec();
        edit(&mut chunks, geometry);
        let index = ChunkIndex::new(&chunks);
        EditedSource {
            inner,
            chunks,
            index,
        }
    }
}

impl MemorySource for EditedSource {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }
    fn report(&self) -> &SourceReport {
        self.inner.report()
    }
    fn locate(&self, pfn: Pfn) -> Option<ChunkLocation> {
        self.index.locate(&self.chunks, pfn)
    }
    fn grow(&mut self, _: u64) -> Result<std::ops::Range<usize>, HugetlbError> {
        Err(HugetlbError::ZeroSize)
    }
}

fn refused(source: EditedSource) -> (Pfn, LayerError, StoreError) {
    let err = Store::new(Box::new(source), StoreOptions::default().with_shards(1))
        .expect_err("the source cannot be managed");
    match &err {
        StoreError::BadSource { base, source } => {
            assert!(err.source().is_some(), "the layer's error is the source");
            assert!(
                err.to_string().contains(&base.to_string()),
                "the message names the chunk: {err}"
            );
            (*base, source.clone(), err.clone())
        }
        other => panic!("expected BadSource, got {other:?}"),
    }
}

#[test]
fn a_chunk_listed_twice_is_refused_naming_it() {
    let mut second = Pfn(0);
    let source = EditedSource::new(|chunks, _| {
        chunks[2] = chunks[1];
        second = chunks[1].base;
    });
    let (base, _, err) = refused(source);
    assert_eq!(base, second, "{err}");
}

#[test]
fn a_chunk_not_aligned_to_a_chunk_is_refused_naming_it() {
    let mut odd = Pfn(0);
    let source = EditedSource::new(|chunks, _| {
        chunks[1].base = Pfn(chunks[1].base.0 + 8);
        odd = chunks[1].base;
    });
    let (base, _, err) = refused(source);
    assert_eq!(base, odd, "{err}");
}

#[test]
fn chunks_spanning_more_than_the_store_can_describe_are_refused() {
    let source = EditedSource::new(|chunks, geometry| {
        // 2^21 chunks apart: more chunk slots than a store allocates.
        chunks[2].base = Pfn(chunks[0].base.0 + (geometry.chunk_pages() << 21));
    });
    let (_, layer, err) = refused(source);
    assert!(
        matches!(
            layer,
            LayerError::Metadata(pfnstore::metadata::MetadataError::SpanTooLarge { .. })
        ),
        "{err}"
    );
}

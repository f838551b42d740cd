//! Tiny conversion domains for the metadata-level models: chunks of four pages with middle
//! blocks of two (`Geometry::new(1, 2)`), every page backed, all private.

use pfnstore_core::sync::Arc;
use pfnstore_core::{Geometry, OffsetRange, PageOffset, Pfn, PfnRange};
use pfnstore_metadata::conversion::{
    ConversionDomain, Interest, Registration, Subscriber, SubscriberRegistry,
};
use pfnstore_metadata::{FileId, MetadataStore, Shareability};

/// Pages per chunk.
pub const CHUNK: u64 = 4;

/// The file id of the first domain of a registry.
pub const FILE: FileId = FileId(1);

/// 2-page middle blocks, 4-page chunks.
pub fn geometry() -> Geometry {
    Geometry::new(1, 2).expect("1 < 2 <= 30")
}

/// Page offsets `a..b`.
pub fn pages(a: u64, b: u64) -> OffsetRange {
    OffsetRange::new(PageOffset(a), PageOffset(b)).expect("a < b")
}

/// One file's domain and the metadata behind it.
#[derive(Debug)]
pub struct Domain {
    /// The file's metadata (keyed by page offset).
    pub store: Arc<MetadataStore>,
    /// The domain (shared by the model's threads).
    pub domain: Arc<ConversionDomain>,
}

impl Domain {
    /// A domain of `chunks` chunks for `file` in `registry`, every page backed (populated
    /// through the transaction, so that plans have blocks to unmap and map) and private.
    pub fn new(registry: &std::sync::Arc<SubscriberRegistry>, file: FileId, chunks: u64) -> Domain {
        let span = PfnRange::from_len(Pfn(0), chunks * CHUNK).expect("small span");
        let store = Arc::new(MetadataStore::new(geometry(), span).expect("valid span"));
        for c in 0..chunks {
            store
                .add_chunk(Pfn(c * CHUNK), Shareability::Private)
                .expect("chunk inside the span");
        }
        let domain = Arc::new(ConversionDomain::new(
            file,
            Arc::clone(&store),
            std::sync::Arc::clone(registry),
        ));
        domain
            .populate_with(pages(0, chunks * CHUNK), &mut ())
            .expect("populating a fresh domain");
        Domain { store, domain }
    }

    /// The shareability of `page`.
    pub fn shareability(&self, page: u64) -> Shareability {
        self.store
            .attributes(Pfn(page))
            .expect("page inside the domain")
            .shareability
    }
}

/// A registry with one one-chunk domain for [`FILE`].
pub fn one_chunk() -> (std::sync::Arc<SubscriberRegistry>, Domain) {
    let registry = std::sync::Arc::new(SubscriberRegistry::new());
    let domain = Domain::new(&registry, FILE, 1);
    (registry, domain)
}

/// Registers `subscriber` for `interest`; panics if the registry refuses.
pub fn register<S: Subscriber + 'static>(
    registry: &std::sync::Arc<SubscriberRegistry>,
    subscriber: &std::sync::Arc<S>,
    interest: Interest,
) -> Registration {
    let dynamic: std::sync::Arc<dyn Subscriber> = subscriber.clone();
    registry
        .register(&dynamic, interest)
        .expect("registering outside any callback")
}

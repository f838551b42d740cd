//! The configuration a VMM gives a store.

use std::fmt;

use pfnstore_core::{Geometry, PAGE_SIZE, PageSize};

/// How a store is shaped: how much memory, in which geometry, over how many lock shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Bytes of guest memory the store manages.
    pub size_bytes: u64,
    /// Block sizes (4K/2M/1G on x86-64).
    pub geometry: Geometry,
    /// Number of lock shards of the allocator and metadata store.
    pub shards: usize,
}

/// A [`StoreConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The size is zero or not a whole number of chunks.
    #[error(
        "store size {size_bytes:#x} is not a non-zero multiple of the chunk size {chunk_bytes:#x}"
    )]
    BadSize { size_bytes: u64, chunk_bytes: u64 },
    /// No shards.
    #[error("a store needs at least one shard")]
    NoShards,
}

impl StoreConfig {
    /// A store of `size_bytes` on x86-64 geometry with one shard per available CPU.
    pub fn new(size_bytes: u64) -> Result<StoreConfig, ConfigError> {
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        let config = StoreConfig {
            size_bytes,
            geometry: Geometry::X86_64,
            shards,
        };
        config.validate()?;
        Ok(config)
    }

    /// Bytes in one chunk.
    pub fn chunk_bytes(&self) -> u64 {
        self.geometry.pages(PageSize::Size1G) * PAGE_SIZE
    }

    /// Number of chunks the store needs.
    pub fn chunks(&self) -> u64 {
        self.size_bytes / self.chunk_bytes()
    }

    /// Checks that the configuration can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let chunk_bytes = self.chunk_bytes();
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(chunk_bytes) {
            return Err(ConfigError::BadSize {
                size_bytes: self.size_bytes,
                chunk_bytes,
            });
        }
        if self.shards == 0 {
            return Err(ConfigError::NoShards);
        }
        Ok(())
    }
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.geometry;
        writeln!(
            f,
            "store size:      {} GiB ({} chunks)",
            self.size_bytes >> 30,
            self.chunks()
        )?;
        writeln!(
            f,
            "block sizes:     {} / {} / {} KiB",
            g.pages(PageSize::Size4K) * PAGE_SIZE / 1024,
            g.pages(PageSize::Size2M) * PAGE_SIZE / 1024,
            g.pages(PageSize::Size1G) * PAGE_SIZE / 1024
        )?;
        write!(f, "lock shards:     {}", self.shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_must_be_whole_chunks() {
        assert!(StoreConfig::new(2 << 30).is_ok());
        assert_eq!(
            StoreConfig::new(3 << 29),
            Err(ConfigError::BadSize {
                size_bytes: 3 << 29,
                chunk_bytes: 1 << 30
            })
        );
        assert!(matches!(
            StoreConfig::new(0),
            Err(ConfigError::BadSize { .. })
        ));
        let mut c = StoreConfig::new(1 << 30).unwrap();
        c.shards = 0;
        assert_eq!(c.validate(), Err(ConfigError::NoShards));
    }

    #[test]
    fn display_names_the_chunks() {
        let c = StoreConfig::new(4 << 30).unwrap();
        let text = c.to_string();
        assert!(text.contains("4 GiB (4 chunks)"), "{text}");
        assert!(text.contains("4 / 2048 / 1048576 KiB"), "{text}");
    }
}

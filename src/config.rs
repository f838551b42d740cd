//! How a store and its files are configured, and what configurations are refused.

use pfnstore_metadata::Shareability;

/// The most lock shards a store takes: more shards than this only spread the same memory
/// thinner (a shard is worth having per CPU that allocates at once).
pub const MAX_SHARDS: usize = 1024;

/// How a store is set up beyond its memory source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Lock shards of the allocator (default: one per CPU), 1 to [`MAX_SHARDS`].
    pub shards: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl StoreOptions {
    /// The default options with `shards` lock shards.
    pub fn with_shards(mut self, shards: usize) -> StoreOptions {
        self.shards = shards;
        self
    }

    /// Checks that the options can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.shards {
            0 => Err(ConfigError::NoShards),
            n if n > MAX_SHARDS => Err(ConfigError::TooManyShards {
                shards: n,
                max: MAX_SHARDS,
            }),
            _ => Ok(()),
        }
    }
}

/// Options a store cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No shards.
    #[error("a store needs at least one shard")]
    NoShards,
    /// More shards than [`MAX_SHARDS`].
    #[error("{shards} shards asked for; a store takes at most {max}")]
    TooManyShards {
        /// Shards asked for.
        shards: usize,
        /// The limit.
        max: usize,
    },
    /// The memory source has no chunks.
    #[error("the memory source has no memory")]
    EmptySource,
}

/// How a file is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileOptions {
    /// Size in bytes: a non-zero multiple of 4 KiB.
    pub size: u64,
    /// Shareability of every offset at creation (guest_memfd's INIT_SHARED flag).
    pub initial: Shareability,
    /// Back every offset with memory at creation, rather than on first use.
    pub populate: bool,
    /// Allow a file larger than the store's memory (it cannot all be backed at once).
    pub overcommit: bool,
}

impl FileOptions {
    /// `size` bytes, all private, backed lazily, no larger than the store.
    pub const fn new(size: u64) -> FileOptions {
        FileOptions {
            size,
            initial: Shareability::Private,
            populate: false,
            overcommit: false,
        }
    }

    /// Starts all-shared.
    pub const fn shared(mut self) -> FileOptions {
        self.initial = Shareability::Shared;
        self
    }

    /// Backs every offset at creation.
    pub const fn populated(mut self) -> FileOptions {
        self.populate = true;
        self
    }

    /// Allows the file to be larger than the store's memory.
    pub const fn overcommit(mut self) -> FileOptions {
        self.overcommit = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_counts_are_checked() {
        assert_eq!(
            StoreOptions::default().with_shards(0).validate(),
            Err(ConfigError::NoShards)
        );
        assert_eq!(
            StoreOptions::default()
                .with_shards(usize::MAX / 2)
                .validate(),
            Err(ConfigError::TooManyShards {
                shards: usize::MAX / 2,
                max: MAX_SHARDS
            })
        );
        assert!(StoreOptions::default().with_shards(3).validate().is_ok());
    }
}

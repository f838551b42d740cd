//! A fake `/sys` and `/proc` for tests of the pool logic: one node, both pools, and a run
//! directory of its own. Its "kernel" takes any `nr_hugepages` and never changes the other
//! counters by itself.

use std::path::PathBuf;

use crate::pool::{PoolId, Sysfs};

#[derive(Debug)]
pub(crate) struct FakeTree {
    pub(crate) root: PathBuf,
}

impl FakeTree {
    /// Every pool: total 4, free 3, surplus 0; the system-wide ones reserved 1.
    pub(crate) fn new(name: &str) -> FakeTree {
        let root =
            std::env::temp_dir().join(format!("pfnstore-hugetlb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let sys = root.join("sys");
        let proc = root.join("proc");
        for (dir, resv) in [
            ("kernel/mm/hugepages/hugepages-1048576kB", true),
            ("kernel/mm/hugepages/hugepages-2048kB", true),
            (
                "devices/system/node/node0/hugepages/hugepages-1048576kB",
                false,
            ),
            (
                "devices/system/node/node0/hugepages/hugepages-2048kB",
                false,
            ),
        ] {
            let d = sys.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("nr_hugepages"), "4\n").unwrap();
            std::fs::write(d.join("free_hugepages"), "3\n").unwrap();
            std::fs::write(d.join("surplus_hugepages"), "0\n").unwrap();
            if resv {
                std::fs::write(d.join("resv_hugepages"), "1\n").unwrap();
            }
        }
        std::fs::create_dir_all(sys.join("devices/system/node/node2")).unwrap();
        std::fs::create_dir_all(&proc).unwrap();
        std::fs::write(
            proc.join("meminfo"),
            "MemTotal:       24610996 kB\nMemFree: 1 kB\n",
        )
        .unwrap();
        FakeTree { root }
    }

    pub(crate) fn sysfs(&self) -> Sysfs {
        Sysfs::at(self.root.join("sys"), self.root.join("proc"))
    }

    /// Sets a counter file of a pool.
    pub(crate) fn set(&self, id: PoolId, file: &str, value: u64) {
        let dir = self.sysfs().pool_dir(id).unwrap();
        std::fs::write(dir.join(file), format!("{value}\n")).unwrap();
    }
}

impl Drop for FakeTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

//! The machine a summary was measured on, when, and at which revision.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Facts about the machine and the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Machine {
    /// CPUs this process may run on.
    pub cores: usize,
    /// `model name` of /proc/cpuinfo.
    pub cpu: String,
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// /proc/loadavg's 1, 5 and 15 minute averages before the run (as the script read them).
    pub load_before: Option<[f64; 3]>,
    /// The same after the run.
    pub load_after: Option<[f64; 3]>,
    /// The hugetlb pools when the summary was made (after the run, which gives back what it
    /// grew), smallest page first.
    pub hugetlb_pools: Vec<HugetlbPool>,
}

/// One hugetlb pool of /sys/kernel/mm/hugepages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugetlbPool {
    /// Its page size, KiB.
    pub page_kib: u64,
    /// `nr_hugepages`: pages in the pool.
    pub pages: u64,
    /// `free_hugepages`: pages not in use.
    pub free: u64,
}

/// The pools under `dir` (`/sys/kernel/mm/hugepages`): one `hugepages-<n>kB` directory each.
/// A pool whose counts cannot be read is left out.
pub fn hugetlb_pools(dir: &Path) -> Vec<HugetlbPool> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let count = |pool: &Path, name: &str| -> Option<u64> {
        std::fs::read_to_string(pool.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let mut pools: Vec<HugetlbPool> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let page_kib = name
                .to_str()?
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            let path = entry.path();
            Some(HugetlbPool {
                page_kib,
                pages: count(&path, "nr_hugepages")?,
                free: count(&path, "free_hugepages")?,
            })
        })
        .collect();
    pools.sort_by_key(|p| p.page_kib);
    pools
}

/// The pools in words: `2 MiB: 0 pages (0 free); 1 GiB: 0 pages (0 free)`.
pub fn pools_text(pools: &[HugetlbPool]) -> String {
    if pools.is_empty() {
        return "no hugetlb pools".to_string();
    }
    pools
        .iter()
        .map(|p| {
            let size = if p.page_kib >= 1 << 20 {
                format!("{} GiB", p.page_kib >> 20)
            } else if p.page_kib >= 1 << 10 {
                format!("{} MiB", p.page_kib >> 10)
            } else {
                format!("{} KiB", p.page_kib)
            };
            format!("{size}: {} pages ({} free)", p.pages, p.free)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl Machine {
    /// This machine, with the load averages the caller read (text of /proc/loadavg).
    pub fn here(load_before: Option<&str>, load_after: Option<&str>) -> Machine {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|text| cpu_model(&text))
                .unwrap_or_else(|| "unknown".to_string()),
            kernel: kernel_release(),
            load_before: load_before.and_then(load_average),
            load_after: load_after.and_then(load_average),
            hugetlb_pools: hugetlb_pools(Path::new("/sys/kernel/mm/hugepages")),
        }
    }
}

/// The first `model name` of /proc/cpuinfo's text.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    })
}

/// The three load averages of /proc/loadavg's text (`4.15 3.53 3.64 6/115 6718`).
pub fn load_average(text: &str) -> Option<[f64; 3]> {
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    Some([
        fields.next()?.ok()?,
        fields.next()?.ok()?,
        fields.next()?.ok()?,
    ])
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .or_else(|| output_of("uname", &["-r"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The revision of the working tree: `git rev-parse HEAD`, with `-dirty` when files differ
/// from it; `unknown` outside git.
pub fn git_revision() -> String {
    let Some(head) = output_of("git", &["rev-parse", "HEAD"]) else {
        return "unknown".to_string();
    };
    match output_of("git", &["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{head}-dirty"),
        _ => head,
    }
}

/// Now, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(secs)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian calendar).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    // Days to civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn hugetlb_pools_are_read() {
        let dir =
            std::env::temp_dir().join(format!("pfnstore-summary-pools-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, pages, free) in [
            ("hugepages-1048576kB", "2\n", "1\n"),
            ("hugepages-2048kB", "512\n", "512\n"),
        ] {
            let pool = dir.join(name);
            std::fs::create_dir_all(&pool).unwrap();
            std::fs::write(pool.join("nr_hugepages"), pages).unwrap();
            std::fs::write(pool.join("free_hugepages"), free).unwrap();
        }
        // Not a pool, and a pool without counts: both left out.
        std::fs::create_dir_all(dir.join("other")).unwrap();
        std::fs::create_dir_all(dir.join("hugepages-64kB")).unwrap();
        let pools = hugetlb_pools(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            pools,
            vec![
                HugetlbPool {
                    page_kib: 2048,
                    pages: 512,
                    free: 512
                },
                HugetlbPool {
                    page_kib: 1 << 20,
                    pages: 2,
                    free: 1
                },
            ]
        );
        assert_eq!(
            pools_text(&pools),
            "2 MiB: 512 pages (512 free); 1 GiB: 2 pages (1 free)"
        );
        assert_eq!(pools_text(&[]), "no hugetlb pools");
    }

    #[test]
    fn load_and_cpu_are_read() {
        assert_eq!(
            load_average("4.15 3.53 3.64 6/115 6718\n"),
            Some([4.15, 3.53, 3.64])
        );
        assert_eq!(load_average("garbage"), None);
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }
}

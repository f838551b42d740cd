//! Support for the project's own tests: reporting a test that cannot run here as *skipped*.
//!
//! Rust's test harness has no runtime skip, so a test that needs something the machine lacks
//! (root, a hugetlb pool, `/dev/kvm`) calls [`skip`] and returns. `skip` prints the reason and,
//! when the test script sets `PFNSTORE_SKIP_LOG`, appends a line to that file so that the
//! script can count the test as skipped rather than passed.

use std::io::Write;

/// The environment variable naming the file that skipped tests are recorded in.
pub const SKIP_LOG_ENV: &str = "PFNSTORE_SKIP_LOG";

/// Records that the test `test` did not run, and why. The caller returns right after.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        let line = format!("{test}\t{reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!(
                "could not record skip of {test} in {}: {e}",
                path.to_string_lossy()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn skip_appends_a_line_per_call() {
        let dir = std::env::temp_dir().join(format!("pfnstore-skip-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        let _ = std::fs::remove_file(&log);
        // The env var is process-wide; only this test in the crate touches it.
        // SAFETY: no other thread of this test binary reads or writes PFNSTORE_SKIP_LOG.
        unsafe { std::env::set_var(super::SKIP_LOG_ENV, &log) };
        super::skip("a", "first reason");
        super::skip("b", "second reason");
        // SAFETY: as above.
        unsafe { std::env::remove_var(super::SKIP_LOG_ENV) };
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "a\tfirst reason\nb\tsecond reason\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The guardian: a tiny process that gives a pool growth back if its owner dies without doing
//! so itself (see the module docs of [`crate::pool`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long a guardian whose owner died waits for the owner's pages to come free before it
/// leaves what is still owed in the ledger for [`crate::pool::reconcile`]. Pages normally come
/// free as the kernel tears the dead process down; a process that shared the memfd (a
/// vhost-user backend) holds them until it lets go.
pub const GUARDIAN_PATIENCE: Duration = Duration::from_secs(600);

/// Started by `/bin/sh -c`: checks for `flock(1)` and starts the guardian proper in the
/// background (so that it is not the owner's child and never a zombie of it), with the pipe
/// as its standard input. `$1` is the guardian's script, `$2..$4` its arguments.
///
/// The guardian ignores SIGTERM too: a service manager stopping the VMM's whole control group
/// sends SIGTERM to every process in it, and the guardian should outlive the VMM long enough to
/// give its pages back (SIGKILL still ends it; what it did not settle stays in the ledger).
const LAUNCH: &str = r#"
trap '' HUP INT PIPE
command -v flock >/dev/null 2>&1 || {
    echo "pfnstore-hugetlb: the pool guardian needs flock(1) (util-linux)" >&2
    exit 1
}
exec 3<&0
sh -c "$1" pfnstore-hugetlb-guardian "$2" "$3" "$4" 0<&3 3<&- &
"#;

/// The guardian: says it is ready (with its pid), waits on the pipe; a byte means the owner
/// settled and it stands down; end of file means the owner is gone, and it settles the ledger
/// entry `$2` under the pool lock `$1` exactly as `ledger::settle` does, retrying every 0.2 s
/// for `$3` seconds while the pages are not free. Like `ledger::settle`, an entry adopted in a
/// handover that was never confirmed (a third line `from <name>`) whose old owner still lives
/// is renamed back to the old owner's entry instead of settled.
const GUARDIAN: &str = r#"
lock=$1 entry=$2 patience=$3
trap '' HUP INT TERM PIPE
echo "ready $$"
exec >/dev/null
word=
IFS= read -r word || true
[ -n "$word" ] && exit 0
exec 9>>"$lock" || exit 1
alive() {
    a_pid=${1%%.*}
    a_rest=${1#*.}
    a_start=${a_rest%%.*}
    a_stat=$(cat "/proc/$a_pid/stat" 2>/dev/null) || return 1
    a_stat=${a_stat##*) }
    set -- $a_stat
    [ "${20:-}" = "$a_start" ]
}
settle() {
    [ -f "$entry" ] || { echo 0; return; }
    from=
    { IFS= read -r dir && read -r owed && { IFS= read -r from || :; }; } < "$entry" || { echo 0; return; }
    from=${from#from }
    ledger=${entry%/*}
    if [ -n "$from" ] && [ "$from" != "${entry##*/}" ] && [ ! -e "$ledger/$from" ] && alive "$from"; then
        if mv -f "$entry" "$ledger/$from"; then
            tmp="$ledger/.$from.tmp"
            printf '%s\n%s\n' "$dir" "$owed" > "$tmp" && mv -f "$tmp" "$ledger/$from"
        fi
        echo 0
        return
    fi
    total=$(cat "$dir/nr_hugepages") || { echo "$owed"; return; }
    free=$(cat "$dir/free_hugepages") || { echo "$owed"; return; }
    resv=0
    [ -r "$dir/resv_hugepages" ] && resv=$(cat "$dir/resv_hugepages")
    avail=$((free - resv))
    [ "$avail" -lt 0 ] && avail=0
    give=$owed
    [ "$avail" -lt "$give" ] && give=$avail
    given=0
    if [ "$give" -gt 0 ] && echo $((total - give)) > "$dir/nr_hugepages"; then
        now=$(cat "$dir/nr_hugepages")
        given=$((total - now))
        [ "$given" -gt "$give" ] && given=$give
        [ "$given" -lt 0 ] && given=0
    fi
    left=$((owed - given))
    if [ "$left" -eq 0 ]; then
        rm -f "$entry"
    else
        tmp="$ledger/.${entry##*/}.tmp"
        printf '%s\n%s\n' "$dir" "$left" > "$tmp" && mv -f "$tmp" "$entry"
    fi
    echo "$left"
}
tries=0
while :; do
    flock 9 || exit 1
    left=$(settle)
    flock -u 9
    [ "${left:-0}" -eq 0 ] && exit 0
    tries=$((tries + 1))
    [ "$tries" -ge $((patience * 5)) ] && exit 0
    sleep 0.2
done
"#;

/// The owner's end of a guardian: the write end of its pipe.
#[derive(Debug)]
pub(crate) struct Guardian {
    pid: u32,
    pipe: Option<File>,
}

impl Guardian {
    /// Starts a guardian of ledger `entry` under the pool lock file `lock`.
    pub(crate) fn spawn(lock: &Path, entry: &Path, patience: Duration) -> io::Result<Guardian> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which lives across the call.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these descriptors; nothing else owns them.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(LAUNCH)
            .arg("pfnstore-hugetlb-guardian")
            .arg(GUARDIAN)
            .arg(lock)
            .arg(entry)
            .arg(patience.as_secs().max(1).to_string())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir("/")
            .stdin(Stdio::from(read_end))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C or a group kill aimed at the VMM spares it.
            .process_group(0);
        // SAFETY: the closure runs in the forked child just before exec; it makes raw
        // close_range/fcntl system calls only (async-signal-safe, no allocation, no locks).
        unsafe {
            command.pre_exec(|| {
                close_on_exec_from(3);
                Ok(())
            });
        }
        let mut launcher = command.spawn()?;
        let mut said = String::new();
        let read = launcher
            .stdout
            .take()
            .expect("stdout is piped")
            .read_to_string(&mut said);
        let status = launcher.wait()?;
        read?;
        let pid = said
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok());
        match pid {
            Some(pid) if status.success() => Ok(Guardian {
                pid,
                pipe: Some(File::from(write_end)),
            }),
            _ => Err(io::Error::other(format!(
                "the pool guardian did not start ({status}, said {said:?})"
            ))),
        }
    }

    /// The guardian's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Tells the guardian that the owner settled its entry: it exits without touching the pool.
    pub(crate) fn stand_down(mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            // If this fails the guardian sees end of file, finds the entry gone and exits.
            let _ = pipe.write_all(b"x");
        }
    }
}

/// Marks every descriptor from `first` on close-on-exec, so that the guardian inherits none of
/// the owner's (std's own spawn-error pipe already is).
fn close_on_exec_from(first: libc::c_uint) {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors of this
    // process; it reads and writes no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        // Kernels before 5.11: one fcntl per descriptor number.
        for fd in first..4096 {
            // SAFETY: setting FD_CLOEXEC on a descriptor number that may or may not be open
            // changes nothing else (EBADF for closed ones).
            unsafe { libc::fcntl(fd as libc::c_int, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether process `pid` still exists (a zombie counts as gone).
    pub(crate) fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    }

    /// Polls `done` every 20 ms until it holds or a generous deadline passes.
    pub(crate) fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The guardian holds no descriptor but its standard ones and its lock, whatever the
    /// owner had open without close-on-exec.
    #[test]
    fn the_guardian_inherits_no_descriptor_of_its_owner() {
        let dir =
            std::env::temp_dir().join(format!("pfnstore-guardian-fds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let leaky = File::create(dir.join("leaky")).unwrap();
        // SAFETY: clears FD_CLOEXEC on a descriptor we own; no memory involved.
        unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&leaky), libc::F_SETFD, 0) };
        let entry = dir.join("1.1.1");
        let guardian = Guardian::spawn(&dir.join("lock"), &entry, Duration::from_secs(1)).unwrap();
        let pid = guardian.pid();
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut fds: Vec<u32> = fds.iter().filter_map(|f| f.parse().ok()).collect();
        fds.sort_unstable();
        assert_eq!(fds, [0, 1, 2], "guardian {pid} holds {fds:?}");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert!(!maps.contains("memfd:"), "no memory of the owner");
        guardian.stand_down();
        eventually("the guardian stands down", || !alive(pid));
        assert!(!entry.exists());
        drop(leaky);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

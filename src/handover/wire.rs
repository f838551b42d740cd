//! The handover's messages on a Unix stream socket: the snapshot with the memfd attached
//! (`SCM_RIGHTS`), and the receiver's answer.

use std::io::{self, Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use pfnstore_hugetlb::fd_passing::{recv_with_fd, send_with_fd};

/// The largest snapshot a receiver accepts (a 16 TiB store at 1 % fragmentation needs a few
/// MiB; this only guards against a corrupt length).
pub(crate) const MAX_SNAPSHOT: u64 = 1 << 30;

/// Sends `bytes`, with `fd` attached to the length that precedes them.
pub(crate) fn send(
    socket: &UnixStream,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let header = (bytes.len() as u64).to_le_bytes();
    send_with_fd(socket, &header, fd)?;
    let mut writer = socket;
    writer.write_all(bytes)?;
    writer.flush()
}

/// Receives a snapshot and the descriptor attached to it, if any.
pub(crate) fn receive(socket: &UnixStream) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut header = [0u8; 8];
    let (got, fd) = recv_with_fd(socket, &mut header)?;
    if got == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut reader = socket;
    reader.read_exact(&mut header[got..])?;
    let len = u64::from_le_bytes(header);
    if len > MAX_SNAPSHOT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a snapshot of {len} bytes announced; at most {MAX_SNAPSHOT} are accepted"),
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    reader.read_exact(&mut bytes)?;
    Ok((bytes, fd))
}

/// The receiver's answer: `Ok` once it owns the store, or why it refused.
pub(crate) fn answer(socket: &UnixStream, result: Result<(), &str>) -> io::Result<()> {
    let (status, text) = match result {
        Ok(()) => (0u8, ""),
        Err(reason) => (1u8, reason),
    };
    let mut message = vec![status];
    message.extend_from_slice(&(text.len() as u32).to_le_bytes());
    message.extend_from_slice(text.as_bytes());
    let mut writer = socket;
    writer.write_all(&message)?;
    writer.flush()
}

/// Waits for the receiver's answer: `Ok(Ok(()))` confirmed, `Ok(Err(reason))` refused.
pub(crate) fn await_answer(socket: &UnixStream) -> io::Result<Result<(), String>> {
    let mut reader = socket;
    let mut head = [0u8; 5];
    reader.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut text = vec![0u8; len.min(1 << 16)];
    reader.read_exact(&mut text)?;
    let text = String::from_utf8_lossy(&text).into_owned();
    Ok(if head[0] == 0 { Ok(()) } else { Err(text) })
}

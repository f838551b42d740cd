//! Passing a descriptor to another process over a Unix socket (`SCM_RIGHTS`): how a source's
//! memfd reaches a store's new owner (a live update) or a vhost-user backend.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Control-message space for one descriptor, in `u64`s so that the buffer is aligned for a
/// `cmsghdr`.
fn control_words() -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let bytes = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    bytes.div_ceil(size_of::<u64>())
}

/// Sends `data` over `socket`, with `fd` (if any) attached to its first byte. `data` must not
/// be empty: a descriptor travels with data.
pub fn send_with_fd(
    socket: &UnixStream,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a descriptor travels with at least one byte",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = vec![0u64; control_words()];
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() * size_of::<u64>();
        // SAFETY: msg_control points to `control`, aligned and large enough for one header
        // with one descriptor (CMSG_SPACE), so CMSG_FIRSTHDR is non-null and its data area
        // holds a RawFd; both live until sendmsg returns.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            libc::CMSG_DATA(cmsg)
                .cast::<RawFd>()
                .write_unaligned(fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` points to `iov` (which points into `data`) and to `control`, all alive
    // for the call; sendmsg only reads them.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The descriptor went with the first part; the rest is plain data.
    (&*socket).write_all(&data[sent as usize..])
}

/// Receives up to `buf.len()` bytes from `socket` and the descriptor attached to them, if any
/// (close-on-exec). Returns the bytes read (0 at end of file) and the descriptor. More than one
/// descriptor, or a truncated control message, is an error (the extra ones are closed).
pub fn recv_with_fd(socket: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = vec![0u64; control_words()];
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * size_of::<u64>();
    // SAFETY: `msg` points to `iov` (into `buf`) and `control`, alive and writable for the
    // call; recvmsg writes at most their lengths.
    let got = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: recvmsg filled `control` with `msg_controllen` bytes of well-formed headers;
    // CMSG_FIRSTHDR/NXTHDR stay inside them and CMSG_DATA of an SCM_RIGHTS header holds
    // (cmsg_len - CMSG_LEN(0)) / 4 descriptors, now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > 1 {
        return Err(io::Error::other(format!(
            "expected at most one descriptor, got {} (control data truncated: {})",
            fds.len(),
            msg.msg_flags & libc::MSG_CTRUNC != 0
        )));
    }
    Ok((got as usize, fds.pop()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HugePageSize;
    use crate::backing::MemfdFile;
    use crate::memfd::FdInfo;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn a_memfd_travels_with_its_data_and_arrives_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let memfd = MemfdFile::create(HugePageSize::Base4K, 8192).unwrap();
        send_with_fd(&a, b"hello", Some(memfd.file.as_fd())).unwrap();
        send_with_fd(&a, b" world", None).unwrap();
        let mut buf = [0u8; 5];
        let (n, fd) = recv_with_fd(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let fd = fd.expect("the descriptor came along");
        let sent = FdInfo::probe(memfd.file.as_fd()).unwrap();
        let received = FdInfo::probe(fd.as_fd()).unwrap();
        assert_eq!(
            (received.id, received.len),
            (sent.id, 8192),
            "the same file"
        );
        // SAFETY: F_GETFD reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let mut rest = [0u8; 6];
        (&b).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b" world");
        assert!(send_with_fd(&a, b"", None).is_err());
        drop(a);
        assert_eq!(recv_with_fd(&b, &mut buf).unwrap().0, 0, "end of file");
    }
}

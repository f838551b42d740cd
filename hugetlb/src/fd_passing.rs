//! Passing a file descriptor over a Unix stream socket (`SCM_RIGHTS`): how a memfd reaches
//! another process (a store handed over for a live update, a vhost-user backend).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Sends `data` (at most one `sendmsg`'s worth: what was sent is returned) with `fd`
/// attached to its first byte.
pub fn send_with_fd(
    socket: &UnixStream,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one descriptor, aligned as the kernel wants control messages.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is a valid empty message; every pointer set below points to a
    // live local (data, iov, control) that outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        let raw: RawFd = fd.as_raw_fd();
        // SAFETY: CMSG_SPACE is a pure computation on a length.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points to `control` (32 bytes, 8-aligned), at least `space`
        // bytes, so CMSG_FIRSTHDR returns a header inside it, and CMSG_DATA's int fits behind
        // it (CMSG_SPACE accounted for both).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), raw);
        }
    }
    // SAFETY: `msg` is fully initialised above and its buffers are alive; the socket fd is
    // open for the duration of the call (borrowed from `socket`). MSG_NOSIGNAL: a closed peer
    // is an EPIPE error, not a SIGPIPE.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Receives into `buf` (one `recvmsg`: the number of bytes is returned, 0 at end of stream)
/// and the descriptor attached, if any (close-on-exec, owned by the caller).
pub fn recv_with_fd(socket: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: as in `send_with_fd`: a zeroed msghdr whose pointers are set to live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` describes buffers we own for the duration of the call; MSG_CMSG_CLOEXEC
    // makes a received descriptor close-on-exec.
    let got = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fd = None;
    // SAFETY: the kernel filled `control` and set msg_controllen; CMSG_FIRSTHDR/NXTHDR walk it
    // within those bounds, and an SCM_RIGHTS message carries ints behind CMSG_DATA.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                // The kernel installed this descriptor in our table for us: we own it now.
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((got as usize, fd))
}

#[cfg(all(test, not(pfnstore_loom)))]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_descriptor_travels_with_its_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = std::fs::File::from(OwnedFd::from(rustix_like_memfd().expect("a memfd")));
        file.write_all(b"hello").unwrap();
        let sent = send_with_fd(&a, b"12345678", Some(file.as_fd())).unwrap();
        assert_eq!(sent, 8);
        let mut buf = [0u8; 8];
        let (got, fd) = recv_with_fd(&b, &mut buf).unwrap();
        assert_eq!((got, &buf), (8, b"12345678"));
        let mut received = std::fs::File::from(fd.expect("the descriptor"));
        received.seek(SeekFrom::Start(0)).unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello");
        // No descriptor attached: none received.
        send_with_fd(&a, b"x", None).unwrap();
        let (got, fd) = recv_with_fd(&b, &mut buf).unwrap();
        assert_eq!((got, fd.is_none()), (1, true));
    }

    fn rustix_like_memfd() -> io::Result<OwnedFd> {
        // SAFETY: memfd_create with a NUL-terminated name; a non-negative result is a new fd
        // we own.
        let fd =
            unsafe { libc::memfd_create(c"pfnstore-fd-passing-test".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

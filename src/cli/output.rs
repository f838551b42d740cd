//! Standard output that notices when its reader has gone (`pfnstore status | head -1`).
//!
//! Rust ignores SIGPIPE, so a write to a pipe whose reader has exited fails with EPIPE, and
//! `println!` panics on that. Commands write through [`Output`] instead: the first
//! `BrokenPipe` is returned as an error (so the command stops doing work nobody will read),
//! every later write fails at once, and `main` sees [`Output::reader_gone`] and exits with
//! status 0 and no message, as `head` expects of the commands it cuts short.

use std::io::{self, Write};

/// A writer that stops for good at the first broken pipe.
#[derive(Debug)]
pub(crate) struct Output<W> {
    inner: W,
    reader_gone: bool,
}

impl<W: Write> Output<W> {
    /// Output to `inner`.
    pub(crate) fn new(inner: W) -> Output<W> {
        Output {
            inner,
            reader_gone: false,
        }
    }

    /// Whether a write found the reader gone (EPIPE).
    pub(crate) fn reader_gone(&self) -> bool {
        self.reader_gone
    }

    fn check<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &result
            && e.kind() == io::ErrorKind::BrokenPipe
        {
            self.reader_gone = true;
        }
        result
    }

    fn gone() -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the reader of the output has gone",
        )
    }
}

impl<W: Write> Write for Output<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.reader_gone {
            return Err(Self::gone());
        }
        let result = self.inner.write(buf);
        self.check(result)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.reader_gone {
            return Err(Self::gone());
        }
        let result = self.inner.flush();
        self.check(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `room` bytes, then fails as a closed pipe does.
    struct Pipe {
        room: usize,
        written: Vec<u8>,
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn stops_for_good_at_a_broken_pipe() {
        let mut out = Output::new(Pipe {
            room: 6,
            written: Vec::new(),
        });
        writeln!(out, "first").unwrap();
        assert!(!out.reader_gone());
        let err = writeln!(out, "second").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert!(out.reader_gone());
        out.inner.room = 100;
        assert!(writeln!(out, "third").is_err());
        assert!(out.flush().is_err());
        assert_eq!(out.inner.written, b"first\n");
    }

    #[test]
    fn other_errors_are_not_a_gone_reader() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::StorageFull.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut out = Output::new(Full);
        assert!(writeln!(out, "x").is_err());
        assert!(!out.reader_gone());
    }
}

//! Accepting connections without spinning when the process is out of descriptors.
//!
//! `accept` fails at once, again and again, while the process is at its descriptor limit
//! (EMFILE) or the system is (ENFILE), or memory is short: a loop that retries at once
//! spins a core and starves everything else. [`Acceptor`] waits instead, from 5 ms doubling
//! to 500 ms while the condition lasts, and counts and logs it (once per episode). Errors
//! that concern one connection only (it was reset before accept) are skipped at once.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_PAUSE: Duration = Duration::from_millis(500);

/// Accepts from one listener, pausing while resources are exhausted.
#[derive(Debug, Default)]
pub struct Acceptor {
    pause: Option<Duration>,
    /// Times accept failed for want of descriptors or memory.
    pub exhausted: u64,
}

/// Out of descriptors or memory: waiting helps, retrying at once does not.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_codes::EMFILE | libc_codes::ENFILE | libc_codes::ENOBUFS | libc_codes::ENOMEM)
    )
}

/// The errno values, without a libc dependency (Linux numbering).
mod libc_codes {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOBUFS: i32 = 105;
}

impl Acceptor {
    pub fn new() -> Acceptor {
        Acceptor::default()
    }

    /// The next connection. Fails only when the listener itself is broken.
    pub async fn accept(&mut self, listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
        loop {
            match listener.accept().await {
                Ok(c) => {
                    if self.pause.take().is_some() {
                        tracing::info!("accepting connections again");
                    }
                    return Ok(c);
                }
                Err(e) if is_exhaustion(&e) => {
                    self.exhausted += 1;
                    let pause = match self.pause {
                        None => {
                            tracing::warn!(error = %e, "cannot accept connections: out of descriptors or memory; pausing");
                            FIRST_PAUSE
                        }
                        Some(p) => (p * 2).min(LONGEST_PAUSE),
                    };
                    self.pause = Some(pause);
                    tokio::time::sleep(pause).await;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_is_told_apart_from_other_errors() {
        for (code, exhausted) in [
            (24, true),
            (23, true),
            (105, true),
            (12, true),
            (103, false),
        ] {
            assert_eq!(
                is_exhaustion(&io::Error::from_raw_os_error(code)),
                exhausted,
                "errno {code}"
            );
        }
        assert!(!is_exhaustion(&io::Error::other("x")));
    }
}

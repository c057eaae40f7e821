//! The gateway's public listeners, claimed before pingora starts.
//!
//! Pingora binds its listeners itself, inside its runtimes, after the process has started;
//! it retries an address in use for a while and cannot report the port it got for port 0.
//! So the gateway claims each address first: [`reserve`] refuses at once an address that is
//! in use (a clear error, a non-zero exit, before anything is printed), and holds the port
//! (port 0: the one the kernel picked) with a bound socket that does not listen, marked
//! `SO_REUSEPORT` so that pingora's listener, marked the same, can bind the very same port
//! while no one else can. [`wait_listening`] then waits until pingora accepts on every
//! address; only then does the gateway print the addresses it listens on, and drop the
//! reservations.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{what} listener {addr}: the address is in use")]
    InUse {
        what: &'static str,
        addr: SocketAddr,
    },
    #[error("{what} listener {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("{what} listener {addr}: not accepting connections within {after:?}")]
    NotListening {
        what: &'static str,
        addr: SocketAddr,
        after: Duration,
    },
}

/// A claimed listening address: the port stays ours while this lives.
#[derive(Debug)]
pub struct Reserved {
    pub what: &'static str,
    /// The address with the port actually bound (never port 0).
    pub addr: SocketAddr,
    _socket: Socket,
}

fn socket(addr: SocketAddr, reuse_addr: bool, reuse_port: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(reuse_addr)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    Ok(s)
}

fn bind_error(what: &'static str, addr: SocketAddr, e: io::Error) -> ListenError {
    if e.kind() == io::ErrorKind::AddrInUse {
        ListenError::InUse { what, addr }
    } else {
        ListenError::Bind {
            what,
            addr,
            source: e,
        }
    }
}

/// Claims `addr` for the listener called `what` (`"http"`, `"tls"`): fails when anything
/// else holds it, `SO_REUSEPORT` listeners included.
pub fn reserve(what: &'static str, addr: SocketAddr) -> Result<Reserved, ListenError> {
    if addr.port() != 0 {
        // As pingora binds (SO_REUSEADDR: connections left in TIME_WAIT do not count), but
        // without SO_REUSEPORT: this fails if anyone holds the port, even another gateway
        // whose listener shares ports, which the reservation below would not notice.
        let probe = socket(addr, true, false).map_err(|e| bind_error(what, addr, e))?;
        probe
            .bind(&addr.into())
            .map_err(|e| bind_error(what, addr, e))?;
    }
    // Without SO_REUSEADDR, so that no listener with it alone can bind the port while this
    // socket holds it without listening; SO_REUSEPORT lets pingora's listener in.
    let claim = |reuse_addr: bool| -> io::Result<Socket> {
        let s = socket(addr, reuse_addr, true)?;
        s.bind(&addr.into())?;
        Ok(s)
    };
    let s = match claim(false) {
        Ok(s) => s,
        // The port is free (the probe got it) but has connections in TIME_WAIT: a weaker
        // claim, still enough against another gateway.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && addr.port() != 0 => {
            claim(true).map_err(|e| bind_error(what, addr, e))?
        }
        Err(e) => return Err(bind_error(what, addr, e)),
    };
    let bound = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| ListenError::Bind {
            what,
            addr,
            source: io::Error::other("no local address after bind"),
        })?;
    Ok(Reserved {
        what,
        addr: bound,
        _socket: s,
    })
}

/// Where to connect to reach a listener on `addr`: loopback for a wildcard address.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Waits (blocking; run it off the async threads) until a connection to every reserved
/// address is accepted, or `within` passes.
pub fn wait_listening(reserved: &[Reserved], within: Duration) -> Result<(), ListenError> {
    let deadline = Instant::now() + within;
    for r in reserved {
        let target = reachable(r.addr);
        loop {
            if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ListenError::NotListening {
                    what: r.what,
                    addr: r.addr,
                    after: within,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_gets_a_real_port_that_no_one_else_can_take() {
        let r = reserve("http", "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(r.addr.port(), 0);
        let other = std::net::TcpListener::bind(r.addr);
        assert!(
            other.is_err(),
            "a plain listener must not get a reserved port"
        );
        // Claiming the same port again, as a second gateway would, is refused.
        let again = reserve("http", r.addr).unwrap_err();
        assert!(matches!(again, ListenError::InUse { .. }), "{again}");
        assert_eq!(
            again.to_string(),
            format!("http listener {}: the address is in use", r.addr)
        );
    }

    #[test]
    fn an_address_in_use_is_refused() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = reserve("tls", addr).unwrap_err();
        assert!(
            matches!(err, ListenError::InUse { what: "tls", .. }),
            "{err}"
        );
    }

    #[test]
    fn a_reuse_port_listener_binds_the_reserved_port_and_is_waited_for() {
        let r = reserve("http", "127.0.0.1:0".parse().unwrap()).unwrap();
        let err = wait_listening(std::slice::from_ref(&r), Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, ListenError::NotListening { .. }));
        // What pingora does with so_reuseport: bind and listen on the same port.
        let s = socket(r.addr, true, true).unwrap();
        s.bind(&r.addr.into()).unwrap();
        s.listen(16).unwrap();
        wait_listening(std::slice::from_ref(&r), Duration::from_secs(5)).unwrap();
    }
}

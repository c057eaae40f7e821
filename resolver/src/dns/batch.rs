//! Batched UDP I/O for the workers: up to [`BATCH`] datagrams per system call, received
//! with `recvmmsg` and answered with `sendmmsg` (through nix's safe wrappers). Each worker
//! owns one [`Inbox`] and one [`Outbox`] and reuses their buffers for every call.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Receive buffer per datagram: queries are small; a longer one arrives cut (and is
/// answered FORMERR by the slow path).
const QUERY_BUFFER: usize = 4096;

/// Received datagrams.
pub struct Inbox {
    buffers: Vec<Vec<u8>>,
    /// (length, source) of each datagram of the last call.
    received: Vec<(usize, SocketAddr)>,
    headers: MultiHeaders<SockaddrStorage>,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            buffers: vec![vec![0u8; QUERY_BUFFER]; BATCH],
            received: Vec::with_capacity(BATCH),
            headers: MultiHeaders::preallocate(BATCH, None),
        }
    }
}

impl Inbox {
    /// Waits for at least one datagram (or the socket's read timeout), then takes every
    /// datagram already queued, up to [`BATCH`]. Returns how many arrived.
    pub fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        self.received.clear();
        let mut buffers = self.buffers.iter_mut();
        let mut slices: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
            [IoSliceMut::new(
                buffers.next().expect("BATCH buffers").as_mut_slice(),
            )]
        });
        let results = recvmmsg(
            fd,
            &mut self.headers,
            slices.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )
        .map_err(io::Error::from)?;
        for msg in results {
            // Unix-domain or unnamed sources cannot be answered: skip them.
            if let Some(src) = msg.address.as_ref().and_then(to_std) {
                self.received.push((msg.bytes, src));
            }
        }
        Ok(self.received.len())
    }

    /// The `i`th datagram of the last call, with its source.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr) {
        let (len, src) = self.received[i];
        (&self.buffers[i][..len.min(QUERY_BUFFER)], src)
    }
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Replies waiting to be sent.
pub struct Outbox {
    buffers: Vec<Vec<u8>>,
    /// (length, destination) of each reply queued so far.
    queued: Vec<(usize, SocketAddr)>,
    /// The destinations in the kernel's form, refilled by every flush.
    addresses: Vec<Option<SockaddrStorage>>,
    headers: MultiHeaders<SockaddrStorage>,
}

impl Outbox {
    /// Room for [`BATCH`] replies of up to `reply_size` bytes.
    pub fn new(reply_size: usize) -> Outbox {
        Outbox {
            buffers: vec![vec![0u8; reply_size]; BATCH],
            queued: Vec::with_capacity(BATCH),
            addresses: Vec::with_capacity(BATCH),
            headers: MultiHeaders::preallocate(BATCH, None),
        }
    }

    /// The buffer the next reply is written into.
    pub fn next_buffer(&mut self) -> &mut [u8] {
        &mut self.buffers[self.queued.len()]
    }

    /// Queues the reply written into [`Outbox::next_buffer`].
    pub fn queue(&mut self, len: usize, dst: SocketAddr) {
        self.queued.push((len, dst));
    }

    /// Sends every queued reply; replies the kernel refuses are dropped (as a lost UDP
    /// datagram would be) and counted in the returned error count.
    pub fn flush(&mut self, fd: RawFd) -> usize {
        self.addresses.clear();
        self.addresses.extend(
            self.queued
                .iter()
                .map(|&(_, dst)| Some(SockaddrStorage::from(dst))),
        );
        let mut sent = 0;
        let mut failed = 0;
        while sent < self.queued.len() {
            let pending = &self.queued[sent..];
            let mut replies = pending.iter().zip(&self.buffers[sent..]);
            let slices: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|_| {
                [IoSlice::new(
                    replies
                        .next()
                        .map_or(&[][..], |(&(len, _), buf)| &buf[..len]),
                )]
            });
            let cmsgs: [ControlMessage<'_>; 0] = [];
            match sendmmsg(
                fd,
                &mut self.headers,
                slices[..pending.len()].iter(),
                &self.addresses[sent..],
                cmsgs,
                MsgFlags::empty(),
            ) {
                Ok(results) => match results.count() {
                    0 => {
                        failed += 1;
                        sent += 1;
                    }
                    n => sent += n,
                },
                Err(e) => {
                    tracing::debug!(error = %e, "UDP send failed");
                    failed += 1;
                    sent += 1;
                }
            }
        }
        self.queued.clear();
        failed
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use super::*;

    #[test]
    fn receives_and_sends_in_batches() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for i in 0..5u8 {
            client
                .send_to(&[i; 10], server.local_addr().unwrap())
                .unwrap();
        }
        let mut inbox = Inbox::default();
        let mut got = 0;
        let mut outbox = Outbox::new(512);
        while got < 5 {
            let n = inbox.receive(server.as_raw_fd()).unwrap();
            for i in 0..n {
                let (packet, src) = inbox.get(i);
                assert_eq!(src, client.local_addr().unwrap());
                assert_eq!(packet.len(), 10);
                let reply = outbox.next_buffer();
                reply[..3].copy_from_slice(&[packet[0], 0xaa, 0xbb]);
                outbox.queue(3, src);
            }
            got += n;
        }
        assert_eq!(outbox.flush(server.as_raw_fd()), 0);
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(&buf[1..n], &[0xaa, 0xbb]);
            seen.push(buf[0]);
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }
}

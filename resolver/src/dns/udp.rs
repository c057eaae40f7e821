//! DNS over UDP: worker threads, each with its own `SO_REUSEPORT` socket on the DNS address
//! (the kernel spreads clients across them) and a large receive buffer, receiving and
//! answering in batches ([`super::batch`]). The [`FastPath`] answers queries for the zone on the spot, without a task
//! or an allocation; everything else — names to forward, unusual or malformed packets — goes
//! to the tokio runtime, where hickory parses it and the [`Handler`] answers exactly as it
//! does over TCP.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_net::xfer::Protocol;
use socket2::{Domain, Socket, Type};

use super::batch::{Inbox, Outbox};
use super::fast::{FastPath, Scratch, Verdict};
use super::reply;
use super::rrl::{self, Decision};
use super::server::Handler;
use crate::metrics::DnsLabels;
use waymark_shared::lifecycle::bounded::Admission;

/// Slow-path queries (forwarded names, unusual packets) being answered at once, at most;
/// forwarding has its own, lower bound (`dns.max_forwards`).
pub const SLOW_TASKS: usize = 4096;

/// How often a worker blocked in `recv` looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// Binds `workers` sockets (at least one) on `addr`, all on the same port (the first one
/// picks it when `addr` has port 0). Each asks for a `recv_buffer`-byte receive buffer.
pub fn bind(addr: SocketAddr, workers: usize, recv_buffer: usize) -> io::Result<Vec<UdpSocket>> {
    let first = bind_one(addr, recv_buffer)?;
    let addr = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers.max(1) {
        sockets.push(bind_one(addr, recv_buffer)?);
    }
    Ok(sockets)
}

fn bind_one(addr: SocketAddr, recv_buffer: usize) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    if recv_buffer > 0 {
        socket.set_recv_buffer_size(recv_buffer)?;
        // Linux doubles what it grants; less than asked means net.core.rmem_max is lower.
        let granted = socket.recv_buffer_size()?;
        if granted < recv_buffer {
            tracing::info!(
                asked = recv_buffer,
                granted,
                "UDP receive buffer capped by net.core.rmem_max"
            );
        }
    }
    socket.bind(&addr.into())?;
    socket.set_read_timeout(Some(STOP_CHECK))?;
    Ok(socket.into())
}

/// The running UDP workers.
pub struct UdpServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpServer {
    /// Starts one worker thread per socket. Slow-path work is spawned on `runtime`.
    pub fn start(
        sockets: Vec<UdpSocket>,
        fast: Arc<FastPath>,
        handler: Arc<Handler>,
        runtime: tokio::runtime::Handle,
    ) -> io::Result<UdpServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let slow_tasks = Admission::new(SLOW_TASKS, None);
        let mut threads = Vec::new();
        for (i, socket) in sockets.into_iter().enumerate() {
            let worker = Worker {
                socket: Arc::new(socket),
                fast: fast.clone(),
                handler: handler.clone(),
                runtime: runtime.clone(),
                stop: stop.clone(),
                slow_tasks: slow_tasks.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || worker.run());
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(UdpServer { stop, threads })
    }

    /// Stops the workers and waits for them (at most about [`STOP_CHECK`]).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

struct Worker {
    socket: Arc<UdpSocket>,
    fast: Arc<FastPath>,
    handler: Arc<Handler>,
    runtime: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    /// Slow-path tasks in flight, shared by every worker.
    slow_tasks: Arc<Admission<()>>,
}

impl Worker {
    fn run(self) {
        let fd = self.socket.as_raw_fd();
        let mut inbox = Inbox::default();
        let mut outbox = Outbox::new(self.handler.max_udp_payload.max(512) as usize);
        let mut scratch = Scratch::default();
        while !self.stop.load(Ordering::Relaxed) {
            let received = match inbox.receive(fd) {
                Ok(n) => n,
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "UDP receive failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            for i in 0..received {
                let (packet, src) = inbox.get(i);
                // Port 0 cannot be answered (and is a classic spoofing sign).
                if src.port() == 0 {
                    continue;
                }
                let out = outbox.next_buffer();
                match self.fast.answer(packet, src.ip(), &mut scratch, out) {
                    Verdict::Reply(n) => match self.handler.rrl(src.ip()) {
                        Decision::Send => outbox.queue(n, src),
                        Decision::Slip => {
                            if let Some(m) = rrl::slip(out, n) {
                                outbox.queue(m, src)
                            }
                        }
                        Decision::Drop => {}
                    },
                    Verdict::Slow => {
                        // Bounded: beyond SLOW_TASKS in flight, the packet is dropped (as
                        // a full socket buffer would), counted.
                        let Ok(ticket) = self.slow_tasks.try_admit(()) else {
                            self.handler
                                .metrics
                                .dns_queries
                                .get_or_create(&DnsLabels {
                                    proto: "udp",
                                    outcome: "dropped",
                                })
                                .inc();
                            continue;
                        };
                        let job = slow(
                            packet.to_vec(),
                            src,
                            self.socket.clone(),
                            self.handler.clone(),
                        );
                        self.runtime.spawn(async move {
                            job.await;
                            drop(ticket);
                        });
                    }
                }
            }
            outbox.flush(fd);
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// The slow path: hickory parses the packet and the handler answers it.
async fn slow(packet: Vec<u8>, src: SocketAddr, socket: Arc<UdpSocket>, handler: Arc<Handler>) {
    if let Some(mut bytes) = reply::answer(packet, src, Protocol::Udp, &handler).await {
        let full = bytes.len();
        match handler.rrl(src.ip()) {
            Decision::Send => {}
            Decision::Slip => match rrl::slip(&mut bytes, full) {
                Some(m) => bytes.truncate(m),
                None => return,
            },
            Decision::Drop => return,
        }
        // A UDP send does not block; the socket is shared with its worker thread.
        if let Err(e) = socket.send_to(&bytes, src) {
            tracing::debug!(error = %e, %src, "UDP send failed");
        }
    }
}

//! The node's one UDP socket, batched: datagrams to the same peer go out as one UDP GSO send
//! (one syscall and one trip through the kernel stack for up to 64 of them), and the receive
//! side takes many datagrams per syscall (recvmmsg, GRO-coalesced runs split by their stride).
//! quinn-udp does the socket work and falls back to one datagram per call where the kernel has
//! no GSO/GRO.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsFd;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;

/// Socket buffer size asked for in both directions.
const BUFFER_BYTES: usize = 4 << 20;
/// Largest GSO send: a UDP datagram's 64 KiB limit applies to the whole batch.
pub const MAX_BATCH_BYTES: usize = 65_000;
/// Buffers per receive call.
pub const RECV_BATCH: usize = 8;
/// Size of each receive buffer: a GRO run can be up to 64 KiB.
pub const RECV_BUF: usize = 64 * 1024;

/// A batched UDP socket.
#[derive(Debug)]
pub struct BatchSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl BatchSocket {
    /// Binds `addr`, marks it with the bypass mark (see [`crate::os_net::mark_own_socket`]:
    /// without `CAP_NET_ADMIN` it stays unmarked) and turns on GSO/GRO where the kernel has
    /// them.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let std = std::net::UdpSocket::bind(addr)?;
        // WireGuard and STUN must leave by the host's routes, never by the tunnel's table 52.
        crate::os_net::mark_own_socket(std.as_fd(), "wireguard-udp");
        std.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std).into())?;
        // Larger buffers absorb bursts; the kernel caps them at its limits.
        let _ = state.set_send_buffer_size((&std).into(), BUFFER_BYTES);
        let _ = state.set_recv_buffer_size((&std).into(), BUFFER_BYTES);
        let io = tokio::net::UdpSocket::from_std(std)?;
        Ok(Self { io, state })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Most datagrams one [`Self::send`] may carry.
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().clamp(1, 64)
    }

    /// Waits until a receive may succeed.
    pub async fn readable(&self) -> io::Result<()> {
        self.io.readable().await
    }

    /// Receives what is ready into `bufs` without waiting; `WouldBlock` when nothing is.
    pub fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.io.try_io(Interest::READABLE, || {
            self.state.recv((&self.io).into(), bufs, meta)
        })
    }

    /// Sends `contents` to `dst`: one datagram, or several of `segment` bytes each (the last
    /// may be shorter) in one GSO send. Called from the data path's sending thread, outside
    /// the runtime: when the socket's buffer is full it waits in `poll(2)` for room.
    pub fn send_blocking(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment: usize,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size: (contents.len() > segment).then_some(segment),
            src_ip: None,
        };
        loop {
            match self.state.try_send((&self.io).into(), &transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [rustix::event::PollFd::new(
                        &self.io,
                        rustix::event::PollFlags::OUT,
                    )];
                    let timeout = rustix::event::Timespec {
                        tv_sec: 1,
                        tv_nsec: 0,
                    };
                    match rustix::event::poll(&mut fds, Some(&timeout)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[tokio::test]
    async fn gso_batch_arrives_as_separate_datagrams() {
        let a = BatchSocket::bind(addr("127.0.0.1:0")).expect("bind a");
        let b = BatchSocket::bind(addr("127.0.0.1:0")).expect("bind b");
        let dst = b.local_addr().expect("addr");
        if let Some(mark) = crate::os_net::own_socket_mark() {
            let got = socket2::SockRef::from(&a.io).mark().expect("mark");
            assert_eq!(got, mark, "the UDP socket carries the bypass mark");
        }
        let mut batch = Vec::new();
        for i in 0..5u8 {
            batch.extend_from_slice(&[i; 1200]);
        }
        batch.extend_from_slice(&[9; 300]);
        a.send_blocking(dst, &batch, 1200).expect("send");
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut storage = vec![vec![0u8; RECV_BUF]; RECV_BATCH];
        let mut meta = vec![RecvMeta::default(); RECV_BATCH];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < 6 {
            tokio::time::timeout_at(deadline, b.readable())
                .await
                .unwrap_or_else(|_| panic!("only {} of 6 datagrams arrived", got.len()))
                .expect("readable");
            let mut slices: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|s| IoSliceMut::new(s)).collect();
            let n = match b.try_recv(&mut slices, &mut meta) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("recv: {e}"),
            };
            for (m, buf) in meta.iter().zip(storage.iter()).take(n) {
                for d in buf[..m.len].chunks(m.stride.max(1)) {
                    got.push(d.to_vec());
                }
            }
        }
        assert_eq!(got.len(), 6);
        assert_eq!(got[4], vec![4u8; 1200]);
        assert_eq!(got[5], vec![9u8; 300]);
    }
}

//! Who is on the other end of a connection, as the kernel tells it, so that
//! the host backend can refuse to write into files its client could not
//! write itself (`device::host`).
//!
//! - Unix socket: `SO_PEERCRED`, the uid, gid and pid of the process that
//!   connected, taken when the connection is accepted.
//! - TCP from a loopback address: the owner (uid) of the client's socket,
//!   found in `/proc/net/tcp` or `/proc/net/tcp6` as the socket whose local
//!   address is the peer's and whose remote address is ours: the identd
//!   approach, exact within this host's network namespace. Only a socket a
//!   process still holds counts (state ESTABLISHED, inode not 0): the kernel
//!   shows uid 0 for TIME_WAIT and orphaned sockets. Looked up on first use
//!   (a GPU load), off the async threads, and kept for the connection once
//!   found.
//! - Anything else is unknown, with the reason: a peer off loopback (another
//!   machine, or this one through a non-loopback address), a socket in
//!   another network namespace, a failed lookup.
//!
//! A local proxy in front of the daemon makes its own user the client: run
//! none on loopback, or listen on a unix socket.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use crate::device::ClientIdentity;

/// One connection's peer. Cheap to clone; tonic hands it to each request.
#[derive(Clone)]
pub struct Peer(Arc<Inner>);

struct Inner {
    addr: PeerAddr,
    /// Set once known; an unknown identity is looked up again next time
    /// (the failure may have been passing, e.g. out of descriptors).
    known: OnceLock<ClientIdentity>,
    /// Why a unix peer's credentials could not be read.
    unix_error: Option<String>,
}

enum PeerAddr {
    Tcp {
        peer: SocketAddr,
        local: Option<SocketAddr>,
    },
    Unix,
}

impl Peer {
    /// A TCP peer at `peer`, connected to our `local` address.
    pub fn tcp(peer: SocketAddr, local: Option<SocketAddr>) -> Self {
        Self(Arc::new(Inner {
            addr: PeerAddr::Tcp { peer, local },
            known: OnceLock::new(),
            unix_error: None,
        }))
    }

    /// The peer of a connected unix socket, from `SO_PEERCRED`.
    pub fn unix(socket: &tokio::net::UnixStream) -> Self {
        let (known, unix_error) = match socket.peer_cred() {
            Ok(cred) => (
                OnceLock::from(ClientIdentity::Known {
                    uid: cred.uid(),
                    gid: Some(cred.gid()),
                    pid: cred.pid().filter(|&pid| pid > 0),
                }),
                None,
            ),
            Err(e) => (OnceLock::new(), Some(format!("SO_PEERCRED failed: {e}"))),
        };
        Self(Arc::new(Inner {
            addr: PeerAddr::Unix,
            known,
            unix_error,
        }))
    }

    /// Who the peer is. For TCP this reads `/proc/net/tcp*` the first time:
    /// call it off the async threads.
    pub fn identity(&self) -> ClientIdentity {
        if let Some(known) = self.0.known.get() {
            return known.clone();
        }
        let identity = match &self.0.addr {
            PeerAddr::Unix => ClientIdentity::Unknown(
                self.0
                    .unix_error
                    .clone()
                    .unwrap_or_else(|| "no credentials on this unix socket".into()),
            ),
            PeerAddr::Tcp { local: None, .. } => {
                ClientIdentity::Unknown("the connection's local address is unknown".into())
            }
            PeerAddr::Tcp {
                peer,
                local: Some(local),
            } => tcp_identity(*peer, *local),
        };
        if let ClientIdentity::Known { .. } = identity {
            tracing::debug!(peer = %self, client = %identity, "peer identified");
            let _ = self.0.known.set(identity.clone());
        }
        identity
    }
}

impl Peer {
    /// Connected through the unix socket.
    pub fn is_unix(&self) -> bool {
        matches!(self.0.addr, PeerAddr::Unix)
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.addr {
            PeerAddr::Tcp { peer, .. } => write!(f, "{peer}"),
            PeerAddr::Unix => match self.0.known.get() {
                Some(identity) => write!(f, "unix socket ({identity})"),
                None => write!(f, "unix socket"),
            },
        }
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Peer({self})")
    }
}

fn tcp_identity(peer: SocketAddr, local: SocketAddr) -> ClientIdentity {
    if !peer.ip().to_canonical().is_loopback() {
        return ClientIdentity::Unknown(format!(
            "{peer} is not a loopback address, so the daemon cannot see whose socket it is"
        ));
    }
    match loopback_tcp_owner(peer, local) {
        Ok(Some(uid)) => ClientIdentity::Known {
            uid,
            gid: None,
            pid: None,
        },
        Ok(None) => ClientIdentity::Unknown(format!(
            "no socket of this network namespace is connected from {peer} to {local} \
             (a client in another namespace, or one that closed its connection)"
        )),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot read /proc/net/tcp to identify a client");
            ClientIdentity::Unknown(format!("reading /proc/net/tcp failed: {e}"))
        }
    }
}

/// The uid owning the socket connected from `peer` to `local`, both on
/// this host, from `/proc/net/tcp` and `/proc/net/tcp6`. `None` when no
/// socket a process holds matches.
pub fn loopback_tcp_owner(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<u32>> {
    let (peer, local) = (canonical(peer), canonical(local));
    // An IPv4 client's socket is in `tcp` even when we accepted it on a
    // dual-stack IPv6 socket, so search both whatever the family.
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(uid) = find_owner(&text, peer, local) {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// `TCP_ESTABLISHED` in `/proc/net/tcp`'s `st` column.
const ESTABLISHED: u8 = 0x01;

/// The uid of the established socket bound to `peer` and connected to
/// `local` in a `/proc/net/tcp{,6}` table.
fn find_owner(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st queues timer retrnsmt uid timeout inode ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (ours, theirs) = (
            parse_address(fields.get(1)?)?,
            parse_address(fields.get(2)?)?,
        );
        let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
        let uid: u32 = fields.get(7)?.parse().ok()?;
        let inode: u64 = fields.get(9)?.parse().ok()?;
        (ours == peer && theirs == local && state == ESTABLISHED && inode != 0).then_some(uid)
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit
/// word is printed as the kernel holds it in memory, i.e. in host order.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(canonical(SocketAddr::new(ip, port)))
}

/// IPv4-mapped IPv6 addresses as plain IPv4, so both tables compare alike.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> u32 {
        rustix::process::getuid().as_raw()
    }

    #[test]
    fn a_loopback_tcp_pair_resolves_to_this_user() {
        for bind in ["127.0.0.1:0", "[::1]:0", "[::]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(bind) else {
                eprintln!("skipping {bind}: cannot bind here");
                continue;
            };
            let port = listener.local_addr().unwrap().port();
            // Through [::] an IPv4 client arrives as ::ffff:127.0.0.1.
            let target = if bind == "[::1]:0" {
                format!("[::1]:{port}")
            } else {
                format!("127.0.0.1:{port}")
            };
            // With net.ipv6.bindv6only=1, [::] takes no IPv4 clients.
            let Ok(_client) = std::net::TcpStream::connect(&target) else {
                eprintln!("skipping {bind}: {target} cannot reach it here");
                continue;
            };
            let (server, peer) = listener.accept().unwrap();
            let local = server.local_addr().unwrap();
            assert_eq!(
                loopback_tcp_owner(peer, local).unwrap(),
                Some(me()),
                "{bind}"
            );
            let identity = Peer::tcp(peer, Some(local)).identity();
            assert_eq!(
                identity,
                ClientIdentity::Known {
                    uid: me(),
                    gid: None,
                    pid: None
                },
                "{bind}"
            );
        }
    }

    #[test]
    fn a_closed_client_or_a_remote_one_is_unknown() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        drop(client);
        // The client's socket is gone (or TIME_WAIT / orphaned, shown as uid 0).
        let after = Peer::tcp(peer, Some(local)).identity();
        assert!(matches!(after, ClientIdentity::Unknown(_)), "{after}");

        let remote: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        match Peer::tcp(remote, Some(local)).identity() {
            ClientIdentity::Unknown(why) => assert!(why.contains("not a loopback"), "{why}"),
            known => panic!("{known}"),
        }
    }

    #[tokio::test]
    async fn a_unix_socketpair_resolves_to_this_process() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let peer = Peer::unix(&a);
        assert_eq!(
            peer.identity(),
            ClientIdentity::Known {
                uid: rustix::process::geteuid().as_raw(),
                gid: Some(rustix::process::getegid().as_raw()),
                pid: Some(std::process::id() as i32),
            }
        );
        assert!(peer.to_string().starts_with("unix socket (uid "), "{peer}");
    }

    #[test]
    fn parses_proc_net_tcp_and_skips_sockets_no_process_holds() {
        // 127.0.0.1:40000 -> 127.0.0.1:8073 three times: TIME_WAIT and an
        // orphan (inode 0) show uid 0 and must not count; the live one does.
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F89 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:1F89 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   2: 0100007F:9C40 0100007F:1F89 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:9C40 0100007F:1F89 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 20 4 30 10 -1
";
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8073".parse().unwrap();
        assert_eq!(find_owner(v4, peer, local), Some(1000));
        assert_eq!(
            find_owner(&v4.replace("  1000 ", "     0 ")[..], peer, local),
            Some(0)
        );
        let without_live: String = v4.lines().take(4).map(|l| format!("{l}\n")).collect();
        assert_eq!(find_owner(&without_live, peer, local), None);
        // Mapped addresses compare as IPv4.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(find_owner(v4, canonical(mapped), local), Some(1000));

        // ::1 port 40000 -> ::1 port 8073 in tcp6's word-wise host order.
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:1F89 01 00000000:00000000 00:00000000 00000000  1001        0 777 1 0000000000000000 20 4 30 10 -1
";
        if cfg!(target_endian = "little") {
            let peer: SocketAddr = "[::1]:40000".parse().unwrap();
            let local: SocketAddr = "[::1]:8073".parse().unwrap();
            assert_eq!(find_owner(v6, peer, local), Some(1001));
        }
        for bad in ["", "garbage", "0: zz:1 00:00 01 x x x 5 0 1"] {
            assert_eq!(find_owner(&format!("header\n{bad}\n"), peer, local), None);
        }
    }
}

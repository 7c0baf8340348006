//! Recovering the address an agent dialled before iptables redirected it to the tagger, through
//! netfilter's `SO_ORIGINAL_DST` socket option (conntrack's record of the pre-NAT tuple).
//!
//! This is the crate's only `unsafe`: two `getsockopt` calls, each filling a plain C struct.

#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

/// Asks conntrack for the original destination of the accepted connection `socket`, whose
/// local address is `local`.
///
/// An IPv4 connection (also one accepted on a dual-stack IPv6 socket, whose local address is
/// then IPv4-mapped) is looked up with `SOL_IP`/`SO_ORIGINAL_DST`; an IPv6 one with
/// `SOL_IPV6`/`IP6T_SO_ORIGINAL_DST`.
///
/// # Errors
/// The `getsockopt` error: typically `ENOENT` when conntrack has no entry for the connection
/// (it was not redirected, or conntrack is not loaded).
///
/// # Caveats
/// When conntrack tracks the connection but no NAT happened, the answer is `local` itself;
/// the caller must treat that as "not redirected".
pub fn original_destination(socket: &impl AsFd, local: SocketAddr) -> io::Result<SocketAddr> {
    let is_v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    if is_v4 {
        original_destination_v4(socket).map(SocketAddr::V4)
    } else {
        original_destination_v6(socket).map(SocketAddr::V6)
    }
}

fn original_destination_v4(socket: &impl AsFd) -> io::Result<SocketAddrV4> {
    let mut addr = libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    let mut len = socklen_of::<libc::sockaddr_in>();
    // SAFETY: the fd is borrowed from a live socket for the whole call (`AsFd`); `addr` is a
    // valid, writable `sockaddr_in` and `len` holds its exact size, so the kernel writes at
    // most `len` bytes into memory we own and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len != socklen_of::<libc::sockaddr_in>() || i32::from(addr.sin_family) != libc::AF_INET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "SO_ORIGINAL_DST returned family {} and length {len}, expected AF_INET",
                addr.sin_family
            ),
        ));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

fn original_destination_v6(socket: &impl AsFd) -> io::Result<SocketAddrV6> {
    let mut addr = libc::sockaddr_in6 {
        sin6_family: 0,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
        sin6_scope_id: 0,
    };
    let mut len = socklen_of::<libc::sockaddr_in6>();
    // SAFETY: as above, with a valid, writable `sockaddr_in6` and its exact size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_IPV6,
            libc::IP6T_SO_ORIGINAL_DST,
            (&raw mut addr).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len != socklen_of::<libc::sockaddr_in6>() || i32::from(addr.sin6_family) != libc::AF_INET6 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "IP6T_SO_ORIGINAL_DST returned family {} and length {len}, expected AF_INET6",
                addr.sin6_family
            ),
        ));
    }
    Ok(SocketAddrV6::new(
        Ipv6Addr::from(addr.sin6_addr.s6_addr),
        u16::from_be(addr.sin6_port),
        u32::from_be(addr.sin6_flowinfo),
        addr.sin6_scope_id,
    ))
}

fn socklen_of<T>() -> libc::socklen_t {
    // Socket address structs are a few dozen bytes; this cannot truncate.
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_has_no_original_destination() {
        // Not a tracked connection: the kernel must answer with an error, not garbage.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        assert!(original_destination(&listener, local).is_err());
    }

    #[test]
    fn an_unredirected_connection_is_not_misread() {
        // Either conntrack is absent (error) or it reports the connection's own address.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(local).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        match original_destination(&accepted, local) {
            Ok(addr) => assert_eq!(addr, local),
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
    }
}

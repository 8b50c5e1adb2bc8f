//! PROXY protocol version 2 headers (HAProxy's `proxy-protocol.txt`, section 2.2), TCP only.
//!
//! Layout of the header [`encode_v2`] writes:
//!
//! | bytes | content |
//! |---|---|
//! | 0..12 | signature `\r\n\r\n\0\r\nQUIT\n` |
//! | 12 | version 2, command PROXY: `0x21` |
//! | 13 | family and transport: `0x11` (TCP over IPv4) or `0x21` (TCP over IPv6) |
//! | 14..16 | length of the address block, big endian: 12 (IPv4) or 36 (IPv6) |
//! | 16.. | source address, destination address, source port, destination port (network order) |
//!
//! When the two addresses are of different families (not possible on Ferry's `IPV6_V6ONLY`
//! frontends, but allowed by the types), the IPv4 one is written as an IPv4-mapped IPv6 address,
//! as the specification recommends. No TLVs are written.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
pub const VERSION_COMMAND_PROXY: u8 = 0x21;
/// `AF_INET` + `STREAM`.
pub const TCP_OVER_IPV4: u8 = 0x11;
/// `AF_INET6` + `STREAM`.
pub const TCP_OVER_IPV6: u8 = 0x21;
/// Length of the longest header [`encode_v2`] writes (IPv6): 16 + 36 bytes.
pub const MAX_LEN: usize = 52;

/// Writes the v2 header of a TCP connection from `src` (the client) to `dst` (the address the
/// client connected to) into `out`; returns its length (28 for IPv4, 52 for IPv6).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr, out: &mut [u8; MAX_LEN]) -> usize {
    out[..12].copy_from_slice(&SIGNATURE);
    out[12] = VERSION_COMMAND_PROXY;
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out[13] = TCP_OVER_IPV4;
            out[14..16].copy_from_slice(&12u16.to_be_bytes());
            out[16..20].copy_from_slice(&s.octets());
            out[20..24].copy_from_slice(&d.octets());
            out[24..26].copy_from_slice(&src.port().to_be_bytes());
            out[26..28].copy_from_slice(&dst.port().to_be_bytes());
            28
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out[13] = TCP_OVER_IPV6;
            out[14..16].copy_from_slice(&36u16.to_be_bytes());
            out[16..32].copy_from_slice(&v6(s).octets());
            out[32..48].copy_from_slice(&v6(d).octets());
            out[48..50].copy_from_slice(&src.port().to_be_bytes());
            out[50..52].copy_from_slice(&dst.port().to_be_bytes());
            52
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(src: &str, dst: &str) -> Vec<u8> {
        let mut buf = [0u8; MAX_LEN];
        let n = encode_v2(src.parse().expect("src"), dst.parse().expect("dst"), &mut buf);
        buf[..n].to_vec()
    }

    #[test]
    fn ipv4_layout() {
        let h = encode("192.0.2.1:51234", "10.96.0.10:80");
        let mut want = vec![0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        want.extend_from_slice(&[192, 0, 2, 1, 10, 96, 0, 10]);
        want.extend_from_slice(&[0xc8, 0x22, 0x00, 0x50]); // 51234, 80
        assert_eq!(h, want);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn ipv6_layout() {
        let h = encode("[2001:db8::1]:443", "[fd00::a]:8443");
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&h[12..16], &[0x21, 0x21, 0x00, 0x24]);
        let src: std::net::Ipv6Addr = "2001:db8::1".parse().expect("v6");
        let dst: std::net::Ipv6Addr = "fd00::a".parse().expect("v6");
        assert_eq!(&h[16..32], &src.octets());
        assert_eq!(&h[32..48], &dst.octets());
        assert_eq!(&h[48..52], &[0x01, 0xbb, 0x20, 0xfb]); // 443, 8443
        assert_eq!(h.len(), 52);
    }

    #[test]
    fn mixed_families_use_mapped_ipv6() {
        let h = encode("192.0.2.1:1", "[fd00::a]:2");
        assert_eq!(h[13], TCP_OVER_IPV6);
        let mapped = std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped();
        assert_eq!(&h[16..32], &mapped.octets());
        assert_eq!(h.len(), 52);
    }
}

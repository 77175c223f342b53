//! IPv6 frames for the tests: headers, TCP/UDP/ICMPv6 with their checksums (over the
//! IPv6 pseudo-header, RFC 8200 8.1), extension headers, the tunnel kinds the balancer
//! sends (6in6, 4in6, 6in4), and a checker that verifies every checksum of a frame,
//! through any nesting of those tunnels.
//!
//! Functions rather than a builder: each returns the bytes of one layer, and the
//! caller stacks them (`eth(.., &ipv6(.., &tcp6(..)))`), so a test can put anything
//! anywhere (a wrong length, an extension header, garbage).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

use anyhow::{Context as _, bail, ensure};

use crate::packet::{ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_IPIP, internet_checksum};

/// IPv6 in IP (6in6, 6in4).
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;
/// Extension headers.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_DEST: u8 = 60;
pub const NEXTHDR_NONE: u8 = 59;
pub const IPV6_HLEN: usize = 40;

/// An Ethernet frame (with one 802.1Q tag when `vlan` is set).
pub fn eth(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(vid) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The 40-byte IPv6 header.
pub fn ipv6_header(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    nexthdr: u8,
    payload_len: u16,
    tc: u8,
    hop_limit: u8,
) -> [u8; IPV6_HLEN] {
    let mut h = [0u8; IPV6_HLEN];
    h[0] = 0x60 | (tc >> 4);
    h[1] = tc << 4;
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = nexthdr;
    h[7] = hop_limit;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

/// An IPv6 packet: header (payload length from `payload`) and payload.
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    nexthdr: u8,
    tc: u8,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("payload fits");
    let mut p = ipv6_header(src, dst, nexthdr, len, tc, hop_limit).to_vec();
    p.extend_from_slice(payload);
    p
}

/// The checksum of an upper-layer `segment` over the IPv6 pseudo-header.
pub fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, nexthdr: u8, segment: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(40 + segment.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&(segment.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, nexthdr]);
    data.extend_from_slice(segment);
    internet_checksum(&data)
}

/// A TCP segment (20-byte header, window 65535) from `src` to `dst`, checksummed.
pub fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, flags: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&src.port().to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    t.extend_from_slice(payload);
    let c = checksum6(*src.ip(), *dst.ip(), crate::packet::IPPROTO_TCP, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A UDP datagram from `src` to `dst`, checksummed.
pub fn udp6(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("fits");
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&src.port().to_be_bytes());
    u[2..4].copy_from_slice(&dst.port().to_be_bytes());
    u[4..6].copy_from_slice(&len.to_be_bytes());
    u.extend_from_slice(payload);
    let mut c = checksum6(*src.ip(), *dst.ip(), crate::packet::IPPROTO_UDP, &u);
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// An ICMPv6 message (`rest`: the 4 bytes after the checksum), checksummed.
pub fn icmp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum6(src, dst, IPPROTO_ICMPV6, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A generic extension header (hop-by-hop, routing, destination options) of 8 bytes:
/// next header, length 0, and 6 bytes of padding (PadN).
pub fn ext_header(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// A fragment header (`offset` in 8-byte units, more-fragments flag, identification).
pub fn fragment_header(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// The IPv4 header (20 bytes, id 0, no flags, TTL 64) of a tunnel carrying `inner`
/// with `protocol`, checksummed, followed by `inner`.
pub fn ipv4_tunnel(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, tos: u8, inner: &[u8]) -> Vec<u8> {
    let tot = u16::try_from(20 + inner.len()).expect("fits");
    let mut h = vec![0x45, tos];
    h.extend_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 64, protocol, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = internet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(inner);
    h
}

/// A GUE datagram over IPv6 (variant 1: the inner IP packet right after the UDP header)
/// from `src`:`sport` to `dst`:`dport`, with its UDP checksum over the IPv6 pseudo
/// header (required over IPv6; a computed 0 is sent as 0xffff).
pub fn gue6_udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, inner: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + inner.len()).expect("fits");
    let mut u = Vec::with_capacity(8 + inner.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(inner);
    let mut c = checksum6(src, dst, crate::packet::IPPROTO_UDP, &u);
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// The IP packet of an Ethernet frame (after at most one VLAN tag): EtherType and bytes.
pub fn l3_of(frame: &[u8]) -> anyhow::Result<(u16, &[u8])> {
    ensure!(frame.len() >= 14, "frame of {} bytes", frame.len());
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let mut off = 14;
    if ethertype == ETH_P_8021Q {
        ensure!(frame.len() >= 18, "tagged frame of {} bytes", frame.len());
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        off = 18;
    }
    Ok((ethertype, &frame[off..]))
}

/// Checks every checksum in `frame`: IPv4 header checksums, TCP, UDP and ICMPv6
/// checksums over IPv6 (and TCP/UDP over IPv4 through `packet::check_checksums`'s
/// rules: the IPv4 header), through tunnels of IPv4/IPv6 in IPv4/IPv6; and that every
/// length field matches what follows.
pub fn check_checksums6(frame: &[u8]) -> anyhow::Result<()> {
    let (ethertype, l3) = l3_of(frame)?;
    match ethertype {
        ETH_P_IPV4 => check_ip(4, l3),
        ETH_P_IPV6 => check_ip(6, l3),
        t => bail!("EtherType {t:#06x} is not IP"),
    }
}

fn check_ip(version: u8, p: &[u8]) -> anyhow::Result<()> {
    ensure!(
        !p.is_empty() && p[0] >> 4 == version,
        "not an IPv{version} header"
    );
    if version == 4 {
        ensure!(p.len() >= 20, "IPv4 header cut short");
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let tot = usize::from(u16::from_be_bytes([p[2], p[3]]));
        ensure!(
            tot == p.len(),
            "IPv4 total length {tot}, {} bytes follow",
            p.len()
        );
        ensure!(internet_checksum(&p[..ihl]) == 0, "IPv4 header checksum");
        return match p[9] {
            IPPROTO_IPIP => check_ip(4, &p[ihl..]),
            IPPROTO_IPV6 => check_ip(6, &p[ihl..]),
            // GUE (UDP checksum 0, allowed over IPv4): check the inner packet instead.
            17 if p.len() >= ihl + 8 + 20
                && p[ihl + 6..ihl + 8] == [0, 0]
                && matches!(p[ihl + 8] >> 4, 4 | 6) =>
            {
                check_ip(p[ihl + 8] >> 4, &p[ihl + 8..])
            }
            // UDP over IPv4 without a checksum (0: allowed, RFC 768).
            17 if p.len() >= ihl + 8 && p[ihl + 6..ihl + 8] == [0, 0] => Ok(()),
            proto @ (6 | 17) => {
                let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
                let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
                // l4_checksum maps a verifying UDP sum of 0 to 0xffff.
                let c = crate::packet::l4_checksum(src, dst, proto, &p[ihl..]);
                ensure!(
                    c == 0 || (proto == 17 && c == 0xffff),
                    "TCP/UDP checksum over IPv4"
                );
                Ok(())
            }
            1 => {
                ensure!(internet_checksum(&p[ihl..]) == 0, "ICMP checksum");
                Ok(())
            }
            _ => Ok(()),
        };
    }
    ensure!(p.len() >= IPV6_HLEN, "IPv6 header cut short");
    let payload = usize::from(u16::from_be_bytes([p[4], p[5]]));
    ensure!(
        IPV6_HLEN + payload == p.len(),
        "IPv6 payload length {payload}, {} bytes follow",
        p.len() - IPV6_HLEN
    );
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).context("src")?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).context("dst")?);
    let rest = &p[IPV6_HLEN..];
    match p[6] {
        IPPROTO_IPIP => check_ip(4, rest),
        IPPROTO_IPV6 => check_ip(6, rest),
        // GUE over IPv6 (to a GUE port of the tests: 6080, 7080): the UDP checksum is
        // required (RFC 8200 8.1) and must verify over the whole datagram; then the
        // inner packet.
        17 if rest.len() >= 8 + 20
            && matches!(u16::from_be_bytes([rest[2], rest[3]]), 6080 | 7080)
            && matches!(rest[8] >> 4, 4 | 6) =>
        {
            ensure!(rest[6..8] != [0, 0], "GUE over IPv6 without a UDP checksum");
            ensure!(
                checksum6(src, dst, 17, rest) == 0,
                "UDP checksum of GUE over IPv6"
            );
            ensure!(
                usize::from(u16::from_be_bytes([rest[4], rest[5]])) == rest.len(),
                "UDP length of GUE over IPv6"
            );
            check_ip(rest[8] >> 4, &rest[8..])
        }
        nh @ (6 | 17 | IPPROTO_ICMPV6) => {
            ensure!(
                checksum6(src, dst, nh, rest) == 0,
                "checksum of next header {nh} over IPv6"
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

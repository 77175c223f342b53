//! Packets for fixture tests: a builder for input frames and a decoder for output frames.
//!
//! - [`PacketBuilder`]: Ethernet (optionally one 802.1Q tag), IPv4 (options, DF/MF,
//!   fragment offset, a `tot_len` or checksum override for malformed input) and TCP,
//!   UDP or raw payload, with correct IPv4 header and TCP/UDP checksums unless overridden.
//! - [`Frame`], [`Ipv4Packet`], [`TcpSegment`], [`UdpDatagram`]: decoded views that copy
//!   the fields out, so an output frame (for example an IPIP-encapsulated one) can be
//!   checked field by field; [`Ipv4Packet::inner_ipv4`] opens a tunnel.
//! - [`internet_checksum`] and [`check_checksums`]: RFC 1071 checksums and a one-call
//!   verification of every checksum in a frame, tunnels included.
//!
//! Multi-byte fields are host integers here; the wire order (big endian) is handled
//! only inside this module.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context as _, bail, ensure};

/// EtherType of IPv4.
pub const ETH_P_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of IP-in-IP (IPv4 inside IPv4).
pub const IPPROTO_IPIP: u8 = 4;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Length of an Ethernet header without VLAN tag.
pub const ETH_HLEN: usize = 14;
/// Length of an IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// Length of a TCP header without options.
pub const TCP_HLEN: usize = 20;
/// Length of a UDP header.
pub const UDP_HLEN: usize = 8;

/// TCP flag bits, as in the header's flags byte.
pub mod tcp_flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push function.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer field significant.
    pub const URG: u8 = 0x20;
}

/// Default source MAC of built frames (locally administered).
pub const DEFAULT_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Default destination MAC of built frames (locally administered).
pub const DEFAULT_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The transport part of a built packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP header (no options) before the payload.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number.
        ack: u32,
        /// Flags byte, see [`tcp_flags`].
        flags: u8,
        /// Receive window.
        window: u16,
    },
    /// A UDP header before the payload.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// No transport header: the payload follows the IPv4 header directly (use this for
    /// non-first fragments, ICMP or tunnels), with this protocol number.
    Raw {
        /// The IPv4 protocol field.
        protocol: u8,
    },
}

impl L4 {
    /// The IPv4 protocol number this transport is carried with.
    pub fn protocol(&self) -> u8 {
        match self {
            Self::Tcp { .. } => IPPROTO_TCP,
            Self::Udp { .. } => IPPROTO_UDP,
            Self::Raw { protocol } => *protocol,
        }
    }
}

/// Builds an Ethernet/IPv4/TCP|UDP frame with correct checksums, field by field.
///
/// ```
/// use xdplb_tests::packet::{PacketBuilder, tcp_flags};
/// let frame = PacketBuilder::tcp("198.18.0.2:40000".parse().unwrap(), "198.18.100.1:80".parse().unwrap())
///     .flags(tcp_flags::SYN)
///     .build();
/// xdplb_tests::packet::check_checksums(&frame).unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketBuilder {
    /// Ethernet source.
    pub src_mac: [u8; 6],
    /// Ethernet destination.
    pub dst_mac: [u8; 6],
    /// One 802.1Q tag with this VLAN id (PCP and DEI 0), if set.
    pub vlan: Option<u16>,
    /// IPv4 source.
    pub src: Ipv4Addr,
    /// IPv4 destination.
    pub dst: Ipv4Addr,
    /// Type of service byte (DSCP and ECN).
    pub tos: u8,
    /// Identification.
    pub id: u16,
    /// Don't-fragment flag.
    pub dont_fragment: bool,
    /// More-fragments flag.
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units (13 bits).
    pub fragment_offset: u16,
    /// Time to live.
    pub ttl: u8,
    /// IPv4 options, padded with zero bytes (end of options) to a multiple of 4; at most 40.
    pub options: Vec<u8>,
    /// Writes this into `tot_len` instead of the real length (the frame stays as built).
    pub tot_len: Option<u16>,
    /// Writes this IPv4 header checksum instead of the correct one.
    pub ip_checksum: Option<u16>,
    /// The transport header.
    pub l4: L4,
    /// Writes this TCP/UDP checksum instead of the correct one.
    pub l4_checksum: Option<u16>,
    /// Bytes after the transport header.
    pub payload: Vec<u8>,
}

impl PacketBuilder {
    /// An IPv4 packet from `src` to `dst` carrying `l4`; DF set, TTL 64.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            src_mac: DEFAULT_SRC_MAC,
            dst_mac: DEFAULT_DST_MAC,
            vlan: None,
            src,
            dst,
            tos: 0,
            id: 0x1234,
            dont_fragment: true,
            more_fragments: false,
            fragment_offset: 0,
            ttl: 64,
            options: Vec::new(),
            tot_len: None,
            ip_checksum: None,
            l4,
            l4_checksum: None,
            payload: Vec::new(),
        }
    }

    /// A TCP segment (flags ACK, seq 1, window 65535) from `src` to `dst`.
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        let l4 = L4::Tcp {
            sport: src.port(),
            dport: dst.port(),
            seq: 1,
            ack: 0,
            flags: tcp_flags::ACK,
            window: 65535,
        };
        Self::new(*src.ip(), *dst.ip(), l4)
    }

    /// A UDP datagram from `src` to `dst`.
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self::new(
            *src.ip(),
            *dst.ip(),
            L4::Udp {
                sport: src.port(),
                dport: dst.port(),
            },
        )
    }

    /// An IPv4 packet with protocol `protocol` and no transport header.
    pub fn raw(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Self {
        Self::new(src, dst, L4::Raw { protocol })
    }

    /// Sets both MAC addresses.
    #[must_use]
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Adds an 802.1Q tag with VLAN id `vid`.
    #[must_use]
    pub fn vlan(mut self, vid: u16) -> Self {
        self.vlan = Some(vid);
        self
    }

    /// Sets the TTL.
    #[must_use]
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the type-of-service byte.
    #[must_use]
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    /// Sets the identification field.
    #[must_use]
    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    /// Sets the DF flag, the MF flag and the fragment offset (8-byte units).
    #[must_use]
    pub fn fragment(mut self, dont_fragment: bool, more_fragments: bool, offset: u16) -> Self {
        self.dont_fragment = dont_fragment;
        self.more_fragments = more_fragments;
        self.fragment_offset = offset;
        self
    }

    /// Sets the IPv4 options (padded to a multiple of 4 bytes when built).
    #[must_use]
    pub fn options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self
    }

    /// Overrides the `tot_len` field.
    #[must_use]
    pub fn tot_len(mut self, tot_len: u16) -> Self {
        self.tot_len = Some(tot_len);
        self
    }

    /// Overrides the IPv4 header checksum.
    #[must_use]
    pub fn ip_checksum(mut self, checksum: u16) -> Self {
        self.ip_checksum = Some(checksum);
        self
    }

    /// Overrides the TCP/UDP checksum.
    #[must_use]
    pub fn l4_checksum(mut self, checksum: u16) -> Self {
        self.l4_checksum = Some(checksum);
        self
    }

    /// Sets the TCP flags (no effect on UDP or raw packets).
    #[must_use]
    pub fn flags(mut self, new_flags: u8) -> Self {
        if let L4::Tcp { flags, .. } = &mut self.l4 {
            *flags = new_flags;
        }
        self
    }

    /// Sets the TCP sequence and acknowledgment numbers (no effect on UDP or raw).
    #[must_use]
    pub fn seq_ack(mut self, new_seq: u32, new_ack: u32) -> Self {
        if let L4::Tcp { seq, ack, .. } = &mut self.l4 {
            *seq = new_seq;
            *ack = new_ack;
        }
        self
    }

    /// Sets the payload after the transport header.
    #[must_use]
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// The whole frame: Ethernet header, optional VLAN tag, IPv4 packet.
    pub fn build(&self) -> Vec<u8> {
        let ip = self.build_ipv4();
        let mut frame = Vec::with_capacity(ETH_HLEN + 4 + ip.len());
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        if let Some(vid) = self.vlan {
            frame.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
        }
        frame.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame
    }

    /// The IPv4 packet alone (what a tunnel carries inside).
    ///
    /// # Panics
    /// If the options are longer than 40 bytes or the packet longer than 65535 bytes.
    pub fn build_ipv4(&self) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        assert!(options.len() <= 40, "IPv4 options are at most 40 bytes");
        let l4 = self.build_l4();
        let header_len = IPV4_HLEN + options.len();
        let total = header_len + l4.len();
        let total_u16 = u16::try_from(total).expect("IPv4 packet longer than 65535 bytes");
        let ihl = u8::try_from(header_len / 4).expect("ihl fits");
        let flags_frag = (u16::from(self.dont_fragment) << 14)
            | (u16::from(self.more_fragments) << 13)
            | (self.fragment_offset & 0x1fff);
        let mut p = Vec::with_capacity(total);
        p.push(0x40 | ihl);
        p.push(self.tos);
        p.extend_from_slice(&self.tot_len.unwrap_or(total_u16).to_be_bytes());
        p.extend_from_slice(&self.id.to_be_bytes());
        p.extend_from_slice(&flags_frag.to_be_bytes());
        p.push(self.ttl);
        p.push(self.l4.protocol());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&options);
        let csum = self.ip_checksum.unwrap_or_else(|| internet_checksum(&p));
        p[10..12].copy_from_slice(&csum.to_be_bytes());
        p.extend_from_slice(&l4);
        p
    }

    /// Transport header and payload, with the checksum filled in.
    fn build_l4(&self) -> Vec<u8> {
        let mut seg = Vec::new();
        let checksum_at = match self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                window,
            } => {
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&seq.to_be_bytes());
                seg.extend_from_slice(&ack.to_be_bytes());
                seg.push(((TCP_HLEN / 4) as u8) << 4);
                seg.push(flags);
                seg.extend_from_slice(&window.to_be_bytes());
                seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                Some(16)
            }
            L4::Udp { sport, dport } => {
                let len = u16::try_from(UDP_HLEN + self.payload.len()).expect("UDP datagram fits");
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&len.to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
                Some(6)
            }
            L4::Raw { .. } => None,
        };
        seg.extend_from_slice(&self.payload);
        if let Some(at) = checksum_at {
            let computed = l4_checksum(self.src, self.dst, self.l4.protocol(), &seg);
            let csum = self.l4_checksum.unwrap_or(computed);
            seg[at..at + 2].copy_from_slice(&csum.to_be_bytes());
        }
        seg
    }
}

/// Adds `data` as big-endian 16-bit words (odd length padded with a zero byte) to `sum`.
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The RFC 1071 Internet checksum of `data`: the ones' complement of the ones'
/// complement sum. Over a header that contains its correct checksum it is 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// The TCP or UDP checksum of `segment` (its checksum field zeroed or not: pass it
/// zeroed to compute, as received to verify, where a correct one gives 0). For UDP a
/// computed 0 is sent as 0xffff.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let csum = l4_checksum_raw(src, dst, protocol, segment);
    if protocol == IPPROTO_UDP && csum == 0 {
        0xffff
    } else {
        csum
    }
}

/// A decoded Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// VLAN id of the first 802.1Q tag, if any.
    pub vlan: Option<u16>,
    /// EtherType after any VLAN tag.
    pub ethertype: u16,
    /// Everything after the Ethernet header (and tag).
    pub payload: Vec<u8>,
}

fn mac(b: &[u8]) -> [u8; 6] {
    let mut m = [0; 6];
    m.copy_from_slice(&b[..6]);
    m
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Frame {
    /// Decodes the Ethernet header (and one 802.1Q tag).
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        ensure!(
            bytes.len() >= ETH_HLEN,
            "frame of {} bytes is shorter than an Ethernet header",
            bytes.len()
        );
        let mut ethertype = be16(bytes, 12);
        let mut at = ETH_HLEN;
        let mut vlan = None;
        if ethertype == ETH_P_8021Q {
            ensure!(
                bytes.len() >= ETH_HLEN + 4,
                "frame truncated in its VLAN tag"
            );
            vlan = Some(be16(bytes, 14) & 0x0fff);
            ethertype = be16(bytes, 16);
            at += 4;
        }
        Ok(Self {
            dst_mac: mac(bytes),
            src_mac: mac(&bytes[6..]),
            vlan,
            ethertype,
            payload: bytes[at..].to_vec(),
        })
    }

    /// Decodes the IPv4 packet this frame carries.
    pub fn ipv4(&self) -> anyhow::Result<Ipv4Packet> {
        ensure!(
            self.ethertype == ETH_P_IPV4,
            "EtherType {:#06x} is not IPv4",
            self.ethertype
        );
        Ipv4Packet::parse(&self.payload)
    }
}

/// A decoded IPv4 packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Packet {
    /// Header length in bytes (ihl * 4).
    pub header_len: usize,
    /// Type of service byte.
    pub tos: u8,
    /// The `tot_len` field as sent.
    pub tot_len: u16,
    /// Identification.
    pub id: u16,
    /// DF flag.
    pub dont_fragment: bool,
    /// MF flag.
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub protocol: u8,
    /// Header checksum as sent.
    pub checksum: u16,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Options bytes (header bytes after the first 20).
    pub options: Vec<u8>,
    /// The whole header as sent.
    pub header: Vec<u8>,
    /// The payload: `tot_len - header_len` bytes (bytes past `tot_len` are padding).
    pub payload: Vec<u8>,
}

impl Ipv4Packet {
    /// Decodes an IPv4 packet; fails on a bad version, ihl or a `tot_len` that does not fit.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        ensure!(
            bytes.len() >= IPV4_HLEN,
            "{} bytes are shorter than an IPv4 header",
            bytes.len()
        );
        let version = bytes[0] >> 4;
        ensure!(version == 4, "IP version {version}, expected 4");
        let header_len = usize::from(bytes[0] & 0x0f) * 4;
        ensure!(header_len >= IPV4_HLEN, "ihl {} is below 5", header_len / 4);
        ensure!(
            bytes.len() >= header_len,
            "packet truncated in its IPv4 options"
        );
        let tot_len = be16(bytes, 2);
        let end = usize::from(tot_len);
        ensure!(
            end >= header_len && end <= bytes.len(),
            "tot_len {tot_len} does not fit a header of {header_len} in {} bytes",
            bytes.len()
        );
        let flags_frag = be16(bytes, 6);
        Ok(Self {
            header_len,
            tos: bytes[1],
            tot_len,
            id: be16(bytes, 4),
            dont_fragment: flags_frag & 0x4000 != 0,
            more_fragments: flags_frag & 0x2000 != 0,
            fragment_offset: flags_frag & 0x1fff,
            ttl: bytes[8],
            protocol: bytes[9],
            checksum: be16(bytes, 10),
            src: Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]),
            dst: Ipv4Addr::new(bytes[16], bytes[17], bytes[18], bytes[19]),
            options: bytes[IPV4_HLEN..header_len].to_vec(),
            header: bytes[..header_len].to_vec(),
            payload: bytes[header_len..end].to_vec(),
        })
    }

    /// Whether the header checksum is correct.
    pub fn header_checksum_ok(&self) -> bool {
        internet_checksum(&self.header) == 0
    }

    /// The IPv4 packet inside an IP-in-IP packet.
    pub fn inner_ipv4(&self) -> anyhow::Result<Self> {
        ensure!(
            self.protocol == IPPROTO_IPIP,
            "protocol {} is not IPIP",
            self.protocol
        );
        Self::parse(&self.payload).context("inner IPv4 packet")
    }

    /// The TCP segment this packet carries.
    pub fn tcp(&self) -> anyhow::Result<TcpSegment> {
        ensure!(
            self.protocol == IPPROTO_TCP,
            "protocol {} is not TCP",
            self.protocol
        );
        TcpSegment::parse(&self.payload)
    }

    /// The UDP datagram this packet carries.
    pub fn udp(&self) -> anyhow::Result<UdpDatagram> {
        ensure!(
            self.protocol == IPPROTO_UDP,
            "protocol {} is not UDP",
            self.protocol
        );
        UdpDatagram::parse(&self.payload)
    }

    /// Whether the TCP or UDP checksum is correct (a UDP checksum of 0 means none: ok).
    pub fn l4_checksum_ok(&self) -> anyhow::Result<bool> {
        match self.protocol {
            IPPROTO_TCP => {
                Ok(l4_checksum_raw(self.src, self.dst, self.protocol, &self.payload) == 0)
            }
            IPPROTO_UDP => {
                let udp = self.udp()?;
                Ok(udp.checksum == 0
                    || l4_checksum_raw(self.src, self.dst, self.protocol, &self.payload) == 0)
            }
            p => bail!("protocol {p} has no TCP/UDP checksum"),
        }
    }
}

/// [`l4_checksum`] without UDP's 0 -> 0xffff substitution (for verification).
fn l4_checksum_raw(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = protocol;
    let len = u16::try_from(segment.len()).unwrap_or(u16::MAX);
    pseudo[10..].copy_from_slice(&len.to_be_bytes());
    !fold(sum16(segment, sum16(&pseudo, 0)))
}

/// A decoded TCP segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Header length in bytes.
    pub header_len: usize,
    /// Flags byte, see [`tcp_flags`].
    pub flags: u8,
    /// Window.
    pub window: u16,
    /// Checksum as sent.
    pub checksum: u16,
    /// Data after the header.
    pub payload: Vec<u8>,
}

impl TcpSegment {
    /// Decodes a TCP header and payload.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        ensure!(
            bytes.len() >= TCP_HLEN,
            "{} bytes are shorter than a TCP header",
            bytes.len()
        );
        let header_len = usize::from(bytes[12] >> 4) * 4;
        ensure!(
            header_len >= TCP_HLEN && header_len <= bytes.len(),
            "bad TCP data offset {}",
            header_len / 4
        );
        Ok(Self {
            sport: be16(bytes, 0),
            dport: be16(bytes, 2),
            seq: be32(bytes, 4),
            ack: be32(bytes, 8),
            header_len,
            flags: bytes[13],
            window: be16(bytes, 14),
            checksum: be16(bytes, 16),
            payload: bytes[header_len..].to_vec(),
        })
    }
}

/// A decoded UDP datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpDatagram {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// The length field.
    pub len: u16,
    /// Checksum as sent (0: none).
    pub checksum: u16,
    /// Data after the header.
    pub payload: Vec<u8>,
}

impl UdpDatagram {
    /// Decodes a UDP header and payload.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        ensure!(
            bytes.len() >= UDP_HLEN,
            "{} bytes are shorter than a UDP header",
            bytes.len()
        );
        Ok(Self {
            sport: be16(bytes, 0),
            dport: be16(bytes, 2),
            len: be16(bytes, 4),
            checksum: be16(bytes, 6),
            payload: bytes[UDP_HLEN..].to_vec(),
        })
    }
}

/// Verifies every checksum in an Ethernet frame carrying IPv4: the IPv4 header, and
/// for IPIP the inner header too, then the innermost TCP/UDP checksum if there is one.
/// The error names the first wrong one.
pub fn check_checksums(frame: &[u8]) -> anyhow::Result<()> {
    let mut ip = Frame::parse(frame)?.ipv4()?;
    for depth in 0.. {
        ensure!(
            ip.header_checksum_ok(),
            "IPv4 header checksum {:#06x} wrong at depth {depth} ({} -> {})",
            ip.checksum,
            ip.src,
            ip.dst
        );
        if ip.protocol != IPPROTO_IPIP {
            break;
        }
        ip = ip.inner_ipv4()?;
    }
    if matches!(ip.protocol, IPPROTO_TCP | IPPROTO_UDP)
        && ip.fragment_offset == 0
        && !ip.more_fragments
    {
        ensure!(
            ip.l4_checksum_ok()?,
            "protocol {} checksum wrong ({} -> {})",
            ip.protocol,
            ip.src,
            ip.dst
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> SocketAddrV4 {
        "198.18.0.2:40000".parse().unwrap()
    }

    fn vip() -> SocketAddrV4 {
        "198.18.100.1:80".parse().unwrap()
    }

    #[test]
    fn checksum_matches_a_known_header() {
        // The classic example header 192.168.0.1 -> 192.168.0.199 has checksum 0xb861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header), 0xb861);
        let mut with = header;
        with[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(internet_checksum(&with), 0);
    }

    #[test]
    fn odd_length_checksum_pads_with_zero() {
        assert_eq!(internet_checksum(&[0x01]), !0x0100);
        assert_eq!(internet_checksum(&[0x01, 0x00]), internet_checksum(&[0x01]));
    }

    #[test]
    fn tcp_syn_round_trips() {
        let frame = PacketBuilder::tcp(client(), vip())
            .flags(tcp_flags::SYN)
            .seq_ack(7, 0)
            .payload(b"hello")
            .build();
        assert_eq!(frame.len(), ETH_HLEN + IPV4_HLEN + TCP_HLEN + 5);
        check_checksums(&frame).unwrap();
        let f = Frame::parse(&frame).unwrap();
        assert_eq!(
            (f.src_mac, f.dst_mac, f.vlan),
            (DEFAULT_SRC_MAC, DEFAULT_DST_MAC, None)
        );
        let ip = f.ipv4().unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.protocol, ip.ttl),
            (*client().ip(), *vip().ip(), IPPROTO_TCP, 64)
        );
        assert!(ip.dont_fragment && !ip.more_fragments && ip.fragment_offset == 0);
        let tcp = ip.tcp().unwrap();
        assert_eq!(
            (tcp.sport, tcp.dport, tcp.seq, tcp.flags),
            (40000, 80, 7, tcp_flags::SYN)
        );
        assert_eq!(tcp.payload, b"hello");
    }

    #[test]
    fn udp_round_trips_and_zero_checksum_is_sent_as_ffff() {
        let frame = PacketBuilder::udp(client(), "198.18.100.1:53".parse().unwrap())
            .payload(b"q")
            .build();
        check_checksums(&frame).unwrap();
        let udp = Frame::parse(&frame).unwrap().ipv4().unwrap().udp().unwrap();
        assert_eq!(
            (udp.sport, udp.dport, udp.len, udp.payload.as_slice()),
            (40000, 53, 9, &b"q"[..])
        );
        assert_ne!(udp.checksum, 0);
        // Some 2-byte payload makes the checksum compute to 0: it must be sent as 0xffff
        // (a computed checksum is never 0xffff otherwise, the data not being all zero).
        let ip = (0..=u16::MAX)
            .map(|x| {
                PacketBuilder::udp(client(), vip())
                    .payload(&x.to_be_bytes())
                    .build_ipv4()
            })
            .map(|p| Ipv4Packet::parse(&p).unwrap())
            .find(|ip| ip.udp().unwrap().checksum == 0xffff)
            .expect("some 2-byte payload sums to zero");
        assert!(ip.l4_checksum_ok().unwrap());
    }

    #[test]
    fn vlan_options_and_fragment_fields_are_encoded() {
        let frame = PacketBuilder::tcp(client(), vip())
            .vlan(100)
            .options(&[0x94, 0x04, 0, 0, 0x01]) // router alert + NOP, padded to 8
            .fragment(false, true, 3)
            .ttl(9)
            .tos(0x10)
            .id(77)
            .build();
        check_checksums(&frame).unwrap();
        assert_eq!(be16(&frame, 12), ETH_P_8021Q);
        let f = Frame::parse(&frame).unwrap();
        assert_eq!(f.vlan, Some(100));
        let ip = f.ipv4().unwrap();
        assert_eq!(ip.header_len, 28);
        assert_eq!(ip.options, [0x94, 0x04, 0, 0, 0x01, 0, 0, 0]);
        assert_eq!(
            (ip.dont_fragment, ip.more_fragments, ip.fragment_offset),
            (false, true, 3)
        );
        assert_eq!((ip.ttl, ip.tos, ip.id), (9, 0x10, 77));
        assert!(ip.tcp().is_ok());
    }

    #[test]
    fn overrides_produce_malformed_packets() {
        let bad_len = PacketBuilder::tcp(client(), vip()).tot_len(1000).build();
        assert!(
            Frame::parse(&bad_len).unwrap().ipv4().is_err(),
            "tot_len beyond the frame is rejected"
        );
        let short_len = PacketBuilder::tcp(client(), vip())
            .payload(b"abcd")
            .tot_len(40)
            .build();
        let ip = Frame::parse(&short_len).unwrap().ipv4().unwrap();
        assert_eq!(ip.payload.len(), 20, "bytes past tot_len are padding");
        assert!(ip.header_checksum_ok());

        let bad_ip = PacketBuilder::tcp(client(), vip())
            .ip_checksum(0xdead)
            .build();
        let err = check_checksums(&bad_ip).unwrap_err().to_string();
        assert!(err.contains("IPv4 header checksum"), "{err}");
        let bad_tcp = PacketBuilder::tcp(client(), vip())
            .l4_checksum(0xbeef)
            .build();
        let err = check_checksums(&bad_tcp).unwrap_err().to_string();
        assert!(err.contains("protocol 6 checksum"), "{err}");
    }

    #[test]
    fn ipip_is_decoded_and_verified_at_every_depth() {
        let inner = PacketBuilder::tcp(client(), vip())
            .payload(b"GET /")
            .build_ipv4();
        let outer = PacketBuilder::raw(
            "198.18.1.10".parse().unwrap(),
            "198.18.1.11".parse().unwrap(),
            IPPROTO_IPIP,
        )
        .payload(&inner)
        .build();
        check_checksums(&outer).unwrap();
        let ip = Frame::parse(&outer).unwrap().ipv4().unwrap();
        assert_eq!(ip.protocol, IPPROTO_IPIP);
        assert_eq!(ip.tot_len as usize, IPV4_HLEN + inner.len());
        let inside = ip.inner_ipv4().unwrap();
        assert_eq!(inside.dst, *vip().ip());
        assert_eq!(inside.tcp().unwrap().payload, b"GET /");

        let mut broken_inner = inner.clone();
        broken_inner[8] = 1; // ttl changed, checksum not updated
        let outer = PacketBuilder::raw(
            "198.18.1.10".parse().unwrap(),
            "198.18.1.11".parse().unwrap(),
            IPPROTO_IPIP,
        )
        .payload(&broken_inner)
        .build();
        let err = check_checksums(&outer).unwrap_err().to_string();
        assert!(err.contains("depth 1"), "{err}");
    }

    #[test]
    fn truncated_frames_are_errors() {
        let frame = PacketBuilder::tcp(client(), vip()).build();
        for len in [0, 13, ETH_HLEN + 19, ETH_HLEN + IPV4_HLEN + 10] {
            let res = Frame::parse(&frame[..len])
                .and_then(|f| f.ipv4())
                .and_then(|ip| ip.tcp());
            assert!(res.is_err(), "length {len} should fail");
        }
    }
}

//! Bounds-checked header access and the packet parser of the balancer.
//!
//! Every access goes through [`ptr_at`], which checks the header lies inside
//! `data..data_end` (the verifier requires it). Multi-byte header fields stay in
//! network order, exactly as `lb_common` keys expect.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    stats::Counter,
    types::{FAMILY_V4, FlowKey, PROTO_TCP, PROTO_UDP},
};

/// EtherType values in network order, as read from the frame.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD: u16 = 0x88a8u16.to_be();
pub const IPPROTO_IPIP: u8 = 4;

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network order.
    pub proto: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct VlanHdr {
    pub tci: u16,
    /// Network order: the EtherType of what follows.
    pub proto: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    /// Network order.
    pub tot_len: u16,
    pub id: u16,
    /// Network order: flags and fragment offset.
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    /// Network order.
    pub saddr: u32,
    /// Network order.
    pub daddr: u32,
}
const _: () = assert!(size_of::<Ipv4Hdr>() == IPV4_HLEN);

/// The first four bytes of TCP and UDP headers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ports {
    pub source: u16,
    pub dest: u16,
}

const TCP_MIN_HLEN: usize = 20;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const UDP_HLEN: usize = 8;
/// More-fragments bit and offset mask of `frag_off`, in network order.
const IP_MF_OFFSET: u16 = 0x3fffu16.to_be();

/// A pointer to a `T` at `offset` from the start of the frame, if the whole `T` lies
/// inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Where the network header starts and which protocol it is, after at most one
/// 802.1Q/802.1ad tag.
#[derive(Clone, Copy)]
pub struct L2 {
    /// Offset of the network header.
    pub l3_off: usize,
    /// EtherType of the network header, network order.
    pub proto: u16,
}

#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Result<L2, Counter> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let proto = unsafe { (*eth).proto };
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        let proto = unsafe { (*vlan).proto };
        return Ok(L2 {
            l3_off: ETH_HLEN + VLAN_HLEN,
            proto,
        });
    }
    Ok(L2 {
        l3_off: ETH_HLEN,
        proto,
    })
}

/// A parsed IPv4 TCP/UDP packet the balancer may forward.
pub struct Ipv4Flow {
    pub l3_off: usize,
    /// The flow as it arrived (client source, VIP destination).
    pub key: FlowKey,
    /// IPv4 total length, host order.
    pub tot_len: u16,
    pub tos: u8,
    /// A TCP SYN without ACK: the first packet of a new connection.
    pub tcp_syn: bool,
}

/// Parse the IPv4 header at `l3_off` and the ports after it. The error is the counter
/// saying why the packet goes to the kernel untouched.
#[inline(always)]
pub fn parse_ipv4(ctx: &XdpContext, l3_off: usize) -> Result<Ipv4Flow, Counter> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { *ip };
    if ip.version_ihl >> 4 != 4 {
        return Err(Counter::PassNotIp);
    }
    let ihl = (ip.version_ihl & 0x0f) as usize * 4;
    if ihl < IPV4_HLEN {
        return Err(Counter::PassTruncated);
    }
    if ihl > IPV4_HLEN {
        return Err(Counter::PassIpOptions);
    }
    let tot_len = u16::from_be(ip.tot_len);
    if (tot_len as usize) < IPV4_HLEN || l3_off + tot_len as usize > ctx.data_end() - ctx.data() {
        return Err(Counter::PassTruncated);
    }
    if ip.frag_off & IP_MF_OFFSET != 0 {
        return Err(Counter::PassFragment);
    }
    let l4_min = match ip.protocol {
        PROTO_TCP => TCP_MIN_HLEN,
        PROTO_UDP => UDP_HLEN,
        _ => return Err(Counter::PassNotVip),
    };
    let l4_off = l3_off + IPV4_HLEN;
    if (tot_len as usize) < IPV4_HLEN + l4_min || ctx.data() + l4_off + l4_min > ctx.data_end() {
        return Err(Counter::PassTruncated);
    }
    let ports = ptr_at::<Ports>(ctx, l4_off).ok_or(Counter::PassTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ports };
    let tcp_syn = if ip.protocol == PROTO_TCP {
        // Data offset byte and flags byte (offset 12, 13 of the TCP header).
        let off_flags = ptr_at::<[u8; 2]>(ctx, l4_off + 12).ok_or(Counter::PassTruncated)?;
        // SAFETY: bounds checked by ptr_at.
        let flags = unsafe { (*off_flags)[1] };
        flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    } else {
        false
    };
    Ok(Ipv4Flow {
        l3_off,
        key: FlowKey {
            src: [ip.saddr, 0, 0, 0],
            dst: [ip.daddr, 0, 0, 0],
            sport: ports.source,
            dport: ports.dest,
            proto: ip.protocol,
            family: FAMILY_V4,
            _pad: [0; 2],
        },
        tot_len,
        tos: ip.tos,
        tcp_syn,
    })
}

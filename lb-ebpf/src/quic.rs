//! QUIC connection-ID routing (`quic = true` on a UDP service), for IPv4 and IPv6 VIPs
//! alike (the IPv4 path asks [`backend`], the IPv6 path in `ipv6.rs` [`backend_at`]).
//!
//! A QUIC server picks the connection IDs its clients send to it, so it can write its
//! own server id into them; the balancer reads that id back and sends the packet to
//! that server whatever the client's address and port, so a connection survives NAT
//! rebinding and client migration (the 5-tuple changes, the flow table misses, the
//! ring would pick anew). This is Katran's scheme, with its connection-ID format.
//!
//! Which packets: short-header packets (first bit 0, RFC 9000 section 17.3), whose
//! destination connection ID starts right after the first byte; at least 8 bytes of
//! it must be there (Katran's `QUIC_MIN_CONNID_LEN`). Long-header packets (Initial,
//! 0-RTT, Handshake, Retry: the client's first packets carry a connection ID of its
//! own choosing) take the flow table and the ring like any UDP datagram.
//!
//! Connection-ID format (what backends must write; the first two bits are its version):
//!
//! | bits 0-1 | server id                                   | ids       |
//! |----------|---------------------------------------------|-----------|
//! | `01`     | the next 16 bits (bits 2 to 17)             | 1..=65535 |
//! | `10`     | bytes 1 to 3 (24 bits, big-endian)          | 1..=2^24-1 |
//! | `11`     | bytes 1 to 4 (32 bits, big-endian)          | 1..=2^32-1 |
//! | `00`     | none: not routed by connection ID           |           |
//!
//! The rest of the ID is the server's. A server id is a backend's `quic_id`
//! (`QUIC_IDS`: per service, id -> backend id). A packet goes to that backend only
//! while it is a live backend of the VIP's service (active: in the ring, or draining
//! with flows pinned to it); otherwise (id 0 or unknown, the backend down or gone, a
//! `00` ID) it is counted as `quic_cid_unknown` and balanced as any other datagram.
//! A routed packet creates no flow-table entry and is not counted as a new flow.
//!
//! The lookup: `QUIC_SLOTS[quic_slot(service, server id)]` first, one array read (as
//! Katran reads its `server_id_map`); a slot that holds this server id and a backend
//! of this service answers. Otherwise (an empty slot, another key's) the hash map
//! `QUIC_IDS`, which holds every key, does: an unknown id costs both, a known one
//! only the read unless it shares its slot with a key before it.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    hash::{quic_slot, quic_slot_backend},
    stats::Counter,
    types::{BACKEND_F_ACTIVE, PROTO_UDP, QuicKey, VIP_F_QUIC, VipMeta},
};

use crate::{
    gue::UDP_HLEN,
    hashing::Choice,
    maps::{BACKENDS, QUIC_IDS, QUIC_SLOTS},
    parsing::{IPV4_HLEN, Ipv4Flow, ptr_at},
    stats::count,
};

/// Bytes of a short header read: the first byte and 8 of the destination connection ID.
const SHORT_HEADER_MIN: usize = 1 + 8;
/// First-byte bit of a long header.
const LONG_HEADER: u8 = 0x80;
/// "No backend" from [`route`] (backend ids stay below the map's capacity).
const NONE: u32 = u32::MAX;

/// The server id a connection ID carries (its first 5 bytes), if its version has one.
#[inline(always)]
pub fn server_id(cid: &[u8; 5]) -> Option<u32> {
    let id = match cid[0] >> 6 {
        1 => (u32::from(cid[0] & 0x3f) << 10) | (u32::from(cid[1]) << 2) | u32::from(cid[2] >> 6),
        2 => (u32::from(cid[1]) << 16) | (u32::from(cid[2]) << 8) | u32::from(cid[3]),
        3 => u32::from_be_bytes([cid[1], cid[2], cid[3], cid[4]]),
        _ => return None,
    };
    if id == 0 { None } else { Some(id) }
}

/// The backend (id) a QUIC packet of a `quic` service names, for the packet `pkt` to
/// `vip`; `None` to balance it as usual (not a `quic` service, not UDP, a long header,
/// too short, or a connection ID naming no live backend).
#[inline(always)]
pub fn backend(ctx: &XdpContext, pkt: &Ipv4Flow, vip: &VipMeta) -> Option<u32> {
    let end = pkt.l3_off + usize::from(pkt.tot_len);
    backend_at(ctx, vip, pkt.key.proto, pkt.l3_off + IPV4_HLEN, end)
}

/// [`backend`] for a packet of either family: protocol `proto`, its L4 header at
/// `l4_off`, the IP packet ending at `end` (the IPv6 path calls this).
#[inline(always)]
pub fn backend_at(
    ctx: &XdpContext,
    vip: &VipMeta,
    proto: u8,
    l4_off: usize,
    end: usize,
) -> Option<u32> {
    if vip.flags & VIP_F_QUIC == 0 || proto != PROTO_UDP {
        return None;
    }
    let backend_id = route(ctx, l4_off, end, vip.service_id);
    if backend_id == NONE {
        None
    } else {
        Some(backend_id)
    }
}

/// [`backend`]'s choice, read whole; `None` if the entry vanished meanwhile.
#[inline(always)]
pub fn choice(backend_id: u32) -> Option<Choice> {
    let backend = *BACKENDS.get(backend_id)?;
    Some(Choice {
        backend_id,
        backend,
    })
}

/// The backend id named by the connection ID of the datagram whose UDP header is at
/// `l4_off` (the IP packet ends at `end`), or [`NONE`]. A subprogram of its own: its
/// stack does not add to `xdp_lb`'s frame beyond the call (see the README's stack
/// budget), and only `quic` services' packets enter it.
#[inline(never)]
fn route(ctx: &XdpContext, l4_off: usize, end: usize, service_id: u32) -> u32 {
    let payload = l4_off + UDP_HLEN;
    if payload + SHORT_HEADER_MIN > end {
        return NONE;
    }
    let Some(head) = ptr_at::<[u8; 6]>(ctx, payload) else {
        return NONE;
    };
    // SAFETY: bounds checked by ptr_at.
    let head = unsafe { *head };
    if head[0] & LONG_HEADER != 0 {
        return NONE;
    }
    let cid = [head[1], head[2], head[3], head[4], head[5]];
    let Some(server_id) = server_id(&cid) else {
        count(Counter::QuicCidUnknown);
        return NONE;
    };
    // The slot first: it holds this key when its server id is this one and its backend
    // belongs to this service (a backend is in one service, so no other key of this
    // server id can name it); that backend's state then decides, as QUIC_IDS's would.
    let slot = QUIC_SLOTS
        .get(quic_slot(service_id, server_id))
        .map_or(0, |v| *v);
    if let Some(backend_id) = quic_slot_backend(slot, server_id) {
        if let Some(backend) = BACKENDS.get(backend_id) {
            if backend.service_id == service_id {
                return routed(backend_id, backend.flags);
            }
        }
    }
    let key = QuicKey {
        service_id,
        server_id,
    };
    // SAFETY: QUIC_IDS is preallocated; a racing update hands at worst another backend
    // id, checked below.
    if let Some(&backend_id) = unsafe { QUIC_IDS.get(key) } {
        if let Some(backend) = BACKENDS.get(backend_id) {
            if backend.service_id == service_id {
                return routed(backend_id, backend.flags);
            }
        }
    }
    count(Counter::QuicCidUnknown);
    NONE
}

/// `backend_id` (of the packet's service, flags `flags`) if it is active, counted as
/// routed; else [`NONE`], counted as unknown.
#[inline(always)]
fn routed(backend_id: u32, flags: u8) -> u32 {
    if flags & BACKEND_F_ACTIVE != 0 {
        count(Counter::QuicCidRouted);
        backend_id
    } else {
        count(Counter::QuicCidUnknown);
        NONE
    }
}

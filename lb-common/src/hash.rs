//! The flow hash and ring indexing: pure functions shared by the XDP program and the
//! agent. The agent's tests use them as the oracle for which backend the program picks.
//!
//! The hash is MurmurHash3's 32-bit block mix and finaliser over fixed-length input,
//! written without loops so the verifier sees straight-line code. Inputs are the raw
//! network-order words of the packet, so kernel and user space hash the same integers.
//!
//! Also the agent's one 64-bit hash of byte strings ([`member_hash`], [`tagged_hash`]):
//! FNV-1a then MurmurHash3's 64-bit finaliser, used for the Maglev permutations of ring
//! members (the XDP rings and the L7 `hash` scheduler's table) and for the L7 `hash`
//! scheduler's keys. Fixed across builds, restarts and nodes, unlike std's
//! `DefaultHasher`: every node must build the same rings and send a client to the same
//! backend.

use crate::types::FlowKey;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// A fixed seed, so every LB node of a cluster picks the same backend for a flow
/// (they share rings through identical configuration).
pub const SEED: u32 = 0x5844_504c; // "XDPL"

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a client flow: source address, both ports and the protocol. The
/// destination is left out: each service has its own ring.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, ((key.sport as u32) << 16) | key.dport as u32);
    h = mix(h, key.proto as u32);
    fmix(h, 24)
}

/// Hash of the client address only, for source-IP affinity (`scheduler = "source-ip"`).
#[inline(always)]
pub const fn source_hash(src: &[u32; 4]) -> u32 {
    let mut h = SEED;
    h = mix(h, src[0]);
    h = mix(h, src[1]);
    h = mix(h, src[2]);
    h = mix(h, src[3]);
    fmix(h, 16)
}

/// Per-flow entropy of a tunnel's outer header: the GUE source port and the host
/// bits of the outer source within `dataplane.source_ipv4_prefix` come from it, so
/// the backends' NICs (RSS) and ECMP on the way spread flows. Client address and
/// both ports, one finaliser: cheaper than [`flow_hash`], which an established
/// flow's packet does not compute.
#[inline(always)]
pub const fn tunnel_entropy(key: &FlowKey) -> u32 {
    let h = SEED
        ^ key.src[0]
        ^ key.src[1].rotate_left(8)
        ^ key.src[2].rotate_left(16)
        ^ key.src[3].rotate_left(24);
    fmix(h ^ (((key.sport as u32) << 16) | key.dport as u32), 8)
}

/// The outer UDP source port of a GUE packet (host order): from the ephemeral range
/// 49152..=65535 (RFC 6335), as RFC 8086 asks of UDP tunnels, with 14 bits of
/// [`tunnel_entropy`].
#[inline(always)]
pub const fn gue_source_port(entropy: u32) -> u16 {
    0xc000 | (entropy as u16 & 0x3fff)
}

/// The outer IPv4 source of a tunnelled packet (network order): `base` (the source
/// address, or `dataplane.source_ipv4_prefix`'s address) with the host bits in
/// `host_mask` (host order) taken from [`tunnel_entropy`] (bits 14 and up, so they
/// do not repeat the GUE source port's bits).
#[inline(always)]
pub const fn tunnel_source_v4(base: u32, host_mask: u32, entropy: u32) -> u32 {
    base | ((entropy >> 14) & host_mask).to_be()
}

/// The last 32 bits of the outer IPv6 source of a tunnelled packet (network order):
/// `base` (the last word of `source_ipv6` or of `dataplane.source_ipv6_prefix`'s
/// address) with the host bits in `host_mask` (host order) taken from
/// [`tunnel_entropy`] rotated by 14 bits: the low 18 bits of the host part do not
/// repeat the GUE source port's bits, and a host part of up to 32 bits gets all 32.
#[inline(always)]
pub const fn tunnel_source_v6_low(base: u32, host_mask: u32, entropy: u32) -> u32 {
    base | (entropy.rotate_right(14) & host_mask).to_be()
}

/// The slot of `QUIC_SLOTS` (`crate::maps::QUIC_SLOTS`) where the QUIC server id
/// `server_id` of service `service_id` lives.
#[inline(always)]
pub const fn quic_slot(service_id: u32, server_id: u32) -> u32 {
    fmix(SEED ^ server_id ^ service_id.rotate_left(16), 8) & (crate::maps::QUIC_SLOTS_LEN - 1)
}

/// A `QUIC_SLOTS` value: `server_id` in the high word (compared with the packet's),
/// `backend_id + 1` in the low one, so that 0 is an empty slot and a slot read while
/// the agent empties or fills it (a half of each) never names a backend for an id
/// (server id 0, which a half would hold, names no server and is never looked up):
/// the agent changes a slot only through 0.
#[inline(always)]
pub const fn quic_slot_value(server_id: u32, backend_id: u32) -> u64 {
    ((server_id as u64) << 32) | (backend_id as u64 + 1)
}

/// The backend id of a `QUIC_SLOTS` value if it holds `server_id`.
#[inline(always)]
pub const fn quic_slot_backend(value: u64, server_id: u32) -> Option<u32> {
    let low = value as u32;
    if (value >> 32) as u32 == server_id && low != 0 {
        Some(low - 1)
    } else {
        None
    }
}

/// The slot of a service's ring a hash falls into, or `None` for an empty ring.
#[inline(always)]
pub const fn ring_slot(hash: u32, ring_size: u32) -> Option<u32> {
    // checked_rem keeps the division-by-zero branch away from the verifier.
    hash.checked_rem(ring_size)
}

/// Index into the flat rings array of slot `slot` of service `service_id`.
#[inline(always)]
pub const fn ring_index(service_id: u32, ring_size: u32, slot: u32) -> u32 {
    service_id.wrapping_mul(ring_size).wrapping_add(slot)
}

/// FNV-1a's 64-bit offset basis and prime.
const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over `bytes`, continuing from state `h`.
const fn fnv1a64(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(FNV64_PRIME);
        i += 1;
    }
    h
}

/// `MurmurHash3`'s 64-bit finaliser: every input bit reaches every output bit.
#[must_use]
pub const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Hash of a ring member's key under `seed` (the Maglev offset and skip hashes): FNV-1a
/// from the offset basis mixed with `fmix64(seed)`, then the key's length mixed in, then
/// [`fmix64`].
///
/// Its values are part of the rings every node builds: they must never change (the
/// tests pin them).
#[must_use]
pub const fn member_hash(key: &[u8], seed: u64) -> u64 {
    fmix64(fnv1a64(FNV64_OFFSET ^ fmix64(seed), key) ^ key.len() as u64)
}

/// Hash of a value of kind `tag` (the L7 `hash` scheduler's header or cookie value, or
/// the client's IPv4 or IPv6 address; the tag keeps equal bytes of different kinds
/// apart): FNV-1a over the tag byte and the bytes, then [`fmix64`].
///
/// Its values decide which backend a client of an L7 `hash` service reaches: they must
/// never change (the tests pin them).
#[must_use]
pub const fn tagged_hash(tag: u8, bytes: &[u8]) -> u64 {
    fmix64(fnv1a64(fnv1a64(FNV64_OFFSET, &[tag]), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: [src, 0, 0, 0],
            dst: [0x0164_12c6, 0, 0, 0],
            sport,
            dport: 80u16.to_be(),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn tunnel_entropy_spreads_ports_and_sources() {
        // One client, 4096 source ports: GUE source ports and the host bits of a /24
        // both take many values, and stay in their ranges.
        let mut ports = [false; 0x4000];
        let mut sources = [false; 256];
        let base = u32::from_ne_bytes([198, 18, 4, 0]);
        for sport in 0..4096u16 {
            let e = tunnel_entropy(&key(0x0a00_0001, sport));
            let port = gue_source_port(e);
            assert!(port >= 0xc000, "{port}");
            ports[usize::from(port & 0x3fff)] = true;
            let src = tunnel_source_v4(base, 0xff, e).to_ne_bytes();
            assert_eq!(src[..3], [198, 18, 4]);
            sources[usize::from(src[3])] = true;
        }
        let distinct_ports = ports.iter().filter(|&&p| p).count();
        assert!(distinct_ports > 3000, "{distinct_ports}");
        assert!(sources.iter().all(|&s| s));
        // No host bits: the base itself.
        assert_eq!(tunnel_source_v4(base, 0, 0xffff_ffff), base);
    }

    #[test]
    fn deterministic_and_sensitive_to_every_field() {
        let base = key(0x0a00_0001, 1000);
        assert_eq!(flow_hash(&base), flow_hash(&base));
        let mut other = base;
        other.sport = 1001;
        assert_ne!(flow_hash(&base), flow_hash(&other));
        other = base;
        other.src[3] = 1;
        assert_ne!(flow_hash(&base), flow_hash(&other));
        other = base;
        other.proto = 17;
        assert_ne!(flow_hash(&base), flow_hash(&other));
        // The destination is not part of the hash (rings are per service).
        other = base;
        other.dst[0] = 1;
        assert_eq!(flow_hash(&base), flow_hash(&other));
    }

    #[test]
    fn spreads_evenly_over_a_prime_ring() {
        const RING: u32 = 65537;
        const BUCKETS: usize = 16;
        let mut counts = [0u32; BUCKETS];
        let n = 160_000u32;
        for i in 0..n {
            let k = key(0xc612_0000 | (i >> 8), (i & 0xff) as u16 + 30000);
            let slot = ring_slot(flow_hash(&k), RING).unwrap();
            counts[(slot as usize * BUCKETS) / RING as usize] += 1;
        }
        let expect = n / BUCKETS as u32;
        for c in counts {
            assert!(c.abs_diff(expect) < expect / 20, "bucket {c} vs {expect}");
        }
    }

    #[test]
    fn empty_ring_has_no_slot() {
        assert_eq!(ring_slot(5, 0), None);
        assert_eq!(ring_slot(65538, 65537), Some(1));
        assert_eq!(ring_index(2, 7, 3), 17);
    }

    #[test]
    fn key_hashes_are_pinned() {
        // Taken from the two copies these functions replace (dataplane/ring.rs and
        // l7/balancer.rs): a change would move ring slots and L7 clients.
        const OFFSET: u64 = 0x5844_504c_4d47_4c31; // the ring's seeds
        const SKIP: u64 = 0x5844_504c_4d47_4c32;
        assert_eq!(member_hash(b"", 0), 0xefd0_1f60_ba99_2926);
        assert_eq!(member_hash(b"198.18.1.1:80", OFFSET), 0x90d8_50b2_ddec_d5d0);
        assert_eq!(member_hash(b"198.18.1.1:80", SKIP), 0x060f_1530_430e_c7ff);
        assert_eq!(
            member_hash(b"[fd00:18::11]:8080", OFFSET),
            0x626b_8ec0_2598_db73
        );
        assert_eq!(tagged_hash(b'v', b""), 0x9dd4_0852_e364_f5da);
        assert_eq!(tagged_hash(b'v', b"alice"), 0x489f_b606_5f0e_b309);
        assert_eq!(tagged_hash(b'4', &[198, 18, 0, 1]), 0x25de_a6f1_99c8_a7ea);
        let v6 = [0xfd, 0, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(tagged_hash(b'6', &v6), 0xac6b_8150_3465_0db7);
    }

    #[test]
    fn quic_slots_spread_keys_and_values_name_only_their_id() {
        let len = crate::maps::QUIC_SLOTS_LEN;
        // 4096 keys (16 services of 256 consecutive ids) take nearly as many slots.
        let mut used = [false; crate::maps::QUIC_SLOTS_LEN as usize];
        for service in 0..16 {
            for id in 1..=256 {
                let slot = quic_slot(service, id);
                assert!(slot < len);
                used[slot as usize] = true;
            }
        }
        let taken = used.iter().filter(|u| **u).count();
        assert!(taken > 3900, "{taken} slots for 4096 keys");
        let v = quic_slot_value(0x0102, 7);
        assert_eq!(quic_slot_backend(v, 0x0102), Some(7));
        assert_eq!(quic_slot_backend(v, 0x0103), None);
        assert_eq!(quic_slot_backend(quic_slot_value(9, 0), 9), Some(0));
        // Empty, and either half of a value alone (a slot read while it changes), for
        // any id the program looks up (server id 0 never is: it names no server).
        assert_eq!(quic_slot_backend(0, 0x0102), None);
        assert_eq!(quic_slot_backend(v & 0xffff_ffff_0000_0000, 0x0102), None);
        assert_eq!(quic_slot_backend(v & 0xffff_ffff, 0x0102), None);
    }
}

//! The Internet checksum (RFC 1071) of a fixed 20-byte IPv4 header, unrolled so the
//! verifier sees straight-line code, and its pieces for ICMP.

/// Checksum of a 20-byte IPv4 header given as ten 16-bit words in memory order, with
/// the checksum word zero. The result is in memory order too: store it as is.
#[inline(always)]
pub fn ipv4_header(words: &[u16; 10]) -> u16 {
    let mut sum: u32 = 0;
    sum += words[0] as u32;
    sum += words[1] as u32;
    sum += words[2] as u32;
    sum += words[3] as u32;
    sum += words[4] as u32;
    sum += words[5] as u32;
    sum += words[6] as u32;
    sum += words[7] as u32;
    sum += words[8] as u32;
    sum += words[9] as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Fold a 32-bit sum of 16-bit words into 16 bits (end-around carry), not inverted.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum `check` of some data after one 16-bit word of it changed from `old` to
/// `new` (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')). All three in memory order (the
/// ones' complement sum does not depend on byte order as long as it is the same).
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// [`replace16`] for a message whose data may all be zero (an ICMP echo with id, sequence
/// and payload 0): eqn. 3 then gives 0x0000, which does not verify, where 0xffff does;
/// 0xffff verifies whenever 0x0000 would (both are zero in ones' complement), so a zero
/// result is written as 0xffff.
#[inline(always)]
pub fn replace16_nonzero(check: u16, old: u16, new: u16) -> u16 {
    match replace16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Fold a 64-bit sum of 16-bit words (or of `bpf_csum_diff` results) into 16 bits,
/// not inverted.
#[inline(always)]
pub fn fold64(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The 16-bit words (memory order) of a 16-byte address, summed.
#[inline(always)]
pub fn sum_addr6(a: &[u32; 4]) -> u64 {
    let mut s = 0u64;
    for w in a {
        s += u64::from(w & 0xffff) + u64::from(w >> 16);
    }
    s
}

/// The sum (not folded) of the IPv6 pseudo header (RFC 8200 8.1) of `len` bytes of
/// upper-layer protocol `next` from `src` to `dst`.
#[inline(always)]
pub fn pseudo6(src: &[u32; 4], dst: &[u32; 4], len: u16, next: u8) -> u64 {
    sum_addr6(src) + sum_addr6(dst) + u64::from(len.to_be()) + u64::from(u16::from(next).to_be())
}

/// The sum (not folded) of the IPv4 pseudo header (RFC 768) of `len` bytes of protocol
/// `proto` from `src` to `dst` (addresses in network order).
#[inline(always)]
pub fn pseudo4(src: u32, dst: u32, len: u16, proto: u8) -> u64 {
    u64::from(src & 0xffff)
        + u64::from(src >> 16)
        + u64::from(dst & 0xffff)
        + u64::from(dst >> 16)
        + u64::from(len.to_be())
        + u64::from(u16::from(proto).to_be())
}

/// The largest number of packet bytes [`sum_packet`] sums: the largest `mtu` (9216).
pub const SUM_MAX: usize = 9216;

/// The ones' complement sum (RFC 1071, not folded, not inverted; 16-bit words in memory
/// order, an odd last byte padded with a zero) of `len` bytes of the packet from
/// offset `off` on; `u64::MAX` when they are not all in the packet or `len` exceeds
/// [`SUM_MAX`].
///
/// `bpf_csum_diff` takes at most 512 bytes, a multiple of 4, per call. The bytes are
/// copied 512 at a time (the last chunk shorter) into a per-CPU scratch buffer
/// ([`crate::maps::SCRATCH`]) with `bpf_xdp_load_bytes`, padded with zeros to a
/// multiple of 4 (zeros add nothing) and summed there. Summing the packet in place
/// (chunks of 512, 64 and 4 bytes of constant size) was rejected by the verifier:
/// with the packet offsets known exactly on each path, every combination of chunk
/// counts was a path of its own (over a million instructions). With the copy, one
/// bounded loop of at most 18 steps, each ending or going on. Every chunk but the
/// last has an even length, so the words keep their alignment from `off`. A BPF
/// subprogram of its own (the GUE-over-IPv6 checksum and the ICMP quotes call it).
#[inline(never)]
pub(crate) fn sum_packet(ctx: *mut aya_ebpf::bindings::xdp_md, off: usize, len: usize) -> u64 {
    if len > SUM_MAX || off > 0xffff {
        return u64::MAX;
    }
    let Some(buf) = crate::maps::SCRATCH.get_ptr_mut(0) else {
        return u64::MAX;
    };
    let buf = buf.cast::<u8>();
    let mut sum = 0u32;
    let mut done = 0usize;
    for _ in 0..SUM_MAX / 512 {
        let left = len - done;
        // Read back through memory, so that LLVM cannot turn the test below into one
        // of `len` against `done`: the verifier must see the very register passed to
        // bpf_xdp_load_bytes tested against 0 (it refuses a size that may be 0).
        // SAFETY: a plain read of a local.
        let rem = unsafe { core::ptr::read_volatile(&raw const left) };
        let chunk = if rem > 512 { 512 } else { rem };
        if chunk == 0 {
            break;
        }
        // SAFETY: `buf` is the scratch map's value (SCRATCH_LEN bytes), `chunk` <= 512
        // fit; the kernel checks the packet range.
        let loaded = unsafe {
            aya_ebpf::helpers::generated::bpf_xdp_load_bytes(
                ctx,
                (off + done) as u32,
                buf.cast(),
                chunk as u32,
            )
        };
        if loaded != 0 {
            return u64::MAX;
        }
        // Zeros after the chunk up to the next multiple of 4 (three are written:
        // chunk + 2 <= 514 < SCRATCH_LEN).
        // SAFETY: as above.
        unsafe {
            buf.add(chunk).write(0);
            buf.add(chunk + 1).write(0);
            buf.add(chunk + 2).write(0);
        }
        let padded = (chunk + 3) & !3;
        // The running sum is the helper's seed: one value, no branch on the answer
        // (negative only for sizes that are not a multiple of 4 or over 512), so the
        // verifier has one path per step.
        // SAFETY: `padded` <= 512 bytes of the scratch buffer; nothing is written.
        sum = unsafe {
            aya_ebpf::helpers::generated::bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                buf.cast(),
                padded as u32,
                sum,
            )
        } as u32;
        done += chunk;
    }
    u64::from(sum)
}

/// Length of [`crate::maps::SCRATCH`]'s value: 512 bytes of packet and the padding
/// after them.
pub const SCRATCH_LEN: usize = 516;

/// `bpf_csum_diff(NULL, 0, p, size, 0)`: the 32-bit ones' complement sum of `size`
/// bytes at `p` (a multiple of 4, at most 512, checked by the caller: in the packet
/// or in the scratch buffer).
#[inline(always)]
pub(crate) fn csum_diff(p: *mut u32, size: u32) -> u64 {
    // SAFETY: the caller checked `size` bytes at `p`; nothing is written.
    let r = unsafe {
        aya_ebpf::helpers::generated::bpf_csum_diff(core::ptr::null_mut(), 0, p, size, 0)
    };
    // A negative answer (bad sizes) cannot happen with the sizes passed; count it as 0.
    if r < 0 { 0 } else { r as u64 & 0xffff_ffff }
}

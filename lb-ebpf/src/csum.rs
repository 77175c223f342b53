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

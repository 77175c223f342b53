//! Batched writes into array maps and batched reads from them: `BPF_MAP_UPDATE_BATCH`
//! and `BPF_MAP_LOOKUP_BATCH`, one `bpf()` call for many entries instead of one call
//! per entry.
//!
//! aya 0.14 has no batch operations (its `Array::set` is one `BPF_MAP_UPDATE_ELEM` per
//! index), so this issues the command itself through `libc::syscall(SYS_bpf, ...)` on
//! the map's fd. The kernel has supported `BPF_MAP_UPDATE_BATCH` on
//! `BPF_MAP_TYPE_ARRAY` since 5.6 (`generic_map_update_batch`): it copies and writes
//! the pairs in order, each entry with the same semantics as a single update (an array
//! entry is overwritten in place, so readers see either the old or the new value of a
//! slot, never a missing one), and on failure tells how many pairs it wrote.
//!
//! Reads ([`lookup_array`]): `BPF_MAP_LOOKUP_BATCH` on an array (kernel 5.6,
//! `generic_map_lookup_batch`) walks the indices in order from the one after
//! `in_batch` (from 0 without it), copies up to `count` keys and values out, and says
//! how many and the last index read (`out_batch`); past the last index it answers
//! `ENOENT` with the entries it did copy. Each value is copied as a single lookup
//! copies it (a slot written meanwhile is read old or new).
//!
//! Measured (`cargo xtask bench xdp --only "1000 svc"`, loaded): writing the rings of
//! 1000 services of 65537 slots (65.5 million slots): the balancer loaded in 220 s with
//! one call per slot, 48 s batched; see the README's `control` section.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Pod,
    maps::{Array, IterableMap, MapData},
};

/// `enum bpf_cmd` value of `BPF_MAP_UPDATE_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_int = 26;
/// `enum bpf_cmd` value of `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_int = 24;

/// Pairs per `bpf()` call: bounds the kernel's time in one call (it copies and writes
/// each pair in turn) and the size of the two arrays handed to it; a ring of 65537
/// slots is two calls.
pub const MAX_BATCH: usize = 32768;

/// The `batch` member of `union bpf_attr` (the layout of include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A batch the kernel refused part-way.
#[derive(Debug, thiserror::Error)]
#[error(
    "bpf(BPF_MAP_UPDATE_BATCH) failed at {} ({written} of {total} entries written): {source}",
    .index.map_or_else(|| "an unknown index".to_owned(), |i| format!("index {i}"))
)]
pub struct BatchError {
    /// The map index whose write failed; None when the kernel could not report how far
    /// it got (`EFAULT`).
    pub index: Option<u32>,
    /// How many of the pairs, in order, are in the map.
    pub written: usize,
    pub total: usize,
    #[source]
    pub source: io::Error,
}

/// Writes `values[i]` at index `keys[i]` of `map` for every `i`, in order, in calls of
/// at most [`MAX_BATCH`] pairs. On failure, the pairs before [`BatchError::written`]
/// are in the map and none after.
///
/// # Panics
/// If `keys` and `values` differ in length (a caller's bug).
pub fn update_array<V: Pod>(
    map: &mut Array<MapData, V>,
    keys: &[u32],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let fd = map.map().fd().as_fd().as_raw_fd();
    let total = keys.len();
    let mut written = 0;
    for (keys, values) in keys.chunks(MAX_BATCH).zip(values.chunks(MAX_BATCH)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` and `values` point to `count` keys of 4 bytes and `count`
        // values of `size_of::<V>()` bytes, the map's key and value sizes (aya checked
        // them when it typed the map), and outlive the call; the kernel writes only
        // `attr.count`.
        if let Err(source) = unsafe { bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) } {
            // On any error but EFAULT the kernel sets `count` to the pairs it wrote.
            let (done, index) = if source.raw_os_error() == Some(libc::EFAULT) {
                (0, None)
            } else {
                let done = (attr.count as usize).min(keys.len());
                (done, keys.get(done).copied())
            };
            return Err(BatchError {
                index,
                written: written + done,
                total,
                source,
            });
        }
        written += keys.len();
    }
    Ok(())
}

/// One `bpf(cmd, attr)` call of the batch family (aya 0.14 has none): the error of a
/// refused call, as the kernel set it.
///
/// # Safety
/// `attr` is the kernel's `bpf_attr.batch` layout (fields after it are zero as the
/// kernel requires, since the size passed ends with it); every pointer in it must be
/// valid for what `cmd` reads and writes through it, for the call's duration.
unsafe fn bpf_batch(cmd: libc::c_int, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: the caller's contract.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A batched read the kernel refused, or one that did not give what was asked.
#[derive(Debug, thiserror::Error)]
#[error(
    "bpf(BPF_MAP_LOOKUP_BATCH) failed reading index {index} ({read} of {total} entries read): {source}"
)]
pub struct ReadError {
    /// The first index not read.
    pub index: u32,
    pub read: usize,
    pub total: usize,
    #[source]
    pub source: io::Error,
}

impl ReadError {
    /// As aya's error of a failed map call, for callers that report `MapError`s.
    pub fn into_map_error(self) -> aya::maps::MapError {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error: self.source,
        })
    }
}

/// The `count` entries of `map` from index `start` on, in calls of at most
/// [`MAX_BATCH`] entries: what `count` calls of `Array::get` would give, in
/// `count / MAX_BATCH` + 1 calls. Indices past the map's end are an error.
pub fn lookup_array<V: Pod>(
    map: &Array<MapData, V>,
    start: u32,
    count: u32,
) -> Result<Vec<V>, ReadError> {
    let fd = map.map().fd().as_fd().as_raw_fd();
    let total = count as usize;
    let mut out: Vec<V> = Vec::with_capacity(total);
    let mut keys = vec![0u32; total.min(MAX_BATCH)];
    // The index before the next one to read (`in_batch`), and the last one read.
    let mut prev = start.wrapping_sub(1);
    let mut last = 0u32;
    let err = |read: usize, source: io::Error| ReadError {
        index: start + read as u32,
        read,
        total,
        source,
    };
    while out.len() < total {
        let want = (total - out.len()).min(MAX_BATCH);
        let mut attr = BatchAttr {
            // From index 0: no previous key.
            in_batch: if start == 0 && out.is_empty() {
                0
            } else {
                &raw const prev as u64
            },
            out_batch: &raw mut last as u64,
            keys: keys.as_mut_ptr() as u64,
            // SAFETY (of the pointer): `out` has room for `total` values, `want` of
            // them after its `len`.
            values: out.spare_capacity_mut().as_mut_ptr() as u64,
            count: want as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` has room for `want` keys of 4 bytes and `values` for `want`
        // values of `size_of::<V>()` bytes (the map's sizes, checked by aya), `prev`
        // and `last` are 4-byte keys; all outlive the call. The kernel writes
        // `attr.count`, the keys, values and `last`.
        let source = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        let end = source
            .as_ref()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ENOENT));
        if let Some(source) = source {
            if !end {
                return Err(err(out.len(), source));
            }
        }
        let got = (attr.count as usize).min(want);
        // An array hands out its indices in order, from the one after `prev`.
        for (i, &k) in keys[..got].iter().enumerate() {
            let expected = start + (out.len() + i) as u32;
            if k != expected {
                return Err(err(
                    out.len() + i,
                    io::Error::other(format!("the kernel gave index {k} for {expected}")),
                ));
            }
        }
        // SAFETY: the kernel wrote `got` whole values at the start of the spare
        // capacity; any bytes are a valid `V` (Pod).
        unsafe { out.set_len(out.len() + got) };
        if end || got == 0 {
            break;
        }
        prev = last;
    }
    if out.len() < total {
        return Err(err(out.len(), io::Error::from_raw_os_error(libc::ENOENT)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipped: creating a BPF map needs root");
        }
        root
    }

    #[test]
    fn writes_every_pair_across_batches() {
        if !root() {
            return;
        }
        let size = (MAX_BATCH * 2 + 7) as u32;
        let mut map = Array::<MapData, u32>::create(size, 0).expect("create an array map");
        // Every index but the multiples of 5, in reverse order: more than two batches.
        let keys: Vec<u32> = (0..size).rev().filter(|k| k % 5 != 0).collect();
        let values: Vec<u32> = keys.iter().map(|k| k * 3 + 1).collect();
        update_array(&mut map, &keys, &values).expect("batch write");
        for k in 0..size {
            let want = if k % 5 == 0 { 0 } else { k * 3 + 1 };
            assert_eq!(map.get(&k, 0).expect("read"), want, "index {k}");
        }
        update_array(&mut map, &[], &[]).expect("an empty batch is no call");
    }

    #[test]
    fn reads_ranges_across_batches_as_single_lookups_do() {
        if !root() {
            return;
        }
        let size = (MAX_BATCH * 2 + 9) as u32;
        let mut map = Array::<MapData, u64>::create(size, 0).expect("create an array map");
        let keys: Vec<u32> = (0..size).filter(|k| k % 3 != 0).collect();
        let values: Vec<u64> = keys.iter().map(|&k| u64::from(k) << 32 | 7).collect();
        update_array(&mut map, &keys, &values).expect("batch write");
        let single = |k: u32| map.get(&k, 0).expect("read");
        // The whole map, a range across a batch boundary, the last entries, nothing.
        for (start, count) in [
            (0, size),
            (MAX_BATCH as u32 - 5, 11),
            (size - 4, 4),
            (17, 0),
        ] {
            let got = lookup_array(&map, start, count).expect("batch read");
            let want: Vec<u64> = (start..start + count).map(single).collect();
            assert_eq!(got, want, "from {start}, {count} entries");
        }
        let err = lookup_array(&map, size - 2, 5).expect_err("past the end");
        assert_eq!((err.index, err.read, err.total), (size, 2, 5));
    }

    #[test]
    fn a_refused_pair_is_named_and_the_pairs_before_it_are_written() {
        if !root() {
            return;
        }
        let mut map = Array::<MapData, u32>::create(8, 0).expect("create an array map");
        let err = update_array(&mut map, &[1, 2, 9, 3], &[10, 20, 90, 30])
            .expect_err("index 9 of 8 entries");
        assert_eq!((err.index, err.written, err.total), (Some(9), 2, 4));
        assert_eq!(err.source.raw_os_error(), Some(libc::E2BIG));
        let text = err.to_string();
        assert!(text.contains("index 9 (2 of 4 entries written)"), "{text}");
        let got: Vec<u32> = (0..5).map(|k| map.get(&k, 0).expect("read")).collect();
        assert_eq!(
            got,
            [0, 10, 20, 0, 0],
            "before the refused pair, nothing after"
        );
    }
}

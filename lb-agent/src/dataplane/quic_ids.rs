//! `QUIC_IDS`: for each `quic` service, its backends' QUIC server ids (`quic_id`) and
//! the backend ids they name, so that `xdp_lb` sends a short-header packet to the
//! backend its connection ID names (`lb-ebpf/src/quic.rs`). Written by the
//! [`super::sync::Reconciler`] after the services (it needs their backend ids), as a
//! diff against what it wrote before.
//!
//! And `QUIC_SLOTS`, the same entries direct-mapped into an array (`lb_common::hash::
//! quic_slot`), which the program reads first: one array read instead of a hash lookup
//! per routed packet. Each key takes its slot unless a key before it (in key order)
//! has it; such a key is found in `QUIC_IDS` only. Order of writes, so that a packet
//! never meets a slot naming a backend its id does not name: new and changed
//! `QUIC_IDS` entries, then the slots (a slot that changes is emptied first, and the
//! program takes an empty slot, or either half of a value, for "look in `QUIC_IDS`"),
//! then the `QUIC_IDS` entries no longer wanted.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::MapError;
use lb_common::{
    hash::{quic_slot, quic_slot_value},
    maps::{self as names, QUIC_SLOTS_LEN},
    types::QuicKey,
};

use super::{
    desired::DesiredState,
    maps::Maps,
    sync::{MapKey, SyncError},
};

/// The `QUIC_IDS` entries `desired` asks for, given the written ids of services and
/// backends (`service_id(name)`, `backend_id(name, address, port)`). Backends without
/// an id yet (not written) are left out.
pub fn wanted(
    desired: &DesiredState,
    service_id: impl Fn(&str) -> Option<u32>,
    backend_id: impl Fn(&str, IpAddr, u16) -> Option<u32>,
) -> BTreeMap<QuicKey, u32> {
    let mut out = BTreeMap::new();
    for svc in desired.services.iter().filter(|s| s.quic && !s.l7) {
        let Some(sid) = service_id(&svc.name) else {
            continue;
        };
        for b in &svc.backends {
            let (Some(server_id), Some(bid)) =
                (b.quic_id, backend_id(&svc.name, b.address, b.port))
            else {
                continue;
            };
            out.insert(
                QuicKey {
                    service_id: sid,
                    server_id,
                },
                bid,
            );
        }
    }
    out
}

/// The `QUIC_SLOTS` contents for the `QUIC_IDS` entries `want` (slot -> value; slots
/// not listed are empty): each key in its slot unless a key before it took it.
pub fn slots(want: &BTreeMap<QuicKey, u32>) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for (key, &backend_id) in want {
        // `backend_id + 1` must fit the value's low word (ids stay below the backend
        // capacity; u32::MAX never is one): otherwise QUIC_IDS alone holds it.
        if backend_id == u32::MAX {
            continue;
        }
        out.entry(quic_slot(key.service_id, key.server_id))
            .or_insert(quic_slot_value(key.server_id, backend_id));
    }
    out
}

/// What this agent wrote into `QUIC_IDS` and `QUIC_SLOTS`.
#[derive(Debug, Default)]
pub struct QuicIds {
    written: BTreeMap<QuicKey, u32>,
    /// The non-empty slots of `QUIC_SLOTS`.
    slots: BTreeMap<u32, u64>,
}

impl QuicIds {
    /// The entries a previous agent left (hitless restart): `QUIC_IDS` walked, the slot
    /// array read in `BPF_MAP_LOOKUP_BATCH` calls.
    pub fn adopt(maps: &Maps) -> Result<Self, SyncError> {
        let written = maps
            .quic_ids
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| SyncError::Read {
                map: names::QUIC_IDS,
                key: MapKey::All,
                source,
            })?;
        let slots = super::batch::lookup_array(&maps.quic_slots, 0, QUIC_SLOTS_LEN)
            .map_err(|e| SyncError::Read {
                map: names::QUIC_SLOTS,
                key: MapKey::Index(e.index),
                source: e.into_map_error(),
            })?
            .into_iter()
            .zip(0u32..)
            .filter(|(v, _)| *v != 0)
            .map(|(v, slot)| (slot, v))
            .collect();
        Ok(Self { written, slots })
    }

    /// Write `want` into `QUIC_SLOTS`: changed slots through empty, then new ones, then
    /// those no longer wanted emptied.
    fn write_slots(
        &mut self,
        maps: &mut Maps,
        want: &BTreeMap<QuicKey, u32>,
    ) -> Result<(), SyncError> {
        let wanted = slots(want);
        let err = |source| SyncError::Write {
            what: "QUIC server id slot",
            source,
        };
        for (&slot, &value) in &wanted {
            match self.slots.get(&slot) {
                Some(&v) if v == value => continue,
                Some(_) => {
                    maps.quic_slots.set(slot, 0, 0).map_err(err)?;
                    self.slots.remove(&slot);
                }
                None => {}
            }
            maps.quic_slots.set(slot, value, 0).map_err(err)?;
            self.slots.insert(slot, value);
        }
        let gone: Vec<u32> = self
            .slots
            .keys()
            .filter(|s| !wanted.contains_key(s))
            .copied()
            .collect();
        for slot in gone {
            maps.quic_slots.set(slot, 0, 0).map_err(err)?;
            self.slots.remove(&slot);
        }
        Ok(())
    }

    /// Write changed and new entries of `want`, then the slots, then remove the entries
    /// it no longer has.
    pub fn write(
        &mut self,
        maps: &mut Maps,
        want: &BTreeMap<QuicKey, u32>,
    ) -> Result<(), SyncError> {
        for (key, &id) in want {
            if self.written.get(key) != Some(&id) {
                maps.quic_ids
                    .insert(key, id, 0)
                    .map_err(|source| SyncError::Write {
                        what: "QUIC server id",
                        source,
                    })?;
                self.written.insert(*key, id);
            }
        }
        self.write_slots(maps, want)?;
        let gone: Vec<QuicKey> = self
            .written
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            match maps.quic_ids.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(SyncError::Write {
                        what: "QUIC server id removal",
                        source,
                    });
                }
            }
            self.written.remove(&key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_goes_to_the_first_key_and_the_rest_stay_in_the_hash() {
        // Two keys of one slot: found by search, as the agent never chooses ids.
        let first = QuicKey {
            service_id: 1,
            server_id: 0x0101,
        };
        let slot = quic_slot(first.service_id, first.server_id);
        let other = (1..u32::MAX)
            .map(|server_id| QuicKey {
                service_id: 2,
                server_id,
            })
            .find(|k| quic_slot(k.service_id, k.server_id) == slot)
            .expect("a key of the same slot");
        let third = QuicKey {
            service_id: 1,
            server_id: 0x0102,
        };
        let want = BTreeMap::from([(first, 4), (other, 9), (third, 5)]);
        let got = slots(&want);
        assert_eq!(got.get(&slot), Some(&quic_slot_value(first.server_id, 4)));
        assert_eq!(
            got.get(&quic_slot(1, 0x0102)),
            Some(&quic_slot_value(0x0102, 5))
        );
        assert_eq!(got.len(), 2, "{got:?}");
        // Without the first key, the other one takes the slot.
        let want = BTreeMap::from([(other, 9)]);
        assert_eq!(
            slots(&want).get(&slot),
            Some(&quic_slot_value(other.server_id, 9))
        );
    }
}

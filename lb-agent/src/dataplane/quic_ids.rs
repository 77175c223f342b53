//! `QUIC_IDS`: for each `quic` service, its backends' QUIC server ids (`quic_id`) and
//! the backend ids they name, so that `xdp_lb` sends a short-header packet to the
//! backend its connection ID names (`lb-ebpf/src/quic.rs`). Written by the
//! [`super::sync::Reconciler`] after the services (it needs their backend ids), as a
//! diff against what it wrote before.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::MapError;
use lb_common::{maps as names, types::QuicKey};

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

/// What this agent wrote into `QUIC_IDS`.
#[derive(Debug, Default)]
pub struct QuicIds {
    written: BTreeMap<QuicKey, u32>,
}

impl QuicIds {
    /// The entries a previous agent left (hitless restart).
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
        Ok(Self { written })
    }

    /// Write changed and new entries of `want`, then remove those it no longer has.
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

//! The backends' next hops in the fast path's `NEXT_HOPS` map (issue 12, item 1).
//!
//! `bpf_fib_lookup` per packet cost more than everything else on an established flow's
//! path (+56 ns over the parse + lookup + IPIP floor). As Katran reads its next-hop MAC
//! from a map, the program reads each backend's egress interface, source and
//! destination MACs and MTU from `NEXT_HOPS[backend id]`, written here, and calls
//! `bpf_fib_lookup` only when the entry is missing, invalid, or was written for another
//! address (a backend id reused before this map caught up).
//!
//! The entries are derived from what the kernel says, never guessed: the backend's
//! route (`RTM_GETROUTE`: gateway or on-link, output interface, route MTU), the
//! neighbour entry of that next hop (its link-layer address while the entry is
//! `NUD_VALID`, the states in which `bpf_fib_lookup` answers with it), and the output
//! link (its MAC, MTU, and whether it is up). [`super::neigh`]'s keeper keeps these
//! three current from netlink notifications (neighbour and link events rewrite the
//! affected entries at once, route events after a short settle) and calls
//! [`NextHopTable::sync`] with what [`desired`] makes of them.
//!
//! An entry is valid only with all three known; anything else (no route, a next hop
//! not resolved yet or failed, a link down or without a MAC) leaves the entry invalid,
//! so the program falls back to `bpf_fib_lookup` and behaves exactly as without this
//! map (passes the packet up when the neighbour is unresolved, drops on unreachable).
//!
//! After a hitless restart the map is adopted with the rest of the fast path, but its
//! entries are not trusted: the first sync writes every backend's entry anew and
//! invalidates every other slot.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{Array, MapData, MapError};
use lb_common::types::{NEXT_HOP_F_VALID, NextHopEntry};

use super::{neigh::NextHop, sync::addr_words};

/// A backend's route as the kernel answers `RTM_GETROUTE` for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub hop: NextHop,
    /// The route's MTU metric, if it has one.
    pub mtu: Option<u32>,
}

/// The output link of a next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// Its Ethernet address (None: not an Ethernet-like link).
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// `IFF_UP`.
    pub up: bool,
}

/// An Ethernet address from a netlink attribute (None unless it has 6 bytes).
#[must_use]
pub fn mac_of(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

/// The entry of a backend at `addr`, from its route, the resolved link-layer address
/// of the route's next hop (None: not resolved) and the output link. Invalid (all
/// zero) unless everything needed is known and usable.
#[must_use]
pub fn entry_for(
    addr: IpAddr,
    route: Option<&Route>,
    neighbour: Option<[u8; 6]>,
    link: Option<&Link>,
) -> NextHopEntry {
    let (Some(route), Some(dmac), Some(link)) = (route, neighbour, link) else {
        return NextHopEntry::default();
    };
    let Some(smac) = link.mac.filter(|_| link.up) else {
        return NextHopEntry::default();
    };
    // bpf_fib_lookup checks the outer length against the route's MTU, else the link's.
    let mtu = route
        .mtu
        .filter(|m| *m > 0)
        .unwrap_or(link.mtu)
        .min(link.mtu);
    if mtu == 0 {
        return NextHopEntry::default();
    }
    let (words, family) = addr_words(addr);
    NextHopEntry {
        addr: words,
        ifindex: route.hop.ifindex,
        mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
        family,
        flags: NEXT_HOP_F_VALID,
        dmac,
        smac,
    }
}

/// The valid entries for the backend ids `ids` (id -> address), given the routes of
/// the backends, the resolved next hops and the links.
#[must_use]
pub fn desired(
    ids: &BTreeMap<u32, IpAddr>,
    routes: &BTreeMap<IpAddr, Route>,
    neighbours: &BTreeMap<NextHop, [u8; 6]>,
    links: &BTreeMap<u32, Link>,
) -> BTreeMap<u32, NextHopEntry> {
    ids.iter()
        .filter_map(|(&id, &addr)| {
            let route = routes.get(&addr);
            let neighbour = route.and_then(|r| neighbours.get(&r.hop)).copied();
            let link = route.and_then(|r| links.get(&r.hop.ifindex));
            let e = entry_for(addr, route, neighbour, link);
            (e.flags & NEXT_HOP_F_VALID != 0).then_some((id, e))
        })
        .collect()
}

/// What a sync writes: entries to write (new or changed) and ids to invalidate.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub set: Vec<(u32, NextHopEntry)>,
    pub clear: Vec<u32>,
}

/// The differences between the entries `want` and those `written`.
#[must_use]
pub fn diff(want: &BTreeMap<u32, NextHopEntry>, written: &BTreeMap<u32, NextHopEntry>) -> Writes {
    Writes {
        set: want
            .iter()
            .filter(|(id, e)| written.get(id) != Some(e))
            .map(|(id, e)| (*id, *e))
            .collect(),
        clear: written
            .keys()
            .filter(|id| !want.contains_key(id))
            .copied()
            .collect(),
    }
}

/// The `NEXT_HOPS` map and what this agent wrote to it.
pub struct NextHopTable {
    map: Array<MapData, NextHopEntry>,
    /// The valid entries as written (None until the first sync, which trusts nothing
    /// a previous agent left).
    written: Option<BTreeMap<u32, NextHopEntry>>,
}

impl NextHopTable {
    #[must_use]
    pub fn new(map: Array<MapData, NextHopEntry>) -> Self {
        NextHopTable { map, written: None }
    }

    /// Make the map hold `want` (and nothing else valid); returns how many slots were
    /// written. The first call rewrites every entry of `want` and invalidates every
    /// other slot that is not already invalid.
    pub fn sync(&mut self, want: &BTreeMap<u32, NextHopEntry>) -> Result<usize, MapError> {
        let written = match &mut self.written {
            Some(w) => w,
            None => {
                let mut stale = BTreeMap::new();
                for id in 0..self.map.len() {
                    let e = self.map.get(&id, 0)?;
                    if e != NextHopEntry::default() && !want.contains_key(&id) {
                        // Not valid for anything we know: cleared by the diff below.
                        stale.insert(id, e);
                    }
                }
                self.written.insert(stale)
            }
        };
        let w = diff(want, written);
        let n = w.set.len() + w.clear.len();
        for (id, e) in w.set {
            self.map.set(id, e, 0)?;
            written.insert(id, e);
        }
        for id in w.clear {
            self.map.set(id, NextHopEntry::default(), 0)?;
            written.remove(&id);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const OWN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xaa];

    fn hop(a: &str) -> NextHop {
        NextHop {
            address: a.parse().unwrap(),
            ifindex: 3,
        }
    }

    fn route(a: &str) -> Route {
        Route {
            hop: hop(a),
            mtu: None,
        }
    }

    fn link() -> Link {
        Link {
            mac: Some(OWN_MAC),
            mtu: 1500,
            up: true,
        }
    }

    #[test]
    fn a_resolved_next_hop_gives_a_valid_entry() {
        let be: IpAddr = "198.18.2.11".parse().unwrap();
        let e = entry_for(be, Some(&route("198.18.1.1")), Some(GW_MAC), Some(&link()));
        assert_eq!(
            e,
            NextHopEntry {
                addr: [
                    u32::from_ne_bytes(Ipv4Addr::new(198, 18, 2, 11).octets()),
                    0,
                    0,
                    0
                ],
                ifindex: 3,
                mtu: 1500,
                family: lb_common::types::FAMILY_V4,
                flags: NEXT_HOP_F_VALID,
                dmac: GW_MAC,
                smac: OWN_MAC,
            }
        );
        // A route MTU below the link's is what counts; one above it is not.
        let mut r = route("198.18.1.1");
        r.mtu = Some(1400);
        assert_eq!(
            entry_for(be, Some(&r), Some(GW_MAC), Some(&link())).mtu,
            1400
        );
        r.mtu = Some(9000);
        assert_eq!(
            entry_for(be, Some(&r), Some(GW_MAC), Some(&link())).mtu,
            1500
        );
        // A jumbo link past u16 is capped (the program compares a u16 length).
        let big = Link {
            mtu: 65536,
            ..link()
        };
        assert_eq!(
            entry_for(be, Some(&route("198.18.1.1")), Some(GW_MAC), Some(&big)).mtu,
            u16::MAX
        );
    }

    #[test]
    fn anything_unknown_or_unusable_gives_an_invalid_entry() {
        let be: IpAddr = "198.18.2.11".parse().unwrap();
        let r = route("198.18.1.1");
        let invalid = NextHopEntry::default();
        assert_eq!(entry_for(be, None, Some(GW_MAC), Some(&link())), invalid);
        assert_eq!(entry_for(be, Some(&r), None, Some(&link())), invalid);
        assert_eq!(entry_for(be, Some(&r), Some(GW_MAC), None), invalid);
        let down = Link {
            up: false,
            ..link()
        };
        assert_eq!(entry_for(be, Some(&r), Some(GW_MAC), Some(&down)), invalid);
        let no_mac = Link {
            mac: None,
            ..link()
        };
        assert_eq!(
            entry_for(be, Some(&r), Some(GW_MAC), Some(&no_mac)),
            invalid
        );
        assert_eq!(mac_of(&[1, 2, 3, 4]), None);
        assert_eq!(mac_of(&GW_MAC), Some(GW_MAC));
    }

    #[test]
    fn desired_follows_routes_neighbours_and_links_per_backend_id() {
        let a: IpAddr = "198.18.1.11".parse().unwrap();
        let b: IpAddr = "198.18.2.11".parse().unwrap();
        let c: IpAddr = "198.18.2.12".parse().unwrap();
        let ids = BTreeMap::from([(0, a), (1, b), (2, c), (7, b)]);
        // a on-link (its own next hop, resolved), b and c through a gateway; c has no
        // route.
        let routes = BTreeMap::from([(a, route("198.18.1.11")), (b, route("198.18.1.1"))]);
        let mut neighbours = BTreeMap::from([(hop("198.18.1.11"), [2, 0, 0, 0, 0, 0x11])]);
        let links = BTreeMap::from([(3, link())]);
        let d = desired(&ids, &routes, &neighbours, &links);
        assert_eq!(d.keys().copied().collect::<Vec<_>>(), vec![0]);
        assert_eq!(d[&0].dmac, [2, 0, 0, 0, 0, 0x11]);
        // The gateway resolves: both ids of b follow, with the gateway's MAC.
        neighbours.insert(hop("198.18.1.1"), GW_MAC);
        let d = desired(&ids, &routes, &neighbours, &links);
        assert_eq!(d.keys().copied().collect::<Vec<_>>(), vec![0, 1, 7]);
        assert_eq!(d[&1].dmac, GW_MAC);
        assert_eq!(d[&1], d[&7]);
    }

    #[test]
    fn diff_writes_changes_and_clears_what_is_gone() {
        let e = |mac: u8| NextHopEntry {
            flags: NEXT_HOP_F_VALID,
            dmac: [2, 0, 0, 0, 0, mac],
            ..NextHopEntry::default()
        };
        let written = BTreeMap::from([(0, e(1)), (1, e(2)), (2, e(3))]);
        let want = BTreeMap::from([(0, e(1)), (1, e(9)), (3, e(4))]);
        assert_eq!(
            diff(&want, &written),
            Writes {
                set: vec![(1, e(9)), (3, e(4))],
                clear: vec![2],
            }
        );
        assert_eq!(diff(&want, &want), Writes::default());
    }
}

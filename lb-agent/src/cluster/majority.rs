//! The cluster's health view and its majority rule.
//!
//! Every node checks every backend itself and publishes the ones it finds down
//! (`<prefix>/health/<node>`, bound to a lease of [`LEASE_TTL_S`](super::LEASE_TTL_S)).
//! The live members are the nodes whose key is there, plus this node (so a node counts
//! itself even before its first publication). While the store answers, every view is
//! taken as etcd has it, this node's own included (its fresh checks count once they
//! are published and come back through the watch): every node then evaluates the same
//! rule over the same views at the same revision, so every node takes a backend out
//! at the same time (to within the watch's delay) and the rings stay identical. A
//! backend is down for the cluster when a strict majority of the live members see it
//! down: then, and only then, it leaves the rings. A backend that fewer nodes cannot reach stays
//! in every ring: a node that cannot reach it counts it as locally down
//! (`xdplb_backend_local_down`, `local_down` in the API) and still forwards to it,
//! because moving those flows would break them on the nodes they move from.
//!
//! With etcd unreachable (or before this node's first publication) its own fresh view
//! stands in for its published one, with the other nodes' last views read (not aged
//! out): the ring stays what the cluster agreed
//! on until health really changes, and a backend this node alone sees die still needs
//! the others' (remembered) agreement. Falling back to local health instead would
//! change this node's ring on a purely local failure, the case the rule is there for.

use std::{collections::BTreeMap, net::SocketAddr};

use super::shared::HealthView;

/// The members' views: as published, or with this node's own fresh view in place of
/// what it published (see the module docs for when).
pub struct Members<'a> {
    others: Vec<&'a HealthView>,
    own: &'a HealthView,
}

impl<'a> Members<'a> {
    /// `views` as read from etcd; `fresh`: this node's own checks now; `published`:
    /// take this node's view as etcd has it (when it has one).
    pub fn new(
        views: &'a BTreeMap<String, HealthView>,
        node: &str,
        fresh: &'a HealthView,
        published: bool,
    ) -> Self {
        Members {
            others: views
                .iter()
                .filter(|(n, _)| n.as_str() != node)
                .map(|(_, v)| v)
                .collect(),
            own: views.get(node).filter(|_| published).unwrap_or(fresh),
        }
    }

    /// How many live members (this node included).
    pub fn count(&self) -> usize {
        self.others.len() + 1
    }

    /// How many members see `backend` of `service` down.
    pub fn seeing_down(&self, service: &str, backend: SocketAddr) -> usize {
        self.others
            .iter()
            .chain(std::iter::once(&self.own))
            .filter(|v| v.is_down(service, backend))
            .count()
    }

    /// A strict majority of the live members sees it down: out of the rings.
    pub fn down(&self, service: &str, backend: SocketAddr) -> bool {
        2 * self.seeing_down(service, backend) > self.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(down: &[&str]) -> HealthView {
        let mut v = HealthView::default();
        for d in down {
            v.down
                .entry("web".into())
                .or_default()
                .insert(d.parse().unwrap());
        }
        v
    }

    #[test]
    fn a_strict_majority_of_live_members_takes_a_backend_out() {
        let a: SocketAddr = "198.18.1.11:80".parse().unwrap();
        let b: SocketAddr = "198.18.1.12:80".parse().unwrap();
        // Three nodes; lb1 is this node.
        let views = BTreeMap::from([
            ("lb2".to_owned(), view(&["198.18.1.11:80"])),
            ("lb3".to_owned(), view(&[])),
            // What lb1 published last.
            ("lb1".to_owned(), view(&["198.18.1.12:80"])),
        ]);
        let fresh = view(&[]);
        let m = Members::new(&views, "lb1", &fresh, false);
        assert_eq!(m.count(), 3);
        // One of three: stays.
        assert!(!m.down("web", a));
        assert_eq!(
            m.seeing_down("web", b),
            0,
            "without the store the fresh view counts"
        );
        // With the store, what lb1 published counts (every node sees the same).
        let m = Members::new(&views, "lb1", &fresh, true);
        assert_eq!(m.seeing_down("web", b), 1);
        assert!(!m.down("web", b), "one of three");
        // Two of three: out.
        let fresh = view(&["198.18.1.11:80"]);
        let m = Members::new(&views, "lb1", &fresh, false);
        assert!(m.down("web", a));
        // With the store, lb1's fresh finding counts once published.
        assert!(!Members::new(&views, "lb1", &fresh, true).down("web", a));
        let m = Members::new(&views, "lb1", &fresh, false);
        // Another service of the same address: not affected.
        assert!(!m.down("api", a));
    }

    #[test]
    fn two_nodes_need_both_and_a_lone_node_decides_alone() {
        let a: SocketAddr = "198.18.1.11:80".parse().unwrap();
        let views = BTreeMap::from([("lb2".to_owned(), view(&[]))]);
        let own = view(&["198.18.1.11:80"]);
        // Only this node sees it down: 1 of 2 is no majority, it stays in the ring.
        assert!(!Members::new(&views, "lb1", &own, true).down("web", a));
        let views = BTreeMap::from([("lb2".to_owned(), view(&["198.18.1.11:80"]))]);
        assert!(Members::new(&views, "lb1", &own, true).down("web", a));
        // Alone (no other live member): its own view decides.
        let none = BTreeMap::new();
        // Not published yet: the fresh view stands in even with the store.
        assert!(Members::new(&none, "lb1", &own, true).down("web", a));
        assert!(!Members::new(&none, "lb1", &view(&[]), true).down("web", a));
    }
}

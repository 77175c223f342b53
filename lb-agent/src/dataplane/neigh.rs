//! Keeping the next hops towards backends resolved.
//!
//! `bpf_fib_lookup` answers "no neighbour" until the kernel has an ARP/ND entry for the
//! next hop, and the kernel only makes one when it sends there itself, which an L4
//! balancer host never does. As Cilium's agent does, we install *managed* neighbour
//! entries (`NTF_EXT_MANAGED`, Linux 5.16+) for the next hop of every backend: the kernel
//! resolves them at once and keeps them resolved by probing. Only entries this agent
//! added are removed again.
//!
//! Route and neighbour changes go through iproute2 (`ip route get`, `ip neigh`), which
//! every host that runs XDP has; the calls are few (on backend-set changes and a slow
//! periodic refresh), never on the packet path.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    process::{Command, Output},
};

#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("running `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("`{cmd}` printed something other than one route: {stdout}")]
    Parse { cmd: String, stdout: String },
}

/// The next hop of a destination: the gateway, or the destination itself when on-link.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NextHop {
    pub address: IpAddr,
    pub dev: String,
}

fn ip(args: &[&str]) -> Result<Output, NeighError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NeighError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NeighError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// Ask the kernel's routing table for the next hop towards `dst`.
pub fn next_hop(dst: IpAddr) -> Result<NextHop, NeighError> {
    let d = dst.to_string();
    let out = ip(&["-j", "route", "get", &d])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let parse_err = || NeighError::Parse {
        cmd: format!("ip -j route get {d}"),
        stdout: stdout.clone(),
    };
    let routes: serde_json::Value = serde_json::from_str(&stdout).map_err(|_| parse_err())?;
    let route = routes.get(0).ok_or_else(parse_err)?;
    let dev = route
        .get("dev")
        .and_then(|v| v.as_str())
        .ok_or_else(parse_err)?;
    let address = match route.get("gateway").and_then(|v| v.as_str()) {
        Some(gw) => gw.parse().map_err(|_| parse_err())?,
        None => dst,
    };
    Ok(NextHop {
        address,
        dev: dev.to_owned(),
    })
}

/// Whether a neighbour entry with a usable state (or one being managed) already exists.
fn has_entry(hop: &NextHop) -> Result<bool, NeighError> {
    let a = hop.address.to_string();
    let out = ip(&["-j", "neigh", "show", "to", &a, "dev", &hop.dev])?;
    let entries: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Array(vec![]));
    Ok(entries.as_array().is_some_and(|a| {
        a.iter().any(|e| {
            let states = e.get("state").and_then(|s| s.as_array());
            let flags = e.get("flags").and_then(|s| s.as_array());
            let has = |list: Option<&Vec<serde_json::Value>>, what: &[&str]| {
                list.is_some_and(|l| {
                    l.iter()
                        .any(|v| v.as_str().is_some_and(|s| what.contains(&s)))
                })
            };
            has(states, &["PERMANENT", "NOARP"]) || has(flags, &["managed"])
        })
    }))
}

/// Keeps managed neighbour entries for the next hops of a set of backends.
#[derive(Debug, Default)]
pub struct NextHopKeeper {
    /// Entries this agent added (removed again when no backend needs them).
    added: BTreeSet<NextHop>,
}

impl NextHopKeeper {
    /// Make sure every backend's next hop has a managed neighbour entry; drop the ones
    /// we added that no backend needs any more. Errors are per backend and returned for
    /// logging; the others are still handled.
    pub fn ensure(&mut self, backends: &BTreeSet<IpAddr>) -> Vec<(IpAddr, NeighError)> {
        let mut errors = Vec::new();
        let mut wanted = BTreeSet::new();
        for &b in backends {
            match next_hop(b) {
                Ok(hop) => {
                    wanted.insert(hop);
                }
                Err(e) => errors.push((b, e)),
            }
        }
        for hop in &wanted {
            if self.added.contains(hop) {
                continue;
            }
            match has_entry(hop) {
                Ok(true) => {}
                Ok(false) => {
                    let a = hop.address.to_string();
                    match ip(&[
                        "neigh",
                        "replace",
                        &a,
                        "dev",
                        &hop.dev,
                        "managed",
                        "extern_learn",
                    ]) {
                        Ok(_) => {
                            tracing::info!(next_hop = %hop.address, dev = %hop.dev, "keeping next hop resolved (managed neighbour)");
                            self.added.insert(hop.clone());
                        }
                        Err(e) => errors.push((hop.address, e)),
                    }
                }
                Err(e) => errors.push((hop.address, e)),
            }
        }
        let stale: Vec<NextHop> = self.added.difference(&wanted).cloned().collect();
        for hop in stale {
            self.remove(&hop);
        }
        errors
    }

    fn remove(&mut self, hop: &NextHop) {
        let a = hop.address.to_string();
        if let Err(e) = ip(&["neigh", "del", &a, "dev", &hop.dev]) {
            tracing::warn!(next_hop = %hop.address, dev = %hop.dev, error = %e, "removing managed neighbour");
        }
        self.added.remove(hop);
    }

    /// Remove every entry this agent added.
    pub fn clear(&mut self) {
        let all: Vec<NextHop> = self.added.iter().cloned().collect();
        for hop in all {
            self.remove(&hop);
        }
    }
}

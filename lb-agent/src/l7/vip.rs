//! L7 VIPs as local addresses. The proxy listens on the VIP, so it must be an address
//! of this host (DESIGN.md: "the agent adds it to `lo` when it is not already local,
//! and removes only what it added"). With XDP attached, the fast path passes L7 VIP
//! packets up to the kernel, which delivers them to the listener through `lo`'s address.

use std::{collections::BTreeSet, net::IpAddr, process::Command};

#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("adding the VIP {vip} to lo: `ip {args}` failed: {message}")]
    Add {
        vip: IpAddr,
        args: String,
        message: String,
    },
}

/// Whether `addr` is a local address here: binding a socket to it succeeds.
#[must_use]
pub fn is_local(addr: IpAddr) -> bool {
    std::net::UdpSocket::bind((addr, 0)).is_ok()
}

/// The VIPs this agent added to `lo`.
#[derive(Debug, Default)]
pub struct LocalVips {
    added: BTreeSet<IpAddr>,
}

fn prefix(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(_) => format!("{vip}/32"),
        IpAddr::V6(_) => format!("{vip}/128"),
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

impl LocalVips {
    /// Make `vip` local, adding it to `lo` when it is not.
    pub fn ensure(&mut self, vip: IpAddr) -> Result<(), VipError> {
        if self.added.contains(&vip) || is_local(vip) {
            return Ok(());
        }
        let p = prefix(vip);
        let args = ["addr", "add", p.as_str(), "dev", "lo"];
        ip(&args).map_err(|message| VipError::Add {
            vip,
            args: args.join(" "),
            message,
        })?;
        // An IPv6 address is tentative until DAD finishes; on lo that is immediate.
        tracing::info!(%vip, "added the L7 VIP to lo");
        self.added.insert(vip);
        Ok(())
    }

    /// Remove the VIPs this agent added that are not in `keep`.
    pub fn retain(&mut self, keep: &BTreeSet<IpAddr>) {
        let gone: Vec<IpAddr> = self.added.difference(keep).copied().collect();
        for vip in gone {
            let p = prefix(vip);
            match ip(&["addr", "del", p.as_str(), "dev", "lo"]) {
                Ok(()) => tracing::info!(%vip, "removed the L7 VIP from lo"),
                Err(e) => tracing::warn!(%vip, error = %e, "removing the L7 VIP from lo"),
            }
            self.added.remove(&vip);
        }
    }

    /// Remove every VIP this agent added.
    pub fn clear(&mut self) {
        self.retain(&BTreeSet::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_local_and_a_test_net_address_is_not() {
        assert!(is_local("127.0.0.1".parse().unwrap()));
        // 198.18.0.0/15 is never configured in the root namespace (test-bed rule).
        assert!(!is_local("198.19.255.254".parse().unwrap()));
    }
}

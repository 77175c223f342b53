//! L7 VIPs as local addresses. The proxy listens on the VIP, so it must be an address
//! of this host (DESIGN.md: "the agent adds it to `lo` when it is not already local,
//! and removes only what it added"). With XDP attached, the fast path passes L7 VIP
//! packets up to the kernel, which delivers them to the listener through `lo`'s address.
//!
//! Addresses are added and removed over netlink (`RTM_NEWADDR` / `RTM_DELADDR` through
//! the `rtnetlink` crate), asynchronously, on a socket opened at first use.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt as _;
use rtnetlink::{AddressMessageBuilder, Handle};

/// The interface L7 VIPs are added to.
pub const LOOPBACK: &str = "lo";

#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("adding the VIP {vip} to lo: opening a netlink socket: {source}")]
    Socket {
        vip: IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("adding the VIP {vip} to lo: looking up lo: {message}")]
    Loopback { vip: IpAddr, message: String },
    #[error("adding the VIP {vip} to lo: {source}")]
    Add {
        vip: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Whether `addr` is a local address here: binding a socket to it succeeds.
#[must_use]
pub fn is_local(addr: IpAddr) -> bool {
    std::net::UdpSocket::bind((addr, 0)).is_ok()
}

/// A host prefix: /32 or /128.
#[must_use]
pub fn host_prefix_len(vip: IpAddr) -> u8 {
    match vip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The VIPs this agent added to `lo`.
#[derive(Debug, Default)]
pub struct LocalVips {
    added: BTreeSet<IpAddr>,
    /// The netlink socket and `lo`'s interface index, once needed.
    netlink: Option<(Handle, u32)>,
}

impl LocalVips {
    /// The VIPs this agent added to `lo` and has not removed yet.
    #[must_use]
    pub fn added(&self) -> &BTreeSet<IpAddr> {
        &self.added
    }

    /// The netlink handle and `lo`'s index, opening the socket on first use (within a
    /// tokio runtime).
    async fn netlink(&mut self, vip: IpAddr) -> Result<(Handle, u32), VipError> {
        if let Some((h, lo)) = &self.netlink {
            return Ok((h.clone(), *lo));
        }
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| VipError::Socket { vip, source })?;
        // The connection task ends when the last handle is dropped.
        tokio::spawn(conn);
        let link = handle
            .link()
            .get()
            .match_name(LOOPBACK.to_owned())
            .execute()
            .try_next()
            .await
            .map_err(|e| VipError::Loopback {
                vip,
                message: e.to_string(),
            })?
            .ok_or_else(|| VipError::Loopback {
                vip,
                message: "no such interface".to_owned(),
            })?;
        let lo = link.header.index;
        self.netlink = Some((handle.clone(), lo));
        Ok((handle, lo))
    }

    /// Make `vip` local, adding it to `lo` when it is not.
    pub async fn ensure(&mut self, vip: IpAddr) -> Result<(), VipError> {
        if self.added.contains(&vip) || is_local(vip) {
            return Ok(());
        }
        let (handle, lo) = self.netlink(vip).await?;
        handle
            .address()
            .add(lo, vip, host_prefix_len(vip))
            .execute()
            .await
            .map_err(|source| VipError::Add { vip, source })?;
        // An IPv6 address is tentative until DAD finishes; on lo that is immediate.
        tracing::info!(%vip, "added the L7 VIP to lo");
        self.added.insert(vip);
        Ok(())
    }

    /// Remove the VIPs this agent added that are not in `keep`.
    pub async fn retain(&mut self, keep: &BTreeSet<IpAddr>) {
        let gone: Vec<IpAddr> = self.added.difference(keep).copied().collect();
        for vip in gone {
            match self.remove(vip).await {
                Ok(()) => tracing::info!(%vip, "removed the L7 VIP from lo"),
                Err(e) => tracing::warn!(%vip, error = %e, "removing the L7 VIP from lo"),
            }
            self.added.remove(&vip);
        }
    }

    async fn remove(&mut self, vip: IpAddr) -> Result<(), String> {
        let (handle, lo) = self.netlink(vip).await.map_err(|e| e.to_string())?;
        let len = host_prefix_len(vip);
        let msg = match vip {
            IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(lo)
                .address(a, len)
                .build(),
            IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(lo)
                .address(a, len)
                .build(),
        };
        handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|e| e.to_string())
    }

    /// Take over VIPs the previous agent added (a hand-off): this agent removes them
    /// when they are no longer needed, or at exit.
    pub fn adopt(&mut self, vips: impl IntoIterator<Item = IpAddr>) {
        self.added.extend(vips);
    }

    /// Forget the VIPs this agent added without removing them (handed to the next
    /// agent), returning them.
    pub fn forget(&mut self) -> BTreeSet<IpAddr> {
        std::mem::take(&mut self.added)
    }

    /// Remove every VIP this agent added.
    pub async fn clear(&mut self) {
        self.retain(&BTreeSet::new()).await;
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

    #[test]
    fn vips_are_host_prefixes() {
        assert_eq!(host_prefix_len("198.18.100.1".parse().unwrap()), 32);
        assert_eq!(host_prefix_len("fd00:18::1".parse().unwrap()), 128);
    }

    #[tokio::test]
    async fn a_local_address_is_not_added_and_nothing_is_removed() {
        let mut vips = LocalVips::default();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        vips.ensure(lo).await.unwrap();
        assert!(vips.added().is_empty());
        // Nothing was added, so nothing is removed (and no socket is opened).
        vips.clear().await;
        assert!(vips.netlink.is_none());
        assert!(is_local(lo));
    }
}

//! A three-member etcd cluster (Debian's `etcd-server`, 3.4) for the `[cluster]` tests:
//! each member in a namespace of the run, its data directory under the run's temporary
//! folder. Members are [`ChildGuard`]s: a test declares the cluster after the
//! namespaces' guard (the topology), so the members stop first, also on panic.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{self, ChildGuard};

/// One member: its name, namespace, address and process (None while stopped).
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<ChildGuard>,
}

/// The members, with the flags that started them.
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

impl EtcdCluster {
    /// Start one member per `(namespace, address)` in `run_dir` and wait until every
    /// member answers `etcdctl endpoint health`.
    pub fn start(
        hosts: &[(String, Ipv4Addr)],
        run_dir: &Path,
        token: &str,
    ) -> anyhow::Result<Self> {
        which_etcd()?;
        let initial_cluster = hosts
            .iter()
            .enumerate()
            .map(|(i, (_, a))| format!("e{}=http://{a}:2380", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members: hosts
                .iter()
                .enumerate()
                .map(|(i, (ns, addr))| Member {
                    name: format!("e{}", i + 1),
                    ns: ns.clone(),
                    addr: *addr,
                    data_dir: run_dir.join(format!("etcd-e{}", i + 1)),
                    log: run_dir.join(format!("etcd-e{}.log", i + 1)),
                    child: None,
                })
                .collect(),
            initial_cluster,
            token: token.to_owned(),
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(Duration::from_secs(20))?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &self.members[i];
        let a = m.addr;
        let args: Vec<String> = vec![
            "etcd".into(),
            "--name".into(),
            m.name.clone(),
            "--data-dir".into(),
            m.data_dir.to_string_lossy().into_owned(),
            "--listen-client-urls".into(),
            format!("http://{a}:2379"),
            "--advertise-client-urls".into(),
            format!("http://{a}:2379"),
            "--listen-peer-urls".into(),
            format!("http://{a}:2380"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{a}:2380"),
            "--initial-cluster".into(),
            self.initial_cluster.clone(),
            "--initial-cluster-state".into(),
            "new".into(),
            "--initial-cluster-token".into(),
            self.token.clone(),
            // Faster elections than the defaults (100 ms / 1 s): a lost member is noticed
            // sooner; the test bed's links are local.
            "--heartbeat-interval".into(),
            "50".into(),
            "--election-timeout".into(),
            "500".into(),
        ];
        let child = netns::spawn(&m.ns, &args, Some(&m.log))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// The client URLs, for `[cluster] etcd`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}:2379", m.addr))
            .collect()
    }

    /// Stop member `i` (SIGTERM, then SIGKILL); its data stays for [`Self::restart`].
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.members[i].child.take() {
            c.stop(Duration::from_secs(3))?;
        }
        Ok(())
    }

    /// Start member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn(i)
    }

    /// `etcdctl` against the running members, run in the first member's namespace.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://{}:2379", m.addr))
            .collect();
        let endpoints = format!("--endpoints={}", running.join(","));
        let mut full = vec!["env", "ETCDCTL_API=3", "etcdctl", endpoints.as_str()];
        full.extend_from_slice(args);
        netns::exec(&self.members[0].ns, &full)
    }

    /// Wait until every running member reports healthy.
    pub fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match self.etcdctl(&["endpoint", "health", "--command-timeout=1s"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let logs: Vec<String> = self
                        .members
                        .iter()
                        .map(|m| {
                            format!(
                                "--- {}:\n{}",
                                m.name,
                                std::fs::read_to_string(&m.log).unwrap_or_default()
                            )
                        })
                        .collect();
                    bail!(
                        "etcd is not healthy within {within:?}: {e:#}\n{}",
                        logs.join("\n")
                    );
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

fn which_etcd() -> anyhow::Result<()> {
    which::which("etcd")
        .map(drop)
        .context("`etcd` is not on PATH: `cargo xtask setup` installs Debian's etcd-server")
}

//! Announcing VIPs through a local BIRD 2 (`[bgp]`, DESIGN.md "A VIP is announced ...").
//!
//! The agent does not speak BGP itself: it writes the VIPs it announces into
//! `include_file` as BIRD static routes and has BIRD read its config again (`birdc -s
//! bird_socket configure`). The operator's BIRD config includes that file and exports
//! `proto "xdplb_vips"` (IPv4) and `proto "xdplb_vips6"` (IPv6) to its peers: BIRD 2
//! gives a static protocol one channel, so the two families are two protocols. Both
//! are always written (empty when nothing of that family is announced), so filters
//! naming them stay valid.
//!
//! - [`announce_set`]: which VIPs this node announces (pure).
//! - [`render`]: the file's text (pure); [`render_with`] adds the site preference
//!   (`site_prepend`: the node's AS prepended to every route's AS path).
//! - [`Announcer`]: writes the file atomically and runs `birdc configure`, only when the
//!   set changed; a node drain withdraws everything until undrained. A BIRD that is
//!   absent or refuses the config is logged as an ERROR, shown in [`BgpStatus`], and
//!   tried again at the next update; forwarding does not depend on it.
//! - [`BgpNode`] and [`spawn`]: the announcer as the agent runs it: a task that looks at
//!   the services every [`TICK`] and announces what can serve, the node drain of the
//!   API, the status for `GET /api/v1/node` and `xdplb_vip_announced{vip}`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{BgpConfig, Config, Mode};
use crate::control::Control;
use crate::l7::manager::L7Registry;
use crate::state::ServiceView;

/// How often the agent looks at its services to decide what to announce: a VIP whose
/// service stops serving is withdrawn within this (plus BGP's own delay).
pub const TICK: Duration = Duration::from_millis(500);

/// After a failed update (BIRD absent or refusing), the next try with an unchanged set
/// comes after this, so that a missing BIRD gives one ERROR line per interval.
pub const RETRY: Duration = Duration::from_secs(5);

/// The IPv4 static protocol's name in `include_file`.
pub const PROTOCOL_V4: &str = "xdplb_vips";
/// The IPv6 static protocol's name in `include_file`.
pub const PROTOCOL_V6: &str = "xdplb_vips6";

/// The VIP addresses this node should announce: a VIP is announced when some service
/// on it can serve. An l4 service can serve while the fast path is attached and some
/// backend is eligible (not `all_down`, fail open included: a node whose backends are
/// all down withdraws so that the other nodes take its flows); an l7 service, while its
/// proxy runs (`l7_running`) and some backend is eligible.
pub fn announce_set(
    config: &Config,
    views: &[ServiceView],
    fast_path: bool,
    l7_running: impl Fn(&str) -> bool,
) -> BTreeSet<IpAddr> {
    config
        .services
        .iter()
        .filter(|svc| {
            let eligible = views
                .iter()
                .find(|v| v.name == svc.name)
                .is_some_and(|v| !v.all_down);
            eligible
                && match svc.mode {
                    Mode::L4 => fast_path,
                    Mode::L7 => l7_running(&svc.name),
                }
        })
        .map(|svc| svc.vip.ip().to_canonical())
        .collect()
}

/// The text of `include_file` announcing `vips`, with no site preference.
pub fn render(vips: &BTreeSet<IpAddr>) -> String {
    render_with(vips, None)
}

/// The site preference of a node's announcements: its AS (`local_as`) prepended
/// `count` times (`site_prepend`); `None` when `site_prepend` is 0.
pub fn site_prepend(config: &BgpConfig) -> Option<(u32, u8)> {
    match (config.local_as, config.site_prepend) {
        (Some(asn), count) if count > 0 => Some((asn, count)),
        _ => None,
    }
}

/// The text of `include_file` announcing `vips`; with `prepend = Some((asn, n))` every
/// route carries `bgp_path.prepend(asn)` n times (BIRD applies it to the static route,
/// and the BGP export to an eBGP peer adds the node's AS once more).
pub fn render_with(vips: &BTreeSet<IpAddr>, prepend: Option<(u32, u8)>) -> String {
    let mut out = String::from(
        "# Written by lb-agent ([bgp] include_file): the VIPs this node announces.\n\
         # Rewritten on every change; do not edit.\n",
    );
    let attrs = match prepend {
        Some((asn, n)) => {
            let _ = writeln!(
                out,
                "# bgp.site_prepend = {n}: AS {asn} prepended {n} times."
            );
            let each = format!("bgp_path.prepend({asn}); ");
            format!(" {{ {}}}", each.repeat(usize::from(n)))
        }
        None => String::new(),
    };
    for (name, channel, v4) in [(PROTOCOL_V4, "ipv4", true), (PROTOCOL_V6, "ipv6", false)] {
        let _ = writeln!(out, "protocol static {name} {{\n  {channel};");
        for vip in vips.iter().filter(|ip| ip.is_ipv4() == v4) {
            let len = if v4 { 32 } else { 128 };
            let _ = writeln!(out, "  route {vip}/{len} blackhole{attrs};");
        }
        out.push_str("}\n");
    }
    out
}

/// Write `text` to `path` atomically: a temporary file in the same directory, synced,
/// renamed over `path`.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    // BIRD may run as another user: the file must be readable (tempfile makes it 0600).
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// What BIRD made of the last update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BirdState {
    /// Nothing was written yet.
    Pending,
    /// The file is written and BIRD took it.
    Configured,
    /// Writing the file or `birdc configure` failed (see `error`); tried again at the
    /// next update.
    Error,
}

/// The announcements as the API shows them (`GET /api/v1/node`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BgpStatus {
    /// `POST /api/v1/node/drain` withdrew every VIP (until `undrain`).
    pub drained: bool,
    /// The VIPs in `include_file` as BIRD last took it.
    #[schema(value_type = Vec<String>)]
    pub announced: Vec<IpAddr>,
    /// The VIPs this node would announce (equal to `announced` unless drained or BIRD
    /// failed).
    #[schema(value_type = Vec<String>)]
    pub wanted: Vec<IpAddr>,
    pub bird: BirdState,
    /// The last failure, while `bird` is `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[schema(value_type = String)]
    pub include_file: PathBuf,
    #[schema(value_type = String)]
    pub bird_socket: PathBuf,
}

/// Writes `include_file` and drives BIRD; see the [module docs](self).
#[derive(Debug)]
pub struct Announcer {
    config: BgpConfig,
    birdc: PathBuf,
    drained: bool,
    wanted: BTreeSet<IpAddr>,
    /// What BIRD took last; None before the first success and after a failure (so the
    /// next update writes again).
    configured: Option<BTreeSet<IpAddr>>,
    /// What BIRD took at some point (for the API and the metric while it fails).
    announced: BTreeSet<IpAddr>,
    bird: BirdState,
    error: Option<String>,
}

impl Announcer {
    /// An announcer that runs `birdc` from `PATH`.
    pub fn new(config: BgpConfig) -> Self {
        Self::with_birdc(config, PathBuf::from("birdc"))
    }

    /// An announcer that runs the given `birdc` program.
    pub fn with_birdc(config: BgpConfig, birdc: PathBuf) -> Self {
        Self {
            config,
            birdc,
            drained: false,
            wanted: BTreeSet::new(),
            configured: None,
            announced: BTreeSet::new(),
            bird: BirdState::Pending,
            error: None,
        }
    }

    pub fn config(&self) -> &BgpConfig {
        &self.config
    }

    /// Announce `wanted` (nothing while drained). Writes and configures only when the
    /// announced set differs from what BIRD took last (or the last try failed); returns
    /// whether it did. Failures are logged and kept in the status.
    pub fn update(&mut self, wanted: BTreeSet<IpAddr>) -> Result<bool, String> {
        self.wanted = wanted;
        self.apply()
    }

    /// Withdraw every VIP (until [`Announcer::undrain`]).
    pub fn drain(&mut self) -> Result<bool, String> {
        self.drained = true;
        self.apply()
    }

    /// Announce the wanted VIPs again after a drain.
    pub fn undrain(&mut self) -> Result<bool, String> {
        self.drained = false;
        self.apply()
    }

    pub fn drained(&self) -> bool {
        self.drained
    }

    fn target(&self) -> BTreeSet<IpAddr> {
        if self.drained {
            BTreeSet::new()
        } else {
            self.wanted.clone()
        }
    }

    fn apply(&mut self) -> Result<bool, String> {
        let target = self.target();
        if self.configured.as_ref() == Some(&target) {
            return Ok(false);
        }
        match self.write_and_configure(&target) {
            Ok(()) => {
                let vips: Vec<String> = target.iter().map(ToString::to_string).collect();
                tracing::info!(announced = ?vips, drained = self.drained, "BGP announcements updated");
                self.announced.clone_from(&target);
                self.configured = Some(target);
                self.bird = BirdState::Configured;
                self.error = None;
                Ok(true)
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    socket = %self.config.bird_socket.display(),
                    "BGP announcements not updated: BIRD did not take {}; forwarding goes on; tried again at the next change or within 5 s",
                    self.config.include_file.display()
                );
                self.configured = None;
                self.bird = BirdState::Error;
                self.error = Some(e.clone());
                Err(e)
            }
        }
    }

    fn write_and_configure(&self, target: &BTreeSet<IpAddr>) -> Result<(), String> {
        let text = render_with(target, site_prepend(&self.config));
        write_atomically(&self.config.include_file, &text).map_err(|e| {
            format!(
                "writing bgp.include_file {}: {e}",
                self.config.include_file.display()
            )
        })?;
        birdc_configure(&self.birdc, &self.config.bird_socket)
    }

    /// Whether something failed and an update should be tried again.
    pub fn failed(&self) -> bool {
        self.bird == BirdState::Error
    }

    pub fn status(&self) -> BgpStatus {
        BgpStatus {
            drained: self.drained,
            announced: self.announced.iter().copied().collect(),
            wanted: self.wanted.iter().copied().collect(),
            bird: self.bird.clone(),
            error: self.error.clone(),
            include_file: self.config.include_file.clone(),
            bird_socket: self.config.bird_socket.clone(),
        }
    }
}

/// `birdc -s SOCKET configure`: Ok when BIRD answers that it reconfigured (or queued a
/// reconfiguration). birdc exits 0 also when BIRD rejects the config, so the answer is
/// read: BIRD's reply codes 0003 (`Reconfigured`), 0004 (`Reconfiguration in progress`),
/// 0018/0019 (queued) mean taken.
pub fn birdc_configure(birdc: &Path, socket: &Path) -> Result<(), String> {
    let out = Command::new(birdc)
        .arg("-s")
        .arg(socket)
        .arg("configure")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e} (is bird2 installed?)", birdc.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = text.trim();
    let taken = text.lines().any(|l| {
        let l = l.trim_start();
        ["0003", "0004", "0018", "0019"]
            .iter()
            .any(|code| l.starts_with(code))
            || l.starts_with("Reconfigured")
            || l.starts_with("Reconfiguration in progress")
    });
    if out.status.success() && taken {
        Ok(())
    } else {
        Err(format!(
            "birdc -s {} configure: {}",
            socket.display(),
            if text.is_empty() {
                format!("no answer ({})", out.status)
            } else {
                text.replace('\n', " | ")
            }
        ))
    }
}

/// The announcer as the agent runs it, shared by the announcing task, the API and the
/// metrics. BIRD is driven on a blocking thread; readers of [`BgpNode::status`] never
/// wait for it.
#[derive(Debug)]
pub struct BgpNode {
    announcer: Arc<std::sync::Mutex<Announcer>>,
    status: std::sync::Mutex<BgpStatus>,
    drain_s: u64,
}

impl BgpNode {
    pub fn new(announcer: Announcer) -> Arc<Self> {
        Arc::new(Self {
            status: std::sync::Mutex::new(announcer.status()),
            drain_s: announcer.config().drain_s,
            announcer: Arc::new(std::sync::Mutex::new(announcer)),
        })
    }

    /// What is announced now.
    pub fn status(&self) -> BgpStatus {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Run `op` on the announcer on a blocking thread (it may run `birdc`), then
    /// publish its status.
    async fn with<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Announcer) -> T + Send + 'static,
    ) -> T {
        let announcer = Arc::clone(&self.announcer);
        let (out, status) = tokio::task::spawn_blocking(move || {
            let mut a = announcer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let out = op(&mut a);
            (out, a.status())
        })
        .await
        .expect("the announcer does not panic");
        *self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = status;
        out
    }

    /// Announce `wanted` (see [`Announcer::update`]).
    pub async fn update(&self, wanted: BTreeSet<IpAddr>) -> Result<bool, String> {
        self.with(move |a| a.update(wanted)).await
    }

    /// `POST /api/v1/node/drain`: withdraw every VIP, then wait `drain_s` so that the
    /// routers move the flows elsewhere before the caller goes on. Err when BIRD did not
    /// take the withdrawal (the node stays drained; the announcing task tries again).
    pub async fn drain(&self) -> Result<BgpStatus, String> {
        self.with(Announcer::drain).await?;
        tokio::time::sleep(Duration::from_secs(self.drain_s)).await;
        Ok(self.status())
    }

    /// `POST /api/v1/node/undrain`: announce again.
    pub async fn undrain(&self) -> Result<BgpStatus, String> {
        self.with(Announcer::undrain).await?;
        Ok(self.status())
    }
}

/// The announcing task: every [`TICK`], the VIPs that can serve ([`announce_set`]) are
/// announced when they changed (or [`RETRY`] after a failure). It ends when `stop`
/// turns true; the routes stay as they are (hitless restart: the next agent takes them
/// over).
pub fn spawn(
    node: Arc<BgpNode>,
    control: Arc<tokio::sync::Mutex<Control>>,
    l7: L7Registry,
    fast_path: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(BTreeSet<IpAddr>, Instant)> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            let wanted = {
                let c = control.lock().await;
                announce_set(c.config(), c.views(), fast_path, |name| {
                    l7.get(name).is_some()
                })
            };
            let failed = node.status().bird == BirdState::Error;
            let due = match &last {
                None => true,
                Some((set, at)) => *set != wanted || (failed && at.elapsed() >= RETRY),
            };
            if due {
                // Errors are logged by the announcer and shown in its status.
                let _ = node.update(wanted.clone()).await;
                last = Some((wanted, Instant::now()));
            }
        }
    })
}

/// `lb-agent detach --config FILE` with `[bgp]`: withdraw every VIP and wait `drain_s`
/// before the fast path goes. The running agent must be stopped first (it would
/// announce again).
pub fn withdraw_all(config: &BgpConfig) -> Result<(), String> {
    let mut a = Announcer::new(config.clone());
    a.drain()?;
    if config.drain_s > 0 {
        tracing::info!(
            drain_s = config.drain_s,
            "VIPs withdrawn; waiting before detaching"
        );
        std::thread::sleep(Duration::from_secs(config.drain_s));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

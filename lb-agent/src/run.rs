//! `lb-agent run`: the wiring of the process. Config and command line, the async
//! runtime, the fast path ([`crate::dataplane::fast_path`]) handed to the one owner of
//! desired state ([`Control`]), and the tasks and signals: REST API, L7 proxy, health
//! events, slow-start ramps, retries of failed map writes, reload
//! on SIGHUP, stop on SIGINT/SIGTERM.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};

use crate::{
    api::{self, ApiState},
    cli::XdpModeArg,
    cluster::Cluster,
    config::{Config, Mode, XdpMode},
    control::Control,
    dataplane::{desired::NoFastPath, fast_path::FastPath, loader::Capacities},
    decap::attach_mode,
    health::HealthChecker,
    l7::manager::{L7Manager, L7Registry},
    metrics::Metrics,
};

/// How often L7 services that failed to start are tried again.
const L7_RETRY: Duration = Duration::from_secs(5);

/// How often slow-starting backends get their weights raised.
const SLOW_START_STEP: Duration = Duration::from_millis(500);

pub struct RunArgs {
    pub config: PathBuf,
    pub iface: Option<String>,
    pub xdp_mode: Option<XdpModeArg>,
    pub bpffs: Option<PathBuf>,
    pub api: Option<std::net::SocketAddr>,
    pub state_dir: Option<PathBuf>,
    /// Remove the fast path when the agent stops, instead of leaving it running.
    pub detach_on_exit: bool,
}

/// The config file with the command line's overrides, validated again.
fn load_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(api) = args.api {
        config.agent.api_listen = api;
    }
    if let Some(dir) = &args.state_dir {
        config.agent.state_dir.clone_from(dir);
    }
    if let Some(iface) = &args.iface {
        config.agent.interface = Some(iface.clone());
    }
    let errors = config.validate();
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "with the command-line overrides the config is invalid:\n{}",
            list.join("\n")
        );
    }
    Ok(config)
}

fn effective_mode(config: &Config, arg: Option<XdpModeArg>) -> XdpModeArg {
    arg.unwrap_or(match config.dataplane.xdp_mode {
        XdpMode::Auto => XdpModeArg::Auto,
        XdpMode::Native => XdpModeArg::Native,
        XdpMode::Skb => XdpModeArg::Skb,
        XdpMode::Off => XdpModeArg::Off,
    })
}

/// `lb-agent run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let mode = effective_mode(&config, args.xdp_mode);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, config, mode))
}

async fn serve(args: RunArgs, config: Config, mode: XdpModeArg) -> anyhow::Result<()> {
    let token = read_token(&config)?;
    let metrics = Arc::new(Metrics::new());
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let health = || HealthChecker::new(events_tx.clone(), metrics.health_observer());
    // [cluster]: the link to etcd (lazy: etcd may be down now; the store task retries),
    // and what the file seeds there.
    let cluster = match &config.cluster {
        Some(c) => Some(ClusterStart {
            cluster: Cluster::connect(c)
                .await
                .map_err(|e| anyhow::anyhow!("[cluster]: {e}"))?,
            seed: (config.services.clone(), config.security.clone()),
        }),
        None => None,
    };
    let link = cluster.as_ref().map(|c| c.cluster.clone());
    let without_fast_path = |config: Config, why: &str| -> anyhow::Result<Control> {
        let l4: Vec<&str> = config
            .services
            .iter()
            .filter(|s| s.mode == Mode::L4)
            .map(|s| s.name.as_str())
            .collect();
        tracing::warn!(not_served = ?l4, "{why}: L4 services are not served; L7 services are");
        Ok(Control::new_with(
            config,
            health(),
            Box::new(NoFastPath),
            link.clone(),
        )?)
    };

    let (control, fast_path) = if mode == XdpModeArg::Off {
        (without_fast_path(config, "XDP is off")?, None)
    } else {
        let iface = args
            .iface
            .clone()
            .or_else(|| config.agent.interface.clone())
            .context("no interface: set agent.interface in the config or pass --iface")?;
        let bpffs = args
            .bpffs
            .clone()
            .unwrap_or_else(|| config.agent.bpffs.clone());
        let caps = Capacities::from(&config.dataplane);
        let (loaded, sink) = match FastPath::load(caps, &iface, &bpffs) {
            Ok(loaded) => loaded,
            Err(e) if mode == XdpModeArg::Auto => {
                tracing::error!(error = %format!("{e:#}"), iface, "the XDP program cannot be loaded");
                let control = without_fast_path(config, "running without the fast path")?;
                return serve_with(args, control, None, metrics, events, token, cluster).await;
            }
            Err(e) => return Err(e),
        };
        let mut control =
            Control::new_with(config.clone(), health(), Box::new(sink), link.clone())?;
        match attach_mode(mode).and_then(|mode| loaded.attach(mode)) {
            Ok(mut fp) => {
                fp.keep_next_hops(control.watch_l4_backends());
                (control, Some(fp))
            }
            // With --xdp-mode auto, a host where XDP cannot attach still serves L7.
            Err(e) if mode == XdpModeArg::Auto => {
                tracing::error!(error = %format!("{e:#}"), iface, "XDP cannot attach");
                control.shutdown();
                drop(control);
                (
                    without_fast_path(config, "running without the fast path")?,
                    None,
                )
            }
            Err(e) => return Err(e),
        }
    };
    serve_with(args, control, fast_path, metrics, events, token, cluster).await
}

/// `[cluster]` at start: the link to etcd and what the config file seeds there.
struct ClusterStart {
    cluster: Arc<Cluster>,
    seed: (
        Vec<crate::config::ServiceConfig>,
        crate::config::SecurityConfig,
    ),
}

/// With `[cluster]`: make `<state_dir>/sticky.key` the cluster's key (created in etcd
/// by the first node, read by the others), before the L7 services load it, so a cookie
/// issued by one node is honoured by every node. Without etcd now, the local key stays
/// (and says so).
async fn share_sticky_key(cluster: &Cluster, state_dir: &std::path::Path) {
    use rand::TryRngCore as _;
    let mut fresh = [0u8; 32];
    if rand::rngs::OsRng.try_fill_bytes(&mut fresh).is_err() {
        tracing::error!("cannot generate a sticky key: keeping the local one");
        return;
    }
    match cluster.store.sticky_key(&fresh).await {
        Ok(key) => {
            let path = state_dir.join(crate::l7::sticky::KEY_FILE);
            if std::fs::read(&path).is_ok_and(|k| k == key) {
                return;
            }
            let write = || -> std::io::Result<()> {
                use std::{io::Write as _, os::unix::fs::PermissionsExt as _};
                std::fs::create_dir_all(state_dir)?;
                let mut tmp = tempfile::NamedTempFile::new_in(state_dir)?;
                tmp.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(0o600))?;
                tmp.write_all(&key)?;
                tmp.as_file().sync_all()?;
                tmp.persist(&path).map_err(|e| e.error)?;
                Ok(())
            };
            match write() {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "sticky key: the cluster's (from etcd)")
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot write the cluster's sticky key")
                }
            }
        }
        Err(e) => tracing::warn!(
            error = %e,
            "sticky key: etcd unreachable at start, keeping the local key (cookies of other nodes are not honoured until a restart with etcd)"
        ),
    }
}

/// The agent's main loop once the fast path is up (or known to be absent): API, L7
/// proxy, health events, reloads, signals.
async fn serve_with(
    args: RunArgs,
    control: Control,
    fast_path: Option<FastPath>,
    metrics: Arc<Metrics>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<crate::health::Transition>,
    token: Option<String>,
    cluster: Option<ClusterStart>,
) -> anyhow::Result<()> {
    let api_listen = control.config().agent.api_listen;
    let services = control.config().services.len();
    let state_dir = control.config().agent.state_dir.clone();
    if let Some(c) = &cluster {
        share_sticky_key(&c.cluster, &state_dir).await;
    }
    let own_view = control.watch_own_view();
    let mut l7_desired = control.watch_l7();
    let mut retry_at = control.watch_retry();
    let control = Arc::new(Mutex::new(control));
    // [cluster]: the store task feeds the control plane from etcd.
    let (store_stop, store_stopped) = tokio::sync::watch::channel(false);
    let store_task = cluster.zip(own_view).map(|(c, own_view)| {
        let _ = metrics.cluster.set(c.cluster.clone());
        crate::cluster::spawn(
            c.cluster,
            crate::cluster::Feed {
                control: control.clone(),
                own_view,
                seed: c.seed,
            },
            store_stopped,
        )
    });

    // The L7 proxy: one task applies every published change of the l7 services.
    let l7 = L7Registry::default();
    let (l7_stop, mut l7_stopped) = tokio::sync::watch::channel(false);
    let mut manager = L7Manager::new(state_dir, metrics.http.clone(), l7.clone());
    let first = l7_desired.borrow_and_update().clone();
    manager.sync(&first).await;
    let l7_task = tokio::spawn(async move {
        let mut retry = tokio::time::interval(L7_RETRY);
        retry.tick().await;
        loop {
            tokio::select! {
                changed = l7_desired.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = retry.tick(), if manager.has_failures() => {}
                _ = l7_stopped.changed() => break,
            }
            let desired = l7_desired.borrow_and_update().clone();
            manager.sync(&desired).await;
        }
        manager.shutdown().await;
    });
    let listener = tokio::net::TcpListener::bind(api_listen)
        .await
        .with_context(|| format!("binding the REST API to {api_listen}"))?;
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    // Announcing VIPs through BIRD ([bgp]): a task of its own, stopped with the agent
    // (routes stay as they are: hitless restart).
    let bgp_node = control
        .lock()
        .await
        .config()
        .bgp
        .clone()
        .map(|cfg| crate::bgp::BgpNode::new(crate::bgp::Announcer::new(cfg)));
    let (bgp_stop, bgp_stopped) = tokio::sync::watch::channel(false);
    let bgp_task = bgp_node.clone().map(|node| {
        let _ = metrics.bgp.set(node.clone());
        crate::bgp::spawn(
            node,
            control.clone(),
            l7.clone(),
            fast_path.is_some(),
            bgp_stopped,
        )
    });
    let router = api::router(ApiState {
        control: control.clone(),
        token,
        metrics,
        config_path: args.config.clone(),
        l7,
        bgp: bgp_node,
    });
    let api_task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = api_stopped.await;
            })
            .await
    });
    tracing::info!(services, api = %api_listen, "agent ready");

    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut ramp = tokio::time::interval(SLOW_START_STEP);
    ramp.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let retry_due = *retry_at.borrow_and_update();
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                let mut c = control.lock().await;
                // SIGHUP never removes every service (POST /api/v1/reload can, when asked).
                match c.reload(&args.config, false).await {
                    // Control logs what the reload changed.
                    Ok(_report) => {}
                    Err(e) => tracing::error!(error = %e, "config reload rejected; keeping the running config"),
                }
            }
            Some(t) = events.recv() => {
                let mut c = control.lock().await;
                // Coalesce a burst of transitions into one recompute.
                let mut n = 1;
                while events.try_recv().is_ok() {
                    n += 1;
                }
                if let Err(e) = c.recompute() {
                    tracing::error!(error = %e, transitions = n, "applying health changes");
                } else {
                    tracing::info!(service = %t.key.service, backend = %t.key.address, up = t.up, transitions = n, "health change applied");
                }
            }
            _ = ramp.tick() => {
                let mut c = control.lock().await;
                if c.ramping() {
                    if let Err(e) = c.recompute() {
                        tracing::error!(error = %e, "raising slow-start weights");
                    }
                }
            }
            // A failed map write is due for another try (Control logs the outcome).
            () = sleep_until(retry_due) => {
                let _ = control.lock().await.retry_writes_at(Instant::now());
            }
            // The retry deadline moved: sleep on the new one.
            Ok(()) = retry_at.changed() => {}
        }
    }
    let _ = api_stop.send(());
    match tokio::time::timeout(Duration::from_secs(5), api_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "REST API server"),
        Ok(Err(e)) => tracing::warn!(error = %e, "REST API task"),
        Err(_) => tracing::warn!("REST API did not finish within 5 s"),
    }
    let _ = store_stop.send(true);
    if let Some(task) = store_task {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "cluster store task");
        }
    }
    let _ = bgp_stop.send(true);
    if let Some(task) = bgp_task {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "BGP task");
        }
    }
    let _ = l7_stop.send(true);
    if let Err(e) = l7_task.await {
        tracing::warn!(error = %e, "L7 task");
    }
    let snapshot = {
        let mut c = control.lock().await;
        c.shutdown();
        c.snapshot()
    };
    if let Some(fp) = fast_path {
        fp.stop(snapshot, args.detach_on_exit).await;
    }
    Ok(())
}

/// The API's bearer token from `agent.api_token_file`, if one is configured.
fn read_token(config: &Config) -> anyhow::Result<Option<String>> {
    let Some(path) = &config.agent.api_token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading agent.api_token_file {}", path.display()))?;
    let token = token.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "agent.api_token_file {} is empty",
        path.display()
    );
    Ok(Some(token.to_owned()))
}

/// Sleep until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

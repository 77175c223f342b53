//! One L7 service as the agent's manager drives it: [`L7Service::start`] binds the
//! VIP and serves; [`L7Service::update_backends`] feeds it the serving set (health,
//! drain and weights decided by the control plane); [`L7Service::shutdown`] stops it
//! gracefully.
//!
//! A started service has no backend until the first `update_backends`: until then
//! it answers `503`.
//!
//! Settings change without refusing a connection: [`L7Service::successor`] starts a
//! service with the new settings on the same listening socket (same VIP), keeping the
//! cache when its settings did not change; the old one then drains
//! ([`L7Service::shutdown`]). [`L7Service::start_on`] serves a socket inherited from
//! the previous agent (see [`crate::handoff`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::config::{Mode, ServiceConfig};
use crate::l7::balancer::{BackendState, Pool};
use crate::l7::cache::Cache;
use crate::l7::proxy::{Proxy, Sticky};
use crate::l7::server::Server;
use crate::l7::stats::HttpStats;
use crate::l7::sticky::{StickyError, StickyKey};
use crate::l7::tls::{self, TlsError};
use crate::l7::upstream::Upstream;
use crate::l7::workers::PerWorker;

/// Backlog of the VIP's listening socket.
const BACKLOG: u32 = 1024;

/// Why an L7 service could not start.
#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    /// The service is not `mode = "l7"`.
    #[error("service \"{service}\": not an l7 service")]
    NotL7 {
        /// Service name.
        service: String,
    },
    /// The VIP could not be bound.
    #[error("service \"{service}\": cannot listen on {addr}: {source}")]
    Bind {
        /// Service name.
        service: String,
        /// The VIP.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("service \"{service}\": {source}")]
    Tls {
        /// Service name.
        service: String,
        /// What was wrong.
        source: TlsError,
    },
    /// The sticky-cookie key could not be loaded or created.
    #[error("service \"{service}\": sticky key under {}: {source}", state_dir.display())]
    Sticky {
        /// Service name.
        service: String,
        /// The agent's state directory.
        state_dir: PathBuf,
        /// What was wrong.
        source: StickyError,
    },
}

/// A running L7 service (see the [module docs](self)).
#[derive(Debug)]
pub struct L7Service {
    proxy: Arc<Proxy>,
    local_addr: SocketAddr,
    server: Server,
    /// The listening socket (shared with a successor while this service drains).
    listener: Arc<TcpListener>,
    /// The settings it was started with.
    config: ServiceConfig,
}

/// Bind `addr` with `SO_REUSEADDR`.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

impl L7Service {
    /// Bind the VIP (`SO_REUSEADDR`), load TLS, open the sticky key under `state_dir`
    /// when sticky sessions are on, create the pool and the cache, and start serving.
    pub async fn start(
        cfg: &ServiceConfig,
        state_dir: &Path,
        stats: HttpStats,
    ) -> Result<Self, L7Error> {
        Self::start_on(cfg, state_dir, stats, None, &[]).await
    }

    /// [`L7Service::start`] on `listener` when given (a listening socket bound to the
    /// VIP, inherited from the previous agent) instead of binding, serving `serving`
    /// (see [`L7Service::update_backends`]) from the first connection on.
    pub async fn start_on(
        cfg: &ServiceConfig,
        state_dir: &Path,
        stats: HttpStats,
        listener: Option<std::net::TcpListener>,
        serving: &[(SocketAddr, u32)],
    ) -> Result<Self, L7Error> {
        let listener = match listener {
            Some(l) => {
                let bind_err = |source| L7Error::Bind {
                    service: cfg.name.clone(),
                    addr: cfg.vip,
                    source,
                };
                l.set_nonblocking(true).map_err(bind_err)?;
                TcpListener::from_std(l).map_err(bind_err)?
            }
            None => bind(cfg.vip).map_err(|source| L7Error::Bind {
                service: cfg.name.clone(),
                addr: cfg.vip,
                source,
            })?,
        };
        Self::build(cfg, state_dir, stats, Arc::new(listener), None, serving)
    }

    /// A service with the settings `cfg` (same VIP) serving this one's listening
    /// socket, with this one's cache when the cache settings are the same. This one
    /// stops accepting as soon as the successor exists; the caller then shuts it down:
    /// it drains while the successor accepts.
    pub fn successor(
        &self,
        cfg: &ServiceConfig,
        state_dir: &Path,
        stats: HttpStats,
        serving: &[(SocketAddr, u32)],
    ) -> Result<Self, L7Error> {
        let cache = (cfg.cache == self.config.cache)
            .then(|| self.proxy.cache.clone())
            .flatten();
        let next = Self::build(
            cfg,
            state_dir,
            stats,
            Arc::clone(&self.listener),
            cache,
            serving,
        )?;
        // From here on the successor takes every new connection.
        self.server.stop_accepting();
        Ok(next)
    }

    /// A duplicate of the listening socket's descriptor (for the next agent).
    pub fn listener_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;
        self.listener.as_fd().try_clone_to_owned()
    }

    /// The settings the service runs with.
    #[must_use]
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    fn build(
        cfg: &ServiceConfig,
        state_dir: &Path,
        stats: HttpStats,
        listener: Arc<TcpListener>,
        cache: Option<Cache>,
        serving: &[(SocketAddr, u32)],
    ) -> Result<Self, L7Error> {
        let service = cfg.name.clone();
        if cfg.mode != Mode::L7 {
            return Err(L7Error::NotL7 { service });
        }
        let tls = cfg
            .tls
            .as_ref()
            .map(tls::server_config)
            .transpose()
            .map_err(|source| L7Error::Tls {
                service: service.clone(),
                source,
            })?;
        let sticky = match &cfg.sticky {
            None => None,
            Some(s) => Some(Sticky {
                key: StickyKey::load_or_create(state_dir).map_err(|source| L7Error::Sticky {
                    service: service.clone(),
                    state_dir: state_dir.to_owned(),
                    source,
                })?,
                cookie: s.cookie.clone(),
                ttl: Duration::from_secs(s.ttl_s),
            }),
        };
        let local_addr = listener.local_addr().map_err(|source| L7Error::Bind {
            service: service.clone(),
            addr: cfg.vip,
            source,
        })?;
        let (hard_stop, _) = watch::channel(false);
        let proxy = Arc::new(Proxy {
            name: service,
            http: cfg.http.clone(),
            tls: tls.is_some(),
            pool: Pool::new(cfg.scheduler, cfg.hash_on.clone(), &cfg.http),
            cache: cache.or_else(|| cfg.cache.as_ref().map(Cache::new)),
            sticky,
            upstream: PerWorker::try_new(|| Upstream::new(cfg)).map_err(|source| L7Error::Tls {
                service: cfg.name.clone(),
                source,
            })?,
            stats: stats.service(&cfg.name),
            tunnels: TaskTracker::new(),
            hard_stop,
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        // Before the first connection: a replacement must not answer 503 for a moment.
        proxy.pool.update(serving);
        let server = Server::spawn(
            Arc::clone(&listener),
            Arc::clone(&proxy),
            tls.map(TlsAcceptor::from),
        );
        tracing::info!(service = %proxy.name, addr = %local_addr, tls = proxy.tls, via = crate::l7::headers::via_name(), "L7 service listening");
        Ok(Self {
            proxy,
            local_addr,
            server,
            listener,
            config: cfg.clone(),
        })
    }

    /// The service's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.proxy.name
    }

    /// Replace the serving set: `(address, effective weight)` of every backend that
    /// takes new requests.
    pub fn update_backends(&self, serving: &[(SocketAddr, u32)]) {
        self.proxy.pool.update(serving);
    }

    /// The bound address (the VIP; its port when the VIP asked for port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Drop cached responses: all (`None`), one path, or a path prefix. `None` when
    /// the service has no cache.
    #[must_use]
    pub fn purge_cache(&self, path: Option<&str>, prefix: bool) -> Option<u64> {
        self.proxy.cache.as_ref().map(|c| c.purge(path, prefix))
    }

    /// `(bytes used, entries)` of the cache, as the cache reports them; `None` without one.
    #[must_use]
    pub fn cache_usage(&self) -> Option<(u64, u64)> {
        self.proxy.cache.as_ref().map(Cache::usage)
    }

    /// The pool's view of each backend.
    #[must_use]
    pub fn pool_snapshot(&self) -> Vec<BackendState> {
        self.proxy.pool.snapshot()
    }

    /// Stop accepting and finish in-flight requests within `grace`; then close what
    /// remains.
    pub async fn shutdown(self, grace: Duration) {
        let Self {
            proxy,
            server,
            listener,
            ..
        } = self;
        // The socket closes once no successor holds it either (new connections are
        // then refused); the accept loop lets go of it when it stops.
        drop(listener);
        server.shutdown(grace).await;
        tracing::info!(service = %proxy.name, "L7 service stopped");
    }
}

//! The Custom Metrics API's HTTPS server: TLS handshakes through the crate's
//! [`crate::tls::incoming`] (concurrent, with a deadline), then HTTP/1.1 or
//! HTTP/2 per connection (hyper's auto builder; ALPN offers both), each
//! request carrying its connection's client certificates to the router.
//!
//! Its own loop rather than `axum::serve`: that one has no header-read
//! timeout, no stream limit and no way to hand the TLS session to a request.
//! Anyone may reach the port, so connections are bounded in number, in time
//! to send headers and in concurrent HTTP/2 streams.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use futures::StreamExt;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use super::{
    Catalogue, PodMetricSource,
    api::{self, ApiState, Peer},
    auth::Guard,
    tls::ApiTls,
};
use crate::{
    config::Config,
    tls::{self, Conn, Tls},
};

/// Open connections at most; more are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS: u32 = 64;
/// A client must send a request's headers within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (HTTP/1.1 buffer, HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The Custom Metrics API, built and checked from the config, ready to serve
/// on a listener the caller bound.
pub struct CustomMetricsApi {
    tls: Arc<Tls<ApiTls>>,
    router: axum::Router,
    guard: Guard,
}

impl CustomMetricsApi {
    /// Builds the catalogue (PromQL checks included), the certificate and
    /// the front-proxy guard; an error names the setting.
    pub fn new(
        config: &Config,
        source: Arc<dyn PodMetricSource>,
        ready: Arc<AtomicBool>,
    ) -> crate::Result<Self> {
        let catalogue = Arc::new(Catalogue::from_config(config)?);
        let (tls, guard) = ApiTls::load(&config.custom_metrics)?;
        let router = api::router(ApiState {
            source,
            catalogue,
            guard: guard.clone(),
            ready,
        });
        Ok(Self { tls, router, guard })
    }

    /// Serves `listener` until `token` is cancelled, then lets open
    /// connections finish their requests (the caller bounds the wait).
    /// Certificate files are re-read every `reload_interval`.
    pub async fn serve(
        self,
        listener: TcpListener,
        reload_interval: Duration,
        token: CancellationToken,
    ) {
        let addr = listener.local_addr().ok();
        info!(
            addr = ?addr,
            self_signed = self.tls.source().self_signed(),
            front_proxy = self.guard.checks(),
            "custom metrics API serving"
        );
        tokio::spawn(self.tls.clone().watch(reload_interval, token.clone()));
        let mut incoming = tls::incoming(listener, Some(self.tls));
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        loop {
            let next = tokio::select! {
                next = incoming.next() => next,
                _ = token.cancelled() => break,
            };
            while connections.try_join_next().is_some() {}
            match next {
                Some(Ok(conn)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let router = self.router.clone();
                        let token = token.clone();
                        connections.spawn(async move {
                            connection(conn, router, token).await;
                            drop(slot);
                        });
                    }
                    Err(_) => warn!(
                        max = MAX_CONNECTIONS,
                        "custom metrics API: too many connections; closing a new one"
                    ),
                },
                Some(Err(e)) => {
                    // Out of file descriptors and the like: do not spin.
                    warn!(error = %e, "custom metrics API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => break,
            }
        }
        drop(incoming);
        while connections.join_next().await.is_some() {}
    }
}

/// Serves one connection until it closes, or gracefully on `token`.
async fn connection(conn: Conn, router: axum::Router, token: CancellationToken) {
    let peer = peer_of(&conn);
    let addr = peer.addr;
    let service = router.map_request(
        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            req
        },
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let serving = builder.serve_connection(TokioIo::new(conn), TowerToHyperService::new(service));
    tokio::pin!(serving);
    let result = tokio::select! {
        r = serving.as_mut() => r,
        _ = token.cancelled() => {
            serving.as_mut().graceful_shutdown();
            serving.await
        }
    };
    if let Err(e) = result {
        debug!(peer = ?addr, error = %e, "custom metrics connection ended");
    }
}

fn peer_of(conn: &Conn) -> Peer {
    match conn {
        Conn::Plain(tcp) => Peer {
            addr: tcp.peer_addr().ok(),
            certificates: None,
        },
        Conn::Tls(stream) => {
            let (tcp, session) = stream.get_ref();
            Peer {
                addr: tcp.peer_addr().ok(),
                certificates: session
                    .peer_certificates()
                    .filter(|c| !c.is_empty())
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
            }
        }
    }
}

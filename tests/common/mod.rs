//! The one start-the-server helper every integration test uses, plus clients
//! and fake sidecars. Real sockets, real tonic clients, real `run`.
#![allow(dead_code)]

#[path = "../../testkit/builders.rs"]
pub mod builders;
pub mod envoy;
#[path = "../../testkit/prometheus.rs"]
pub mod prometheus_server;
pub mod redis_server;

// Not every test binary uses every builder.
#[allow(unused_imports)]
pub use builders::{meta, so_ref};

use std::{net::SocketAddr, time::Duration};

use activescale::{
    Listeners, Port, config::Config, proto::external_scaler_client::ExternalScalerClient,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// A running server on ephemeral loopback ports. A port that was not
/// started reads as `127.0.0.1:0` (nothing can connect to it).
pub struct TestServer {
    pub sink: SocketAddr,
    pub scaler: SocketAddr,
    pub http: SocketAddr,
    /// Every started port's address, the optional ones included.
    pub ports: Vec<(Port, SocketAddr)>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<activescale::Result<()>>>,
}

/// A config for tests: loopback port 0 everywhere, no warm-up, the sink scope
/// exclusion derived from port 9000 as in production.
pub fn test_config() -> Config {
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    {
        let mut c = Config::default();
        c.servers.sink_addr = loopback;
        c.servers.scaler_addr = loopback;
        c.servers.http_addr = loopback;
        c.engine.warmup = Some(Duration::ZERO);
        c
    }
}

/// Starts `activescale::run` with `config` (its addresses are overridden by
/// ephemeral ones) and returns once every port accepts connections. Every
/// port the config turns on is started.
pub async fn start_server(config: Config) -> TestServer {
    start_only(config, &Port::ALL).await
}

/// [`start_server`] with only those of `ports` the config turns on.
pub async fn start_only(config: Config, ports: &[Port]) -> TestServer {
    let listeners = Listeners::bind_only(&config, ports).await.expect("bind");
    let unbound: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let addr = |p| listeners.addr_of(p).unwrap_or(unbound);
    let (sink, scaler, http) = (addr(Port::Sink), addr(Port::Scaler), addr(Port::Http));
    let ports = Port::ALL
        .iter()
        .filter_map(|&p| Some((p, listeners.addr_of(p)?)))
        .collect();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(activescale::run(config, listeners, async move {
        let _ = stopped.await;
    }));
    TestServer {
        sink,
        scaler,
        http,
        ports,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestServer {
    /// The address of a started port.
    pub fn addr(&self, port: Port) -> SocketAddr {
        let found = self.ports.iter().find(|(p, _)| *p == port);
        found.map(|(_, a)| *a).expect("that port was started")
    }

    pub async fn scaler_client(&self) -> ExternalScalerClient<Channel> {
        ExternalScalerClient::connect(format!("http://{}", self.scaler))
            .await
            .expect("connect to scaler")
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// Stops the server and waits for `run` to return.
    pub async fn stop(mut self) -> activescale::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().unwrap().await.expect("run panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A GET over plain HTTP/1.1 to the server's HTTP port.
pub async fn http_get(url: &str) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::get(url).await.expect("http get");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// GetMetrics for a trigger, returning the float value or the status.
pub async fn get_metric(
    client: &mut ExternalScalerClient<Channel>,
    r: &activescale::proto::ScaledObjectRef,
) -> Result<f64, tonic::Status> {
    let resp = client
        .get_metrics(activescale::proto::GetMetricsRequest {
            scaled_object_ref: Some(r.clone()),
            metric_name: String::new(),
        })
        .await?
        .into_inner();
    Ok(resp.metric_values[0].metric_value_float)
}

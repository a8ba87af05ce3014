//! TLS and mTLS on the gRPC ports, through real sockets with real tonic
//! clients, with certificates generated here (rcgen) and published the way
//! Kubernetes mounts a Secret (a `..data` symlink swapped atomically), so
//! rotation is exercised the way cert-manager triggers it.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use activescale::proto::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};
use common::{envoy::*, *};
use envoy_types::pb::envoy::service::metrics::v3::{
    StreamMetricsMessage, StreamMetricsResponse, metrics_service_client::MetricsServiceClient,
    stream_metrics_message::Identifier,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Response, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Deadline for anything awaited over the network.
const LIMIT: Duration = Duration::from_secs(10);

/// A certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A client certificate with exactly these names: `uri:` items are URI
    /// SANs, the others DNS SANs; `cn` the subject's common name.
    fn client_named(&self, sans: &[&str], cn: Option<&str>) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.strip_prefix("uri:") {
                Some(u) => SanType::URI((*u).try_into().unwrap()),
                None => SanType::DnsName((*s).try_into().unwrap()),
            })
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn server(&self) -> Leaf {
        self.leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self) -> Leaf {
        self.leaf(&["keda-operator"], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A Secret volume as the kubelet writes it: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..v<N>`, and an update swaps `..data` with one rename.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretVolume {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn publish(&mut self, server: &Leaf, client_ca: &Ca) {
        self.version += 1;
        let root = self.dir.path();
        let version = format!("..v{}", self.version);
        std::fs::create_dir(root.join(&version)).unwrap();
        let files = [
            ("tls.crt", server.cert.clone()),
            ("tls.key", server.key.clone()),
            ("ca.crt", client_ca.pem()),
        ];
        for (name, content) in &files {
            std::fs::write(root.join(&version).join(name), content).unwrap();
        }
        std::os::unix::fs::symlink(&version, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        for (name, _) in &files {
            let link = root.join(name);
            if !link.exists() {
                std::os::unix::fs::symlink(Path::new("..data").join(name), link).unwrap();
            }
        }
    }
}

fn tls_config(volume: &SecretVolume, mtls: bool) -> activescale::config::Config {
    let mut c = test_config();
    c.tls = Some(activescale::config::TlsConfig {
        cert: volume.path("tls.crt"),
        key: volume.path("tls.key"),
        client_ca: mtls.then(|| volume.path("ca.crt")),
        client_names: Vec::new(),
        reload_interval: Duration::from_millis(50),
        sink: true,
    });
    c
}

fn scaled_object() -> ScaledObjectRef {
    ScaledObjectRef {
        name: "web".into(),
        namespace: "shop".into(),
        scaler_metadata: [
            (
                "scalerAddress".to_string(),
                "activescale.keda:9090".to_string(),
            ),
            ("enableTLS".to_string(), "true".to_string()),
            ("labelSelector".to_string(), "app=web".to_string()),
            ("targetValue".to_string(), "10".to_string()),
        ]
        .into(),
    }
}

/// A TLS channel trusting `ca`, presenting `identity` when given.
async fn channel(
    addr: SocketAddr,
    ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(LIMIT)
        .connect()
        .await
}

/// One GetMetricSpec on a new connection: the target, or why it failed.
/// (With TLS 1.3 a refused client certificate surfaces on the first call,
/// not at connect, so refusal is judged on the call.)
async fn spec(addr: SocketAddr, ca: &Ca, identity: Option<&Leaf>) -> Result<f64, String> {
    let call = async {
        let ch = channel(addr, ca, identity)
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        ExternalScalerClient::new(ch)
            .get_metric_spec(scaled_object())
            .await
            .map(|r| r.into_inner().metric_specs[0].target_size_float)
            .map_err(|s| format!("call: {s:?}"))
    };
    tokio::time::timeout(LIMIT, call)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// One gRPC health check on a new connection (both ports serve it).
async fn health(addr: SocketAddr, ca: &Ca, identity: Option<&Leaf>) -> Result<(), String> {
    let call = async {
        let ch = channel(addr, ca, identity)
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(drop)
            .map_err(|s| format!("call: {s:?}"))
    };
    tokio::time::timeout(LIMIT, call)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// A fake Envoy sidecar's StreamMetrics stream over `channel`.
struct TlsSidecar {
    tx: mpsc::Sender<StreamMetricsMessage>,
    task: JoinHandle<Result<Response<StreamMetricsResponse>, Status>>,
    first: bool,
}

impl TlsSidecar {
    fn open(channel: Channel) -> Self {
        let mut client = MetricsServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        let task =
            tokio::spawn(async move { client.stream_metrics(ReceiverStream::new(rx)).await });
        Self {
            tx,
            task,
            first: true,
        }
    }

    async fn push(&mut self, value: f64) {
        let identifier = std::mem::take(&mut self.first).then(|| Identifier {
            node: Some(istio_node("shop", "web-1", &[("app", "web")], "web")),
        });
        let msg = StreamMetricsMessage {
            identifier,
            envoy_metrics: vec![gauge(&inbound(8080), value)],
        };
        self.tx.send(msg).await.expect("sidecar stream closed");
    }
}

async fn metric_value(client: &mut ExternalScalerClient<Channel>) -> Option<f64> {
    let req = GetMetricsRequest {
        scaled_object_ref: Some(scaled_object()),
        metric_name: "s0-active_requests".into(),
    };
    let r = client.get_metrics(req).await.ok()?;
    Some(r.into_inner().metric_values.first()?.metric_value_float)
}

#[tokio::test]
async fn tls_serves_the_scaler_and_the_sink() {
    let ca = Ca::new("ca");
    let mut volume = SecretVolume::new();
    volume.publish(&ca.server(), &ca);
    let server = start_server(tls_config(&volume, false)).await;

    assert_eq!(spec(server.scaler, &ca, None).await, Ok(10.0));

    // A client that does not trust the server's CA refuses it.
    let stranger = Ca::new("stranger");
    assert!(spec(server.scaler, &stranger, None).await.is_err());

    // A plaintext client (KEDA without enableTLS) gets no answer.
    let plain = async {
        let mut c = ExternalScalerClient::connect(format!("http://{}", server.scaler))
            .await
            .map_err(|e| e.to_string())?;
        c.get_metric_spec(scaled_object())
            .await
            .map_err(|e| e.to_string())
    };
    let plain = tokio::time::timeout(LIMIT, plain)
        .await
        .expect("plaintext attempt hung");
    assert!(plain.is_err(), "plaintext must not be served on a TLS port");

    // The sink speaks TLS too: a sidecar's push reaches the scaler.
    let mut sidecar = TlsSidecar::open(channel(server.sink, &ca, None).await.unwrap());
    sidecar.push(3.0).await;
    let client = ExternalScalerClient::new(channel(server.scaler, &ca, None).await.unwrap());
    eventually(LIMIT, "value 3 over TLS", || {
        let mut c = client.clone();
        async move { metric_value(&mut c).await == Some(3.0) }
    })
    .await;
    assert!(!sidecar.task.is_finished(), "the sidecar stream stays open");

    // The HTTP ops port stays plaintext for probes and scrapes.
    let (status, _) = http_get(&server.http_url("/healthz")).await;
    assert_eq!(status, 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_trusted_certificate() {
    let ca = Ca::new("ca");
    let mut volume = SecretVolume::new();
    volume.publish(&ca.server(), &ca);
    let server = start_server(tls_config(&volume, true)).await;
    let keda = ca.client();

    assert_eq!(spec(server.scaler, &ca, Some(&keda)).await, Ok(10.0));
    let none = spec(server.scaler, &ca, None).await;
    assert!(none.is_err(), "no client certificate must be refused");
    let other = Ca::new("other").client();
    let foreign = spec(server.scaler, &ca, Some(&other)).await;
    assert!(
        foreign.is_err(),
        "a certificate of another CA must be refused"
    );

    // Same on the sink: a sidecar without a certificate gets an error, not a stream.
    assert!(health(server.sink, &ca, None).await.is_err());
    assert_eq!(health(server.sink, &ca, Some(&keda)).await, Ok(()));
    let mut anonymous = TlsSidecar::open(channel(server.sink, &ca, None).await.unwrap());
    let refused = tokio::time::timeout(LIMIT, &mut anonymous.task)
        .await
        .expect("a refused sidecar must be told, not left hanging");
    assert!(refused.expect("sidecar task").is_err());

    // A client stuck mid-handshake (TCP open, nothing sent) holds up nobody,
    // and the failed handshakes above did not stop the accept loop.
    let stalled = tokio::net::TcpStream::connect(server.scaler).await.unwrap();
    assert_eq!(spec(server.scaler, &ca, Some(&keda)).await, Ok(10.0));
    let mut sidecar = TlsSidecar::open(channel(server.sink, &ca, Some(&keda)).await.unwrap());
    sidecar.push(4.0).await;
    let client = ExternalScalerClient::new(channel(server.scaler, &ca, Some(&keda)).await.unwrap());
    eventually(LIMIT, "value 4 over mTLS", || {
        let mut c = client.clone();
        async move { metric_value(&mut c).await == Some(4.0) }
    })
    .await;
    drop(stalled);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn rotation_reaches_new_connections_and_spares_open_streams() {
    let old = Ca::new("old");
    let mut volume = SecretVolume::new();
    volume.publish(&old.server(), &old);
    let server = start_server(tls_config(&volume, true)).await;
    let old_client = old.client();

    // Long-lived streams opened before the rotation: KEDA's StreamIsActive
    // and an Envoy sidecar's StreamMetrics.
    let mut keda = ExternalScalerClient::new(
        channel(server.scaler, &old, Some(&old_client))
            .await
            .unwrap(),
    );
    let mut active = keda
        .stream_is_active(scaled_object())
        .await
        .expect("StreamIsActive")
        .into_inner();
    let first = tokio::time::timeout(LIMIT, active.message())
        .await
        .expect("first StreamIsActive message")
        .expect("stream ok")
        .expect("a message");
    assert!(!first.result, "no pods yet: inactive");
    let mut sidecar =
        TlsSidecar::open(channel(server.sink, &old, Some(&old_client)).await.unwrap());
    sidecar.push(0.0).await;

    // cert-manager renews: new server certificate and new client CA.
    let new = Ca::new("new");
    let new_client = new.client();
    volume.publish(&new.server(), &new);
    eventually(
        LIMIT,
        "a new connection to present the new certificate",
        || {
            let (new, new_client) = (&new, &new_client);
            async move { spec(server.scaler, new, Some(new_client)).await.is_ok() }
        },
    )
    .await;
    assert_eq!(
        health(server.sink, &new, Some(&new_client)).await,
        Ok(()),
        "the sink rotated too"
    );
    assert!(
        spec(server.scaler, &old, Some(&old_client)).await.is_err(),
        "new connections must no longer get the old certificate"
    );
    assert!(
        spec(server.scaler, &new, Some(&old_client)).await.is_err(),
        "the old client CA is no longer trusted"
    );

    // The streams opened before the rotation carry on: a push on the old
    // sidecar stream reaches the old StreamIsActive stream.
    sidecar.push(5.0).await;
    let next = tokio::time::timeout(LIMIT, active.message())
        .await
        .expect("StreamIsActive still delivering after the rotation")
        .expect("stream ok")
        .expect("a message");
    assert!(next.result, "active after the push");
    assert!(!sidecar.task.is_finished());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn tls_towards_keda_only_leaves_the_sink_plaintext() {
    let ca = Ca::new("ca");
    let mut volume = SecretVolume::new();
    volume.publish(&ca.server(), &ca);
    let mut config = tls_config(&volume, true);
    config.tls.as_mut().unwrap().sink = false;
    let server = start_server(config).await;

    // KEDA's port still demands TLS and a client certificate.
    let keda = ca.client();
    assert_eq!(spec(server.scaler, &ca, Some(&keda)).await, Ok(10.0));
    assert!(spec(server.scaler, &ca, None).await.is_err());

    // A sidecar without any certificate pushes over plaintext.
    let mut sidecar = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    sidecar.push_gauges(&[(&inbound(8080), 4.0)]).await;
    let client = ExternalScalerClient::new(channel(server.scaler, &ca, Some(&keda)).await.unwrap());
    eventually(LIMIT, "value 4 from a plaintext sidecar", || {
        let mut c = client.clone();
        async move { metric_value(&mut c).await == Some(4.0) }
    })
    .await;
    server.stop().await.unwrap();
}

/// KEDA's operator as Istio (or SPIRE) names it.
const KEDA_SPIFFE: &str = "spiffe://cluster.local/ns/keda/sa/keda-operator";

/// `activescale_scaler_clients_refused_total` as `/metrics` reports it.
async fn clients_refused(server: &TestServer) -> u64 {
    let (_, text) = http_get(&server.http_url("/metrics")).await;
    text.lines()
        .find_map(|l| l.strip_prefix("activescale_scaler_clients_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refusal counter in /metrics:\n{text}"))
}

#[tokio::test]
async fn pinned_client_names_admit_only_those_certificates_on_the_scaler_port() {
    let ca = Ca::new("ca");
    let mut volume = SecretVolume::new();
    volume.publish(&ca.server(), &ca);
    let mut config = tls_config(&volume, true);
    config.tls.as_mut().unwrap().client_names =
        vec![KEDA_SPIFFE.into(), "keda-operator.keda.svc".into()];
    let server = start_server(config).await;

    // KEDA by its SPIFFE ID, or by a DNS SAN: served.
    let keda = ca.client_named(&[&format!("uri:{KEDA_SPIFFE}")], None);
    assert_eq!(spec(server.scaler, &ca, Some(&keda)).await, Ok(10.0));
    let keda_dns = ca.client_named(&["keda-operator.keda.svc"], Some("keda"));
    assert_eq!(spec(server.scaler, &ca, Some(&keda_dns)).await, Ok(10.0));
    assert_eq!(clients_refused(&server).await, 0);

    // A tenant's workload certificate from the same CA: the handshake
    // verifies, but the connection is closed before any RPC is read.
    let tenant = ca.client_named(
        &["uri:spiffe://cluster.local/ns/shop/sa/web", "web.shop.svc"],
        Some("keda-operator.keda.svc"),
    );
    let refused = spec(server.scaler, &ca, Some(&tenant)).await;
    assert!(
        refused.is_err(),
        "a certificate naming another workload must be refused: {refused:?}"
    );
    // The old behaviour's test certificate (DNS SAN keda-operator) does not
    // carry a pinned name either.
    assert!(spec(server.scaler, &ca, Some(&ca.client())).await.is_err());
    eventually(LIMIT, "two refusals counted", || async {
        clients_refused(&server).await == 2
    })
    .await;

    // Refusals stop nobody else, and the sink port is not pinned: any
    // certificate of the CA streams there.
    assert_eq!(spec(server.scaler, &ca, Some(&keda)).await, Ok(10.0));
    assert_eq!(health(server.sink, &ca, Some(&tenant)).await, Ok(()));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn without_client_names_any_certificate_of_the_client_ca_is_served() {
    let ca = Ca::new("ca");
    let mut volume = SecretVolume::new();
    volume.publish(&ca.server(), &ca);
    let config = tls_config(&volume, true);
    assert!(config.tls.as_ref().unwrap().client_names.is_empty());
    let server = start_server(config).await;
    let tenant = ca.client_named(&["uri:spiffe://cluster.local/ns/shop/sa/web"], None);
    assert_eq!(spec(server.scaler, &ca, Some(&tenant)).await, Ok(10.0));
    let nameless = ca.client_named(&[], None);
    assert_eq!(spec(server.scaler, &ca, Some(&nameless)).await, Ok(10.0));
    assert!(spec(server.scaler, &ca, None).await.is_err(), "still mTLS");
    assert_eq!(clients_refused(&server).await, 0);
    server.stop().await.unwrap();
}

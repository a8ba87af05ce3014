//! TLS on the two gRPC ports (sink and scaler), optionally with client
//! certificates (mTLS), and certificate rotation without restarts.
//!
//! cert-manager rotates a Secret by swapping the symlinks of the mounted
//! volume; nothing signals the process. So [`Tls::watch`] re-reads the files
//! every `tls_reload_interval` and, when their contents changed, builds a whole
//! new rustls `ServerConfig` (certificate, key and client CA together, so they
//! can never be mixed) and swaps it in. Each handshake takes the config current
//! at accept time: new connections get the new certificate, established
//! connections (KEDA's `StreamIsActive`, Envoy's metrics streams) keep theirs.
//! A file that does not load leaves the previous config in place and is
//! reported once per change.
//!
//! [`incoming`] turns a listener into the connection stream tonic serves:
//! plain TCP, or TLS with handshakes running concurrently, so one slow or
//! failing client never holds up the accept loop. The HTTP ops port stays
//! plaintext (kubelet probes and Prometheus scrapes).
//!
//! With `tls_client_names` set, the scaler port also checks who a verified
//! client certificate names ([`ClientNames`]): the scaler answers for
//! whatever namespace a caller asks about, so a certificate the client CA
//! signed for some other workload must not be enough to ask.
//!
//! What is read and how it becomes a config is a [`TlsSource`]: [`TlsFiles`]
//! for the gRPC ports; a port with its own needs (the Custom Metrics API's
//! front-proxy CA, a certificate made at start-up) brings its own source and
//! shares the reload loop.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use prometheus_client::metrics::counter::Counter;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, info, warn};

use crate::{config::TlsConfig, telemetry::RateLimit};

/// A client that has not finished its handshake by then is dropped, so
/// half-open connections cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS files from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files `config` names.
    pub fn from_config(config: &TlsConfig) -> Self {
        Self {
            cert: config.cert.clone(),
            key: config.key.clone(),
            client_ca: config.client_ca.clone(),
        }
    }

    /// Reads the three files as they are now.
    fn read(&self) -> Result<Contents, TlsError> {
        let read = |field: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                field,
                path: path.to_owned(),
                source,
            })
        };
        Ok(Contents {
            cert: read("tls_cert", &self.cert)?,
            key: read("tls_key", &self.key)?,
            client_ca: self
                .client_ca
                .as_deref()
                .map(|p| read("tls_client_ca", p))
                .transpose()?,
        })
    }
}

/// The raw bytes a config was built from; compared to notice rotation.
/// Contents rather than mtimes: a symlink swap can keep the target's mtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// Why the TLS files cannot be used; each message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field}: cannot read {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is PEM but not what the setting needs.
    #[error("{field}: {}: {problem}", path.display())]
    Pem {
        field: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("{field}: {}: not valid PEM: {source}", path.display())]
    PemSyntax {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tls_cert/tls_key: the certificate and key are not usable together: {0}")]
    CertKey(#[source] rustls::Error),
    #[error("tls_client_ca: {}: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Any other setting of a [`TlsSource`] that does not work.
    #[error("{field}: {problem}")]
    Setting {
        field: &'static str,
        problem: String,
    },
}

/// Builds the server config for `contents`. Pure apart from rustls itself.
fn server_config(files: &TlsFiles, contents: &Contents) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = pem_certs("tls_cert", &files.cert, &contents.cert)?;
    let key = pem_key("tls_key", &files.key, &contents.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::CertKey)?;
    let mut config = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in pem_certs("tls_client_ca", path, pem)? {
                roots.add(ca).map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    source: e.into(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    source: e.into(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    }
    .with_single_cert(certs, key)
    .map_err(TlsError::CertKey)?;
    // gRPC is HTTP/2 only, and grpc-go (KEDA) refuses a TLS server that does
    // not negotiate h2 by ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

pub(crate) fn pem_certs(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let problem = |problem: String| TlsError::Pem {
        field,
        path: path.to_owned(),
        problem,
    };
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::PemSyntax {
            field,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(problem("no PEM CERTIFICATE block found".into()));
    }
    Ok(certs)
}

pub(crate) fn pem_key(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let problem = |problem: String| TlsError::Pem {
        field,
        path: path.to_owned(),
        problem,
    };
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::PemSyntax {
            field,
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| problem("no PEM private key (PKCS#8, PKCS#1 or SEC1) found".into()))
}

/// What a [`Tls`] re-reads on every check and builds a config from.
pub trait TlsSource: Send + Sync + 'static {
    /// The bytes a config is built from; compared to notice rotation.
    type Contents: PartialEq + Send + 'static;
    /// Reads the files as they are now. Blocking: called at start-up and from
    /// a blocking task.
    fn read_contents(&self) -> Result<Self::Contents, TlsError>;
    /// The config `contents` make.
    fn build_config(&self, contents: &Self::Contents) -> Result<Arc<ServerConfig>, TlsError>;
    /// The files, for the reload log line.
    fn describe(&self) -> String;
}

impl TlsSource for TlsFiles {
    type Contents = Contents;

    fn read_contents(&self) -> Result<Contents, TlsError> {
        self.read()
    }

    fn build_config(&self, contents: &Contents) -> Result<Arc<ServerConfig>, TlsError> {
        server_config(self, contents)
    }

    fn describe(&self) -> String {
        match &self.client_ca {
            Some(ca) => format!("{}, {}", self.cert.display(), ca.display()),
            None => self.cert.display().to_string(),
        }
    }
}

/// What one look at the files found.
#[derive(Debug)]
pub enum Reload {
    /// Same contents as the config in use.
    Unchanged,
    /// New contents, loaded; new handshakes use them.
    Reloaded,
    /// New contents that do not load; the previous config stays in use.
    Failed(TlsError),
}

/// The TLS state of a port (both gRPC ports share one).
pub struct Tls<S: TlsSource = TlsFiles> {
    source: S,
    // std RwLock: read once per accepted connection (an Arc clone), written
    // on rotation; never held across an await.
    current: RwLock<Arc<ServerConfig>>,
    reload: Mutex<ReloadState<S::Contents>>,
}

struct ReloadState<C> {
    /// What `current` was built from.
    loaded: C,
    /// The last failure reported, so a bad file is logged once, not on
    /// every check.
    last_failure: Option<String>,
}

impl Tls {
    /// Loads the files `config` names.
    pub fn from_config(config: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        Self::load(TlsFiles::from_config(config))
    }

    /// Whether clients must present a certificate.
    pub fn verifies_clients(&self) -> bool {
        self.source.client_ca.is_some()
    }
}

impl<S: TlsSource> Tls<S> {
    /// Loads the files; an error here stops start-up.
    pub fn load(source: S) -> Result<Arc<Self>, TlsError> {
        let contents = source.read_contents()?;
        let config = source.build_config(&contents)?;
        Ok(Arc::new(Self {
            source,
            current: RwLock::new(config),
            reload: Mutex::new(ReloadState {
                loaded: contents,
                last_failure: None,
            }),
        }))
    }

    /// What the config is built from.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// An acceptor for the config in use now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(Arc::clone(&config))
    }

    /// Re-reads the files and swaps the config in when they changed and load.
    /// Blocking file reads: call from a blocking context.
    pub fn reload(&self) -> Reload {
        let mut state = self.reload.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = match self.source.read_contents() {
            Ok(contents) if contents == state.loaded => Reload::Unchanged,
            Ok(contents) => match self.source.build_config(&contents) {
                Ok(config) => {
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                    state.loaded = contents;
                    Reload::Reloaded
                }
                Err(e) => Reload::Failed(e),
            },
            // A rotation caught between two symlink swaps can look like a
            // missing file for a moment; the next check sees it whole.
            Err(e) => Reload::Failed(e),
        };
        match &outcome {
            Reload::Unchanged => state.last_failure = None,
            Reload::Reloaded => {
                state.last_failure = None;
                info!(
                    files = %self.source.describe(),
                    "TLS files changed: new connections use the new certificate"
                );
            }
            Reload::Failed(e) => {
                let message = e.to_string();
                if state.last_failure.as_ref() != Some(&message) {
                    warn!(error = %message, "TLS files changed but do not load; keeping the previous certificate");
                    state.last_failure = Some(message);
                }
            }
        }
        outcome
    }

    /// Checks the files every `every` until `token` is cancelled. A zero
    /// interval turns reloading off.
    pub async fn watch(self: Arc<Self>, every: Duration, token: CancellationToken) {
        if every.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = token.cancelled() => return,
            }
            let tls = Arc::clone(&self);
            if let Err(e) = tokio::task::spawn_blocking(move || tls.reload()).await {
                warn!(error = %e, "TLS reload check failed");
            }
        }
    }
}

/// The connections `listener` accepts, through TLS when `tls` is set.
pub fn incoming<S: TlsSource>(listener: TcpListener, tls: Option<Arc<Tls<S>>>) -> Incoming {
    Incoming {
        listener,
        tls: tls.map(|tls| Arc::new(move || tls.acceptor()) as Acceptor),
        client_names: None,
        handshakes: FuturesUnordered::new(),
    }
}

/// The acceptor of the config in use when a connection arrives.
type Acceptor = Arc<dyn Fn() -> TlsAcceptor + Send + Sync>;

/// A stream of accepted connections for tonic's `serve_with_incoming*`.
///
/// Handshakes run inside the stream (tonic polls it continuously from its
/// accept loop), concurrently; a failed one is logged and dropped and never
/// ends the stream. Dropping the stream closes the listener.
pub struct Incoming {
    listener: TcpListener,
    tls: Option<Acceptor>,
    client_names: Option<Arc<ClientNames>>,
    handshakes: FuturesUnordered<BoxFuture<'static, Option<Conn>>>,
}

impl Incoming {
    /// Accepts a TLS client only when its certificate carries one of
    /// `names` (see [`ClientNames`]); `None` accepts any certificate the
    /// handshake verified. No effect on a plaintext port.
    pub fn client_names(mut self, names: Option<Arc<ClientNames>>) -> Self {
        self.client_names = names;
        self
    }
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => {
                    // gRPC messages are small and latency matters more than
                    // packet count (the server builder's tcp_nodelay applies
                    // only to tonic's own listener).
                    let _ = tcp.set_nodelay(true);
                    match &this.tls {
                        None => return Poll::Ready(Some(Ok(Conn::Plain(tcp)))),
                        Some(tls) => this.handshakes.push(Box::pin(handshake(
                            tls(),
                            tcp,
                            peer,
                            this.client_names.clone(),
                        ))),
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some(done)) = this.handshakes.poll_next_unpin(cx) {
            if let Some(conn) = done {
                return Poll::Ready(Some(Ok(conn)));
            }
        }
        Poll::Pending
    }
}

/// One TLS handshake; `None` (logged) when the client is not served.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    client_names: Option<Arc<ClientNames>>,
) -> Option<Conn> {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            log_refused(peer, &e);
            return None;
        }
        Err(_) => {
            let e = io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake not finished in time",
            );
            log_refused(peer, &e);
            return None;
        }
    };
    if let Some(pinned) = client_names {
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first());
        if let Err(presented) = pinned.check(leaf) {
            // Dropping the stream closes the connection: the client's first
            // RPC fails, and nothing it sent is read.
            pinned.refuse(peer, &presented);
            return None;
        }
    }
    Some(Conn::Tls(Box::new(stream)))
}

/// rustls reports protocol and certificate problems as `InvalidData`: those
/// are misconfigurations worth a warning (a plaintext KEDA trigger without
/// `enableTLS`, a client certificate from another CA). Resets and EOFs are
/// TCP probes and port scans: debug only.
fn log_refused(peer: SocketAddr, e: &io::Error) {
    if e.kind() == io::ErrorKind::InvalidData {
        warn!(%peer, error = %e, "TLS handshake refused (a plaintext client, or a certificate not trusted)");
    } else {
        debug!(%peer, error = %e, "TLS handshake did not complete");
    }
}

/// Refusals by name are logged at most this often at warn (the rest at
/// debug): a misconfigured client reconnects in a loop.
const REFUSED_NAME_LOG_PERIOD: Duration = Duration::from_secs(10);

/// The client certificate names a port accepts (`tls_client_names`), checked
/// after the handshake has verified the certificate against the client CA.
pub struct ClientNames {
    names: Vec<String>,
    /// Connections closed because no name matched.
    refused: Counter,
    log: RateLimit,
}

impl ClientNames {
    /// `None` when `names` is empty: any verified certificate is accepted.
    pub fn new(names: &[String], refused: Counter) -> Option<Arc<Self>> {
        let names: Vec<String> = names
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        (!names.is_empty()).then(|| {
            Arc::new(Self {
                names,
                refused,
                log: RateLimit::new(REFUSED_NAME_LOG_PERIOD),
            })
        })
    }

    /// `Ok` when `leaf` (the client's end-entity certificate) carries one of
    /// the names; else what it presented, for the log.
    fn check(&self, leaf: Option<&CertificateDer<'_>>) -> Result<(), String> {
        let Some(leaf) = leaf else {
            return Err("no client certificate".into());
        };
        match PresentedNames::of(leaf) {
            Some(presented) if presented.matches(&self.names) => Ok(()),
            Some(presented) => Err(bounded(presented.to_string())),
            None => Err("a certificate that does not parse".into()),
        }
    }

    fn refuse(&self, peer: SocketAddr, presented: &str) {
        self.refused.inc();
        match self.log.check() {
            Some(held_back) => warn!(
                %peer,
                presented,
                accepted = ?self.names,
                held_back,
                "client certificate refused on the scaler port: none of its names is in tls_client_names"
            ),
            None => {
                debug!(%peer, presented, "client certificate refused: no name in tls_client_names")
            }
        }
    }
}

/// Log text of at most 1 KiB: a CA can sign a certificate with thousands of
/// names, and a log line should stay a line.
fn bounded(mut text: String) -> String {
    const MAX: usize = 1024;
    if text.len() > MAX {
        let mut cut = MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" ...");
    }
    text
}

/// The names a certificate identifies its holder by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PresentedNames {
    /// URI subject alternative names (SPIFFE IDs).
    pub uris: Vec<String>,
    /// DNS subject alternative names.
    pub dns: Vec<String>,
    /// The subject's common name (the last CN attribute, as Go reads it).
    pub common_name: Option<String>,
}

impl PresentedNames {
    /// The names of `cert`; `None` when it is not a certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Option<Self> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let mut names = Self {
            common_name: subject_common_name(&parsed),
            ..Self::default()
        };
        // A malformed or repeated SAN extension names nothing: the CA
        // verified the signature, not that the extension makes sense.
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(u) => names.uris.push((*u).into()),
                    x509_parser::extensions::GeneralName::DNSName(d) => names.dns.push((*d).into()),
                    _ => {}
                }
            }
        }
        Some(names)
    }

    /// Whether one of `accepted` names this certificate: a URI SAN (exactly),
    /// else a DNS SAN (ASCII case-insensitively, as DNS compares), else,
    /// only on a certificate with neither, the subject CN (exactly). Once a
    /// CA puts subject alternative names in a certificate the CN is legacy
    /// text it may not have vetted (RFC 6125 6.4.4), so it then counts for
    /// nothing. No wildcards: a pin names one identity.
    pub fn matches(&self, accepted: &[String]) -> bool {
        let uri = self.uris.iter().any(|u| accepted.iter().any(|a| a == u));
        let dns = || {
            self.dns
                .iter()
                .any(|d| accepted.iter().any(|a| a.eq_ignore_ascii_case(d)))
        };
        let cn = || {
            self.uris.is_empty()
                && self.dns.is_empty()
                && self
                    .common_name
                    .as_ref()
                    .is_some_and(|cn| accepted.contains(cn))
        };
        uri || dns() || cn()
    }
}

impl std::fmt::Display for PresentedNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(self.uris.iter().map(|u| format!("uri:{u}")));
        parts.extend(self.dns.iter().map(|d| format!("dns:{d}")));
        parts.extend(self.common_name.iter().map(|cn| format!("cn:{cn}")));
        if parts.is_empty() {
            f.write_str("no names")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// The subject's common name as Go's `pkix.Name.CommonName` has it: the last
/// CN attribute. `None` when there is none or it is not a string.
pub(crate) fn subject_common_name(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .last()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// An accepted connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream),
    // Boxed: a rustls connection is about a kilobyte, a TcpStream a few words.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    // The TCP info in both cases, so `Request::remote_addr()` (used in the
    // sink's logs) works the same with and without TLS.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a server certificate it signed, as PEM (cert, key, ca).
    fn pki(name: &str) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem(), ca.pem())
    }

    struct Dir {
        _dir: tempfile::TempDir,
        files: TlsFiles,
    }

    impl Dir {
        fn new(with_ca: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let files = TlsFiles {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                client_ca: with_ca.then(|| dir.path().join("ca.crt")),
            };
            let d = Self { _dir: dir, files };
            d.write(&pki("one"));
            d
        }

        fn write(&self, (cert, key, ca): &(String, String, String)) {
            std::fs::write(&self.files.cert, cert).unwrap();
            std::fs::write(&self.files.key, key).unwrap();
            if let Some(p) = &self.files.client_ca {
                std::fs::write(p, ca).unwrap();
            }
        }
    }

    fn config_ptr(tls: &Tls) -> *const ServerConfig {
        Arc::as_ptr(&tls.current.read().unwrap())
    }

    #[test]
    fn loads_and_offers_h2() {
        let d = Dir::new(true);
        let tls = Tls::load(d.files.clone()).unwrap();
        assert!(tls.verifies_clients());
        assert_eq!(
            tls.current.read().unwrap().alpn_protocols,
            vec![b"h2".to_vec()]
        );
    }

    #[test]
    fn reload_swaps_only_on_new_contents() {
        let d = Dir::new(true);
        let tls = Tls::load(d.files.clone()).unwrap();
        let before = config_ptr(&tls);
        assert!(matches!(tls.reload(), Reload::Unchanged));
        assert_eq!(config_ptr(&tls), before);
        d.write(&pki("two"));
        assert!(matches!(tls.reload(), Reload::Reloaded));
        assert_ne!(config_ptr(&tls), before);
        assert!(matches!(tls.reload(), Reload::Unchanged));
    }

    #[test]
    fn a_bad_new_file_keeps_the_old_config() {
        let d = Dir::new(false);
        let tls = Tls::load(d.files.clone()).unwrap();
        let before = config_ptr(&tls);
        std::fs::write(&d.files.key, "not a key").unwrap();
        let Reload::Failed(e) = tls.reload() else {
            panic!("a broken key must not load")
        };
        assert!(e.to_string().contains("tls_key"), "{e}");
        assert_eq!(config_ptr(&tls), before);
        // A key that belongs to another certificate: also refused.
        let (_, other_key, _) = pki("other");
        std::fs::write(&d.files.key, other_key).unwrap();
        let Reload::Failed(e) = tls.reload() else {
            panic!("a mismatched key must not load")
        };
        assert!(e.to_string().contains("tls_cert/tls_key"), "{e}");
        assert_eq!(config_ptr(&tls), before);
        std::fs::remove_file(&d.files.cert).unwrap();
        assert!(matches!(
            tls.reload(),
            Reload::Failed(TlsError::Read {
                field: "tls_cert",
                ..
            })
        ));
        assert_eq!(config_ptr(&tls), before);
    }

    #[test]
    fn start_up_errors_name_the_setting() {
        let d = Dir::new(true);
        std::fs::write(d.files.client_ca.as_ref().unwrap(), "garbage").unwrap();
        let e = Tls::load(d.files.clone()).err().unwrap().to_string();
        assert!(
            e.contains("tls_client_ca") && e.contains("no PEM CERTIFICATE"),
            "{e}"
        );
        std::fs::write(&d.files.cert, "").unwrap();
        let e = Tls::load(d.files.clone()).err().unwrap().to_string();
        assert!(e.contains("tls_cert"), "{e}");
        let as_lib: crate::Error = Tls::load(d.files.clone()).err().unwrap().into();
        assert!(
            as_lib
                .to_string()
                .starts_with("invalid configuration: tls_cert"),
            "{as_lib}"
        );
        let source = std::error::Error::source(&as_lib).expect("the TlsError");
        assert!(
            matches!(
                source.downcast_ref::<TlsError>(),
                Some(TlsError::Pem {
                    field: "tls_cert",
                    ..
                })
            ),
            "{source:?}"
        );
    }

    #[test]
    fn tls_is_off_without_a_certificate() {
        assert!(crate::config::Config::default().tls.is_none());
    }

    /// A certificate with these SANs (`uri:` prefix: a URI, else DNS) and CN.
    fn named(sans: &[&str], cn: Option<&str>) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.strip_prefix("uri:") {
                Some(u) => rcgen::SanType::URI((*u).try_into().unwrap()),
                None => rcgen::SanType::DnsName((*s).try_into().unwrap()),
            })
            .collect();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const KEDA: &str = "spiffe://cluster.local/ns/keda/sa/keda-operator";

    #[test]
    fn presented_names_read_uri_and_dns_sans_and_the_cn() {
        let cert = named(
            &[&format!("uri:{KEDA}"), "keda-operator.keda.svc"],
            Some("keda"),
        );
        let names = PresentedNames::of(&cert).unwrap();
        assert_eq!(names.uris, [KEDA]);
        assert_eq!(names.dns, ["keda-operator.keda.svc"]);
        assert_eq!(names.common_name.as_deref(), Some("keda"));
        assert_eq!(
            names.to_string(),
            format!("uri:{KEDA}, dns:keda-operator.keda.svc, cn:keda")
        );
        assert_eq!(
            PresentedNames::of(&named(&[], None)).unwrap().to_string(),
            "no names"
        );
        assert_eq!(
            PresentedNames::of(&CertificateDer::from(vec![1, 2, 3])),
            None
        );
    }

    #[test]
    fn a_uri_san_matches_exactly() {
        let names = PresentedNames::of(&named(&[&format!("uri:{KEDA}")], None)).unwrap();
        assert!(names.matches(&list(&[KEDA])));
        assert!(names.matches(&list(&["other", KEDA])));
        for near in [
            "spiffe://cluster.local/ns/keda/sa/keda-operator2",
            "spiffe://cluster.local/ns/keda/sa/",
            "spiffe://cluster.local/ns/keda/sa/KEDA-operator",
            "spiffe://cluster.local/ns/victim/sa/keda-operator",
            "keda-operator",
        ] {
            assert!(!names.matches(&list(&[near])), "{near}");
        }
    }

    #[test]
    fn a_dns_san_matches_without_case() {
        let names = PresentedNames::of(&named(
            &[&format!("uri:{KEDA}"), "keda-operator.keda.svc"],
            None,
        ))
        .unwrap();
        assert!(names.matches(&list(&["keda-operator.keda.svc"])));
        assert!(names.matches(&list(&["KEDA-Operator.keda.svc"])));
        assert!(!names.matches(&list(&["keda-operator.keda"])));
        assert!(!names.matches(&list(&["*.keda.svc"])), "no wildcards");
    }

    #[test]
    fn the_cn_counts_only_without_sans() {
        let cn_only = PresentedNames::of(&named(&[], Some("keda-operator"))).unwrap();
        assert!(cn_only.matches(&list(&["keda-operator"])));
        assert!(!cn_only.matches(&list(&["Keda-Operator"])), "CN: exact");
        // With a SAN, a CN that happens to read like the pin is not enough.
        let with_san =
            PresentedNames::of(&named(&["tenant.shop.svc"], Some("keda-operator"))).unwrap();
        assert!(!with_san.matches(&list(&["keda-operator"])));
        assert!(with_san.matches(&list(&["tenant.shop.svc"])));
        let nothing = PresentedNames::of(&named(&[], None)).unwrap();
        assert!(!nothing.matches(&list(&["keda-operator", ""])));
    }

    #[test]
    fn client_names_refuse_what_they_do_not_list() {
        assert!(
            ClientNames::new(&[], Counter::default()).is_none(),
            "empty: any certificate"
        );
        assert!(ClientNames::new(&list(&[" ", ""]), Counter::default()).is_none());
        let refused = Counter::default();
        let pin = ClientNames::new(&list(&[&format!(" {KEDA} ")]), refused.clone()).unwrap();
        let keda = named(&[&format!("uri:{KEDA}")], None);
        assert_eq!(pin.check(Some(&keda)), Ok(()), "names are trimmed");
        let tenant = named(&["uri:spiffe://cluster.local/ns/shop/sa/web"], Some("web"));
        let why = pin.check(Some(&tenant)).unwrap_err();
        assert_eq!(why, "uri:spiffe://cluster.local/ns/shop/sa/web, cn:web");
        assert_eq!(pin.check(None).unwrap_err(), "no client certificate");
        let junk = CertificateDer::from(vec![0x30, 0x00]);
        assert!(pin.check(Some(&junk)).is_err());
        pin.refuse("127.0.0.1:1".parse().unwrap(), &why);
        pin.refuse("127.0.0.1:1".parse().unwrap(), &why);
        assert_eq!(refused.get(), 2);
    }

    #[test]
    fn long_name_lists_are_cut_for_the_log() {
        let text = bounded("é".repeat(2000));
        assert!(
            text.len() <= 1028 && text.ends_with(" ..."),
            "{}",
            text.len()
        );
        assert_eq!(bounded("short".into()), "short");
    }
}

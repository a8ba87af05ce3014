//! Front-proxy authentication, as an aggregated API server does it.
//!
//! The kube-apiserver proxies each request to an aggregated API with its
//! front-proxy client certificate and says who the caller is in headers
//! (`X-Remote-User`, `X-Remote-Group`, `X-Remote-Extra-<key>`). Anyone can
//! send such headers, so they mean something only on a connection whose
//! client certificate was signed by the front-proxy CA and, when
//! `custom_metrics_allowed_names` is set, carries one of those common names.
//! That is k8s.io/apiserver's `x509.Verifier` (`pkg/authentication/request/
//! x509/x509.go`: chain verified with `ExtKeyUsageClientAuth`, then
//! `subject.CommonName` compared exactly with the allowed names, any CN when
//! the list is empty) in front of `headerrequest` (`.../headerrequest/
//! requestheader.go`: the first user header with a value wins, groups are
//! every value of every group header, extra keys are the lowercased rest of
//! the header name, %-unescaped).
//!
//! The TLS handshake only *requests* a certificate ([`RequestClientCert`]):
//! a client without one, or with one from another CA, still completes the
//! handshake, so that it can be answered 401 with a Kubernetes `Status`
//! instead of a TLS alert. The handshake still checks that the client holds
//! the key of the certificate it presents (the signature checks are
//! webpki's). The chain itself is verified per request, against the CA in
//! use at that moment ([`Guard`]), so a rotated CA applies at once.
//!
//! What is not checked here: authorisation. Any user the front proxy vouches
//! for may read every metric of every namespace (a SubjectAccessReview per
//! user comes with the Kubernetes client).

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use axum::http::HeaderMap;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

/// Who made a request, as the front proxy vouched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Why a request is not authenticated (401).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate is not one of custom_metrics_client_ca: {0}")]
    Untrusted(String),
    #[error("the client certificate's common name {0:?} is not in custom_metrics_allowed_names")]
    NameNotAllowed(String),
    #[error("no user header ({0}) came with the request")]
    NoUser(String),
}

/// The request headers that identify the user (lowercase, as HTTP/2 and
/// `http::HeaderName` have them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderNames {
    username: Vec<String>,
    group: Vec<String>,
    extra_prefix: Vec<String>,
}

impl HeaderNames {
    pub fn new(username: &[String], group: &[String], extra_prefix: &[String]) -> Self {
        let lower = |v: &[String]| -> Vec<String> {
            v.iter().map(|h| h.trim().to_ascii_lowercase()).collect()
        };
        Self {
            username: lower(username),
            group: lower(group),
            extra_prefix: lower(extra_prefix),
        }
    }

    /// Reads the user from `headers` (only call once the certificate is verified).
    fn user(&self, headers: &HeaderMap) -> Result<User, AuthError> {
        let text = |v: &axum::http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let name = self
            .username
            .iter()
            .filter_map(|h| headers.get(h.as_str()))
            .map(text)
            .find(|v| !v.is_empty())
            .ok_or_else(|| AuthError::NoUser(self.username.join(", ")))?;
        let groups = self
            .group
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()))
            .map(text)
            .filter(|v| !v.is_empty())
            .collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for prefix in &self.extra_prefix {
            for (header, value) in headers {
                if let Some(key) = header.as_str().strip_prefix(prefix.as_str()) {
                    extra
                        .entry(path_unescape(key))
                        .or_default()
                        .push(text(value));
                }
            }
        }
        Ok(User {
            name,
            groups,
            extra,
        })
    }
}

/// Go's `url.PathUnescape`, keeping the input when it is not valid
/// %-encoding (as `unescapeExtraKey` does).
fn path_unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => return s.to_owned(),
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

/// The front-proxy CA and the checks made against it.
#[derive(Debug)]
pub struct FrontProxy {
    /// webpki's verifier over the CA: chain, validity dates, clientAuth usage.
    verifier: Arc<dyn ClientCertVerifier>,
    allowed_names: Vec<String>,
    headers: HeaderNames,
}

impl FrontProxy {
    /// `ca` is the certificates of `custom_metrics_client_ca`.
    pub fn new(
        ca: Vec<CertificateDer<'static>>,
        allowed_names: &[String],
        headers: HeaderNames,
    ) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| e.to_string())?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        Ok(Self {
            verifier,
            allowed_names: allowed_names.iter().map(|n| n.trim().to_owned()).collect(),
            headers,
        })
    }

    /// The verifier for the TLS handshake: asks for a certificate, lets the
    /// handshake finish whatever comes, checks the handshake signatures.
    pub fn handshake_verifier(&self) -> Arc<RequestClientCert> {
        Arc::new(RequestClientCert {
            inner: self.verifier.clone(),
        })
    }

    /// Authenticates one request: `chain` is what the client presented
    /// (end entity first).
    pub fn authenticate(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
        headers: &HeaderMap,
        now: UnixTime,
    ) -> Result<User, AuthError> {
        let (leaf, intermediates) = chain
            .and_then(|c| c.split_first())
            .ok_or(AuthError::NoCertificate)?;
        self.verifier
            .verify_client_cert(leaf, intermediates, now)
            .map_err(|e| AuthError::Untrusted(e.to_string()))?;
        if !self.allowed_names.is_empty() {
            let cn = common_name(leaf).unwrap_or_default();
            if !self.allowed_names.contains(&cn) {
                return Err(AuthError::NameNotAllowed(cn));
            }
        }
        self.headers.user(headers)
    }
}

/// The subject's common name as Go's `pkix.Name.CommonName` has it: the last
/// CN attribute. `None` when there is none or it is not a string.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    crate::tls::subject_common_name(&parsed)
}

/// How the API authenticates requests; cheap to clone, read per request.
#[derive(Clone, Debug)]
pub struct Guard(Option<Arc<RwLock<Option<Arc<FrontProxy>>>>>);

impl Guard {
    /// No front-proxy CA (loopback only): every request is served, and the
    /// identity headers are ignored.
    pub fn open() -> Self {
        Self(None)
    }

    /// Authenticating, with no CA loaded yet: every request is refused until
    /// [`Guard::replace`] puts one in.
    pub fn pending() -> Self {
        Self(Some(Arc::new(RwLock::new(None))))
    }

    pub fn front_proxy(fp: FrontProxy) -> Self {
        let guard = Self::pending();
        guard.replace(fp);
        guard
    }

    /// Whether requests are authenticated.
    pub fn checks(&self) -> bool {
        self.0.is_some()
    }

    /// Puts a (rotated) CA in use; no-op on an open guard.
    pub fn replace(&self, fp: FrontProxy) {
        if let Some(slot) = &self.0 {
            *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(fp));
        }
    }

    /// The user of a request; `Ok(None)` on an open guard.
    pub fn check(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
        headers: &HeaderMap,
    ) -> Result<Option<User>, AuthError> {
        let Some(slot) = &self.0 else {
            return Ok(None);
        };
        // std RwLock: an Arc clone under the lock, never held across an await.
        let fp = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
        let fp = fp.ok_or_else(|| AuthError::Untrusted("no front-proxy CA is loaded".into()))?;
        fp.authenticate(chain, headers, UnixTime::now()).map(Some)
    }
}

/// Requests a client certificate without requiring one, and accepts any
/// chain at the handshake: [`FrontProxy::authenticate`] decides per request.
/// The handshake signatures are still checked by webpki, so a client cannot
/// present a certificate whose key it does not hold.
#[derive(Debug)]
pub struct RequestClientCert {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for RequestClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// The CA's subject, so Go clients (which send only a certificate whose
    /// issuer is hinted) send the front-proxy certificate.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deferred to the HTTP layer, which answers 401 with a body.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };

    /// A test CA.
    pub(crate) struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        pub(crate) fn new(name: &str) -> Self {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            Self(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
        }

        pub(crate) fn der(&self) -> CertificateDer<'static> {
            self.0.der().clone()
        }

        /// A client certificate with common name `cn` (none when `None`).
        pub(crate) fn client(
            &self,
            cn: Option<&str>,
            usage: ExtendedKeyUsagePurpose,
        ) -> CertificateDer<'static> {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = cn {
                p.distinguished_name.push(DnType::OrganizationName, "org");
                p.distinguished_name.push(DnType::CommonName, cn);
            }
            p.extended_key_usages = vec![usage];
            p.signed_by(&KeyPair::generate().unwrap(), &self.0)
                .unwrap()
                .der()
                .clone()
        }
    }

    fn defaults() -> HeaderNames {
        HeaderNames::new(
            &["X-Remote-User".into()],
            &["X-Remote-Group".into()],
            &["X-Remote-Extra-".into()],
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn front_proxy(ca: &Ca, allowed: &[&str]) -> FrontProxy {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        FrontProxy::new(vec![ca.der()], &allowed, defaults()).unwrap()
    }

    const AGGREGATOR: &[(&str, &str)] = &[
        ("X-Remote-User", "system:kube-aggregator"),
        ("X-Remote-Group", "system:masters"),
        ("X-Remote-Group", "system:authenticated"),
        ("X-Remote-Extra-Scopes", "a"),
        ("X-Remote-Extra-Scopes", "b"),
        ("X-Remote-Extra-Acme.com%2Fproject", "p1"),
    ];

    #[test]
    fn a_front_proxy_certificate_makes_the_headers_count() {
        let ca = Ca::new("front-proxy-ca");
        let fp = front_proxy(&ca, &["front-proxy-client"]);
        let cert = ca.client(
            Some("front-proxy-client"),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let user = fp
            .authenticate(Some(&[cert]), &headers(AGGREGATOR), UnixTime::now())
            .unwrap();
        assert_eq!(user.name, "system:kube-aggregator");
        assert_eq!(user.groups, ["system:masters", "system:authenticated"]);
        assert_eq!(user.extra["scopes"], ["a", "b"]);
        assert_eq!(user.extra["acme.com/project"], ["p1"]);
    }

    #[test]
    fn no_or_foreign_certificates_are_refused_whatever_the_headers_say() {
        let ca = Ca::new("front-proxy-ca");
        let fp = front_proxy(&ca, &[]);
        let h = headers(AGGREGATOR);
        assert_eq!(
            fp.authenticate(None, &h, UnixTime::now()),
            Err(AuthError::NoCertificate)
        );
        assert_eq!(
            fp.authenticate(Some(&[]), &h, UnixTime::now()),
            Err(AuthError::NoCertificate)
        );
        let other = Ca::new("front-proxy-ca"); // same name, other key
        let foreign = other.client(
            Some("front-proxy-client"),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        assert!(matches!(
            fp.authenticate(Some(&[foreign]), &h, UnixTime::now()),
            Err(AuthError::Untrusted(_))
        ));
        // A server certificate of the right CA is not a client certificate.
        let server = ca.client(
            Some("front-proxy-client"),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        assert!(matches!(
            fp.authenticate(Some(&[server]), &h, UnixTime::now()),
            Err(AuthError::Untrusted(_))
        ));
        // The CA's own certificate presented as a client certificate.
        assert!(matches!(
            fp.authenticate(Some(&[ca.der()]), &h, UnixTime::now()),
            Err(AuthError::Untrusted(_))
        ));
        // Garbage.
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            fp.authenticate(Some(&[junk]), &h, UnixTime::now()),
            Err(AuthError::Untrusted(_))
        ));
    }

    #[test]
    fn expired_or_not_yet_valid_certificates_are_refused() {
        let ca = Ca::new("front-proxy-ca");
        let fp = front_proxy(&ca, &[]);
        let cert = ca.client(
            Some("front-proxy-client"),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let h = headers(AGGREGATOR);
        // rcgen's default validity: 1975 to 4096.
        let before = UnixTime::since_unix_epoch(std::time::Duration::from_secs(86_400));
        assert!(matches!(
            fp.authenticate(Some(std::slice::from_ref(&cert)), &h, before),
            Err(AuthError::Untrusted(_))
        ));
        assert!(fp.authenticate(Some(&[cert]), &h, UnixTime::now()).is_ok());
    }

    #[test]
    fn allowed_names_are_the_common_name_exactly() {
        let ca = Ca::new("front-proxy-ca");
        let fp = front_proxy(&ca, &["front-proxy-client", "aggregator"]);
        let h = headers(AGGREGATOR);
        for (cn, ok) in [
            (Some("front-proxy-client"), true),
            (Some("aggregator"), true),
            (Some("Aggregator"), false),
            (Some("front-proxy-client2"), false),
            (Some("system:anonymous"), false),
            (None, false),
        ] {
            let cert = ca.client(cn, ExtendedKeyUsagePurpose::ClientAuth);
            let got = fp.authenticate(Some(&[cert]), &h, UnixTime::now());
            assert_eq!(got.is_ok(), ok, "{cn:?}: {got:?}");
            if !ok {
                assert!(matches!(got, Err(AuthError::NameNotAllowed(_))), "{got:?}");
            }
        }
        // Without allowed names, any certificate of the CA, even without a CN.
        let fp = front_proxy(&ca, &[]);
        let cert = ca.client(None, ExtendedKeyUsagePurpose::ClientAuth);
        assert!(fp.authenticate(Some(&[cert]), &h, UnixTime::now()).is_ok());
    }

    #[test]
    fn a_verified_certificate_still_needs_a_user() {
        let ca = Ca::new("front-proxy-ca");
        let fp = front_proxy(&ca, &[]);
        let cert = ca.client(
            Some("front-proxy-client"),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        for h in [
            headers(&[]),
            headers(&[("X-Remote-User", "")]),
            headers(&[("X-Remote-Group", "g")]),
        ] {
            assert!(matches!(
                fp.authenticate(Some(std::slice::from_ref(&cert)), &h, UnixTime::now()),
                Err(AuthError::NoUser(_))
            ));
        }
    }

    #[test]
    fn header_names_are_configurable_and_case_blind() {
        let ca = Ca::new("front-proxy-ca");
        let names = HeaderNames::new(
            &["X-Forwarded-User".into(), "X-Remote-User".into()],
            &["X-Forwarded-Groups".into()],
            &["X-Forwarded-Extra-".into()],
        );
        let fp = FrontProxy::new(vec![ca.der()], &[], names).unwrap();
        let cert = ca.client(Some("p"), ExtendedKeyUsagePurpose::ClientAuth);
        let h = headers(&[
            ("x-forwarded-user", ""),
            ("X-REMOTE-USER", "bob"),
            ("x-forwarded-groups", "devs"),
            ("X-Remote-Group", "ignored"),
            ("x-forwarded-extra-Key", "v"),
            ("x-remote-extra-key", "ignored"),
        ]);
        let user = fp.authenticate(Some(&[cert]), &h, UnixTime::now()).unwrap();
        assert_eq!(user.name, "bob", "the first header with a value wins");
        assert_eq!(user.groups, ["devs"]);
        assert_eq!(user.extra.len(), 1);
        assert_eq!(user.extra["key"], ["v"]);
    }

    #[test]
    fn guard_rotation_and_open_mode() {
        let (a, b) = (Ca::new("a"), Ca::new("b"));
        let guard = Guard::front_proxy(front_proxy(&a, &[]));
        let from_b = b.client(Some("p"), ExtendedKeyUsagePurpose::ClientAuth);
        let h = headers(AGGREGATOR);
        assert!(
            guard
                .check(Some(std::slice::from_ref(&from_b)), &h)
                .is_err()
        );
        guard.replace(front_proxy(&b, &[]));
        assert!(guard.check(Some(&[from_b]), &h).unwrap().is_some());
        assert!(guard.checks());
        let open = Guard::open();
        assert!(!open.checks());
        assert_eq!(open.check(None, &h), Ok(None));
    }

    #[test]
    fn common_name_of_a_certificate() {
        let ca = Ca::new("front-proxy-ca");
        assert_eq!(common_name(&ca.der()).as_deref(), Some("front-proxy-ca"));
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "first");
        let cert = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("first"));
        assert_eq!(common_name(&CertificateDer::from(vec![1, 2, 3])), None);
    }

    #[test]
    fn path_unescape_like_go() {
        assert_eq!(path_unescape("acme.com%2fproject"), "acme.com/project");
        assert_eq!(path_unescape("plain"), "plain");
        assert_eq!(path_unescape("bad%zz"), "bad%zz");
        assert_eq!(path_unescape("cut%2"), "cut%2");
        assert_eq!(path_unescape("%ff"), "%ff", "not UTF-8: kept as sent");
    }
}

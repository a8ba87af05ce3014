//! The Custom Metrics API's TLS: its certificate, the client-certificate
//! request, ALPN, and rotation through the crate's reloading [`Tls`].
//!
//! The certificate comes from `custom_metrics_tls_cert`/`_key`, re-read every
//! `tls_reload_interval` like the gRPC ports' files, or, when they are unset,
//! is made at start-up (self-signed, for `custom_metrics_tls_names`): the
//! APIService then uses `insecureSkipTLSVerify: true`, since a certificate
//! that changes on every start cannot be pinned by a `caBundle`. The
//! front-proxy CA (`custom_metrics_client_ca`) is re-read with them: a new
//! CA goes into the [`Guard`] the API checks requests with, at once.
//!
//! ALPN offers `h2` and `http/1.1`: the aggregator speaks both.

use std::{path::PathBuf, sync::Arc};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};

use crate::{
    config::CustomMetricsConfig,
    tls::{Tls, TlsError, TlsSource, pem_certs, pem_key},
};

use super::auth::{FrontProxy, Guard, HeaderNames};

const CERT: &str = "custom_metrics_tls_cert";
const KEY: &str = "custom_metrics_tls_key";
const CLIENT_CA: &str = "custom_metrics_client_ca";

/// Where the serving certificate comes from.
#[derive(Debug)]
enum Identity {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Made at start-up; never changes.
    Made {
        cert: CertificateDer<'static>,
        key: PrivatePkcs8KeyDer<'static>,
    },
}

/// The [`TlsSource`] of the Custom Metrics API.
#[derive(Debug)]
pub struct ApiTls {
    identity: Identity,
    client_ca: Option<PathBuf>,
    allowed_names: Vec<String>,
    headers: HeaderNames,
    /// Given each newly loaded CA; shared with the router.
    guard: Guard,
}

/// File contents: certificate, key, CA (each `None` when not a file).
type Contents = (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);

impl ApiTls {
    /// The TLS state and the request guard `config` asks for; an error names
    /// the setting.
    pub fn load(config: &CustomMetricsConfig) -> Result<(Arc<Tls<ApiTls>>, Guard), TlsError> {
        let identity = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Identity::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => self_signed(&config.tls_names)?,
        };
        let headers = HeaderNames::new(
            &config.username_headers,
            &config.group_headers,
            &config.extra_headers_prefix,
        );
        // Filled by the first load, below.
        let guard = match &config.client_ca {
            Some(_) => Guard::pending(),
            None => Guard::open(),
        };
        let source = ApiTls {
            identity,
            client_ca: config.client_ca.clone(),
            allowed_names: config.allowed_names.clone(),
            headers,
            guard: guard.clone(),
        };
        Ok((Tls::load(source)?, guard))
    }

    /// Whether the certificate was made at start-up.
    pub fn self_signed(&self) -> bool {
        matches!(self.identity, Identity::Made { .. })
    }
}

fn setting(field: &'static str, problem: String) -> TlsError {
    TlsError::Setting { field, problem }
}

/// A self-signed serving certificate for `names` (DNS names or IPs).
fn self_signed(names: &[String]) -> Result<Identity, TlsError> {
    let made = || -> Result<Identity, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().map_or("activescale", String::as_str),
        );
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.self_signed(&key)?;
        Ok(Identity::Made {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    };
    made().map_err(|e| {
        setting(
            "custom_metrics_tls_names",
            format!("cannot make a self-signed certificate: {e}"),
        )
    })
}

fn read(field: &'static str, path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.clone(),
        source,
    })
}

impl TlsSource for ApiTls {
    type Contents = Contents;

    fn read_contents(&self) -> Result<Contents, TlsError> {
        let (cert, key) = match &self.identity {
            Identity::Files { cert, key } => (Some(read(CERT, cert)?), Some(read(KEY, key)?)),
            Identity::Made { .. } => (None, None),
        };
        let ca = self
            .client_ca
            .as_ref()
            .map(|p| read(CLIENT_CA, p))
            .transpose()?;
        Ok((cert, key, ca))
    }

    fn build_config(&self, (cert, key, ca): &Contents) -> Result<Arc<ServerConfig>, TlsError> {
        let (certs, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) =
            match (&self.identity, cert, key) {
                (Identity::Files { cert: cp, key: kp }, Some(c), Some(k)) => {
                    (pem_certs(CERT, cp, c)?, pem_key(KEY, kp, k)?)
                }
                (Identity::Made { cert, key }, _, _) => {
                    (vec![cert.clone()], PrivateKeyDer::Pkcs8(key.clone_key()))
                }
                _ => return Err(setting(CERT, "not read".into())),
            };
        let front_proxy = match (&self.client_ca, ca) {
            (Some(path), Some(pem_bytes)) => {
                let ca = pem_certs(CLIENT_CA, path, pem_bytes)?;
                Some(
                    FrontProxy::new(ca, &self.allowed_names, self.headers.clone()).map_err(
                        |problem| TlsError::Pem {
                            field: CLIENT_CA,
                            path: path.clone(),
                            problem,
                        },
                    )?,
                )
            }
            _ => None,
        };
        let builder =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| setting(CERT, e.to_string()))?;
        let builder = match &front_proxy {
            Some(fp) => builder.with_client_cert_verifier(fp.handshake_verifier()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            setting(
                KEY,
                format!("the certificate and key are not usable together: {e}"),
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Last, once nothing can fail: the CA requests are checked against.
        if let Some(fp) = front_proxy {
            self.guard.replace(fp);
        }
        Ok(Arc::new(config))
    }

    fn describe(&self) -> String {
        let mut files: Vec<String> = Vec::new();
        if let Identity::Files { cert, .. } = &self.identity {
            files.push(cert.display().to_string());
        }
        if let Some(ca) = &self.client_ca {
            files.push(ca.display().to_string());
        }
        files.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::{custom_metrics::auth::tests::Ca, tls::Reload};
    use axum::http::HeaderMap;
    use rcgen::ExtendedKeyUsagePurpose;

    fn pem_of(der: &CertificateDer<'_>) -> String {
        let b64 = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(der.as_ref())
        };
        let body: Vec<String> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            body.join("\n")
        )
    }

    fn config_with_ca(dir: &std::path::Path, ca: &Ca) -> CustomMetricsConfig {
        let path = dir.join("ca.crt");
        std::fs::write(&path, pem_of(&ca.der())).unwrap();
        CustomMetricsConfig {
            client_ca: Some(path),
            ..Config::default().custom_metrics
        }
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", "u".parse().unwrap());
        h
    }

    #[test]
    fn self_signed_offers_h2_and_http1() {
        let (tls, guard) = ApiTls::load(&Config::default().custom_metrics).unwrap();
        let config = tls.acceptor().config().clone();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(!guard.checks(), "no client CA: nothing checked");
    }

    #[test]
    fn the_ca_file_reaches_the_guard_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Ca::new("a"), Ca::new("b"));
        let config = config_with_ca(dir.path(), &a);
        let (tls, guard) = ApiTls::load(&config).unwrap();
        let from_a = a.client(Some("p"), ExtendedKeyUsagePurpose::ClientAuth);
        let from_b = b.client(Some("p"), ExtendedKeyUsagePurpose::ClientAuth);
        assert!(
            guard
                .check(Some(std::slice::from_ref(&from_a)), &headers())
                .is_ok()
        );
        assert!(
            guard
                .check(Some(std::slice::from_ref(&from_b)), &headers())
                .is_err()
        );
        assert!(matches!(tls.reload(), Reload::Unchanged));

        std::fs::write(config.client_ca.as_ref().unwrap(), pem_of(&b.der())).unwrap();
        assert!(matches!(tls.reload(), Reload::Reloaded));
        assert!(guard.check(Some(&[from_b]), &headers()).is_ok());
        assert!(guard.check(Some(&[from_a]), &headers()).is_err());

        // A broken CA file keeps the last good one.
        std::fs::write(config.client_ca.as_ref().unwrap(), "garbage").unwrap();
        let Reload::Failed(e) = tls.reload() else {
            panic!("a broken CA must not load")
        };
        assert!(e.to_string().contains("custom_metrics_client_ca"), "{e}");
        let from_b = b.client(Some("p"), ExtendedKeyUsagePurpose::ClientAuth);
        assert!(guard.check(Some(&[from_b]), &headers()).is_ok());
    }

    #[test]
    fn start_up_errors_name_the_custom_metrics_settings() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let mut config = CustomMetricsConfig {
            tls_cert: Some(cert.clone()),
            tls_key: Some(key.clone()),
            ..Config::default().custom_metrics
        };
        let e = ApiTls::load(&config).err().unwrap().to_string();
        assert!(e.starts_with("custom_metrics_tls_cert:"), "{e}");

        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(&cert, made.cert.pem()).unwrap();
        let e = ApiTls::load(&config).err().unwrap().to_string();
        assert!(e.starts_with("custom_metrics_tls_key:"), "{e}");

        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key, other.serialize_pem()).unwrap();
        let e = ApiTls::load(&config).err().unwrap().to_string();
        assert!(
            e.starts_with("custom_metrics_tls_key:") && e.contains("not usable together"),
            "{e}"
        );

        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let (tls, _) = ApiTls::load(&config).unwrap();
        assert!(!tls_is_self_signed(&tls));

        config.client_ca = Some(dir.path().join("missing.crt"));
        let e = ApiTls::load(&config).err().unwrap().to_string();
        assert!(e.starts_with("custom_metrics_client_ca:"), "{e}");
    }

    fn tls_is_self_signed(tls: &Tls<ApiTls>) -> bool {
        tls.source().self_signed()
    }
}

//! From [`RedisConfig`] to redis clients: URL, TLS, ACL credentials, cluster
//! mode.
//!
//! [`RedisConfig::seeds`] takes `redis_url` apart (one or several seed hosts;
//! the scheme or the flags pick TLS and cluster mode); `redis_username`,
//! `redis_password` and `redis_db` win over the URL's. `Config::validate`
//! has already run the same checks, so a failure here is for a config built
//! in code.

use std::time::Duration;

use redis::{
    AsyncConnectionConfig, ClientTlsConfig, ConnectionInfo, IntoConnectionInfo, TlsCertificates,
    cluster::ClusterClientBuilder,
};
use tracing::warn;

use super::Backend;
use crate::config::RedisConfig;

/// Everything [`super::RedisStore`] needs to connect.
pub struct Settings {
    pub(super) backend: Backend,
    /// One client per seed node, for the change subscription.
    pub(super) subscriber_clients: Vec<redis::Client>,
}

impl Settings {
    pub fn from_config(config: &RedisConfig) -> Result<Self, String> {
        let seeds = config.seeds().map_err(|e| e.0)?;
        let (tls, cluster) = (seeds.tls, seeds.cluster);
        let certs = certificates(config)?;
        if certs.is_some() && !tls {
            warn!(
                "redis_ca_file / redis_cert_file are set but the connection is not TLS (use rediss:// or redis_tls); they are ignored"
            );
        }
        let mut infos = Vec::with_capacity(seeds.urls.len());
        for url in &seeds.urls {
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| format!("redis_url {:?}: {e}", config.redacted_url()))?;
            let mut redis = info.redis_settings().clone();
            if let Some(u) = &config.username {
                redis = redis.set_username(u);
            }
            if let Some(p) = &config.password {
                redis = redis.set_password(p);
            }
            if let Some(db) = config.db {
                if cluster && db != 0 {
                    return Err(format!(
                        "redis_db {db}: a Redis Cluster has only database 0"
                    ));
                }
                redis = redis.set_db(db);
            }
            infos.push(info.set_redis_settings(redis));
        }
        let timeout = config.timeout;
        let client = |info: &ConnectionInfo| -> Result<redis::Client, String> {
            match (&certs, tls) {
                (Some(c), true) => redis::Client::build_with_tls(info.clone(), c.clone()),
                _ => redis::Client::open(info.clone()),
            }
            .map_err(|e| format!("redis TLS settings: {e}"))
        };
        let subscriber_clients = infos.iter().map(client).collect::<Result<Vec<_>, _>>()?;
        let backend = if cluster {
            let mut builder = ClusterClientBuilder::new(infos.clone())
                .connection_timeout(timeout.max(Duration::from_millis(100)))
                .response_timeout(timeout)
                .retries(2);
            if let (Some(c), true) = (&certs, tls) {
                builder = builder.certs(c.clone());
            }
            Backend::Cluster(
                builder
                    .build()
                    .map_err(|e| format!("redis cluster settings: {e}"))?,
            )
        } else {
            Backend::Single {
                client: subscriber_clients[0].clone(),
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout)),
            }
        };
        Ok(Self {
            backend,
            subscriber_clients,
        })
    }
}

fn certificates(config: &RedisConfig) -> Result<Option<TlsCertificates>, String> {
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
    };
    let root_cert = match &config.ca_file {
        Some(p) => Some(read("redis_ca_file", p)?),
        None => None,
    };
    let client_tls = match (&config.cert_file, &config.key_file) {
        (Some(c), Some(k)) => Some(ClientTlsConfig {
            client_cert: read("redis_cert_file", c)?,
            client_key: read("redis_key_file", k)?,
        }),
        (None, None) => None,
        _ => return Err("redis_cert_file and redis_key_file go together".into()),
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(f: impl FnOnce(&mut RedisConfig)) -> RedisConfig {
        let mut c = RedisConfig::default();
        f(&mut c);
        c
    }

    #[test]
    fn urls_split_into_seeds() {
        let s = redis(|c| c.url = "rediss+cluster://u:p@a:1,b:2/0".into())
            .seeds()
            .unwrap();
        assert!(s.tls && s.cluster);
        assert_eq!(s.urls, vec!["rediss://u:p@a:1/0", "rediss://u:p@b:2/0"]);
        let s = redis(|c| c.url = "redis://localhost:6379".into())
            .seeds()
            .unwrap();
        assert!(!s.tls && !s.cluster);
        assert_eq!(s.urls, vec!["redis://localhost:6379"]);
        for bad in ["http://x", "redis://", "localhost:6379"] {
            assert!(redis(|c| c.url = bad.into()).seeds().is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_flags_shape_the_seed_url() {
        let url = |tls, insecure| {
            redis(|c| {
                c.url = "redis://h:1".into();
                c.tls = tls;
                c.tls_insecure = insecure;
            })
            .seeds()
            .unwrap()
            .urls
        };
        assert_eq!(url(true, true), ["rediss://h:1#insecure"]);
        assert_eq!(url(false, true), ["redis://h:1"]);
        assert_eq!(url(true, false), ["rediss://h:1"]);
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        let r = redis(|c| c.url = "redis://u:secret@h:1".into());
        assert_eq!(r.redacted_url(), "redis://u:***@h:1");
        let r = redis(|c| c.url = "ftp://u:secret@h:1".into());
        assert!(!r.seeds().unwrap_err().to_string().contains("secret"));
        assert_eq!(redis(|_| {}).redacted_url(), "redis://127.0.0.1:6379");
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let mut c = RedisConfig {
            url: "redis://a:1,b:2".into(),
            ..RedisConfig::default()
        };
        let err = |c: &RedisConfig| Settings::from_config(c).err().unwrap();
        assert!(err(&c).contains("cluster"));
        c.url = "redis+cluster://a:1".into();
        c.db = Some(3);
        assert!(err(&c).contains("redis_db"));
        c.db = None;
        c.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(err(&c).contains("redis_ca_file"));
    }
}

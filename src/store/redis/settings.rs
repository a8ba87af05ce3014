//! From [`Config`] to redis clients: URL, TLS, ACL credentials, cluster mode.
//!
//! `redis_url` takes one or several comma-separated seed hosts:
//! `redis://[user:pass@]host:port[,host:port...][/db]`. The scheme picks TLS
//! (`rediss`) and cluster mode (`redis+cluster`, `rediss+cluster`); the flags
//! `redis_tls` and `redis_cluster` do the same for a plain `redis://` URL.
//! `redis_username`, `redis_password` and `redis_db` win over the URL's.

use std::time::Duration;

use redis::{
    AsyncConnectionConfig, ClientTlsConfig, ConnectionInfo, IntoConnectionInfo, TlsCertificates,
    cluster::ClusterClientBuilder,
};
use tracing::warn;

use super::Backend;
use crate::config::Config;

/// Everything [`super::RedisStore`] needs to connect.
pub struct Settings {
    pub(super) backend: Backend,
    /// One client per seed node, for the change subscription.
    pub(super) subscriber_clients: Vec<redis::Client>,
}

impl Settings {
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let (scheme_tls, cluster_scheme, seeds) = split_url(&config.redis_url)?;
        let tls = scheme_tls || config.redis_tls;
        let cluster = cluster_scheme || config.redis_cluster;
        let certs = certificates(config)?;
        if certs.is_some() && !tls {
            warn!(
                "redis_ca_file / redis_cert_file are set but the connection is not TLS (use rediss:// or redis_tls); they are ignored"
            );
        }
        let mut infos = Vec::with_capacity(seeds.len());
        for seed in &seeds {
            let url = seed_url(seed, tls, config.redis_tls_insecure);
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| format!("redis_url {:?}: {e}", redact(&config.redis_url)))?;
            let mut redis = info.redis_settings().clone();
            if let Some(u) = &config.redis_username {
                redis = redis.set_username(u);
            }
            if let Some(p) = &config.redis_password {
                redis = redis.set_password(p);
            }
            if let Some(db) = config.redis_db {
                if cluster && db != 0 {
                    return Err(format!(
                        "redis_db {db}: a Redis Cluster has only database 0"
                    ));
                }
                redis = redis.set_db(db);
            }
            infos.push(info.set_redis_settings(redis));
        }
        let timeout = config.redis_timeout;
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
            if seeds.len() > 1 {
                return Err("redis_url lists several hosts: that needs cluster mode (redis+cluster:// or redis_cluster)".into());
            }
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

/// `(tls, cluster, seeds)`; each seed is `userinfo@host:port/path?query#fragment`
/// without the scheme.
fn split_url(url: &str) -> Result<(bool, bool, Vec<String>), String> {
    let bad = |why: &str| format!("redis_url {:?}: {why}", redact(url));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (tls, cluster) = match scheme {
        "redis" => (false, false),
        "rediss" => (true, false),
        "redis+cluster" => (false, true),
        "rediss+cluster" => (true, true),
        _ => {
            return Err(bad(
                "the scheme must be redis, rediss, redis+cluster or rediss+cluster",
            ));
        }
    };
    let split_at = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split_at);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let seeds: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| match userinfo {
            Some(u) => format!("{u}@{h}{tail}"),
            None => format!("{h}{tail}"),
        })
        .collect();
    if seeds.is_empty() {
        return Err(bad("no host"));
    }
    Ok((tls, cluster, seeds))
}

fn seed_url(seed: &str, tls: bool, insecure: bool) -> String {
    let mut url = format!("{}://{seed}", if tls { "rediss" } else { "redis" });
    if tls && insecure && !url.contains('#') {
        // The redis crate's switch for "do not verify the server certificate".
        url.push_str("#insecure");
    }
    url
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (userinfo, hosts) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{hosts}")
        }
        _ => url.to_string(),
    }
}

fn certificates(config: &Config) -> Result<Option<TlsCertificates>, String> {
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
    };
    let root_cert = match &config.redis_ca_file {
        Some(p) => Some(read("redis_ca_file", p)?),
        None => None,
    };
    let client_tls = match (&config.redis_cert_file, &config.redis_key_file) {
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

    #[test]
    fn urls_split_into_seeds() {
        let (tls, cluster, seeds) = split_url("rediss+cluster://u:p@a:1,b:2/0").unwrap();
        assert!(tls && cluster);
        assert_eq!(seeds, vec!["u:p@a:1/0", "u:p@b:2/0"]);
        let (tls, cluster, seeds) = split_url("redis://localhost:6379").unwrap();
        assert!(!tls && !cluster);
        assert_eq!(seeds, vec!["localhost:6379"]);
        assert!(split_url("http://x").is_err());
        assert!(split_url("redis://").is_err());
    }

    #[test]
    fn tls_flags_shape_the_seed_url() {
        assert_eq!(seed_url("h:1", true, true), "rediss://h:1#insecure");
        assert_eq!(seed_url("h:1", false, true), "redis://h:1");
        assert_eq!(seed_url("h:1", true, false), "rediss://h:1");
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("redis://u:secret@h:1"), "redis://u:***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let mut c = Config {
            redis_url: "redis://a:1,b:2".into(),
            ..Config::default()
        };
        assert!(Settings::from_config(&c).err().unwrap().contains("cluster"));
        c.redis_url = "redis+cluster://a:1".into();
        c.redis_db = Some(3);
        assert!(
            Settings::from_config(&c)
                .err()
                .unwrap()
                .contains("redis_db")
        );
        c.redis_db = None;
        c.redis_ca_file = Some("/nonexistent/ca.pem".into());
        assert!(
            Settings::from_config(&c)
                .err()
                .unwrap()
                .contains("redis_ca_file")
        );
    }
}

//! Redis/Valkey store shared by several replicas (issue #3).
//!
//! Interface stub: `lib.rs` builds it with [`RedisStore::connect`].

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Notifier, PodIdentity, PodQuery, PodSelector, PodView, Store, StoreError};
use crate::config::Config;

/// Handle on the Redis store.
#[derive(Clone)]
pub struct RedisStore {
    notifier: std::sync::Arc<Notifier>,
}

impl RedisStore {
    /// Connects (pool, subscriber) as configured. Fails only on settings that
    /// can never work; an unreachable server is retried in the background.
    pub async fn connect(_config: &Config) -> Result<Self, StoreError> {
        Err(StoreError::Unavailable(
            "the redis store is not built yet".into(),
        ))
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn record(
        &self,
        _pod: &PodIdentity,
        _families: &[(String, f64)],
    ) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("not built".into()))
    }

    async fn values(&self, _query: &PodQuery) -> Result<Vec<f64>, StoreError> {
        Err(StoreError::Unavailable("not built".into()))
    }

    async fn pods(
        &self,
        _namespace: &str,
        _selector: Option<&PodSelector>,
    ) -> Result<Vec<PodView>, StoreError> {
        Err(StoreError::Unavailable("not built".into()))
    }

    fn watch(&self, namespace: &str) -> watch::Receiver<u64> {
        self.notifier.subscribe(namespace)
    }

    async fn ready(&self) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("not built".into()))
    }
}

//! One Redis connection type for a single node or a cluster, both reconnecting on their
//! own after Redis restarts. Requests issued concurrently share one socket (they are
//! pipelined), which is what makes per-user Lua calls cheap at high rates.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use crate::config::RedisConfig;

#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects as configured (password from the configuration, never from the URL).
    pub async fn connect(cfg: &RedisConfig) -> redis::RedisResult<Self> {
        let urls: Vec<&str> = cfg.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        if cfg.cluster || urls.len() > 1 {
            let mut builder = ClusterClient::builder(urls);
            if let Some(p) = &cfg.password {
                builder = builder.password(p.expose());
            }
            return Ok(Self::Cluster(builder.build()?.get_async_connection().await?));
        }
        let mut info = urls.first().copied().unwrap_or("").into_connection_info()?;
        if let Some(p) = &cfg.password {
            let settings = info.redis_settings().clone().set_password(p.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(2);
        Ok(Self::Single(ConnectionManager::new_with_config(client, config).await?))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

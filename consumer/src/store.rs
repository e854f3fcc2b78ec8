//! The Redis store (DESIGN.md §3.3): pending windows, summaries and their history, with
//! every change made by one Lua script so that it is atomic and idempotent.
//!
//! - [`Store::persist_pending`] appends signals to `alignx:{u}:pending` unless they were
//!   already applied (offset ≤ `applied[partition]`) or are already pending, so a
//!   re-delivery after a crash adds nothing.
//! - [`Store::apply`] writes a new summary version only if the stored version is the one
//!   the update started from and none of its signals was applied before; it removes the
//!   consumed signals from `pending`, advances `applied`, and pushes the previous summary
//!   onto the capped history.
//!
//! All keys of a user share the hash tag `{user_id}` (see `alignx_schemas::keys`), so the
//! scripts also run on Redis Cluster. Offsets travel through Lua's cjson, which keeps 14
//! significant digits: offsets below 10^14 per partition are exact.

use std::collections::{BTreeMap, HashMap};

use alignx_schemas::inference_log::LoggedSignal;
use alignx_schemas::keys::UserKeys;
use alignx_schemas::summary::SummaryRecord;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt record for user {user}: {message}")]
    Corrupt { user: String, message: String },
}

/// A past summary, newest first in `alignx:{u}:history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub summary: String,
}

/// One summary update, as the scheduler hands it to the store.
#[derive(Debug, Clone)]
pub struct Update {
    pub user_id: String,
    /// The version the update started from (0: the user had none).
    pub expected_version: u64,
    pub summary: String,
    pub model: String,
    pub reasoning: Option<String>,
    /// Per input partition, the highest offset this update consumed from `pending`.
    pub consumed: BTreeMap<i32, i64>,
    /// How many signals the update folded in.
    pub signals: u64,
    pub now_ms: u64,
}

/// What [`Store::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The new summary is stored as `version`.
    Applied { version: u64 },
    /// Another update got there first; the stored version is `current`.
    Stale { current: u64 },
    /// Its signals were already applied (a replay after a crash); nothing changed.
    Replayed { current: u64 },
}

const PERSIST: &str = r#"
local applied = {}
local raw = redis.call('HGET', KEYS[1], 'applied')
if raw then applied = cjson.decode(raw) end
local seen = {}
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local d = cjson.decode(e)
  seen[string.format('%d:%d', d.partition, d.offset)] = true
end
local added = 0
for i = 1, #ARGV, 3 do
  local p, o = ARGV[i], tonumber(ARGV[i + 1])
  local done = applied[p]
  local key = string.format('%d:%d', tonumber(p), o)
  if (done == nil or o > done) and not seen[key] then
    redis.call('RPUSH', KEYS[2], ARGV[i + 2])
    seen[key] = true
    added = added + 1
  end
end
return added
"#;

const APPLY: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
local applied = {}
local raw = redis.call('HGET', KEYS[1], 'applied')
if raw then applied = cjson.decode(raw) end
local consumed = cjson.decode(ARGV[8])
for p, o in pairs(consumed) do
  if applied[p] ~= nil and o <= applied[p] then return {-1, cur} end
end
local keep = {}
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local d = cjson.decode(e)
  local c = consumed[string.format('%d', d.partition)]
  if c == nil or d.offset > c then table.insert(keep, e) end
end
redis.call('DEL', KEYS[2])
for _, e in ipairs(keep) do redis.call('RPUSH', KEYS[2], e) end
for p, o in pairs(consumed) do applied[p] = o end
local old = redis.call('HGET', KEYS[1], 'summary')
if old then
  redis.call('LPUSH', KEYS[3], cjson.encode({version = cur, summary = old}))
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
end
local n = tonumber(redis.call('HGET', KEYS[1], 'signals_applied') or '0') + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'summary', ARGV[2], 'version', cur + 1, 'model', ARGV[3],
  'updated_at_ms', ARGV[4], 'signals_applied', n, 'applied', cjson.encode(applied))
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'reasoning', ARGV[7]) else redis.call('HDEL', KEYS[1], 'reasoning') end
return {1, cur + 1}
"#;

/// Summaries, pending windows and history in Redis, over any connection (single node or
/// cluster).
pub struct Store<C> {
    conn: C,
    persist: redis::Script,
    apply: redis::Script,
    history_len: usize,
}

impl<C: ConnectionLike + Send + Clone> Store<C> {
    pub fn new(conn: C, history_len: usize) -> Self {
        Self {
            conn,
            persist: redis::Script::new(PERSIST),
            apply: redis::Script::new(APPLY),
            history_len: history_len.max(1),
        }
    }

    /// Appends signals of one user to their pending window; returns how many were new.
    pub async fn persist_pending(
        &self,
        user_id: &str,
        signals: &[LoggedSignal],
    ) -> Result<usize, StoreError> {
        if signals.is_empty() {
            return Ok(0);
        }
        let keys = UserKeys::new(user_id);
        let mut inv = self.persist.key(&keys.summary);
        inv.key(&keys.pending);
        for s in signals {
            let json = serde_json::to_string(s).expect("a signal serialises");
            inv.arg(s.partition).arg(s.offset).arg(json);
        }
        let added: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(added as usize)
    }

    /// Applies an update atomically (see the module docs).
    pub async fn apply(&self, u: &Update) -> Result<ApplyOutcome, StoreError> {
        let keys = UserKeys::new(&u.user_id);
        let consumed: BTreeMap<String, i64> = u.consumed.iter().map(|(p, o)| (p.to_string(), *o)).collect();
        let (code, version): (i64, u64) = self
            .apply
            .key(&keys.summary)
            .key(&keys.pending)
            .key(&keys.history)
            .arg(u.expected_version)
            .arg(&u.summary)
            .arg(&u.model)
            .arg(u.now_ms)
            .arg(u.signals)
            .arg(self.history_len)
            .arg(u.reasoning.as_deref().unwrap_or(""))
            .arg(serde_json::to_string(&consumed).expect("a map of integers serialises"))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match code {
            1 => ApplyOutcome::Applied { version },
            0 => ApplyOutcome::Stale { current: version },
            _ => ApplyOutcome::Replayed { current: version },
        })
    }

    /// The user's current summary, if any.
    pub async fn summary(&self, user_id: &str) -> Result<Option<SummaryRecord>, StoreError> {
        let keys = UserKeys::new(user_id);
        let fields: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&keys.summary).query_async(&mut self.conn.clone()).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        SummaryRecord::from_hash_fields(user_id, &fields)
            .map(Some)
            .map_err(|e| StoreError::Corrupt { user: user_id.to_owned(), message: e.to_string() })
    }

    /// The user's pending signals, in arrival order.
    pub async fn pending(&self, user_id: &str) -> Result<Vec<LoggedSignal>, StoreError> {
        self.list(user_id, &UserKeys::new(user_id).pending).await
    }

    /// Past summaries, newest first.
    pub async fn history(&self, user_id: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        self.list(user_id, &UserKeys::new(user_id).history).await
    }

    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        user_id: &str,
        key: &str,
    ) -> Result<Vec<T>, StoreError> {
        let raw: Vec<String> =
            redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query_async(&mut self.conn.clone()).await?;
        raw.iter()
            .map(|e| {
                serde_json::from_str(e).map_err(|err| StoreError::Corrupt {
                    user: user_id.to_owned(),
                    message: format!("{key}: {err}"),
                })
            })
            .collect()
    }
}

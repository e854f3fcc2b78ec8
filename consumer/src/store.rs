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
//! - [`Store::skip`] consumes signals without changing the summary, for a window whose
//!   generations kept failing: its offsets count as applied so a replay skips them too.
//! - The apply script also stores the update's inference-log record in the `outbox` field
//!   of the summary hash: written atomically with the summary, so a crash between the
//!   write and the log's delivery cannot lose it (the next owner of the user re-sends it).
//!
//! Which users have pending signals is indexed per input partition (a sorted set scored by
//! when the first signal was persisted), so a consumer that takes over a partition finds
//! their windows without scanning the keyspace. The index is a separate key (another hash
//! slot), kept by separate commands: added to before the pending list is written, removed
//! from only after the list is seen empty, so it may list a user with nothing pending but
//! never misses one that has.
//!
//! - [`Store::erase`] deletes everything stored about a user and leaves a tombstone (the
//!   erasure time): the persist and apply scripts then refuse any signal stamped at or
//!   before it, so a replay or an update already in flight cannot bring the data back.
//!
//! All keys of a user share the hash tag `{user_id}` (see `alignx_schemas::keys`), so the
//! scripts also run on Redis Cluster. Offsets travel through Lua's cjson, which keeps 14
//! significant digits: offsets below 10^14 per partition are exact.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};

use alignx_schemas::inference_log::LoggedSignal;
use alignx_schemas::keys::UserKeys;
use alignx_schemas::summary::{SummaryRecord, field};
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
    /// The oldest signal timestamp among them (Unix ms), checked against the tombstone.
    pub oldest_ts_ms: i64,
    pub now_ms: u64,
    /// The update's inference-log record (JSON), kept in the `outbox` field until it is
    /// delivered; empty for none.
    pub outbox: String,
    /// The update's signals (JSON), appended to the capped recent-signals list when the
    /// store keeps one (base setting).
    pub recent: Vec<String>,
}

/// What [`Store::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The new summary is stored as `version`; the user's signals applied so far.
    Applied { version: u64, signals_applied: u64 },
    /// Another update got there first; the stored version is `current`.
    Stale { current: u64 },
    /// Its signals were already applied (a replay after a crash); nothing changed.
    Replayed { current: u64 },
    /// [`Store::skip`]: the signals were consumed, the summary stays at `version`.
    Skipped { version: u64 },
    /// Some of its signals predate the user's erasure: refused, nothing changed.
    Erased { current: u64 },
}

/// What [`Store::erase`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// The summary version that was deleted (0: there was none).
    pub version: u64,
    pub pending: u64,
    pub history: u64,
}

/// Everything the consumer needs to know about a user it starts serving.
#[derive(Debug, Clone, Default)]
pub struct UserRecord {
    /// The current summary; `None` before the first update.
    pub summary: Option<SummaryRecord>,
    /// Input partition → last consumed offset (applied or skipped).
    pub applied: BTreeMap<i32, i64>,
    /// An inference-log record written with the last update whose delivery is unconfirmed.
    pub outbox: Option<String>,
    /// The most recent signals, oldest first (only when the store keeps them).
    pub recent: Vec<LoggedSignal>,
    /// When the user was last erased (Unix ms): signals stamped at or before it are dropped.
    pub erased_at_ms: Option<i64>,
}

/// Pending entries are `LoggedSignal` JSON, which serde writes starting with
/// `{"partition":P,"offset":O,`: the scripts read the position with a pattern instead of
/// decoding the whole signal (the decode was most of their cost).
const POSITION: &str = r#"
local function position(e)
  local p, o = string.match(e, '^{"partition":(%-?%d+),"offset":(%-?%d+)')
  return p, tonumber(o)
end
"#;

const PERSIST: &str = r#"
local applied = {}
local raw = redis.call('HGET', KEYS[1], 'applied')
if raw then applied = cjson.decode(raw) end
local erased = tonumber(redis.call('GET', KEYS[3]) or '-1e300')
local seen = {}
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local p, o = position(e)
  seen[p .. ':' .. o] = true
end
local added = 0
for i = 1, #ARGV, 4 do
  local p, o = ARGV[i], tonumber(ARGV[i + 1])
  local done = applied[p]
  local key = p .. ':' .. o
  if (done == nil or o > done) and not seen[key] and tonumber(ARGV[i + 2]) > erased then
    redis.call('RPUSH', KEYS[2], ARGV[i + 3])
    seen[key] = true
    added = added + 1
  end
end
return added
"#;

const APPLY: &str = r#"
local st = redis.call('HMGET', KEYS[1], 'version', 'applied', 'summary', 'signals_applied')
local cur = tonumber(st[1] or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
local erased = redis.call('GET', KEYS[5])
if erased and tonumber(ARGV[12]) <= tonumber(erased) then return {4, cur} end
local applied = {}
if st[2] then applied = cjson.decode(st[2]) end
local consumed = cjson.decode(ARGV[8])
for p, o in pairs(consumed) do
  if applied[p] ~= nil and o <= applied[p] then return {3, cur} end
end
if redis.call('LLEN', KEYS[2]) > 0 then
  local keep = {}
  for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    local p, o = position(e)
    local c = consumed[p]
    if c == nil or o > c then table.insert(keep, e) end
  end
  redis.call('DEL', KEYS[2])
  for _, e in ipairs(keep) do redis.call('RPUSH', KEYS[2], e) end
end
for p, o in pairs(consumed) do applied[p] = o end
local recent = tonumber(ARGV[11])
if recent > 0 then
  for i = 13, #ARGV do redis.call('RPUSH', KEYS[4], ARGV[i]) end
  redis.call('LTRIM', KEYS[4], -recent, -1)
end
if ARGV[10] == 'skip' then
  redis.call('HSET', KEYS[1], 'applied', cjson.encode(applied))
  redis.call('HINCRBY', KEYS[1], 'signals_failed', ARGV[5])
  return {2, cur}
end
if st[3] then
  redis.call('LPUSH', KEYS[3], cjson.encode({version = cur, summary = st[3]}))
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
end
local n = tonumber(st[4] or '0') + tonumber(ARGV[5])
local fields = {'summary', ARGV[2], 'version', cur + 1, 'model', ARGV[3], 'updated_at_ms', ARGV[4],
  'signals_applied', n, 'applied', cjson.encode(applied)}
local drop = {}
if ARGV[7] ~= '' then table.insert(fields, 'reasoning'); table.insert(fields, ARGV[7]) else table.insert(drop, 'reasoning') end
if ARGV[9] ~= '' then table.insert(fields, 'outbox'); table.insert(fields, ARGV[9]) else table.insert(drop, 'outbox') end
redis.call('HSET', KEYS[1], unpack(fields))
if #drop > 0 then redis.call('HDEL', KEYS[1], unpack(drop)) end
return {1, cur + 1, n}
"#;

/// Deletes a user's summary, pending window, history and recent signals, and sets the
/// tombstone to the erasure time (never moving it back). Returns the erased version,
/// pending and history lengths.
const ERASE: &str = r#"
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local pending = redis.call('LLEN', KEYS[2])
local history = redis.call('LLEN', KEYS[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local prev = tonumber(redis.call('GET', KEYS[5]) or '-1')
if tonumber(ARGV[1]) > prev then redis.call('SET', KEYS[5], ARGV[1]) end
return {version, pending, history}
"#;

/// Summaries, pending windows and history in Redis, over any connection (single node or
/// cluster).
#[derive(Clone)]
pub struct Store<C> {
    conn: C,
    persist: redis::Script,
    apply: redis::Script,
    erase: redis::Script,
    history_len: usize,
    /// Recent signals kept per user (0: none, the streaming setting).
    recent_len: usize,
}

/// The summary hash field holding the last update's unconfirmed inference-log record.
const OUTBOX: &str = "outbox";

impl<C: ConnectionLike + Send + Clone> Store<C> {
    pub fn new(conn: C, history_len: usize) -> Self {
        Self::with_recent(conn, history_len, 0)
    }

    /// A store that also keeps each user's `recent_len` most recent signals.
    pub fn with_recent(conn: C, history_len: usize, recent_len: usize) -> Self {
        Self {
            conn,
            persist: redis::Script::new(&format!("{POSITION}{PERSIST}")),
            apply: redis::Script::new(&format!("{POSITION}{APPLY}")),
            erase: redis::Script::new(ERASE),
            history_len: history_len.max(1),
            recent_len,
        }
    }

    /// Appends signals of one user to their pending window; returns how many were new.
    pub async fn persist_pending<S: Borrow<LoggedSignal>>(
        &self,
        user_id: &str,
        signals: &[S],
    ) -> Result<usize, StoreError> {
        if signals.is_empty() {
            return Ok(0);
        }
        let keys = UserKeys::new(user_id);
        let mut inv = self.persist.key(&keys.summary);
        inv.key(&keys.pending).key(&keys.erased);
        for s in signals {
            let s = s.borrow();
            let json = serde_json::to_string(s).expect("a signal serialises");
            inv.arg(s.partition).arg(s.offset).arg(s.signal.ts.unix_ms()).arg(json);
        }
        let added: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(added as usize)
    }

    /// Applies an update atomically (see the module docs).
    pub async fn apply(&self, u: &Update) -> Result<ApplyOutcome, StoreError> {
        self.run_apply(u, "apply").await
    }

    /// Consumes the signals of `u.consumed` (and counts `u.signals` as failed) without
    /// changing the summary, with the same version and replay checks as [`Self::apply`].
    pub async fn skip(&self, u: &Update) -> Result<ApplyOutcome, StoreError> {
        self.run_apply(u, "skip").await
    }

    async fn run_apply(&self, u: &Update, mode: &str) -> Result<ApplyOutcome, StoreError> {
        let keys = UserKeys::new(&u.user_id);
        let consumed: BTreeMap<String, i64> = u.consumed.iter().map(|(p, o)| (p.to_string(), *o)).collect();
        let reply: Vec<u64> = self
            .apply
            .key(&keys.summary)
            .key(&keys.pending)
            .key(&keys.history)
            .key(&keys.signals)
            .key(&keys.erased)
            .arg(u.expected_version)
            .arg(&u.summary)
            .arg(&u.model)
            .arg(u.now_ms)
            .arg(u.signals)
            .arg(self.history_len)
            .arg(u.reasoning.as_deref().unwrap_or(""))
            .arg(serde_json::to_string(&consumed).expect("a map of integers serialises"))
            .arg(&u.outbox)
            .arg(mode)
            .arg(if u.recent.is_empty() { 0 } else { self.recent_len })
            .arg(u.oldest_ts_ms)
            .arg(&u.recent)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match reply.as_slice() {
            [1, version, n] => ApplyOutcome::Applied { version: *version, signals_applied: *n },
            [2, version] => ApplyOutcome::Skipped { version: *version },
            [0, current] => ApplyOutcome::Stale { current: *current },
            [4, current] => ApplyOutcome::Erased { current: *current },
            [_, current] => ApplyOutcome::Replayed { current: *current },
            other => {
                return Err(StoreError::Corrupt {
                    user: u.user_id.clone(),
                    message: format!("unexpected reply from the apply script: {other:?}"),
                });
            }
        })
    }

    /// The user's summary, consumed offsets, unconfirmed outbox and erasure time, in one
    /// atomic read.
    pub async fn load_user(&self, user_id: &str) -> Result<UserRecord, StoreError> {
        let keys = UserKeys::new(user_id);
        let (fields, erased_at_ms): (HashMap<String, String>, Option<i64>) = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(&keys.summary)
            .cmd("GET")
            .arg(&keys.erased)
            .query_async(&mut self.conn.clone())
            .await?;
        let corrupt = |message: String| StoreError::Corrupt { user: user_id.to_owned(), message };
        let applied = match fields.get(field::APPLIED) {
            Some(raw) => serde_json::from_str(raw).map_err(|e| corrupt(format!("applied: {e}")))?,
            None => BTreeMap::new(),
        };
        let summary = if fields.contains_key(field::VERSION) {
            Some(SummaryRecord::from_hash_fields(user_id, &fields).map_err(|e| corrupt(e.to_string()))?)
        } else {
            None
        };
        let recent = if self.recent_len > 0 { self.recent(user_id).await? } else { Vec::new() };
        Ok(UserRecord { summary, applied, outbox: fields.get(OUTBOX).cloned(), recent, erased_at_ms })
    }

    /// Erases everything stored about a user and leaves the tombstone `erased_at_ms`.
    /// Idempotent; the tombstone never moves back.
    pub async fn erase(&self, user_id: &str, erased_at_ms: i64) -> Result<Erased, StoreError> {
        let keys = UserKeys::new(user_id);
        let reply: Vec<u64> = self
            .erase
            .key(&keys.summary)
            .key(&keys.pending)
            .key(&keys.history)
            .key(&keys.signals)
            .key(&keys.erased)
            .arg(erased_at_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.as_slice() {
            [version, pending, history] => {
                Ok(Erased { version: *version, pending: *pending, history: *history })
            }
            other => Err(StoreError::Corrupt {
                user: user_id.to_owned(),
                message: format!("unexpected reply from the erase script: {other:?}"),
            }),
        }
    }

    /// The user's erasure time (Unix ms), if they were ever erased.
    pub async fn erased_at(&self, user_id: &str) -> Result<Option<i64>, StoreError> {
        Ok(redis::cmd("GET").arg(UserKeys::new(user_id).erased).query_async(&mut self.conn.clone()).await?)
    }

    /// Forgets the outbox record once its delivery is confirmed. A plain `HDEL`, not a
    /// script: only the user's owner writes their summary, and it starts the user's next
    /// update only after this returns. (A zombie owner's newer record could be dropped by
    /// it; that record is then missing from the log only if the zombie also crashes
    /// before delivering it.)
    pub async fn clear_outbox(&self, user_id: &str) -> Result<(), StoreError> {
        let keys = UserKeys::new(user_id);
        let _: i64 =
            redis::cmd("HDEL").arg(&keys.summary).arg(OUTBOX).query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// The model directory the deployment wants served (`alignx:model:current`), if set.
    pub async fn model_pointer(&self) -> Result<Option<String>, StoreError> {
        Ok(redis::cmd("GET")
            .arg(alignx_schemas::keys::MODEL_POINTER)
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// Loads the scripts into Redis's script cache up front, so that the first burst of
    /// concurrent calls does not all miss it. (After a Redis restart the cache is empty
    /// again; each call then loads its script on a miss.)
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        for script in [&self.persist, &self.apply, &self.erase] {
            let _: String = script.prepare_invoke().load_async(&mut self.conn.clone()).await?;
        }
        Ok(())
    }

    /// Adds users to a partition's pending index (scored by `now_ms`, kept if present).
    pub async fn index_add(&self, index: &str, users: &[&str], now_ms: u64) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(index).arg("NX");
        for u in users {
            cmd.arg(now_ms).arg(*u);
        }
        let _: i64 = cmd.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Removes users from a partition's pending index.
    pub async fn index_remove(&self, index: &str, users: &[&str]) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let _: i64 = redis::cmd("ZREM").arg(index).arg(users).query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// The users of a partition's pending index with the time (Unix ms) they were added.
    pub async fn index_members(&self, index: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(redis::cmd("ZRANGE")
            .arg(index)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// The user's current summary, if any.
    pub async fn summary(&self, user_id: &str) -> Result<Option<SummaryRecord>, StoreError> {
        Ok(self.load_user(user_id).await?.summary)
    }

    /// The user's pending signals, in arrival order.
    pub async fn pending(&self, user_id: &str) -> Result<Vec<LoggedSignal>, StoreError> {
        self.list(user_id, &UserKeys::new(user_id).pending).await
    }

    /// The most recent applied signals, oldest first (kept in the base setting only).
    pub async fn recent(&self, user_id: &str) -> Result<Vec<LoggedSignal>, StoreError> {
        self.list(user_id, &UserKeys::new(user_id).signals).await
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

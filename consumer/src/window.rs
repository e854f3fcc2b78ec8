//! Per-user windows of pending signals (DESIGN.md §3.2), the timers that flush them, and
//! the queue of users ready for an update.
//!
//! A window flushes when it holds `max_signals` signals or its oldest signal has waited
//! `max_wait`. Each user has at most one update in flight; signals arriving meanwhile
//! wait for the next one. Timers live in one heap ordered by deadline, so firing them
//! costs O(log n) per due user — idle users are never scanned.
//!
//! This module is pure bookkeeping (no I/O): the pipeline persists what
//! [`Windows::unpersisted`] returns, runs the updates [`Windows::take_ready`] hands out,
//! and reports back with [`Windows::finish`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alignx_schemas::inference_log::LoggedSignal;

/// One signal in a window.
#[derive(Debug, Clone)]
struct Entry {
    signal: Arc<LoggedSignal>,
    /// Arrival, for the max-wait deadline.
    arrived: Instant,
    /// Written to the user's pending list in Redis.
    persisted: bool,
}

/// What the pipeline knows about one user.
#[derive(Debug)]
struct UserState {
    version: u64,
    summary: Option<String>,
    /// Per partition, the highest offset applied or in the window: anything at or below
    /// is a re-delivery.
    seen: BTreeMap<i32, i64>,
    window: VecDeque<Entry>,
    /// Entries at the front of `window` taken by the update in flight (0: none).
    in_flight: usize,
    /// Failed generations of the current window.
    attempts: u32,
    /// Partition of the user's latest signal (where its pending index entry lives).
    partition: i32,
    /// The most recent consumed signals, oldest first (base setting only).
    recent: VecDeque<Arc<LoggedSignal>>,
    /// Listed in the partition's pending index in Redis.
    indexed: bool,
    /// The deadline currently armed in the timer heap.
    deadline: Option<Instant>,
    queued: bool,
    /// The user's erasure time (Unix ms): signals stamped at or before it are dropped.
    erased_at_ms: Option<i64>,
}

/// Stamped at or before the user's erasure (if any): such a signal never becomes state.
fn predates(erased_at_ms: Option<i64>, signal: &LoggedSignal) -> bool {
    erased_at_ms.is_some_and(|t| signal.signal.ts.unix_ms() <= t)
}

/// A user's stored state, as read from Redis when the pipeline starts serving them.
#[derive(Debug, Clone, Default)]
pub struct Known {
    pub version: u64,
    pub summary: Option<String>,
    pub applied: BTreeMap<i32, i64>,
    /// The most recent consumed signals, oldest first (base setting only).
    pub recent: Vec<LoggedSignal>,
    /// When the user was last erased (Unix ms), if ever.
    pub erased_at_ms: Option<i64>,
}

/// An update to run: one user's window.
#[derive(Debug, Clone)]
pub struct UpdateInput {
    pub user: Arc<str>,
    pub expected_version: u64,
    pub previous_summary: Option<String>,
    pub signals: Vec<Arc<LoggedSignal>>,
    /// Failed generations of this window so far.
    pub attempt: u32,
    /// Signals consumed before this window, oldest first (kept for the base setting).
    pub recent: Vec<Arc<LoggedSignal>>,
}

/// How an update ended, as far as the window is concerned.
#[derive(Debug, Clone)]
pub enum Finished {
    /// A new summary version was stored; its signals are consumed.
    Applied { version: u64, summary: String },
    /// The window was given up after repeated failures; its signals are consumed.
    Skipped,
    /// The generation failed; try the same window again after `after`.
    Retry { after: Duration },
    /// The stored state moved on (another writer, or a replay): start again from it.
    Reload(Known),
    /// The update was abandoned (shutdown, or Redis unreachable): try again later.
    Abandoned,
}

/// Result of [`Windows::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Added,
    /// Already applied or already in the window (a re-delivery).
    Duplicate,
    /// Stamped at or before the user's erasure: dropped.
    Erased,
}

pub struct Windows {
    max_signals: usize,
    /// Recent signals remembered per user (0: none).
    recent_len: usize,
    max_wait: Duration,
    users: HashMap<Arc<str>, UserState>,
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    ready: VecDeque<Arc<str>>,
    /// Users with window entries not yet persisted.
    unpersisted: HashSet<Arc<str>>,
    /// Users whose window emptied while they were indexed.
    emptied: HashSet<Arc<str>>,
    buffered: usize,
    in_flight: usize,
}

impl Windows {
    pub fn new(max_signals: usize, max_wait: Duration) -> Self {
        Self::with_recent(max_signals, max_wait, 0)
    }

    /// Windows that also remember each user's `recent_len` last consumed signals.
    pub fn with_recent(max_signals: usize, max_wait: Duration, recent_len: usize) -> Self {
        Self {
            max_signals: max_signals.max(1),
            recent_len,
            max_wait,
            users: HashMap::new(),
            timers: BinaryHeap::new(),
            ready: VecDeque::new(),
            unpersisted: HashSet::new(),
            emptied: HashSet::new(),
            buffered: 0,
            in_flight: 0,
        }
    }

    /// Signals held (waiting or in an update).
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Updates handed out and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// The interned id of a known user.
    pub fn user_id(&self, user: &str) -> Option<Arc<str>> {
        self.users.get_key_value(user).map(|(k, _)| k.clone())
    }

    /// Starts serving a user from their stored state.
    pub fn insert(&mut self, user: &str, known: Known, partition: i32) -> Arc<str> {
        let id: Arc<str> = Arc::from(user);
        self.users.insert(
            id.clone(),
            UserState {
                version: known.version,
                summary: known.summary,
                seen: known.applied,
                recent: known.recent.into_iter().map(Arc::new).collect(),
                window: VecDeque::new(),
                in_flight: 0,
                attempts: 0,
                partition,
                indexed: false,
                deadline: None,
                queued: false,
                erased_at_ms: known.erased_at_ms,
            },
        );
        id
    }

    /// Restores a window persisted in Redis (after a restart or rebalance). `since` is
    /// when its first signal was persisted; the max-wait clock continues from there.
    pub fn restore(&mut self, user: &Arc<str>, pending: Vec<LoggedSignal>, since: Instant, now: Instant) {
        let Some(st) = self.users.get_mut(user) else { return };
        st.indexed = true;
        for signal in pending {
            if st.seen.get(&signal.partition).is_some_and(|&o| signal.offset <= o)
                || predates(st.erased_at_ms, &signal)
            {
                continue;
            }
            st.seen.insert(signal.partition, signal.offset);
            st.partition = signal.partition;
            st.window.push_back(Entry { signal: Arc::new(signal), arrived: since, persisted: true });
            self.buffered += 1;
        }
        if st.window.is_empty() {
            self.emptied.insert(user.clone());
        }
        self.schedule(user, now);
    }

    /// Adds a signal to a known user's window.
    pub fn push(&mut self, user: &Arc<str>, signal: LoggedSignal, now: Instant) -> Pushed {
        let Some(st) = self.users.get_mut(user) else { return Pushed::Duplicate };
        if st.seen.get(&signal.partition).is_some_and(|&o| signal.offset <= o) {
            return Pushed::Duplicate;
        }
        st.seen.insert(signal.partition, signal.offset);
        if predates(st.erased_at_ms, &signal) {
            return Pushed::Erased;
        }
        st.partition = signal.partition;
        st.window.push_back(Entry { signal: Arc::new(signal), arrived: now, persisted: false });
        self.buffered += 1;
        self.unpersisted.insert(user.clone());
        self.emptied.remove(user);
        self.schedule(user, now);
        Pushed::Added
    }

    /// Queues the user if their window is due, else arms the timer of its oldest signal.
    fn schedule(&mut self, user: &Arc<str>, now: Instant) {
        let Some(st) = self.users.get_mut(user) else { return };
        if st.in_flight > 0 || st.queued || st.window.is_empty() {
            return;
        }
        let due = st.window[0].arrived + self.max_wait;
        if st.window.len() >= self.max_signals || due <= now {
            st.queued = true;
            self.ready.push_back(user.clone());
        } else if st.deadline.is_none_or(|d| d > due) {
            st.deadline = Some(due);
            self.timers.push(Reverse((due, user.clone())));
        }
    }

    /// Moves users whose deadline passed to the ready queue.
    pub fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, user))) = self.timers.pop() else { break };
            let Some(st) = self.users.get_mut(&user) else { continue };
            if st.deadline != Some(at) {
                continue; // superseded
            }
            st.deadline = None;
            if st.in_flight == 0 && !st.queued && !st.window.is_empty() {
                st.queued = true;
                self.ready.push_back(user);
            }
        }
    }

    /// When the next timer fires, if any is armed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Hands out up to `max` updates, oldest ready first.
    pub fn take_ready(&mut self, max: usize) -> Vec<UpdateInput> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(user) = self.ready.pop_front() else { break };
            let Some(st) = self.users.get_mut(&user) else { continue };
            st.queued = false;
            if st.in_flight > 0 || st.window.is_empty() {
                continue;
            }
            let n = st.window.len().min(self.max_signals);
            st.in_flight = n;
            st.deadline = None;
            self.in_flight += 1;
            out.push(UpdateInput {
                user: user.clone(),
                expected_version: st.version,
                previous_summary: st.summary.clone(),
                signals: st.window.iter().take(n).map(|e| e.signal.clone()).collect(),
                attempt: st.attempts,
                recent: st.recent.iter().cloned().collect(),
            });
        }
        out
    }

    /// Records how a user's update ended. Returns the signals that left the window
    /// (consumed, or found already applied), whose offsets are now handled.
    pub fn finish(&mut self, user: &Arc<str>, finished: Finished, now: Instant) -> Vec<(i32, i64)> {
        let Some(st) = self.users.get_mut(user) else { return Vec::new() };
        if st.in_flight == 0 {
            return Vec::new();
        }
        let taken = std::mem::take(&mut st.in_flight);
        self.in_flight -= 1;
        let mut gone = Vec::new();
        let mut retry_at = None;
        match finished {
            Finished::Applied { version, summary } => {
                st.version = version;
                st.summary = Some(summary);
                st.attempts = 0;
                consume(st, taken, self.recent_len, &mut gone);
            }
            Finished::Skipped => {
                st.attempts = 0;
                consume(st, taken, self.recent_len, &mut gone);
            }
            Finished::Retry { after } => {
                st.attempts += 1;
                retry_at = Some(now + after);
            }
            Finished::Reload(known) => {
                st.version = known.version;
                st.summary = known.summary;
                st.recent = known.recent.into_iter().map(Arc::new).collect();
                st.attempts = 0;
                st.erased_at_ms = known.erased_at_ms;
                let erased_at = known.erased_at_ms;
                st.window.retain(|e| {
                    let applied =
                        known.applied.get(&e.signal.partition).is_some_and(|&o| e.signal.offset <= o);
                    let erased = predates(erased_at, &e.signal);
                    if applied || erased {
                        gone.push((e.signal.partition, e.signal.offset));
                    }
                    !(applied || erased)
                });
                for (p, o) in known.applied {
                    let seen = st.seen.entry(p).or_insert(o);
                    *seen = (*seen).max(o);
                }
            }
            Finished::Abandoned => retry_at = Some(now + Duration::from_secs(1)),
        }
        self.buffered -= gone.len();
        if st.window.is_empty() {
            if st.indexed {
                self.emptied.insert(user.clone());
            }
            self.unpersisted.remove(user);
        }
        match retry_at {
            Some(at) => {
                st.deadline = Some(at);
                self.timers.push(Reverse((at, user.clone())));
            }
            None => self.schedule(user, now),
        }
        gone
    }

    /// The signals not yet persisted that arrived at or before `cutoff`, per user, with
    /// the user's home partition. Call [`Self::persisted`] with the same cutoff once they
    /// are written. (Younger signals are usually applied before the next checkpoint, and
    /// then never need persisting.)
    pub fn unpersisted(&self, cutoff: Instant) -> Vec<(Arc<str>, i32, Vec<Arc<LoggedSignal>>)> {
        self.unpersisted
            .iter()
            .filter_map(|user| {
                let st = self.users.get(user)?;
                let signals: Vec<Arc<LoggedSignal>> = st
                    .window
                    .iter()
                    .filter(|e| !e.persisted && e.arrived <= cutoff)
                    .map(|e| e.signal.clone())
                    .collect();
                (!signals.is_empty()).then(|| (user.clone(), st.partition, signals))
            })
            .collect()
    }

    /// Marks what [`Self::unpersisted`] returned for `cutoff` as persisted (nothing may
    /// change in between).
    pub fn persisted(&mut self, cutoff: Instant) {
        self.unpersisted.retain(|user| {
            let Some(st) = self.users.get_mut(user) else { return false };
            let mut left = false;
            for e in st.window.iter_mut().filter(|e| !e.persisted) {
                if e.arrived <= cutoff {
                    e.persisted = true;
                    st.indexed = true;
                } else {
                    left = true;
                }
            }
            left
        });
    }

    /// Indexed users whose windows are empty and idle: their index entries can go.
    /// Returns (partition, user) pairs and forgets that they are indexed.
    pub fn take_emptied(&mut self) -> Vec<(i32, Arc<str>)> {
        let mut out = Vec::new();
        for user in self.emptied.drain() {
            if let Some(st) = self.users.get_mut(&user)
                && st.window.is_empty()
                && st.in_flight == 0
            {
                st.indexed = false;
                out.push((st.partition, user));
            }
        }
        out
    }

    /// Forgets every user whose home partition is in `partitions` (after their work was
    /// drained and persisted).
    pub fn drop_partitions(&mut self, partitions: &[i32]) {
        let gone: Vec<Arc<str>> = self
            .users
            .iter()
            .filter(|(_, st)| partitions.contains(&st.partition))
            .map(|(u, _)| u.clone())
            .collect();
        for user in gone {
            if let Some(st) = self.users.remove(&user) {
                self.buffered -= st.window.len();
                if st.in_flight > 0 {
                    self.in_flight -= 1;
                }
            }
            self.unpersisted.remove(&user);
            self.emptied.remove(&user);
        }
        self.ready.retain(|u| self.users.contains_key(u));
    }

    /// Forgets idle users (empty window, nothing in flight) while more than `max` are
    /// known; they are read back from Redis if they return.
    pub fn evict_idle(&mut self, max: usize) {
        if self.users.len() <= max {
            return;
        }
        let target = max - max / 10;
        let idle: Vec<Arc<str>> = self
            .users
            .iter()
            .filter(|(u, st)| st.window.is_empty() && st.in_flight == 0 && !self.emptied.contains(*u))
            .map(|(u, _)| u.clone())
            .take(self.users.len() - target)
            .collect();
        for user in idle {
            self.users.remove(&user);
        }
    }
}

/// Removes the first `taken` entries of a window (consumed by an update), remembering
/// them as recent signals when `recent_len` > 0.
fn consume(st: &mut UserState, taken: usize, recent_len: usize, gone: &mut Vec<(i32, i64)>) {
    for e in st.window.drain(..taken) {
        gone.push((e.signal.partition, e.signal.offset));
        if recent_len > 0 {
            st.recent.push_back(e.signal);
        }
    }
    while st.recent.len() > recent_len {
        st.recent.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use alignx_schemas::{Limits, validate_signal};

    use super::*;

    fn signal(user: &str, offset: i64) -> LoggedSignal {
        signal_at(user, offset, "2026-11-27T09:00:00Z")
    }

    fn signal_at(user: &str, offset: i64, ts: &str) -> LoggedSignal {
        let json = format!(
            r#"{{"schema":"alignx.signal.v1","user_id":"{user}","signal_id":"s{offset}","ts":"{ts}","kind":"text","text":"t"}}"#
        );
        let signal = validate_signal(json.as_bytes(), Some(user.as_bytes()), &Limits::default()).unwrap();
        LoggedSignal { partition: 0, offset, signal }
    }

    #[test]
    fn signals_stamped_before_an_erasure_never_enter_a_window() {
        let now = Instant::now();
        let erased_at = signal_at("u", 0, "2026-11-27T10:00:00Z").signal.ts.unix_ms();
        let mut w = Windows::new(3, Duration::from_secs(30));
        let u = w.insert("u", Known { erased_at_ms: Some(erased_at), ..Known::default() }, 0);
        assert_eq!(w.push(&u, signal_at("u", 1, "2026-11-27T09:59:59Z"), now), Pushed::Erased);
        assert_eq!(w.push(&u, signal_at("u", 2, "2026-11-27T10:00:00Z"), now), Pushed::Erased);
        assert_eq!(w.push(&u, signal_at("u", 2, "2026-11-27T10:00:00Z"), now), Pushed::Duplicate);
        assert_eq!(w.push(&u, signal_at("u", 3, "2026-11-27T10:00:01Z"), now), Pushed::Added);
        assert_eq!(w.buffered(), 1);

        // A user erased while their window was being generated: the update is refused
        // and reloaded; the window keeps only what came after the erasure.
        let v = w.insert("v", Known::default(), 0);
        w.push(&v, signal_at("v", 1, "2026-11-27T09:00:00Z"), now);
        w.push(&v, signal_at("v", 2, "2026-11-27T09:30:00Z"), now);
        w.push(&v, signal_at("v", 3, "2026-11-27T10:30:00Z"), now);
        w.fire_timers(now + Duration::from_secs(31));
        assert_eq!(w.take_ready(10).iter().map(|i| i.signals.len()).sum::<usize>(), 4);
        let known = Known { erased_at_ms: Some(erased_at), ..Known::default() };
        assert_eq!(w.finish(&v, Finished::Reload(known), now), [(0, 1), (0, 2)], "erased: handled");
        w.fire_timers(now + Duration::from_secs(62));
        let again = w.take_ready(10);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].signals.iter().map(|s| s.offset).collect::<Vec<_>>(), [3]);
        assert_eq!(again[0].expected_version, 0);
    }

    #[test]
    fn full_windows_are_ready_and_one_update_runs_per_user() {
        let now = Instant::now();
        let mut w = Windows::new(2, Duration::from_secs(30));
        let u = w.insert("u", Known::default(), 0);
        assert_eq!(w.push(&u, signal("u", 1), now), Pushed::Added);
        assert!(!w.has_ready());
        assert_eq!(w.push(&u, signal("u", 1), now), Pushed::Duplicate);
        w.push(&u, signal("u", 2), now);
        w.push(&u, signal("u", 3), now);
        let taken = w.take_ready(10);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].signals.iter().map(|s| s.offset).collect::<Vec<_>>(), [1, 2]);
        w.push(&u, signal("u", 4), now);
        assert!(w.take_ready(10).is_empty(), "one update in flight per user");
        let gone = w.finish(&u, Finished::Applied { version: 1, summary: "s".into() }, now);
        assert_eq!(gone, [(0, 1), (0, 2)]);
        let next = w.take_ready(10);
        assert_eq!(next[0].expected_version, 1);
        assert_eq!(next[0].previous_summary.as_deref(), Some("s"));
        assert_eq!(next[0].signals.len(), 2);
        assert_eq!(w.buffered(), 2);
    }

    #[test]
    fn partial_windows_flush_at_their_deadline() {
        let now = Instant::now();
        let mut w = Windows::new(4, Duration::from_secs(5));
        let u = w.insert("u", Known::default(), 0);
        w.push(&u, signal("u", 1), now);
        w.push(&u, signal("u", 2), now + Duration::from_secs(1));
        assert_eq!(w.next_deadline(), Some(now + Duration::from_secs(5)));
        w.fire_timers(now + Duration::from_secs(4));
        assert!(!w.has_ready());
        w.fire_timers(now + Duration::from_secs(5));
        assert_eq!(w.take_ready(10)[0].signals.len(), 2);
    }

    #[test]
    fn retries_wait_and_reloads_drop_applied_signals() {
        let now = Instant::now();
        let mut w = Windows::new(2, Duration::from_secs(30));
        let u = w.insert("u", Known::default(), 0);
        w.push(&u, signal("u", 1), now);
        w.push(&u, signal("u", 2), now);
        w.take_ready(1);
        assert!(w.finish(&u, Finished::Retry { after: Duration::from_secs(1) }, now).is_empty());
        assert!(w.take_ready(1).is_empty());
        w.fire_timers(now + Duration::from_secs(1));
        let again = w.take_ready(1);
        assert_eq!(again[0].attempt, 1);
        let known = Known {
            version: 7,
            summary: Some("x".into()),
            applied: BTreeMap::from([(0, 1)]),
            recent: vec![],
            erased_at_ms: None,
        };
        assert_eq!(w.finish(&u, Finished::Reload(known), now), [(0, 1)]);
        assert_eq!(w.buffered(), 1);
        w.fire_timers(now + Duration::from_secs(31));
        let last = w.take_ready(1);
        assert_eq!((last[0].expected_version, last[0].signals.len()), (7, 1));
    }

    #[test]
    fn persisting_and_index_bookkeeping() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let mut w = Windows::new(2, Duration::from_secs(30));
        let u = w.insert("u", Known::default(), 3);
        w.push(&u, signal("u", 1), now);
        w.push(&u, signal("u", 2), later);
        assert_eq!(w.unpersisted(now)[0].2.len(), 1, "only signals old enough are persisted");
        w.persisted(now);
        assert!(w.unpersisted(now).is_empty());
        assert_eq!(w.unpersisted(later)[0].2[0].offset, 2);
        w.persisted(later);
        assert!(w.unpersisted(later).is_empty());
        w.take_ready(1);
        w.finish(&u, Finished::Applied { version: 1, summary: "s".into() }, later);
        assert_eq!(w.take_emptied(), [(0, u.clone())]);
        assert!(w.take_emptied().is_empty());
    }
}

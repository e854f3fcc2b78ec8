//! Which offsets of a partition are fully handled, and so may be committed.
//!
//! A message is handled once it is dead-lettered (delivery confirmed), persisted in its
//! user's pending window in Redis, applied to a summary, or recognised as a duplicate.
//! Handling finishes out of order (users are updated concurrently), but the committed
//! offset must never pass a message that is not handled: the commit point is the
//! low-water mark, the first offset still open (or the next offset to read when none is).

use std::collections::VecDeque;

/// Handled/open state of the messages read from one partition, in offset order.
#[derive(Debug, Default)]
pub struct PartitionOffsets {
    /// Offsets read and not yet below the low-water mark, with whether each is handled.
    /// Offsets increase but may have gaps (compaction, transaction markers).
    open: VecDeque<(i64, bool)>,
    /// The offset after the last one read.
    next: Option<i64>,
    /// What was last committed.
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// Records a message just read. Offsets at or below the last one read are ignored
    /// (a re-delivery after a seek is tracked by its first reading).
    pub fn read(&mut self, offset: i64) -> bool {
        if self.next.is_some_and(|n| offset < n) {
            return false;
        }
        self.open.push_back((offset, false));
        self.next = Some(offset + 1);
        true
    }

    /// Marks a message handled. Unknown offsets (below the mark, or never read) are ignored.
    pub fn handled(&mut self, offset: i64) {
        if let Ok(i) = self.open.binary_search_by_key(&offset, |&(o, _)| o) {
            self.open[i].1 = true;
        }
        while self.open.front().is_some_and(|&(_, done)| done) {
            self.open.pop_front();
        }
    }

    /// The offset to commit: every message below it is handled. `None` before any read.
    pub fn low_water(&self) -> Option<i64> {
        match self.open.front() {
            Some(&(o, _)) => Some(o),
            None => self.next,
        }
    }

    /// Messages read but not yet handled.
    pub fn open(&self) -> usize {
        self.open.iter().filter(|&&(_, done)| !done).count()
    }

    /// The offset to commit if it moved since the last commit.
    pub fn to_commit(&self) -> Option<i64> {
        self.low_water().filter(|&o| Some(o) != self.committed)
    }

    pub fn committed(&mut self, offset: i64) {
        self.committed = Some(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_water_waits_for_the_oldest_open_message() {
        let mut p = PartitionOffsets::default();
        assert_eq!(p.low_water(), None);
        for o in [10, 11, 13, 14] {
            assert!(p.read(o));
        }
        assert_eq!(p.low_water(), Some(10));
        p.handled(11);
        p.handled(14);
        assert_eq!(p.low_water(), Some(10), "10 is still open");
        p.handled(10);
        assert_eq!(p.low_water(), Some(13), "the gap at 12 is skipped");
        p.handled(13);
        assert_eq!(p.low_water(), Some(15));
        assert_eq!(p.open(), 0);
        p.handled(99);
        assert!(!p.read(12), "offsets already passed are not read again");
        assert_eq!(p.to_commit(), Some(15));
        p.committed(15);
        assert_eq!(p.to_commit(), None);
    }
}

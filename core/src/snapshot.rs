//! The snapshot manager of one session (specs/SandboxSnapshot.tla): snapshot after each turn and before the sandbox's time limit, restore the newest live one, expire and clean up.

use serde::{Deserialize, Serialize};

/// One snapshot the session holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Snap {
    pub id: String,
    /// The turn (number of finished prompts) whose work it holds.
    pub turn: u64,
    pub taken_at: u64,
    pub expires_at: u64,
}

/// How a follow-up gets a sandbox once the old one is gone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Start {
    /// Restore this snapshot: its checkout holds turn `turn`'s work.
    Restore { snapshot: String, turn: u64 },
    /// No live snapshot: start from the repository (committed work is on the branch).
    Cold,
}

/// Snapshot bookkeeping for one session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Snapshots {
    /// Oldest first.
    pub snaps: Vec<Snap>,
    /// Finished turns so far.
    pub turns: u64,
    /// The turn a snapshot is being taken for (at most one at a time).
    pub taking: Option<u64>,
    /// Snapshots to delete at the provider (expired or superseded); safe to repeat.
    pub to_delete: Vec<String>,
}

/// Snapshots kept per session (older ones are deleted as newer ones land).
pub const KEEP: usize = 3;

impl Snapshots {
    /// A turn finished with a live sandbox: returns the turn to snapshot, unless one is in flight.
    pub fn turn_ended(&mut self) -> Option<u64> {
        self.turns += 1;
        self.want()
    }

    /// The sandbox nears its time limit: snapshot the current turn unless it is already held.
    pub fn near_limit(&mut self) -> Option<u64> {
        self.want()
    }

    fn want(&mut self) -> Option<u64> {
        if self.taking.is_some() || self.holds_current() {
            return None;
        }
        self.taking = Some(self.turns);
        Some(self.turns)
    }

    /// Someone asked for a snapshot now (`POST /sandbox/:id/snapshot`): the current turn, even
    /// if a snapshot holds it already (the checkout may have changed since), unless one is in flight.
    pub fn requested(&mut self) -> Option<u64> {
        if self.taking.is_some() {
            return None;
        }
        self.taking = Some(self.turns);
        Some(self.turns)
    }

    /// The newest snapshot holds the latest turn's work (nothing to take near the limit).
    pub fn holds_current(&self) -> bool {
        self.snaps.last().map(|s| s.turn) == Some(self.turns)
    }

    /// The provider took the snapshot for `turn`.
    pub fn taken(&mut self, turn: u64, id: &str, now: u64, expires_at: u64) {
        if self.taking == Some(turn) {
            self.taking = None;
        }
        if self.snaps.iter().any(|s| s.id == id) {
            return;
        }
        self.snaps.push(Snap {
            id: id.to_string(),
            turn,
            taken_at: now,
            expires_at,
        });
        self.snaps.sort_by_key(|s| (s.turn, s.taken_at));
        while self.snaps.len() > KEEP {
            let old = self.snaps.remove(0);
            self.to_delete.push(old.id);
        }
    }

    /// The snapshot could not be taken (the sandbox was already gone): nothing is held for it.
    pub fn not_taken(&mut self, turn: u64) {
        if self.taking == Some(turn) {
            self.taking = None;
        }
    }

    /// Drops snapshots past their expiry (they are deleted at the provider).
    pub fn expire(&mut self, now: u64) {
        let (gone, live): (Vec<Snap>, Vec<Snap>) =
            self.snaps.drain(..).partition(|s| s.expires_at <= now);
        self.snaps = live;
        self.to_delete.extend(gone.into_iter().map(|s| s.id));
    }

    /// The provider deleted these.
    pub fn deleted(&mut self, ids: &[String]) {
        self.to_delete.retain(|d| !ids.contains(d));
    }

    /// How the next sandbox starts: from the newest live snapshot, else cold.
    pub fn start(&self, now: u64) -> Start {
        match self.restorable(None, now) {
            Some(s) => Start::Restore {
                snapshot: s.id.clone(),
                turn: s.turn,
            },
            None => Start::Cold,
        }
    }

    /// The live snapshot `id` (or, without one, the newest live snapshot) a restore may use; `None`
    /// when it is unknown to this session, expired or already dropped.
    pub fn restorable(&self, id: Option<&str>, now: u64) -> Option<&Snap> {
        self.snaps
            .iter()
            .rev()
            .filter(|s| s.expires_at > now)
            .find(|s| id.is_none_or(|id| s.id == id))
    }

    /// The provider said a snapshot is gone (expired early, deleted): forget it.
    pub fn forget(&mut self, id: &str) {
        self.snaps.retain(|s| s.id != id);
    }

    /// Earliest expiry still held (for the alarm).
    pub fn next_expiry(&self) -> Option<u64> {
        self.snaps.iter().map(|s| s.expires_at).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_live_snapshot_is_restored_and_old_ones_are_deleted() {
        let mut s = Snapshots::default();
        assert_eq!(s.start(0), Start::Cold);
        let t = s.turn_ended().expect("turn 1");
        assert_eq!(s.turn_ended(), None, "one at a time");
        s.taken(t, "snp_1", 10, 100);
        assert_eq!(s.near_limit(), Some(2));
        s.taken(2, "snp_2", 20, 50);
        assert_eq!(s.next_expiry(), Some(50), "the earliest expiry held");
        assert_eq!(s.near_limit(), None, "turn 2 is already held");
        assert_eq!(
            s.start(30),
            Start::Restore {
                snapshot: "snp_2".into(),
                turn: 2
            }
        );
        assert_eq!(
            s.start(60),
            Start::Restore {
                snapshot: "snp_1".into(),
                turn: 1
            }
        );
        s.expire(100);
        assert_eq!(s.start(100), Start::Cold);
        assert_eq!(s.next_expiry(), None, "nothing held");
        assert_eq!(s.to_delete, vec!["snp_1".to_string(), "snp_2".to_string()]);
        s.deleted(&["snp_1".to_string()]);
        assert_eq!(
            s.to_delete,
            vec!["snp_2".to_string()],
            "deleted ones leave the queue"
        );
    }

    #[test]
    fn a_snapshot_on_request_is_one_more_snapshot_and_only_live_ones_of_the_session_restore() {
        let mut s = Snapshots::default();
        assert_eq!(s.requested(), Some(0), "before any turn");
        assert_eq!(s.requested(), None, "one at a time");
        assert_eq!(s.turn_ended(), None, "a turn waits for the one in flight");
        s.taken(0, "snp_a", 10, 100);
        assert_eq!(
            s.near_limit(),
            Some(1),
            "the turn that ended meanwhile is next"
        );
        s.taken(1, "snp_b", 20, 50);
        assert_eq!(
            s.requested(),
            Some(1),
            "asked for even though turn 1 is held"
        );
        s.taken(1, "snp_c", 30, 200);
        assert_eq!(s.taking, None);
        let ids = |s: &Snapshots| s.snaps.iter().map(|x| x.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&s), ["snp_a", "snp_b", "snp_c"]);
        assert_eq!(s.restorable(None, 40).map(|x| x.id.as_str()), Some("snp_c"));
        assert_eq!(s.restorable(Some("snp_b"), 40).map(|x| x.turn), Some(1));
        assert_eq!(s.restorable(Some("snp_b"), 50), None, "expired");
        assert_eq!(
            s.restorable(Some("snp_other"), 40),
            None,
            "not this session's"
        );
        assert_eq!(s.restorable(None, 200), None, "nothing live");
        s.forget("snp_c");
        assert_eq!(
            s.restorable(Some("snp_c"), 40),
            None,
            "gone at the provider"
        );
        assert_eq!(s.restorable(None, 40).map(|x| x.id.as_str()), Some("snp_b"));
    }
}

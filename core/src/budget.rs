//! The global budget of background agents: the deployment-wide cap (`BG_MAX_GLOBAL`) lent to tenant shards in slots, the waiting list of short-changed shards, and the reconcile that keeps slots from leaking after a fault — both sides of the exchange, no I/O.
//!
//! A shard (`Holding`) asks the budget (`Budget`) only when its need changes. Every exchange
//! carries a `Report`: the exchange's number and the slots the shard holds before it. A shard
//! has at most one exchange in flight (the shell holds a lock across the call), so a report
//! counts every earlier exchange the shard lived to see answered; a grant whose answer was lost
//! (a crash, an error) is not in it, and the budget takes it back (`reconcile`). A report older
//! than one already seen (a request of a dead instance arriving late) is ignored whole.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A shard to wake: slots came back (or the budget's alarm asks every holder to report).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Wake(pub String);

/// What an acquire lent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Granted {
    pub granted: u32,
    /// It got fewer than it asked for: it is on the waiting list.
    pub short: bool,
}

/// What a shard asks for in one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Request {
    /// Up to this many more slots (0: nothing, the exchange only reports).
    Acquire(u32),
    /// Gives this many back.
    Release(u32),
}

impl Request {
    /// The slot count of the request.
    pub fn n(self) -> u32 {
        match self {
            Request::Acquire(n) | Request::Release(n) => n,
        }
    }
}

/// What a shard tells the budget with each exchange: its number, and the slots the shard holds
/// before the exchange (every earlier answer it received applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Report {
    pub seq: u64,
    pub held: u32,
}

/// The budget's answer to one exchange.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Answer {
    pub granted: u32,
    /// Shards to wake (slots came back).
    pub wake: Vec<Wake>,
}

/// The deployment-wide budget: who holds how many slots, who waits for more, and the newest
/// exchange each shard reported.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Budget {
    pub cap: u32,
    /// Slots lent, by shard (no zero entries).
    pub holds: BTreeMap<String, u32>,
    /// Shards that got fewer than they asked for.
    pub waiting: BTreeSet<String>,
    /// The newest exchange number seen from each shard.
    pub seen: BTreeMap<String, u64>,
}

impl Budget {
    pub fn new(cap: u32) -> Budget {
        Budget {
            cap,
            ..Budget::default()
        }
    }

    /// The budget as stored: rows of slots lent (zero rows are dropped), the waiting list and
    /// the newest exchange seen from each shard.
    pub fn restore(
        cap: u32,
        holds: impl IntoIterator<Item = (String, u32)>,
        waiting: impl IntoIterator<Item = String>,
        seen: impl IntoIterator<Item = (String, u64)>,
    ) -> Budget {
        Budget {
            cap,
            holds: holds.into_iter().filter(|(_, n)| *n > 0).collect(),
            waiting: waiting.into_iter().collect(),
            seen: seen.into_iter().collect(),
        }
    }

    /// Slots lent to `shard`.
    pub fn held_by(&self, shard: &str) -> u32 {
        self.holds.get(shard).copied().unwrap_or(0)
    }

    /// Slots lent in all.
    pub fn lent(&self) -> u32 {
        self.holds.values().fold(0, |a, n| a.saturating_add(*n))
    }

    /// Slots not lent (none when the cap was lowered below what is lent).
    pub fn free(&self) -> u32 {
        self.cap.saturating_sub(self.lent())
    }

    fn set(&mut self, shard: &str, n: u32) {
        if n == 0 {
            self.holds.remove(shard);
        } else {
            self.holds.insert(shard.to_string(), n);
        }
    }

    /// Lends up to `want` more slots; a shard that got fewer than it asked for goes on the
    /// waiting list, one that got all it asked for comes off it.
    pub fn acquire(&mut self, shard: &str, want: u32) -> Granted {
        let granted = want.min(self.free());
        self.set(shard, self.held_by(shard).saturating_add(granted));
        let short = granted < want;
        if short {
            self.waiting.insert(shard.to_string());
        } else {
            self.waiting.remove(shard);
        }
        Granted { granted, short }
    }

    /// Takes back `n` slots (a shard that gives slots back is not short: it leaves the waiting
    /// list). When slots came back, every other waiting shard is to be woken; they stay on the
    /// list until an acquire gives them all they ask for.
    pub fn release(&mut self, shard: &str, n: u32) -> Vec<Wake> {
        let before = self.held_by(shard);
        self.set(shard, before.saturating_sub(n));
        self.waiting.remove(shard);
        self.wake_if_freed(shard, before)
    }

    /// A shard reports holding `held`: slots lent beyond that were lost on the way (a grant
    /// whose answer never arrived, a release that never did) and come back. A report of more
    /// than is lent changes nothing (the budget never lends by report).
    pub fn reconcile(&mut self, shard: &str, held: u32) -> Vec<Wake> {
        let before = self.held_by(shard);
        self.set(shard, before.min(held));
        self.wake_if_freed(shard, before)
    }

    fn wake_if_freed(&self, shard: &str, before: u32) -> Vec<Wake> {
        if self.held_by(shard) >= before {
            return Vec::new();
        }
        self.waiting
            .iter()
            .filter(|s| s.as_str() != shard)
            .map(|s| Wake(s.clone()))
            .collect()
    }

    /// Records exchange number `seq` of `shard`: false when a newer (or the same) one was
    /// already seen, and this one must be ignored.
    pub fn fresh(&mut self, shard: &str, seq: u64) -> bool {
        if self.seen.get(shard).is_some_and(|s| *s >= seq) {
            return false;
        }
        self.seen.insert(shard.to_string(), seq);
        true
    }

    /// One exchange from a shard: its report (fenced, then reconciled) and its request. A stale
    /// exchange is answered with nothing and changes nothing. Without a report (an older shard)
    /// the request is carried out as it stands.
    pub fn exchange(&mut self, shard: &str, report: Option<Report>, req: Request) -> Answer {
        let mut wake = Vec::new();
        if let Some(r) = report {
            if !self.fresh(shard, r.seq) {
                return Answer::default();
            }
            wake = self.reconcile(shard, r.held);
        }
        let granted = match req {
            Request::Acquire(n) => self.acquire(shard, n).granted,
            Request::Release(n) => {
                wake.extend(self.release(shard, n));
                0
            }
        };
        wake.sort();
        wake.dedup();
        Answer { granted, wake }
    }

    /// Whether the alarm should run: some shard waits (slots may have leaked to a shard that
    /// will not ask again by itself).
    pub fn needs_alarm(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Whom the alarm wakes while some shard waits: every shard holding slots (each reports,
    /// and whatever leaked to it comes back) and every waiting shard (each asks again).
    pub fn alarm(&self) -> Vec<Wake> {
        if !self.needs_alarm() {
            return Vec::new();
        }
        let all: BTreeSet<&String> = self.holds.keys().chain(self.waiting.iter()).collect();
        all.into_iter().map(|s| Wake(s.clone())).collect()
    }
}

/// A shard's side of the budget: the slots it holds and the number of its latest exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Holding {
    pub held: u32,
    pub seq: u64,
}

/// One exchange to send: its report and its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Exchange {
    pub report: Report,
    pub request: Request,
}

impl Holding {
    /// The exchange that brings the holding to `wanted` slots, or none when it is there already
    /// (unless `report`: then an `Acquire(0)` that only reports). Numbers the exchange, and
    /// gives released slots up at once (they are never used again, whatever the call's fate):
    /// store the holding before sending.
    pub fn ask(&mut self, wanted: u32, report: bool) -> Option<Exchange> {
        let request = if wanted > self.held {
            Request::Acquire(wanted - self.held)
        } else if wanted < self.held {
            Request::Release(self.held - wanted)
        } else if report {
            Request::Acquire(0)
        } else {
            return None;
        };
        self.seq = self.seq.saturating_add(1);
        let out = Exchange {
            report: Report {
                seq: self.seq,
                held: self.held,
            },
            request,
        };
        if let Request::Release(n) = request {
            self.held = self.held.saturating_sub(n);
        }
        Some(out)
    }

    /// The budget's answer to an acquire arrived: the slots granted are held. Whether it got any.
    pub fn granted(&mut self, granted: u32) -> bool {
        self.held = self.held.saturating_add(granted);
        granted > 0
    }
}

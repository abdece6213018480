//! Model check of specs/WarmPool.tla against the Rust warm pool: no sandbox shared, pool bounded, only the latest image handed out, idempotent refills, drains final.

use std::collections::{BTreeMap, BTreeSet};

use nightshift_core::check::{explore, Model};
use nightshift_core::pool::{Pool, Slot, Work};

const SESSIONS: [&str; 2] = ["ses_a", "ses_b"];
const IMAGES: [&str; 2] = ["img_1", "img_2"];
const TARGETS: [u32; 3] = [0, 1, 2];
/// The provider hands out at most this many sandbox ids (sbx_1 ..).
const MAX_SANDBOXES: u32 = 4;
/// Depth of the exhaustive exploration (number of actions in a sequence).
const DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    pool: Pool,
    /// Ghost: every key ever planned by a refill, with the image it was planned from.
    planned: BTreeMap<String, Option<String>>,
    /// Ghost: every sandbox the provider created, with the image of the key it was created for.
    created: BTreeMap<String, Option<String>>,
    /// Ghost: every sandbox ever handed out, and to whom.
    handed: BTreeMap<String, String>,
    /// Ghost: every sandbox whose entry was removed as lost or drained (terminated or dead).
    released: BTreeSet<String>,
    /// Ghost: every sandbox the pool ever asked to terminate.
    terminated: BTreeSet<String>,
    /// Ghost: every sandbox that was ever in a draining entry.
    drained: BTreeSet<String>,
    /// Ghost: a claim handed out a sandbox already handed to another session.
    shared: bool,
    /// Ghost: a claim handed out a sandbox whose image was not the pool's image at claim time.
    stale: bool,
    /// Ghost: a refill planned a key that had been planned before.
    replanned: bool,
    /// Ghost: a claim by a session without a sandbox came back empty although a ready one of the current image was pooled.
    cold_when_warm: bool,
}

#[derive(Debug, Clone)]
enum Action {
    Refill,
    /// The provider accepted the create of this key with a fresh sandbox id.
    Created(String),
    Booted(String),
    Lost(String),
    Drained(String),
    Claim(usize),
    Unclaim(usize),
    NewImage(usize),
    Resize(u32),
}

/// The pool as written, or with one deliberate bug so the check can be seen to catch it.
struct WarmPool {
    mutant: Option<Mutant>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mutant {
    /// A claim leaves the sandbox in the pool, ready for the next session.
    ClaimKeepsEntry,
    /// A refill plans its creates without recording them as requested.
    RefillForgets,
    /// A new image leaves the old image's ready sandboxes claimable.
    NewImageKeepsOld,
}

impl WarmPool {
    fn record(t: &mut State, work: &[Work]) {
        for w in work {
            match w {
                Work::Create { key, image } => {
                    if t.planned.insert(key.clone(), image.clone()).is_some() {
                        t.replanned = true;
                    }
                }
                Work::Terminate { sandbox } => {
                    t.terminated.insert(sandbox.clone());
                }
            }
        }
    }

    /// Ghost bookkeeping after every step: sandboxes seen draining.
    fn observe(t: &mut State) {
        for e in t.pool.entries.values() {
            if let (Slot::Draining, Some(sbx)) = (e.slot, &e.sandbox) {
                t.drained.insert(sbx.clone());
            }
        }
    }
}

impl Model for WarmPool {
    type State = State;
    type Action = Action;

    fn init(&self) -> Vec<State> {
        vec![State {
            pool: Pool::new(1, None),
            planned: BTreeMap::new(),
            created: BTreeMap::new(),
            handed: BTreeMap::new(),
            released: BTreeSet::new(),
            terminated: BTreeSet::new(),
            drained: BTreeSet::new(),
            shared: false,
            stale: false,
            replanned: false,
            cold_when_warm: false,
        }]
    }

    fn actions(&self, s: &State) -> Vec<Action> {
        let mut v = vec![Action::Refill];
        // Every key ever planned, so stale and duplicated provider callbacks are explored too.
        for k in s.planned.keys() {
            v.push(Action::Created(k.clone()));
            v.push(Action::Booted(k.clone()));
            v.push(Action::Lost(k.clone()));
            v.push(Action::Drained(k.clone()));
        }
        for i in 0..SESSIONS.len() {
            v.push(Action::Claim(i));
            v.push(Action::Unclaim(i));
        }
        for i in 0..IMAGES.len() {
            v.push(Action::NewImage(i));
        }
        v.extend(TARGETS.iter().map(|n| Action::Resize(*n)));
        v
    }

    fn next(&self, s: &State, a: &Action) -> Option<State> {
        let mut t = s.clone();
        let changed = match a {
            Action::Refill => {
                let work = t.pool.refill(0);
                if self.mutant == Some(Mutant::RefillForgets) {
                    t.pool.entries.retain(|_, e| e.slot != Slot::Requested);
                }
                Self::record(&mut t, &work);
                !work.is_empty()
            }
            Action::Created(key) => {
                let n = t.created.len() as u32 + 1;
                if n > MAX_SANDBOXES {
                    return None;
                }
                let sbx = format!("sbx_{n}");
                let ok = t.pool.created(key, &sbx);
                if ok {
                    let image = t.planned.get(key).cloned().flatten();
                    t.created.insert(sbx, image);
                }
                ok
            }
            Action::Booted(key) => t.pool.booted(key),
            Action::Lost(key) | Action::Drained(key) => {
                let sbx = t.pool.entries.get(key).and_then(|e| e.sandbox.clone());
                let ok = if matches!(a, Action::Lost(_)) {
                    t.pool.lost(key)
                } else {
                    t.pool.drained(key)
                };
                if let (true, Some(sbx)) = (ok, sbx) {
                    t.released.insert(sbx);
                }
                ok
            }
            Action::Claim(i) => {
                let session = SESSIONS[*i];
                let again = t.pool.claims.contains_key(session);
                let warm = t
                    .pool
                    .entries
                    .values()
                    .any(|e| e.slot == Slot::Ready && e.image == t.pool.image);
                match t.pool.claim(session) {
                    None => {
                        if warm && !again {
                            t.cold_when_warm = true;
                            true
                        } else {
                            false
                        }
                    }
                    // The same session asking again gets the same sandbox: nothing new handed out.
                    Some(sbx) if again => {
                        assert_eq!(s.pool.claims.get(session), Some(&sbx));
                        false
                    }
                    Some(sbx) => {
                        if self.mutant == Some(Mutant::ClaimKeepsEntry) {
                            t.pool.entries = s.pool.entries.clone();
                        }
                        if t.handed.get(&sbx).is_some_and(|who| who != session) {
                            t.shared = true;
                        }
                        t.handed.insert(sbx.clone(), session.to_string());
                        if t.created.get(&sbx) != Some(&t.pool.image) {
                            t.stale = true;
                        }
                        true
                    }
                }
            }
            Action::Unclaim(i) => t.pool.unclaim(SESSIONS[*i]).is_some(),
            Action::NewImage(i) => {
                let work = t.pool.new_image(IMAGES[*i]);
                if self.mutant == Some(Mutant::NewImageKeepsOld) {
                    for (k, e) in t.pool.entries.iter_mut() {
                        if e.slot == Slot::Draining && s.pool.entries[k].slot == Slot::Ready {
                            e.slot = Slot::Ready;
                            e.image = Some(IMAGES[*i].to_string());
                        }
                    }
                }
                Self::record(&mut t, &work);
                t.pool != s.pool
            }
            Action::Resize(n) => {
                let work = t.pool.resize(*n);
                Self::record(&mut t, &work);
                t.pool != s.pool
            }
        };
        if !changed {
            assert_eq!(s.pool, t.pool, "refused {a:?} changed the pool");
            return None;
        }
        Self::observe(&mut t);
        Some(t)
    }

    fn invariants(&self, s: &State) -> Vec<(&'static str, bool)> {
        let p = &s.pool;
        let idle: Vec<_> = p
            .entries
            .values()
            .filter(|e| e.slot != Slot::Draining)
            .collect();
        let claimed: Vec<&String> = p.claims.values().collect();
        let distinct: BTreeSet<&String> = claimed.iter().copied().collect();
        vec![
            (
                "NeverTwoSessionsOnOneSandbox",
                !s.shared
                    && distinct.len() == claimed.len()
                    && p.claims
                        .iter()
                        .all(|(ses, sbx)| s.handed.get(sbx) == Some(ses))
                    && claimed.iter().all(|sbx| p.key_of(sbx).is_none()),
            ),
            ("PoolBound", idle.len() <= p.target as usize),
            (
                "NoOldImageHandedOut",
                !s.stale && idle.iter().all(|e| e.image == p.image),
            ),
            ("RefillPlansFreshKeys", !s.replanned),
            (
                "DrainedNeverClaimed",
                s.handed
                    .keys()
                    .all(|sbx| !s.drained.contains(sbx) && !s.terminated.contains(sbx)),
            ),
            ("ClaimTakesWarm", !s.cold_when_warm),
            (
                "DrainsOwed",
                // Every draining sandbox that exists is either in pending_drains or was sent a terminate.
                p.entries
                    .iter()
                    .filter(|(_, e)| e.slot == Slot::Draining)
                    .all(|(k, e)| match &e.sandbox {
                        None => true,
                        Some(sbx) => p.pending_drains().contains(&(k.clone(), sbx.clone())),
                    }),
            ),
            (
                "NoSandboxLeaked",
                // Every sandbox the provider created is pooled, handed out, or was removed as
                // terminated or dead; booting and ready entries always carry their sandbox.
                s.created.keys().all(|sbx| {
                    p.key_of(sbx).is_some()
                        || s.handed.contains_key(sbx)
                        || s.released.contains(sbx)
                }) && p.entries.values().all(|e| match e.slot {
                    Slot::Requested => e.sandbox.is_none(),
                    Slot::Booting | Slot::Ready => e.sandbox.is_some(),
                    Slot::Draining => true,
                }),
            ),
        ]
    }

    fn step_properties(&self, pre: &State, a: &Action, post: &State) -> Vec<(&'static str, bool)> {
        // A refill immediately repeated (a duplicated alarm) plans nothing and changes nothing.
        let idempotent = match a {
            Action::Refill => {
                let mut again = post.pool.clone();
                again.refill(0).is_empty() && again == post.pool
            }
            _ => true,
        };
        // A draining entry stays draining until it is gone: never requested, booting or ready again.
        let drain_final = pre
            .pool
            .entries
            .iter()
            .filter(|(_, e)| e.slot == Slot::Draining)
            .all(|(k, _)| {
                post.pool
                    .entries
                    .get(k)
                    .is_none_or(|e| e.slot == Slot::Draining)
            });
        // A removed key never comes back.
        let keys_final = post
            .pool
            .entries
            .keys()
            .all(|k| pre.pool.entries.contains_key(k) || !pre.planned.contains_key(k));
        vec![
            ("RefillIdempotent", idempotent),
            ("DrainingIsFinal", drain_final),
            ("RemovedKeysStayRemoved", keys_final),
        ]
    }
}

/// Bound: 2 sessions, 2 images (starting from none), targets 0..=2 (starting at 1), at most 4 sandbox ids, sequences of up to DEPTH (8) actions.
#[test]
fn warm_pool_invariants_hold_up_to_bound() {
    let report = explore(&WarmPool { mutant: None }, DEPTH)
        .unwrap_or_else(|v| panic!("invariant {} violated by {:?}", v.invariant, v.trace));
    println!("WarmPool: {report:?}");
    assert!(report.states > 20_000, "exploration too small: {report:?}");
}

/// The check is not vacuous: each deliberate bug is caught within the same bound.
#[test]
fn warm_pool_mutants_are_caught() {
    for (mutant, invariant) in [
        (Mutant::ClaimKeepsEntry, "NeverTwoSessionsOnOneSandbox"),
        (Mutant::RefillForgets, "RefillIdempotent"),
        (Mutant::NewImageKeepsOld, "NoOldImageHandedOut"),
    ] {
        match explore(
            &WarmPool {
                mutant: Some(mutant),
            },
            DEPTH,
        ) {
            Ok(r) => panic!("{mutant:?} not caught: {r:?}"),
            Err(v) => assert_eq!(v.invariant, invariant, "{mutant:?}: {:?}", v.trace),
        }
    }
}

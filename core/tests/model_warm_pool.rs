//! Model check of specs/WarmPool.tla against the Rust warm pool: no sandbox shared, pool bounded, only the latest image handed out, idempotent refills, drains final, and every sandbox the provider created owned by the pool or terminated (a create answered by the provider but never recorded, as after a crash, is given up after the pending timeout and swept).

use std::collections::{BTreeMap, BTreeSet};

use nightshift_core::check::{explore, Model};
use nightshift_core::pool::{Pool, Pooled, Slot, Work};

const SESSIONS: [&str; 2] = ["ses_a", "ses_b"];
const IMAGES: [&str; 2] = ["img_1", "img_2"];
const TARGETS: [u32; 3] = [0, 1, 2];
/// The provider hands out at most this many sandbox ids (sbx_1 ..).
const MAX_SANDBOXES: u32 = 4;
/// The clock runs 0..=MAX_TIME in ticks.
const MAX_TIME: u64 = 2;
/// Ticks a sandbox may stay requested or booting before the pool gives it up.
const TIMEOUT: u64 = 1;
/// Depth of the exhaustive exploration (number of actions in a sequence).
const DEPTH: usize = 8;

/// One sandbox at the provider (ghost): the key it was created for, its image, and whether it still runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AtProvider {
    key: String,
    image: Option<String>,
    alive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    pool: Pool,
    now: u64,
    /// Ghost: keys whose create is on its way to the provider (not created, not refused yet),
    /// with the time it was asked. Assumption (the provider contract's create is synchronous):
    /// a create the provider has not carried out within TIMEOUT of the request never is.
    asked: BTreeMap<String, u64>,
    /// Ghost: every sandbox the provider created, by id (created is not yet recorded).
    provider: BTreeMap<String, AtProvider>,
    /// Ghost: the provider's answer (201, this sandbox) on its way back to the pool, by key.
    answers: BTreeMap<String, String>,
    /// Ghost: every key ever planned by a refill, with the image it was planned from.
    planned: BTreeMap<String, Option<String>>,
    /// Ghost: every sandbox the pool recorded, with the image of the key it was created for.
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
    /// The provider created a sandbox (a fresh id) for this key's create; its answer is on its way.
    ProviderCreated(String),
    /// The provider refused this key's create: the pool forgets the key.
    CreateRefused(String),
    /// The object was evicted or crashed while this key's create was out: the answer (or the
    /// request) is lost, and nothing records it.
    Crash(String),
    /// The provider's answer for this key reaches the pool; unwanted sandboxes are terminated.
    Recorded(String),
    Booted(String),
    /// A recorded sandbox died while pooled.
    Lost(String),
    /// The terminate of this draining key's sandbox was confirmed.
    Drained(String),
    /// Every provider sandbox labelled with this swept key was terminated.
    Swept(String),
    Tick,
    /// The alarm gives up entries pending longer than TIMEOUT.
    Expire,
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
    /// Expiry drops an unrecorded entry without owing a sweep of its key.
    ExpireForgetsSweep,
    /// Pending entries never time out.
    NeverExpires,
}

impl WarmPool {
    fn record(t: &mut State, work: &[Work]) {
        for w in work {
            match w {
                Work::Create { key, image } => {
                    if t.planned.insert(key.clone(), image.clone()).is_some() {
                        t.replanned = true;
                    }
                    t.asked.insert(key.clone(), t.now);
                }
                Work::Terminate { sandbox } => {
                    t.terminated.insert(sandbox.clone());
                }
                Work::Sweep { .. } => {}
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

/// Waiting on the provider (independent of the pool's own notion): requested, booting, or
/// drained before its create was answered.
fn pending(e: &Pooled) -> bool {
    matches!(e.slot, Slot::Requested | Slot::Booting)
        || (e.slot == Slot::Draining && e.sandbox.is_none())
}

/// An entry whose create has not been recorded (no sandbox yet).
fn unrecorded(e: &Pooled) -> bool {
    matches!(e.slot, Slot::Requested | Slot::Draining)
}

impl Model for WarmPool {
    type State = State;
    type Action = Action;

    fn init(&self) -> Vec<State> {
        vec![State {
            pool: Pool::new(1, None),
            now: 0,
            asked: BTreeMap::new(),
            provider: BTreeMap::new(),
            answers: BTreeMap::new(),
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
        let mut v = vec![Action::Refill, Action::Tick, Action::Expire];
        for k in s.asked.keys() {
            v.push(Action::ProviderCreated(k.clone()));
            v.push(Action::CreateRefused(k.clone()));
            v.push(Action::Crash(k.clone()));
        }
        for k in s.answers.keys() {
            v.push(Action::Recorded(k.clone()));
            v.push(Action::Crash(k.clone()));
        }
        // Every key ever planned, so stale and duplicated provider callbacks are explored too.
        for k in s.planned.keys() {
            v.push(Action::Booted(k.clone()));
            v.push(Action::Lost(k.clone()));
            v.push(Action::Drained(k.clone()));
        }
        v.extend(s.pool.sweeps.iter().map(|k| Action::Swept(k.clone())));
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
                let work = t.pool.refill(t.now);
                if self.mutant == Some(Mutant::RefillForgets) {
                    t.pool.entries.retain(|_, e| e.slot != Slot::Requested);
                }
                Self::record(&mut t, &work);
                !work.is_empty()
            }
            Action::ProviderCreated(key) => {
                let n = t.provider.len() as u32 + 1;
                let in_time = t.asked.get(key).is_some_and(|at| t.now < at + TIMEOUT);
                if n > MAX_SANDBOXES || !in_time {
                    return None;
                }
                t.asked.remove(key);
                let sbx = format!("sbx_{n}");
                let image = t.planned.get(key).cloned().flatten();
                t.provider.insert(
                    sbx.clone(),
                    AtProvider {
                        key: key.clone(),
                        image,
                        alive: true,
                    },
                );
                t.answers.insert(key.clone(), sbx);
                return Some(t);
            }
            Action::CreateRefused(key) => {
                t.asked.remove(key)?;
                t.pool.lost(key);
                return Some(t);
            }
            Action::Crash(key) => {
                if t.asked.remove(key).is_none() && t.answers.remove(key).is_none() {
                    return None;
                }
                return Some(t);
            }
            Action::Recorded(key) => {
                let sbx = t.answers.remove(key)?;
                let work = t.pool.created(key, &sbx);
                if t.pool.key_of(&sbx).is_some() {
                    let image = t.planned.get(key).cloned().flatten();
                    t.created.insert(sbx.clone(), image);
                }
                if let Some(w) = work {
                    Self::record(&mut t, std::slice::from_ref(&w));
                    // The shell terminates it at once.
                    if let Work::Terminate { sandbox } = &w {
                        if let Some(p) = t.provider.get_mut(sandbox) {
                            p.alive = false;
                        }
                    }
                }
                Self::observe(&mut t);
                return Some(t);
            }
            Action::Booted(key) => t.pool.booted(key),
            Action::Lost(key) | Action::Drained(key) => {
                // Only recorded sandboxes die or are drained (a refused create is CreateRefused).
                let sbx = t.pool.entries.get(key).and_then(|e| e.sandbox.clone())?;
                let ok = if matches!(a, Action::Lost(_)) {
                    t.pool.lost(key)
                } else {
                    t.pool.drained(key)
                };
                if ok {
                    t.released.insert(sbx.clone());
                    if let Some(p) = t.provider.get_mut(&sbx) {
                        p.alive = false;
                    }
                }
                ok
            }
            Action::Swept(key) => {
                if !t.pool.swept(key) {
                    return None;
                }
                for p in t.provider.values_mut().filter(|p| p.key == *key) {
                    p.alive = false;
                }
                true
            }
            Action::Tick => {
                if t.now >= MAX_TIME {
                    return None;
                }
                t.now += 1;
                return Some(t);
            }
            Action::Expire => {
                let work = if self.mutant == Some(Mutant::NeverExpires) {
                    Vec::new()
                } else {
                    t.pool.expire(t.now, TIMEOUT)
                };
                if self.mutant == Some(Mutant::ExpireForgetsSweep) {
                    t.pool.sweeps = s.pool.sweeps.clone();
                }
                Self::record(&mut t, &work);
                // Always a step, so ExpireGivesUpStale judges an expiry that gives up nothing.
                Self::observe(&mut t);
                return Some(t);
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
            (
                "ProviderSandboxOwned",
                // Every sandbox still running at the provider is recorded by a pool entry, handed
                // out, on its way back in an answer, or stands for an entry whose create was never
                // recorded: that entry is still pending (it times out, PendingTimesOut) or its key
                // is owed a sweep. Nothing else may run.
                s.provider
                    .iter()
                    .filter(|(_, at)| at.alive)
                    .all(|(sbx, at)| {
                        p.key_of(sbx).is_some()
                            || s.handed.contains_key(sbx)
                            || s.answers.get(&at.key) == Some(sbx)
                            || p.entries
                                .get(&at.key)
                                .is_some_and(|e| e.sandbox.is_none() && unrecorded(e))
                            || p.sweeps.contains(&at.key)
                    }),
            ),
            (
                "PendingTimesOut",
                // The pool's next deadline is due no later than any pending entry's timeout.
                p.entries.values().filter(|e| pending(e)).all(|e| {
                    p.next_deadline(TIMEOUT)
                        .is_some_and(|d| d <= e.since + TIMEOUT)
                }),
            ),
        ]
    }

    fn step_properties(&self, pre: &State, a: &Action, post: &State) -> Vec<(&'static str, bool)> {
        // A refill immediately repeated (a duplicated alarm) plans nothing and changes nothing.
        let idempotent = match a {
            Action::Refill => {
                let mut again = post.pool.clone();
                again.refill(post.now).is_empty() && again == post.pool
            }
            _ => true,
        };
        // After an expiry nothing pending is older than the bound; what was given up without a
        // recorded sandbox is owed a sweep, and a given-up booting sandbox a terminate.
        let expired = match a {
            Action::Expire => {
                let stale = |e: &Pooled| pending(e) && e.since + TIMEOUT <= post.now;
                post.pool.entries.values().all(|e| !stale(e))
                    && pre
                        .pool
                        .entries
                        .iter()
                        .filter(|(_, e)| stale(e))
                        .all(|(k, e)| match &e.sandbox {
                            None => post.pool.sweeps.contains(k),
                            Some(sbx) => {
                                post.terminated.contains(sbx)
                                    && post.pool.entries.get(k).map(|e| e.slot)
                                        == Some(Slot::Draining)
                            }
                        })
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
            ("ExpireGivesUpStale", expired),
        ]
    }
}

/// Bound: 2 sessions, 2 images (starting from none), targets 0..=2 (starting at 1), at most 4 sandbox ids, clock 0..=2 with a 1-tick pending timeout, sequences of up to DEPTH (8) actions (crashes between the provider's create and the pool's record included).
#[test]
fn warm_pool_invariants_hold_up_to_bound() {
    let report = explore(&WarmPool { mutant: None }, DEPTH)
        .unwrap_or_else(|v| panic!("invariant {} violated by {:?}", v.invariant, v.trace));
    println!("WarmPool: {report:?}");
    assert!(report.states > 20_000, "exploration too small: {report:?}");
    assert_eq!(report.depth, DEPTH, "the bound was not reached: {report:?}");
}

/// The check is not vacuous: each deliberate bug is caught within the same bound.
#[test]
fn warm_pool_mutants_are_caught() {
    for (mutant, invariant) in [
        (Mutant::ClaimKeepsEntry, "NeverTwoSessionsOnOneSandbox"),
        (Mutant::RefillForgets, "RefillIdempotent"),
        (Mutant::NewImageKeepsOld, "NoOldImageHandedOut"),
        (Mutant::ExpireForgetsSweep, "ExpireGivesUpStale"),
        (Mutant::NeverExpires, "ExpireGivesUpStale"),
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

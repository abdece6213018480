//! Model check of specs/SandboxSnapshot.tla against the Rust snapshot manager: newest live restore, one in flight, KEEP held, dropped ones deleted, no work lost; snapshots asked for through the API share the one-in-flight rule. The expected set of held snapshots and the restore choice come from a ghost kept by this test alone (never from the manager's own lists).

use std::collections::{BTreeMap, BTreeSet};

use nightshift_core::check::{explore, Model};
use nightshift_core::snapshot::{Snapshots, Start, KEEP};

/// Turns a session may finish within the bound.
const MAX_TURNS: u64 = 5;
/// The clock runs 0..=MAX_TIME in ticks.
const MAX_TIME: u64 = 3;
/// Every snapshot lives this many ticks (the shell asks the provider for one fixed ttl).
const TTL: u64 = 2;
/// Depth of the exhaustive exploration (number of actions in a sequence).
const DEPTH: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    snaps: Snapshots,
    now: u64,
    /// The session's sandbox is live (else exited: the next prompt restores or starts cold).
    live: bool,
    /// Ghost: the snapshot request outstanding at the provider (its turn).
    in_flight: Option<u64>,
    /// Ghost: every snapshot the provider took and answered, by id: (turn, taken_at, expires_at).
    taken: BTreeMap<String, (u64, u64, u64)>,
    /// Ghost: snapshots deleted at the provider by the shell.
    deleted: BTreeSet<String>,
    /// Ghost, kept independently of the manager: the snapshots it should hold, i.e. the KEEP
    /// newest taken by (turn, taken_at, order of arrival), less those dropped as expired by an
    /// expiry pass and those the provider lost.
    kept: BTreeSet<String>,
    /// Ghost: snapshots dropped from `kept` because KEEP newer ones were held (superseded, not
    /// lost work).
    superseded: BTreeSet<String>,
    /// Ghost: snapshots the provider lost on its own (the shell was told and forgot them).
    lost: BTreeSet<String>,
    /// Ghost: a second snapshot was requested while one was in flight.
    doubled: bool,
}

#[derive(Debug, Clone)]
enum Action {
    /// A prompt finished with the sandbox live.
    TurnEnded,
    /// The live sandbox nears its time limit: the shell's alarm drops expired snapshots, then
    /// asks near_limit (which has no clock of its own).
    NearLimit,
    /// Someone asks for a snapshot now through the sandbox API (`POST /sandbox/:id/snapshot`).
    Requested,
    /// The provider took the requested snapshot (a fresh id).
    Taken,
    /// The snapshot failed (the sandbox was already gone).
    NotTaken,
    /// The sandbox exited (time limit, crash).
    Exit,
    /// The next prompt needs a sandbox: restore the chosen snapshot or start cold.
    Restore,
    Tick,
    /// The expiry alarm.
    Expire,
    /// The provider confirmed deleting this snapshot.
    Delete(String),
    /// The provider lost this snapshot on its own (expired early): the shell forgets it.
    Forget(String),
}

/// The manager as written, or with one deliberate bug so the check can be seen to catch it.
struct SandboxSnapshot {
    mutant: Option<Mutant>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mutant {
    /// The shell asks near_limit without dropping expired snapshots first.
    NearLimitWithoutExpire,
    /// Expired snapshots are dropped without being queued for deletion.
    ExpireForgets,
    /// A turn that ends while a snapshot is in flight requests another one anyway.
    RequestWhileInFlight,
}

/// The ghost's order of snapshots: (turn, taken_at, arrival).
fn order(s: &State, id: &str) -> (u64, u64, u64) {
    let g = s.taken[id];
    let arrival = id.trim_start_matches("snp_").parse().unwrap_or(0);
    (g.0, g.1, arrival)
}

/// The snapshot a restore should use, from the ghost alone: the newest of `kept` still live at
/// `now`, as (turn, id).
fn newest_live(s: &State) -> Option<(u64, String)> {
    s.kept
        .iter()
        .filter(|id| s.taken[*id].2 > s.now)
        .max_by_key(|id| order(s, id))
        .map(|id| (s.taken[id].0, id.clone()))
}

/// The latest turn whose snapshot completed and is still restorable at `now`: live, not lost by
/// the provider, and not superseded by KEEP newer ones (all from the ghost).
fn latest_covered_turn(s: &State) -> Option<u64> {
    s.taken
        .iter()
        .filter(|(id, g)| g.2 > s.now && !s.lost.contains(*id) && !s.superseded.contains(*id))
        .map(|(_, g)| g.0)
        .max()
}

/// Ghost expiry pass: what an expiry at `now` drops.
fn ghost_expire(t: &mut State) {
    let now = t.now;
    let taken = t.taken.clone();
    t.kept.retain(|id| taken[id].2 > now);
}

impl Model for SandboxSnapshot {
    type State = State;
    type Action = Action;

    fn init(&self) -> Vec<State> {
        vec![State {
            snaps: Snapshots::default(),
            now: 0,
            live: true,
            in_flight: None,
            taken: BTreeMap::new(),
            deleted: BTreeSet::new(),
            kept: BTreeSet::new(),
            superseded: BTreeSet::new(),
            lost: BTreeSet::new(),
            doubled: false,
        }]
    }

    fn actions(&self, s: &State) -> Vec<Action> {
        let mut v = vec![
            Action::TurnEnded,
            Action::NearLimit,
            Action::Requested,
            Action::Taken,
            Action::NotTaken,
            Action::Exit,
            Action::Restore,
            Action::Tick,
            Action::Expire,
        ];
        v.extend(
            s.snaps
                .to_delete
                .iter()
                .map(|id| Action::Delete(id.clone())),
        );
        v.extend(s.snaps.snaps.iter().map(|p| Action::Forget(p.id.clone())));
        v
    }

    fn next(&self, s: &State, a: &Action) -> Option<State> {
        let mut t = s.clone();
        match a {
            Action::TurnEnded | Action::NearLimit => {
                if !t.live || (matches!(a, Action::TurnEnded) && t.snaps.turns >= MAX_TURNS) {
                    return None;
                }
                let want = if matches!(a, Action::TurnEnded) {
                    let want = t.snaps.turn_ended();
                    if self.mutant == Some(Mutant::RequestWhileInFlight) && want.is_none() {
                        t.snaps.taking = Some(t.snaps.turns);
                        Some(t.snaps.turns)
                    } else {
                        want
                    }
                } else {
                    if self.mutant != Some(Mutant::NearLimitWithoutExpire) {
                        t.snaps.expire(t.now);
                        ghost_expire(&mut t);
                    }
                    t.snaps.near_limit()
                };
                if let Some(turn) = want {
                    t.doubled |= t.in_flight.is_some();
                    t.in_flight = Some(turn);
                }
            }
            Action::Requested => {
                if !t.live {
                    return None;
                }
                if let Some(turn) = t.snaps.requested() {
                    t.doubled |= t.in_flight.is_some();
                    t.in_flight = Some(turn);
                }
            }
            Action::Taken => {
                let turn = t.in_flight.take()?;
                let id = format!("snp_{}", t.taken.len() + 1);
                t.snaps.taken(turn, &id, t.now, t.now + TTL);
                t.taken.insert(id.clone(), (turn, t.now, t.now + TTL));
                t.kept.insert(id);
                while t.kept.len() > KEEP {
                    let oldest = t
                        .kept
                        .iter()
                        .min_by_key(|id| order(&t, id))
                        .cloned()
                        .expect("kept is not empty");
                    t.kept.remove(&oldest);
                    t.superseded.insert(oldest);
                }
            }
            Action::NotTaken => {
                let turn = t.in_flight.take()?;
                t.snaps.not_taken(turn);
            }
            Action::Exit => {
                if !t.live {
                    return None;
                }
                t.live = false;
            }
            Action::Restore => {
                if t.live {
                    return None;
                }
                // Which snapshot it restores is checked in every state (RestoresNewestLive).
                let _ = t.snaps.start(t.now);
                t.live = true;
            }
            Action::Tick => {
                if t.now >= MAX_TIME {
                    return None;
                }
                t.now += 1;
            }
            Action::Expire => {
                t.snaps.expire(t.now);
                ghost_expire(&mut t);
                if self.mutant == Some(Mutant::ExpireForgets) {
                    t.snaps.to_delete = s.snaps.to_delete.clone();
                }
            }
            Action::Delete(id) => {
                t.snaps.deleted(std::slice::from_ref(id));
                t.deleted.insert(id.clone());
            }
            Action::Forget(id) => {
                t.snaps.forget(id);
                t.kept.remove(id);
                t.lost.insert(id.clone());
            }
        }
        // A near-limit that requests nothing is still a step, so NewerTurnNext judges it.
        if t == *s && !matches!(a, Action::NearLimit) {
            return None;
        }
        Some(t)
    }

    fn invariants(&self, s: &State) -> Vec<(&'static str, bool)> {
        let start = s.snaps.start(s.now);
        let held: BTreeSet<&String> = s.snaps.snaps.iter().map(|p| &p.id).collect();
        let queued: BTreeSet<&String> = s.snaps.to_delete.iter().collect();
        let picked = match &start {
            Start::Restore { snapshot, turn } => Some((snapshot.clone(), *turn)),
            Start::Cold => None,
        };
        let accounted = s.taken.keys().all(|id| {
            held.contains(id)
                || queued.contains(id)
                || s.deleted.contains(id)
                || s.lost.contains(id)
        });
        let disjoint = held
            .iter()
            .all(|id| !queued.contains(id) && !s.deleted.contains(*id) && !s.lost.contains(*id))
            && queued.iter().all(|id| !s.deleted.contains(*id));
        vec![
            (
                "RestoresNewestLive",
                picked.as_ref().map(|p| &p.0) == newest_live(s).as_ref().map(|n| &n.1),
            ),
            (
                "KeepsNewest",
                held.len() == s.snaps.snaps.len()
                    && held.iter().copied().eq(s.kept.iter())
                    && s.snaps
                        .snaps
                        .iter()
                        .all(|p| s.taken.get(&p.id) == Some(&(p.turn, p.taken_at, p.expires_at))),
            ),
            (
                "NeverRestoresExpired",
                picked.as_ref().is_none_or(|(id, _)| {
                    s.taken.get(id).is_some_and(|g| g.2 > s.now)
                        && !queued.contains(id)
                        && !s.deleted.contains(id)
                        && !s.lost.contains(id)
                }),
            ),
            (
                "AtMostOneInFlight",
                !s.doubled && s.snaps.taking == s.in_flight,
            ),
            ("AtMostKeepHeld", s.snaps.snaps.len() <= KEEP),
            ("DroppedAreDeleted", accounted && disjoint),
            ("NoWorkLost", picked.map(|p| p.1) == latest_covered_turn(s)),
        ]
    }

    fn step_properties(&self, pre: &State, a: &Action, post: &State) -> Vec<(&'static str, bool)> {
        // After a turn ends with a live sandbox, its snapshot is requested unless one is in flight.
        let after_turn = match a {
            Action::TurnEnded => {
                pre.in_flight.is_some() || post.in_flight == Some(post.snaps.turns)
            }
            _ => true,
        };
        // With nothing in flight and no live snapshot of the current turn, near-limit requests it
        // (so a turn that ended while another snapshot was in flight is taken next).
        let newer_next = match a {
            Action::NearLimit => {
                let held_live = pre.snaps.snaps.iter().any(|p| {
                    p.turn == pre.snaps.turns && pre.taken.get(&p.id).is_some_and(|g| g.2 > pre.now)
                });
                pre.in_flight.is_some() || held_live || post.in_flight == Some(pre.snaps.turns)
            }
            _ => true,
        };
        // The same answer delivered twice in a row (a retried handler) changes nothing.
        let taken_idempotent = match (a, pre.in_flight) {
            (Action::Taken, Some(turn)) => {
                let id = format!("snp_{}", post.taken.len());
                let mut again = post.snaps.clone();
                again.taken(turn, &id, pre.now, pre.now + TTL);
                again == post.snaps
            }
            _ => true,
        };
        vec![
            ("SnapshotAfterTurn", after_turn),
            ("NewerTurnNext", newer_next),
            ("TakenIdempotent", taken_idempotent),
        ]
    }
}

/// Bound: up to 5 turns, clock 0..=3 with a 2-tick ttl, KEEP (3) held, sequences of up to DEPTH (12) actions.
#[test]
fn sandbox_snapshot_invariants_hold_up_to_bound() {
    let report = explore(&SandboxSnapshot { mutant: None }, DEPTH)
        .unwrap_or_else(|v| panic!("invariant {} violated by {:?}", v.invariant, v.trace));
    println!("SandboxSnapshot: {report:?}");
    assert!(report.states > 50_000, "exploration too small: {report:?}");
    assert_eq!(report.depth, DEPTH, "the bound was not reached: {report:?}");
}

/// The check is not vacuous: each deliberate bug is caught within the same bound.
#[test]
fn sandbox_snapshot_mutants_are_caught() {
    for (mutant, invariant) in [
        (Mutant::NearLimitWithoutExpire, "NewerTurnNext"),
        (Mutant::ExpireForgets, "DroppedAreDeleted"),
        (Mutant::RequestWhileInFlight, "AtMostOneInFlight"),
    ] {
        match explore(
            &SandboxSnapshot {
                mutant: Some(mutant),
            },
            DEPTH,
        ) {
            Ok(r) => panic!("{mutant:?} not caught: {r:?}"),
            Err(v) => assert_eq!(v.invariant, invariant, "{mutant:?}: {:?}", v.trace),
        }
    }
}

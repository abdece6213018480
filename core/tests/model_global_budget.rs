//! Model check of specs/GlobalBudget.tla against the Rust global budget (core/src/budget.rs) lending BG_MAX_GLOBAL to two shards, each a core `Scheduler` with its `Holding`: slots lent never exceed the cap, no shard holds more than it was lent nor runs more than it holds, slots lost to a failed call or a crash come back with the shard's next exchange, and waiting shards are woken when slots come back and by the alarm.

use std::collections::{BTreeMap, BTreeSet};

use nightshift_core::background::{Limits, Scheduler, Spawn, Status};
use nightshift_core::budget::{Answer, Budget, Exchange, Holding, Request, Wake};
use nightshift_core::check::{explore, Model};

const SHARDS: [&str; 2] = ["a", "b"];
/// BG_MAX_GLOBAL.
const CAP: u32 = 2;
/// Each shard's own limits: it could run 2 agents alone, so the two shards compete for the cap.
const LIMITS: Limits = Limits {
    max_concurrent: 2,
    max_per_user: 2,
    max_per_session: 2,
    max_queued: 2,
    max_depth: 1,
    max_children: 2,
};
/// Agents spawned per shard, at most.
const MAX_AGENTS: usize = 2;
/// Crashes (or failed calls) in a whole sequence, at most.
const MAX_CRASHES: u32 = 2;
/// Depth of the exhaustive exploration (number of actions in a sequence).
const DEPTH: usize = 14;

/// One shard: what it stores (its scheduler, its holding) and its calls to the budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shard {
    /// The stored scheduler, with the shard's own limits (the shell lowers them on each load).
    sched: Scheduler,
    holding: Holding,
    spawned: usize,
    /// Exchanges the shard waits on (at most one: the shell holds a lock across the call).
    asking: BTreeSet<u64>,
    /// The budget's answers on their way back to it, by exchange number.
    answers: BTreeMap<u64, (Request, Answer)>,
    /// A `/wake` is on its way to it: its next exchange reports even with nothing to change.
    woken: bool,
    /// Ghost: every exchange it sent since the start was answered (none failed, no crash since
    /// the last answered one).
    synced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    budget: Budget,
    shards: [Shard; 2],
    /// Requests on their way to the budget (a failed call's or a dead instance's among them).
    flight: BTreeSet<(usize, Exchange)>,
    crashes: u32,
}

#[derive(Debug, Clone)]
enum Action {
    /// A person spawns an agent in the shard (it starts if the shard holds a free slot).
    Spawn(usize),
    /// The shard's first active agent ends.
    Finish(usize),
    /// The shard brings its holding to what it wants (or reports, when woken): one exchange.
    Exchange(usize),
    /// The budget receives a request in flight and carries it out.
    Deliver(usize, Exchange),
    /// The budget's answer to this exchange reaches the shard.
    Answer(usize, u64),
    /// A request never reaches the budget.
    Lose(usize, Exchange),
    /// The shard's call fails or the shard restarts: it stops waiting, its answers are lost,
    /// and what it sent may still arrive (to be reconciled by its next exchange).
    Crash(usize),
    /// The budget's alarm (it runs while a shard waits).
    Alarm,
}

/// The budget as written, or with one deliberate bug so the check can be seen to catch it.
struct GlobalBudget {
    mutant: Option<Mutant>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mutant {
    /// An acquire short of free slots grants one more than is free.
    AcquireOneTooMany,
    /// Reports are reconciled without the fence: a late request's report counts too.
    NoFence,
    /// Reports are never reconciled: lost grants stay lent.
    NoReconcile,
    /// Slots given back wake nobody.
    ReleaseWakesNobody,
    /// A shard sends its next exchange without waiting for the answer to the last.
    NoLock,
    /// A shard runs up to its own limit, whatever it holds.
    ShardIgnoresHolding,
    /// The alarm wakes only the waiting shards, not those holding (possibly leaked) slots.
    AlarmWakesWaitersOnly,
}

fn index(w: &Wake) -> usize {
    SHARDS.iter().position(|s| *s == w.0).unwrap_or(0)
}

fn active(s: &Scheduler) -> u32 {
    s.agents.values().filter(|a| a.status.is_active()).count() as u32
}

impl GlobalBudget {
    fn is(&self, m: Mutant) -> bool {
        self.mutant == Some(m)
    }

    /// The scheduler as the shell loads it: own limits lowered to the holding.
    fn loaded(&self, sh: &Shard) -> Scheduler {
        let mut s = sh.sched.clone();
        if !self.is(Mutant::ShardIgnoresHolding) {
            s.hold(sh.holding.held);
        }
        s
    }

    /// Stores a loaded scheduler back (limits are not part of what the model compares).
    fn store(sh: &mut Shard, mut s: Scheduler) {
        s.limits = LIMITS;
        sh.sched = s;
    }

    /// The budget object carrying out one request.
    fn deliver(&self, b: &mut Budget, shard: usize, ex: &Exchange) -> Answer {
        let name = SHARDS[shard];
        let mut answer = if self.is(Mutant::NoFence) || self.is(Mutant::NoReconcile) {
            let fresh = b.fresh(name, ex.report.seq);
            if self.is(Mutant::NoFence) || fresh {
                let mut wake = Vec::new();
                if self.is(Mutant::NoFence) {
                    wake = b.reconcile(name, ex.report.held);
                }
                let granted = match ex.request {
                    Request::Acquire(n) => b.acquire(name, n).granted,
                    Request::Release(n) => {
                        wake.extend(b.release(name, n));
                        0
                    }
                };
                Answer { granted, wake }
            } else {
                Answer::default()
            }
        } else {
            b.exchange(name, Some(ex.report), ex.request)
        };
        if self.is(Mutant::AcquireOneTooMany) {
            if let Request::Acquire(n) = ex.request {
                if answer.granted < n && b.seen.get(name) == Some(&ex.report.seq) {
                    answer.granted += 1;
                    b.holds.insert(name.to_string(), b.held_by(name) + 1);
                    if answer.granted == n {
                        b.waiting.remove(name);
                    }
                }
            }
        }
        if self.is(Mutant::ReleaseWakesNobody) {
            answer.wake.clear();
        }
        answer
    }
}

impl Model for GlobalBudget {
    type State = State;
    type Action = Action;

    fn init(&self) -> Vec<State> {
        let shard = Shard {
            sched: Scheduler::new(LIMITS),
            holding: Holding::default(),
            spawned: 0,
            asking: BTreeSet::new(),
            answers: BTreeMap::new(),
            woken: false,
            synced: true,
        };
        vec![State {
            budget: Budget::new(CAP),
            shards: [shard.clone(), shard],
            flight: BTreeSet::new(),
            crashes: 0,
        }]
    }

    fn actions(&self, s: &State) -> Vec<Action> {
        let mut v = vec![Action::Alarm];
        for i in 0..SHARDS.len() {
            v.push(Action::Spawn(i));
            v.push(Action::Finish(i));
            v.push(Action::Exchange(i));
            v.push(Action::Crash(i));
            v.extend(s.shards[i].answers.keys().map(|q| Action::Answer(i, *q)));
        }
        for (i, ex) in &s.flight {
            v.push(Action::Deliver(*i, *ex));
            v.push(Action::Lose(*i, *ex));
        }
        v
    }

    fn next(&self, s: &State, a: &Action) -> Option<State> {
        let mut t = s.clone();
        match a {
            Action::Spawn(i) => {
                let sh = &mut t.shards[*i];
                if sh.spawned >= MAX_AGENTS {
                    return None;
                }
                sh.spawned += 1;
                let mut sched = self.loaded(sh);
                sched
                    .spawn(Spawn {
                        id: format!("{}{}", SHARDS[*i], sh.spawned),
                        user: "ada".into(),
                        parent: None,
                        parent_depth: 0,
                    })
                    .ok()?;
                Self::store(sh, sched);
            }
            Action::Finish(i) => {
                let sh = &mut t.shards[*i];
                let mut sched = self.loaded(sh);
                let id = sched
                    .agents
                    .values()
                    .find(|a| a.status.is_active())
                    .map(|a| a.id.clone())?;
                sched.transition(&id, Status::Failed).ok()?;
                Self::store(sh, sched);
            }
            Action::Exchange(i) => {
                let sh = &mut t.shards[*i];
                if !sh.asking.is_empty() && !self.is(Mutant::NoLock) {
                    return None;
                }
                let wanted = sh.sched.slots_wanted(0);
                let ex = sh.holding.ask(wanted, sh.woken)?;
                sh.woken = false;
                sh.asking.insert(ex.report.seq);
                t.flight.insert((*i, ex));
            }
            Action::Deliver(i, ex) => {
                t.flight.take(&(*i, *ex))?;
                let answer = self.deliver(&mut t.budget, *i, ex);
                let sh = &mut t.shards[*i];
                // Only the call still waiting gets its answer.
                if sh.asking.contains(&ex.report.seq) {
                    sh.answers.insert(ex.report.seq, (ex.request, answer));
                }
            }
            Action::Answer(i, seq) => {
                let sh = &mut t.shards[*i];
                let (req, answer) = sh.answers.remove(seq)?;
                sh.asking.remove(seq);
                if let Request::Acquire(_) = req {
                    if sh.holding.granted(answer.granted) {
                        let mut sched = self.loaded(sh);
                        sched.schedule();
                        Self::store(sh, sched);
                    }
                }
                sh.synced = sh.asking.is_empty();
                for w in &answer.wake {
                    t.shards[index(w)].woken = true;
                }
            }
            Action::Lose(i, ex) => {
                t.flight.take(&(*i, *ex))?;
            }
            Action::Crash(i) => {
                if t.crashes >= MAX_CRASHES {
                    return None;
                }
                t.crashes += 1;
                let sh = &mut t.shards[*i];
                sh.asking.clear();
                sh.answers.clear();
                sh.synced = false;
            }
            Action::Alarm => {
                if !t.budget.needs_alarm() {
                    return None;
                }
                for w in t.budget.alarm() {
                    let j = index(&w);
                    if self.is(Mutant::AlarmWakesWaitersOnly) && !t.budget.waiting.contains(&w.0) {
                        continue;
                    }
                    t.shards[j].woken = true;
                }
            }
        }
        (t != *s).then_some(t)
    }

    fn invariants(&self, s: &State) -> Vec<(&'static str, bool)> {
        let b = &s.budget;
        let shards = || s.shards.iter().zip(SHARDS);
        vec![
            ("LentNeverExceedsCap", b.lent() <= b.cap),
            (
                "NoShardHoldsMoreThanLent",
                // What a shard holds, with the grants on their way to it, is lent to it: the
                // slots the shards can use never exceed the cap.
                shards().all(|(sh, name)| {
                    let coming: u32 = sh.answers.values().map(|(_, a)| a.granted).sum();
                    sh.holding.held + coming <= b.held_by(name)
                }),
            ),
            (
                "RunningNeverExceedsHeld",
                shards().all(|(sh, _)| active(&sh.sched) <= sh.holding.held),
            ),
            (
                "LedgerMatchesAfterExchange",
                // Nothing leaks for good: once a shard's exchange is answered with none lost
                // since, the budget lends it exactly what it holds (a crash's lost grants and
                // releases were reconciled by that exchange).
                shards()
                    .filter(|(sh, _)| sh.synced && sh.asking.is_empty())
                    .all(|(sh, name)| b.held_by(name) == sh.holding.held),
            ),
        ]
    }

    fn step_properties(&self, pre: &State, a: &Action, post: &State) -> Vec<(&'static str, bool)> {
        let (mut short_waits, mut freed_wake, mut alarm_wakes) = (true, true, true);
        match a {
            Action::Deliver(i, ex) => {
                let name = SHARDS[*i];
                let mut b = pre.budget.clone();
                let answer = self.deliver(&mut b, *i, ex);
                debug_assert_eq!(b, post.budget);
                let fresh = post.budget.seen.get(name) == Some(&ex.report.seq)
                    && pre.budget.seen.get(name) != Some(&ex.report.seq);
                // An acquire that got less than it asked for leaves the shard waiting; one that
                // got all of it takes it off the list.
                if let (Request::Acquire(n), true) = (ex.request, fresh) {
                    short_waits = post.budget.waiting.contains(name) == (answer.granted < n);
                }
                // Slots that came back from a shard wake every other shard that waited.
                if post.budget.held_by(name) < pre.budget.held_by(name) {
                    freed_wake = pre
                        .budget
                        .waiting
                        .iter()
                        .filter(|w| w.as_str() != name)
                        .all(|w| answer.wake.contains(&Wake(w.clone())));
                }
            }
            Action::Alarm => {
                // The alarm wakes every waiting shard and every shard holding slots.
                alarm_wakes = SHARDS.iter().enumerate().all(|(j, name)| {
                    let due = pre.budget.held_by(name) > 0 || pre.budget.waiting.contains(*name);
                    !due || post.shards[j].woken
                });
            }
            _ => {}
        }
        vec![
            ("ShortChangedShardWaits", short_waits),
            ("FreedSlotsWakeWaiters", freed_wake),
            ("AlarmWakesHoldersAndWaiters", alarm_wakes),
        ]
    }
}

/// Bound: 2 shards under a cap of 2, each able to run 2 agents alone, at most 2 agents spawned
/// per shard, at most 2 crashes (or failed calls) in all, requests lost or delivered late in any
/// order, sequences of up to DEPTH (11) actions.
#[test]
fn global_budget_invariants_hold_up_to_bound() {
    let report = explore(&GlobalBudget { mutant: None }, DEPTH)
        .unwrap_or_else(|v| panic!("invariant {} violated by {:?}", v.invariant, v.trace));
    println!("GlobalBudget: {report:?}");
    assert!(report.states > 20_000, "exploration too small: {report:?}");
    assert_eq!(report.depth, DEPTH, "the bound was not reached: {report:?}");
}

/// The check is not vacuous: each deliberate bug is caught within the same bound.
#[test]
fn global_budget_mutants_are_caught() {
    for (mutant, invariant) in [
        (Mutant::AcquireOneTooMany, "LentNeverExceedsCap"),
        (Mutant::NoFence, "NoShardHoldsMoreThanLent"),
        (Mutant::NoReconcile, "LedgerMatchesAfterExchange"),
        (Mutant::ReleaseWakesNobody, "FreedSlotsWakeWaiters"),
        (Mutant::NoLock, "NoShardHoldsMoreThanLent"),
        (Mutant::ShardIgnoresHolding, "RunningNeverExceedsHeld"),
        (Mutant::AlarmWakesWaitersOnly, "AlarmWakesHoldersAndWaiters"),
    ] {
        match explore(
            &GlobalBudget {
                mutant: Some(mutant),
            },
            DEPTH,
        ) {
            Ok(r) => panic!("{mutant:?} not caught: {r:?}"),
            Err(v) => {
                assert_eq!(v.invariant, invariant, "{mutant:?}: {:?}", v.trace);
                println!("{mutant:?} caught by {invariant}: {:?}", v.trace);
            }
        }
    }
}

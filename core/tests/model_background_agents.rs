//! Model check of specs/BackgroundAgents.tla against the Rust background-agent scheduler: limits, valid and final statuses, refusals that change nothing, cascading cancel, nothing dropped, fair starts.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use nightshift_core::background::{Agent, Limits, Scheduler, Spawn, Status, Transition};
use nightshift_core::check::{explore, Model};

const USERS: [&str; 3] = ["ada", "bob", "cy"];
/// A person's hosted session: its agent spawns top-level (depth 1) background agents.
const HUMAN_SESSION: &str = "ses_h";
/// At most this many agents are spawned.
const MAX_AGENTS: usize = 4;
/// Agent ids in spawn order, and the sessions they run in (an agent's session is named after it).
const IDS: [&str; MAX_AGENTS] = ["a1", "a2", "a3", "a4"];
const SESSIONS: [&str; MAX_AGENTS] = ["ses_a1", "ses_a2", "ses_a3", "ses_a4"];
/// An id no agent has (refusals: not found).
const MISSING: &str = "zz";
const STATUSES: [Status; 6] = [
    Status::Queued,
    Status::Starting,
    Status::Running,
    Status::Completed,
    Status::Failed,
    Status::Cancelled,
];
/// Per-user limit 1: the per-user, per-session and global limits all bind.
const STRICT: Limits = Limits {
    max_concurrent: 2,
    max_per_user: 1,
    max_per_session: 1,
    max_queued: 2,
    max_depth: 2,
    max_children: 2,
};
/// Per-user limit 2 under a global limit of 2: a user with one agent running competes with users
/// with none, so the fair order between users is exercised.
const FAIR: Limits = Limits {
    max_per_user: 2,
    ..STRICT
};
/// The seed, a second starting point reached by these actions from the empty shard (a person's
/// session spawned an agent that started, runs and is attached): explored to SEED_DEPTH, it takes
/// sequences to grandchildren and to nesting refused as too deep.
const SEED: [Action; 3] = [
    Action::Spawn {
        id: "a1",
        user: 0,
        by: By::HumanSession,
    },
    Action::Move("a1", Status::Running),
    Action::Attach("a1"),
];
/// Depth of the exhaustive exploration (number of actions in a sequence).
const DEPTH: usize = 6;
/// Depth of the exploration from the seed (3 actions in).
const SEED_DEPTH: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq)]
enum By {
    /// Through the API: no parent, depth 1.
    Person,
    /// The agent of a person's hosted session: parent HUMAN_SESSION, depth 1.
    HumanSession,
    /// The session of a running agent (attached): one level deeper than that agent.
    Agent(&'static str),
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Spawn {
        id: &'static str,
        user: usize,
        by: By,
    },
    /// `transition(id, to)`: Start is Move(Running), Finish is Move(Completed | Failed).
    Move(&'static str, Status),
    Cancel(&'static str),
    CancelChildrenOf(&'static str),
    /// The shell records the session the agent runs in (`ses_<id>`).
    Attach(&'static str),
}

/// What the call answered.
#[derive(Debug, Clone)]
enum Outcome {
    None,
    Done(Vec<Transition>),
    Refused(&'static str),
}

#[derive(Debug)]
struct State {
    sched: Scheduler,
    /// What the call that reached this state answered: read by the step properties only, so
    /// left out of equality and hashing (it does not multiply the states) and not cloned.
    outcome: Outcome,
}

impl Clone for State {
    fn clone(&self) -> State {
        State {
            sched: self.sched.clone(),
            outcome: Outcome::None,
        }
    }
}
impl PartialEq for State {
    fn eq(&self, o: &State) -> bool {
        self.sched == o.sched
    }
}
impl Eq for State {}
impl Hash for State {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.sched.hash(h);
    }
}

/// The model's constant for an agent id.
fn id_of(id: &str) -> &'static str {
    IDS.iter().find(|x| **x == id).copied().unwrap_or(MISSING)
}

/// The session of agent `id`: `ses_<id>`.
fn session_of(id: &str) -> &'static str {
    IDS.iter()
        .position(|x| *x == id)
        .map_or("ses_zz", |i| SESSIONS[i])
}

/// The scheduler as written, or with one deliberate bug so the check can be seen to catch it.
struct BackgroundAgents {
    /// The spec's limits (the scheduler is configured with them unless a mutant loosens one).
    limits: Limits,
    mutant: Option<Mutant>,
    /// Starts from the seed (explored to SEED_DEPTH) instead of the empty shard (to DEPTH).
    seeded: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mutant {
    /// The scheduler runs with a looser limit than the spec's (it ignores that limit).
    LooseConcurrent,
    LoosePerUser,
    LoosePerSession,
    LooseQueue,
    LooseDepth,
    LooseChildren,
    /// Cancel stops the agent itself only.
    CancelNoCascade,
    /// Cancel does not report the descendants it cancels.
    CancelUnreported,
    /// A finished agent can be started again.
    TerminalRevives,
    /// A queued agent can be moved straight to running.
    SkipsStarting,
    /// Starts go first-come first-served, whatever each user already runs.
    Fifo,
    /// Freed capacity is not handed on when an agent ends.
    LazySchedule,
    /// A spawn refused because the queue is full is answered as accepted.
    SpawnDrops,
    /// A refused spawn still consumes an arrival number.
    RefusalLeaks,
    /// Cancelling a session's children schedules between cancels (the code before the fix).
    ScheduleBetweenCancels,
    /// `transition(id, Cancelled)` does not cascade (the code before the fix).
    MoveCancelNoCascade,
    /// `transition(id, Starting)` starts a queued agent, bypassing the scheduler (before the fix).
    MoveStartsQueued,
    /// Cancelling a session's children skips those that ended, and so their descendants (before
    /// the fix).
    ChildrenOfSkipsEnded,
    /// A spawn that would fill the queue is refused as if it were full.
    QueueFullEarly,
    /// A completed agent is forgotten.
    CompletedForgotten,
    /// (In the shell) the session of a cancelled agent may still spawn.
    SpawnFromCancelled,
}

fn active(s: &Scheduler, f: impl Fn(&Agent) -> bool) -> u32 {
    s.agents
        .values()
        .filter(|a| a.status.is_active() && f(a))
        .count() as u32
}

/// The spec's Fits: starting `a` now stays within every running limit.
fn fits(l: &Limits, s: &Scheduler, a: &Agent) -> bool {
    active(s, |_| true) < l.max_concurrent
        && active(s, |x| x.user == a.user) < l.max_per_user
        && a.parent
            .as_ref()
            .is_none_or(|p| active(s, |x| x.parent.as_ref() == Some(p)) < l.max_per_session)
}

/// Agents spawned, transitively, from `sessions`: through the sessions agents are attached to,
/// ended agents included.
fn descendants(s: &Scheduler, mut sessions: BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    loop {
        let mut grew = false;
        for a in s.agents.values() {
            if a.parent.as_ref().is_some_and(|p| sessions.contains(p)) && out.insert(a.id.clone()) {
                sessions.extend(a.session.clone());
                grew = true;
            }
        }
        if !grew {
            return out;
        }
    }
}

fn descendants_of_agent(s: &Scheduler, id: &str) -> BTreeSet<String> {
    let sessions = s
        .agents
        .get(id)
        .and_then(|a| a.session.clone())
        .into_iter()
        .collect();
    descendants(s, sessions)
}

/// queued → starting → running → completed | failed | cancelled; queued and starting may also
/// fail or be cancelled; a new agent appears queued. Written out here, not taken from `can_move`.
fn valid_move(from: Option<Status>, to: Status) -> bool {
    use Status::*;
    matches!(
        (from, to),
        (None, Queued)
            | (Some(Queued), Starting)
            | (Some(Starting), Running)
            | (Some(Running), Completed | Failed | Cancelled)
            | (Some(Queued | Starting), Failed | Cancelled)
    )
}

/// Starting `c` passes over no waiting agent that fits the limits and whose user runs fewer
/// agents than `c`'s, nor an earlier one of the same user.
fn fair_pick(l: &Limits, s: &Scheduler, c: &Agent) -> bool {
    let load = |u: &String| active(s, |x| &x.user == u);
    s.agents
        .values()
        .filter(|q| q.status == Status::Queued && q.id != c.id && fits(l, s, q))
        .all(|q| load(&q.user) >= load(&c.user) && !(q.user == c.user && q.arrival < c.arrival))
}

/// Undoes the starts a call made (a mutant then replaces them).
fn undo_starts(t: &mut State, ts: &mut Vec<Transition>) {
    for tr in ts.iter().filter(|tr| tr.to == Status::Starting) {
        if let Some(a) = t.sched.agents.get_mut(&tr.id) {
            a.status = Status::Queued;
        }
    }
    ts.retain(|tr| tr.to != Status::Starting);
}

/// Marks one agent cancelled and reports it, nothing else (for the mutants).
fn cancel_alone(t: &mut State, id: &str) -> Vec<Transition> {
    let a = t.sched.agents.get_mut(id).expect("agent");
    let from = a.status;
    a.status = Status::Cancelled;
    let mut ts = vec![Transition {
        id: id.to_string(),
        from: Some(from),
        to: Status::Cancelled,
    }];
    ts.extend(t.sched.schedule());
    ts
}

impl BackgroundAgents {
    fn depth(&self) -> usize {
        if self.seeded {
            SEED_DEPTH
        } else {
            DEPTH
        }
    }

    fn configured(&self) -> Limits {
        let mut l = self.limits;
        match self.mutant {
            Some(Mutant::LooseConcurrent) => l.max_concurrent += 1,
            Some(Mutant::LoosePerUser) => l.max_per_user += 1,
            Some(Mutant::LoosePerSession) => l.max_per_session += 1,
            Some(Mutant::LooseQueue) => l.max_queued += 1,
            Some(Mutant::LooseDepth) => l.max_depth += 1,
            Some(Mutant::LooseChildren) => l.max_children += 1,
            _ => {}
        }
        l
    }

    /// Applies the action to the scheduler as written (or as broken by the mutant).
    fn call(&self, t: &mut State, a: &Action) -> Result<Vec<Transition>, &'static str> {
        let m = self.mutant;
        let live = |t: &State, id: &str| {
            t.sched
                .agents
                .get(id)
                .map(|x| x.status)
                .filter(|st| !st.is_terminal())
        };
        let res = match *a {
            Action::Spawn { id, user, by } => {
                if m == Some(Mutant::QueueFullEarly)
                    && t.sched.queued() + 1 >= t.sched.limits.max_queued
                {
                    return Err("queue_full");
                }
                let (parent, parent_depth) = match by {
                    By::Person => (None, 0),
                    By::HumanSession => (Some(HUMAN_SESSION.to_string()), 0),
                    By::Agent(p) => {
                        let pa = &t.sched.agents[p];
                        (pa.session.clone(), pa.depth)
                    }
                };
                let r = t.sched.spawn(Spawn {
                    id: id.to_string(),
                    user: USERS[user].to_string(),
                    parent,
                    parent_depth,
                });
                match (m, &r) {
                    (Some(Mutant::SpawnDrops), Err(e)) if e.code() == "queue_full" => {
                        return Ok(Vec::new());
                    }
                    (Some(Mutant::RefusalLeaks), Err(_)) => t.sched.next_arrival += 1,
                    _ => {}
                }
                r
            }
            Action::Move(id, to) => {
                let cur = t.sched.agents.get(id).map(|x| x.status);
                match (m, cur, to) {
                    (Some(Mutant::TerminalRevives), Some(from), Status::Running)
                        if from.is_terminal() =>
                    {
                        t.sched.agents.get_mut(id).expect("agent").status = Status::Running;
                        return Ok(vec![Transition {
                            id: id.to_string(),
                            from: Some(from),
                            to: Status::Running,
                        }]);
                    }
                    (Some(Mutant::SkipsStarting), Some(Status::Queued), Status::Running) => {
                        t.sched.agents.get_mut(id).expect("agent").status = Status::Running;
                        return Ok(vec![Transition {
                            id: id.to_string(),
                            from: Some(Status::Queued),
                            to: Status::Running,
                        }]);
                    }
                    (Some(Mutant::MoveStartsQueued), Some(Status::Queued), Status::Starting) => {
                        t.sched.agents.get_mut(id).expect("agent").status = Status::Starting;
                        return Ok(vec![Transition {
                            id: id.to_string(),
                            from: Some(Status::Queued),
                            to: Status::Starting,
                        }]);
                    }
                    (Some(Mutant::MoveCancelNoCascade), Some(from), Status::Cancelled)
                        if !from.is_terminal() =>
                    {
                        return Ok(cancel_alone(t, id));
                    }
                    _ => {}
                }
                let r = t.sched.transition(id, to);
                match (m, r) {
                    (Some(Mutant::LazySchedule), Ok(mut ts)) => {
                        undo_starts(t, &mut ts);
                        Ok(ts)
                    }
                    (Some(Mutant::CompletedForgotten), Ok(ts)) if to == Status::Completed => {
                        t.sched.agents.remove(id);
                        Ok(ts)
                    }
                    (_, r) => r,
                }
            }
            Action::Cancel(id) => match m {
                Some(Mutant::CancelNoCascade) if live(t, id).is_some() => Ok(cancel_alone(t, id)),
                Some(Mutant::CancelUnreported) => t.sched.cancel(id).map(|ts| {
                    ts.into_iter()
                        .filter(|tr| tr.id == id || tr.to == Status::Starting)
                        .collect()
                }),
                _ => t.sched.cancel(id),
            },
            Action::CancelChildrenOf(ses) => {
                if m == Some(Mutant::ChildrenOfSkipsEnded) {
                    let kids: Vec<String> = t
                        .sched
                        .agents
                        .values()
                        .filter(|x| x.parent.as_deref() == Some(ses) && !x.status.is_terminal())
                        .map(|x| x.id.clone())
                        .collect();
                    let mut doomed: BTreeSet<String> = BTreeSet::new();
                    for k in kids {
                        doomed.extend(descendants_of_agent(&t.sched, &k));
                        doomed.insert(k);
                    }
                    let mut out = Vec::new();
                    for d in doomed {
                        let a = t.sched.agents.get_mut(&d).expect("agent");
                        if !a.status.is_terminal() {
                            out.push(Transition {
                                id: d,
                                from: Some(a.status),
                                to: Status::Cancelled,
                            });
                            a.status = Status::Cancelled;
                        }
                    }
                    out.extend(t.sched.schedule());
                    Ok(out)
                } else if m == Some(Mutant::ScheduleBetweenCancels) {
                    let kids: Vec<String> = t
                        .sched
                        .agents
                        .values()
                        .filter(|x| x.parent.as_deref() == Some(ses) && !x.status.is_terminal())
                        .map(|x| x.id.clone())
                        .collect();
                    let mut out = Vec::new();
                    for k in kids {
                        if let Ok(ts) = t.sched.cancel(&k) {
                            out.extend(ts);
                        }
                    }
                    Ok(out)
                } else {
                    Ok(t.sched.cancel_children_of(ses))
                }
            }
            Action::Attach(id) => t.sched.attach(id, session_of(id)).map(|()| Vec::new()),
        };
        let mut res = res.map_err(|e| e.code());
        if let (Some(Mutant::Fifo), Ok(ts)) = (m, &mut res) {
            // Redo the call's starts first-come first-served within the scheduler's limits.
            undo_starts(t, ts);
            let l = t.sched.limits;
            loop {
                let pick = t
                    .sched
                    .agents
                    .values()
                    .filter(|x| x.status == Status::Queued && fits(&l, &t.sched, x))
                    .min_by_key(|x| x.arrival)
                    .map(|x| x.id.clone());
                let Some(id) = pick else { break };
                t.sched.agents.get_mut(&id).expect("agent").status = Status::Starting;
                ts.push(Transition {
                    id,
                    from: Some(Status::Queued),
                    to: Status::Starting,
                });
            }
        }
        res
    }
}

impl Model for BackgroundAgents {
    type State = State;
    type Action = Action;

    /// The empty shard, or the seed (its three steps are checked by the run from the empty shard).
    fn init(&self) -> Vec<State> {
        let mut s = State {
            sched: Scheduler::new(self.configured()),
            outcome: Outcome::None,
        };
        if self.seeded {
            for a in SEED {
                s = self.next(&s, &a).expect("the seed's actions are accepted");
            }
        }
        vec![s]
    }

    fn actions(&self, s: &State) -> Vec<Action> {
        let sch = &s.sched;
        let mut v = Vec::new();
        if sch.agents.len() < MAX_AGENTS {
            let id = IDS[sch.agents.len()];
            let mut spawners = vec![By::Person, By::HumanSession];
            spawners.extend(
                sch.agents
                    .values()
                    .filter(|a| {
                        let may = a.status == Status::Running
                            || (self.mutant == Some(Mutant::SpawnFromCancelled)
                                && a.status == Status::Cancelled);
                        may && a.session.is_some()
                    })
                    .map(|a| By::Agent(id_of(&a.id))),
            );
            // Users are interchangeable: a spawn runs for a user already seen or for the first
            // user not seen yet (symmetry reduction).
            let seen = USERS
                .iter()
                .filter(|u| sch.agents.values().any(|a| &a.user == *u))
                .count();
            for by in spawners {
                for user in 0..(seen + 1).min(USERS.len()) {
                    v.push(Action::Spawn { id, user, by });
                }
            }
        }
        // Refusals: a taken id, an unknown agent.
        if !sch.agents.is_empty() {
            v.push(Action::Spawn {
                id: IDS[0],
                user: 1,
                by: By::Person,
            });
        }
        v.extend([
            Action::Move(MISSING, Status::Running),
            Action::Cancel(MISSING),
            Action::Attach(MISSING),
        ]);
        for a in sch.agents.values() {
            let id = id_of(&a.id);
            // Every move, valid or not: Start is Running, Finish is Completed or Failed.
            v.extend(STATUSES.map(|to| Action::Move(id, to)));
            v.push(Action::Cancel(id));
            // The shell attaches an agent's session while it starts or runs.
            if a.status.is_active() && a.session.is_none() {
                v.push(Action::Attach(id));
            }
        }
        // A session ended: its children are cancelled (for a session that never spawned, a no-op).
        let parents: BTreeSet<&str> = sch
            .agents
            .values()
            .filter_map(|a| a.parent.as_deref())
            .collect();
        for p in parents {
            let ses = [HUMAN_SESSION]
                .iter()
                .chain(SESSIONS.iter())
                .find(|x| **x == p)
                .copied()
                .expect("a model session");
            v.push(Action::CancelChildrenOf(ses));
        }
        v
    }

    fn next(&self, s: &State, a: &Action) -> Option<State> {
        let mut t = s.clone();
        match self.call(&mut t, a) {
            Ok(ts) => t.outcome = Outcome::Done(ts),
            Err(code) => {
                // A refusal that changed nothing is no step, except for spawns: their refusal (a
                // stutter) goes to the step properties, which check its reason.
                if t == *s && !matches!(a, Action::Spawn { .. }) {
                    return None;
                }
                t.outcome = Outcome::Refused(code);
            }
        }
        Some(t)
    }

    fn invariants(&self, s: &State) -> Vec<(&'static str, bool)> {
        let l = &self.limits;
        let sch = &s.sched;
        let parents: BTreeSet<&String> = sch
            .agents
            .values()
            .filter_map(|a| a.parent.as_ref())
            .collect();
        let by_session: BTreeMap<&String, &Agent> = sch
            .agents
            .values()
            .filter_map(|a| a.session.as_ref().map(|ses| (ses, a)))
            .collect();
        vec![
            (
                "ConcurrencyLimit",
                active(sch, |_| true) <= l.max_concurrent,
            ),
            (
                "PerUserLimit",
                USERS
                    .iter()
                    .all(|u| active(sch, |a| a.user == *u) <= l.max_per_user),
            ),
            (
                "PerSessionLimit",
                parents
                    .iter()
                    .all(|p| active(sch, |a| a.parent.as_ref() == Some(p)) <= l.max_per_session),
            ),
            ("QueueBound", sch.queued() <= l.max_queued),
            (
                "DepthBound",
                // Within the limit, and one deeper than the agent whose session spawned it.
                sch.agents.values().all(|a| {
                    let want = match a.parent.as_ref().and_then(|p| by_session.get(p)) {
                        Some(pa) => pa.depth + 1,
                        None => 1,
                    };
                    a.depth <= l.max_depth && a.depth == want
                }),
            ),
            (
                "FanOutBound",
                // Children per parent session within the limit, and counted exactly.
                parents.iter().all(|p| {
                    let n = sch
                        .agents
                        .values()
                        .filter(|a| a.parent.as_ref() == Some(p))
                        .count() as u32;
                    n <= l.max_children && sch.spawned.get(*p) == Some(&n)
                }) && sch.spawned.keys().all(|p| parents.contains(p)),
            ),
            (
                "WorkConserving",
                sch.agents
                    .values()
                    .all(|a| a.status != Status::Queued || !fits(l, sch, a)),
            ),
            (
                "NoOrphanAfterCancel",
                sch.agents
                    .values()
                    .filter(|a| a.status == Status::Cancelled)
                    .all(|a| {
                        descendants_of_agent(sch, &a.id)
                            .iter()
                            .all(|d| sch.agents[d].status.is_terminal())
                    }),
            ),
        ]
    }

    fn step_properties(&self, pre: &State, a: &Action, post: &State) -> Vec<(&'static str, bool)> {
        let l = &self.limits;
        let (p, q) = (&pre.sched, &post.sched);
        let (ts, refused): (&[Transition], Option<&str>) = match &post.outcome {
            Outcome::Done(ts) => (ts, None),
            Outcome::Refused(code) => (&[], Some(code)),
            Outcome::None => (&[], None),
        };
        let terminal_final = p
            .agents
            .values()
            .filter(|x| x.status.is_terminal())
            .all(|x| q.agents.get(&x.id).map(|y| y.status) == Some(x.status));
        let valid = ts.iter().all(|tr| valid_move(tr.from, tr.to));
        // Replay the answered transitions over the pre-state: each must start from the status
        // the agent has at that point, every start must be a fair pick at that point, and the
        // replay must end in the post-state's statuses (no silent change).
        let (mut mirror, mut fair) = (true, true);
        if !ts.is_empty() || p != q {
            let mut r = p.clone();
            for tr in ts {
                if r.agents.get(&tr.id).map(|x| x.status) != tr.from {
                    mirror = false;
                    break;
                }
                if tr.from.is_none() {
                    let Some(x) = q.agents.get(&tr.id) else {
                        mirror = false;
                        break;
                    };
                    r.agents.insert(tr.id.clone(), x.clone());
                } else if tr.to == Status::Starting {
                    fair &= fair_pick(l, &r, &r.agents[&tr.id]);
                }
                r.agents.get_mut(&tr.id).expect("replayed").status = tr.to;
            }
            mirror &= r.agents.len() == q.agents.len()
                && r.agents
                    .iter()
                    .zip(&q.agents)
                    .all(|((i, x), (j, y))| i == j && x.status == y.status);
        }
        // An operation never starts an agent that it also ends.
        let started: BTreeSet<&String> = ts
            .iter()
            .filter(|tr| tr.to == Status::Starting)
            .map(|tr| &tr.id)
            .collect();
        let no_wasted_start = ts
            .iter()
            .all(|tr| !(tr.to.is_terminal() && started.contains(&tr.id)));
        // After a cancel, nothing spawned (transitively) from the cancelled agent or from the
        // ended session is waiting or running.
        let all_ended =
            |ids: BTreeSet<String>| ids.iter().all(|d| q.agents[d].status.is_terminal());
        let cascade = match *a {
            _ if refused.is_some() => true,
            Action::Cancel(id) | Action::Move(id, Status::Cancelled) => {
                all_ended(descendants_of_agent(q, id))
            }
            Action::CancelChildrenOf(ses) => {
                all_ended(descendants(q, BTreeSet::from([ses.to_string()])))
            }
            _ => true,
        };
        let refused_unchanged = refused.is_none() || p == q;
        // Every spawn is either refused (and then nothing was added) or its agent is there,
        // reported queued first.
        let answered = match *a {
            Action::Spawn { id, .. } if refused.is_none() => {
                q.agents.contains_key(id)
                    && !p.agents.contains_key(id)
                    && ts.first()
                        == Some(&Transition {
                            id: id.to_string(),
                            from: None,
                            to: Status::Queued,
                        })
            }
            Action::Spawn { id, .. } => q.agents.contains_key(id) == p.agents.contains_key(id),
            _ => true,
        };
        // A spawn is refused exactly when, and for the reason, the scheduler's limits say.
        let spawn_answer = match *a {
            Action::Spawn { id, by, user } => {
                let (parent, depth) = match by {
                    By::Person => (None, 1),
                    By::HumanSession => (Some(HUMAN_SESSION), 1),
                    By::Agent(x) => (p.agents[x].session.as_deref(), p.agents[x].depth + 1),
                };
                let c = &p.limits;
                let children = |s: &str| {
                    p.agents
                        .values()
                        .filter(|x| x.parent.as_deref() == Some(s))
                        .count() as u32
                };
                let want = if p.agents.contains_key(id) {
                    Some("invalid_input")
                } else if depth > c.max_depth {
                    Some("too_deep")
                } else if parent.is_some_and(|s| children(s) >= c.max_children) {
                    Some("too_many_children")
                } else if p.queued() >= c.max_queued && !fits_now(p, USERS[user], parent) {
                    Some("queue_full")
                } else {
                    None
                };
                want == refused
            }
            _ => true,
        };
        // Agents are never removed; who they run for, their parent, depth and arrival never
        // change; only attach sets a session, and never over another one.
        let kept = p.agents.values().all(|x| {
            q.agents.get(&x.id).is_some_and(|y| {
                (&y.user, &y.parent, y.depth, y.arrival) == (&x.user, &x.parent, x.depth, x.arrival)
                    && (y.session == x.session
                        || (matches!(a, Action::Attach(_)) && x.session.is_none()))
            })
        });
        vec![
            ("TerminalIsFinal", terminal_final),
            ("AgentsKept", kept),
            ("ValidTransitions", valid),
            ("TransitionsReportEveryChange", mirror),
            ("FairStarts", fair),
            ("NoStartThenEnd", no_wasted_start),
            ("CancelCascades", cascade),
            ("RefusedChangesNothing", refused_unchanged),
            ("NothingSilentlyDropped", answered),
            ("SpawnRefusedPerLimits", spawn_answer),
        ]
    }
}

/// (name, limits, from the seed, at least this many states: the check cannot be vacuous).
const RUNS: [(&str, Limits, bool, usize); 4] = [
    ("strict", STRICT, false, 15_000),
    ("fair", FAIR, false, 15_000),
    ("strict from the seed", STRICT, true, 4_000),
    ("fair from the seed", FAIR, true, 4_000),
];

/// Bound: 3 users (interchangeable), at most 4 agents, spawned by a person, by a person's hosted
/// session or by a running agent's session; limits STRICT and FAIR; every sequence of up to
/// DEPTH (6) actions from the empty shard and of up to SEED_DEPTH (4) from the seed (3 actions in).
#[test]
fn background_agents_invariants_hold_up_to_bound() {
    for (name, limits, seeded, floor) in RUNS {
        let model = BackgroundAgents {
            limits,
            mutant: None,
            seeded,
        };
        let report = explore(&model, model.depth()).unwrap_or_else(|v| {
            panic!(
                "{name}: invariant {} violated by {:?}",
                v.invariant, v.trace
            )
        });
        println!("BackgroundAgents ({name}): {report:?}");
        assert!(
            report.states > floor,
            "{name}: exploration too small: {report:?}"
        );
        assert_eq!(
            report.depth,
            model.depth(),
            "{name}: the bound was not reached: {report:?}"
        );
    }
}

/// The check is not vacuous: each deliberate bug is caught within the same bounds.
#[test]
fn background_agents_mutants_are_caught() {
    use Mutant::*;
    for (mutant, limits, seeded, invariant) in [
        (LooseConcurrent, STRICT, false, "ConcurrencyLimit"),
        (LoosePerUser, STRICT, false, "PerUserLimit"),
        (LoosePerSession, STRICT, false, "PerSessionLimit"),
        (LooseQueue, STRICT, false, "QueueBound"),
        (LooseDepth, STRICT, true, "DepthBound"),
        (LooseChildren, STRICT, false, "FanOutBound"),
        (CancelNoCascade, STRICT, false, "CancelCascades"),
        (MoveCancelNoCascade, STRICT, false, "CancelCascades"),
        (
            CancelUnreported,
            STRICT,
            false,
            "TransitionsReportEveryChange",
        ),
        (TerminalRevives, STRICT, false, "TerminalIsFinal"),
        (SkipsStarting, STRICT, false, "ValidTransitions"),
        (Fifo, FAIR, false, "FairStarts"),
        (LazySchedule, STRICT, false, "WorkConserving"),
        (SpawnDrops, STRICT, false, "NothingSilentlyDropped"),
        (RefusalLeaks, STRICT, false, "RefusedChangesNothing"),
        (ScheduleBetweenCancels, STRICT, false, "NoStartThenEnd"),
        (MoveStartsQueued, STRICT, false, "PerUserLimit"),
        (ChildrenOfSkipsEnded, STRICT, false, "CancelCascades"),
        (QueueFullEarly, STRICT, false, "SpawnRefusedPerLimits"),
        (CompletedForgotten, STRICT, false, "AgentsKept"),
        (SpawnFromCancelled, STRICT, false, "NoOrphanAfterCancel"),
    ] {
        let model = BackgroundAgents {
            limits,
            mutant: Some(mutant),
            seeded,
        };
        match explore(&model, model.depth()) {
            Ok(r) => panic!("{mutant:?} not caught: {r:?}"),
            Err(v) => assert_eq!(v.invariant, invariant, "{mutant:?}: {:?}", v.trace),
        }
    }
}

/// Whether a new agent of `user` (spawned by `parent`) could start at once under the limits.
fn fits_now(s: &Scheduler, user: &str, parent: Option<&str>) -> bool {
    let l = &s.limits;
    let active = |f: &dyn Fn(&nightshift_core::background::Agent) -> bool| {
        s.agents
            .values()
            .filter(|a| a.status.is_active() && f(a))
            .count() as u32
    };
    active(&|_| true) < l.max_concurrent
        && active(&|a| a.user == user) < l.max_per_user
        && parent.is_none_or(|p| active(&|a| a.parent.as_deref() == Some(p)) < l.max_per_session)
}

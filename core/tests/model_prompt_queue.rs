//! Model check of specs/PromptQueue.tla against the Rust session's prompt queue: order, cancel, stop, nothing lost or run twice, terminal prompts pruned beyond a window.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use nightshift_core::check::{explore, Model};
use nightshift_core::events::EventKind;
use nightshift_core::ids::Identity;
use nightshift_core::queue::PromptStatus;
use nightshift_core::session::{Dirty, Limits, Meta, Session, SessionStatus};

const USERS: [&str; 2] = ["owner", "u1"];
const PROMPTS: [&str; 3] = ["p1", "p2", "p3"];
const MAX_QUEUED: u32 = 2;
const PRIORITIES: [i32; 2] = [0, 1];
/// Depth of the exhaustive exploration (number of actions in a sequence).
const DEPTH: usize = 6;
/// Terminal prompts the session keeps: one, so that pruning is reached early and often (the
/// production window, `queue::terminal_window`, is far beyond three prompts; a window of 2 was
/// also explored once, clean, at three times the cost).
const WINDOW: usize = 1;

/// Transitions that pruned a prompt, so the test can tell the window was reached.
static PRUNING_STEPS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    session: Session,
    /// Ghost: every prompt id ever acknowledged as queued.
    acked: BTreeSet<String>,
    /// Ghost: every prompt id that ever started.
    started: BTreeSet<String>,
    /// Ghost: statuses as reconstructed from events alone.
    view: BTreeMap<String, PromptStatus>,
    /// Ghost: prompts in the order they ended (from events).
    ended: Vec<String>,
    /// Ghost: prompts whose rows were named dirty while the queue no longer held them (deleted).
    pruned: BTreeSet<String>,
}

#[derive(Debug, Clone)]
enum Action {
    Enqueue(usize, usize, i32),
    Cancel(usize, usize),
    Reprioritize(usize, usize, i32),
    Stop(usize),
    Finish(bool),
}

fn ident(u: usize) -> Identity {
    Identity {
        user: USERS[u].into(),
        name: USERS[u].into(),
        email: None,
    }
}

struct PromptQueueModel {
    window: usize,
}

impl Model for PromptQueueModel {
    type State = State;
    type Action = Action;

    fn init(&self) -> Vec<State> {
        let meta = Meta {
            id: "s".into(),
            title: "t".into(),
            repository: None,
            owner: "owner".into(),
            invite: "i".into(),
            created_at: 0,
            status: SessionStatus::Active,
            limits: Limits {
                max_queued: MAX_QUEUED,
                ..Limits::default()
            },
            next_arrival: 0,
            model: None,
            pull_request: None,
            pull_request_action: None,
        };
        let (session, _) = Session::create(meta, &ident(0));
        let mut session = session.with_terminal_window(self.window);
        let _ = session.join(&ident(1), "i", 0);
        session.take_dirty();
        vec![State {
            session,
            acked: BTreeSet::new(),
            started: BTreeSet::new(),
            view: BTreeMap::new(),
            ended: Vec::new(),
            pruned: BTreeSet::new(),
        }]
    }

    fn actions(&self, _s: &State) -> Vec<Action> {
        let mut v = vec![Action::Finish(true), Action::Finish(false)];
        for u in 0..USERS.len() {
            v.push(Action::Stop(u));
            for p in 0..PROMPTS.len() {
                v.push(Action::Cancel(u, p));
                for pr in PRIORITIES {
                    v.push(Action::Enqueue(u, p, pr));
                    v.push(Action::Reprioritize(u, p, pr));
                }
            }
        }
        v
    }

    fn next(&self, s: &State, a: &Action) -> Option<State> {
        let mut t = s.clone();
        // The clock moves on once per prompt that ends (each action ends at most one), so
        // ending times are distinct and in order, and states stay few.
        let now = 1 + s.ended.len() as u64;
        // The shell's prompt ids are fresh (random): a pruned prompt's id is never submitted
        // again. (The queue could not tell it from a new one; a held one it refuses, explored.)
        if let Action::Enqueue(_, p, _) = a {
            if s.pruned.contains(PROMPTS[*p]) {
                return None;
            }
        }
        let res = match a {
            Action::Enqueue(u, p, pr) => t.session.enqueue_prompt(
                &ident(*u),
                PROMPTS[*p].into(),
                "do it".into(),
                *pr,
                None,
                now,
            ),
            Action::Cancel(u, p) => t.session.cancel_prompt(&ident(*u), PROMPTS[*p], now),
            Action::Reprioritize(u, p, pr) => {
                t.session.reprioritize_prompt(&ident(*u), PROMPTS[*p], *pr)
            }
            Action::Stop(u) => t.session.stop_prompt(&ident(*u), now),
            Action::Finish(ok) => {
                let id = t.session.queue.running.clone()?;
                t.session.finish_prompt(&id, *ok, None, now)
            }
        };
        match res {
            Ok(out) => {
                for d in t.session.take_dirty() {
                    if let Dirty::Prompt(id) = d {
                        if !t.session.queue.prompts.contains_key(&id) && t.pruned.insert(id) {
                            PRUNING_STEPS.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // The running prompt chosen must be the best queued one in the pre-state
                // (or, after an enqueue into an idle queue, the new prompt itself).
                if let Some(id) = &out.start {
                    let best = best_queued_after(s, &t, id);
                    assert!(best, "{a:?} started {id} out of order");
                }
                for (_, k) in out.events {
                    match k {
                        EventKind::PromptQueued { prompt } => {
                            t.acked.insert(prompt.id.clone());
                            t.view.insert(prompt.id, PromptStatus::Queued);
                        }
                        EventKind::PromptStarted { id, .. } => {
                            assert!(t.started.insert(id.clone()), "{id} started twice");
                            t.view.insert(id, PromptStatus::Running);
                        }
                        EventKind::PromptCancelled { id } => {
                            t.ended.push(id.clone());
                            t.view.insert(id, PromptStatus::Cancelled);
                        }
                        EventKind::PromptStopped { id } => {
                            t.ended.push(id.clone());
                            t.view.insert(id, PromptStatus::Stopped);
                        }
                        EventKind::PromptFinished { id, ok, .. } => {
                            let st = if ok {
                                PromptStatus::Completed
                            } else {
                                PromptStatus::Failed
                            };
                            t.ended.push(id.clone());
                            t.view.insert(id, st);
                        }
                        _ => {}
                    }
                }
                Some(t)
            }
            Err(_) => {
                let mut after = t.session.clone();
                after.take_dirty();
                assert_eq!(s.session, after, "refused {a:?} changed the state");
                None
            }
        }
    }

    fn invariants(&self, s: &State) -> Vec<(&'static str, bool)> {
        let q = &s.session.queue;
        let running: Vec<_> = q
            .prompts
            .values()
            .filter(|p| p.status == PromptStatus::Running)
            .collect();
        vec![
            ("AtMostOneRunning", running.len() <= 1),
            (
                "RunningMatchesPointer",
                running.first().map(|p| p.id.clone()) == q.running,
            ),
            // Acknowledged prompts are held, or were pruned (and ended: OnlyEndedPruned).
            (
                "NoPromptLost",
                s.acked
                    .iter()
                    .all(|id| q.prompts.contains_key(id) || s.pruned.contains(id)),
            ),
            ("QueueBound", q.queued_count() <= MAX_QUEUED as usize),
            (
                "WorkConserving",
                q.running.is_some() || q.queued_count() == 0,
            ),
            // The statuses rebuilt from events equal the queue's, for every prompt it holds;
            // the log also has every pruned one.
            (
                "EventsMirrorQueue",
                s.view
                    .iter()
                    .filter(|(id, _)| !s.pruned.contains(*id))
                    .map(|(id, status)| (id.clone(), *status))
                    .collect::<BTreeMap<_, _>>()
                    == q.prompts
                        .iter()
                        .map(|(id, p)| (id.clone(), p.status))
                        .collect()
                    && s.pruned.iter().all(|id| s.view.contains_key(id)),
            ),
            ("StartedWereAcked", s.started.is_subset(&s.acked)),
            ("TerminalWindow", q.terminal_count() <= self.window),
            // Only ended prompts leave the queue: queued and running ones are never pruned.
            (
                "OnlyEndedPruned",
                s.pruned
                    .iter()
                    .all(|id| s.view.get(id).is_some_and(|st| st.is_terminal())),
            ),
            // The terminal prompts held are exactly the last `window` that ended.
            (
                "KeepsLastEnded",
                held_terminal(s) == last_ended(s, self.window),
            ),
            // A pruned prompt's row is deleted: it was named dirty when it left the queue.
            (
                "PrunedRowsDeleted",
                s.acked
                    .iter()
                    .filter(|id| !q.prompts.contains_key(*id))
                    .all(|id| s.pruned.contains(id)),
            ),
        ]
    }

    fn step_properties(&self, pre: &State, _a: &Action, post: &State) -> Vec<(&'static str, bool)> {
        // A terminal prompt keeps its status, or is pruned (its events keep it).
        let terminal_final = pre.session.queue.prompts.iter().all(|(id, p)| {
            let now = post.session.queue.prompts.get(id).map(|n| n.status);
            !p.status.is_terminal() || now == Some(p.status) || post.pruned.contains(id)
        });
        // Prompts that started in this step (running now, not before).
        let status = |s: &State, id: &str| s.session.queue.prompts.get(id).map(|p| p.status);
        let newly_running: Vec<&String> = post
            .session
            .queue
            .prompts
            .keys()
            .filter(|id| {
                status(post, id) == Some(PromptStatus::Running)
                    && status(pre, id) != Some(PromptStatus::Running)
            })
            .collect();
        vec![
            ("TerminalIsFinal", terminal_final),
            (
                "NoRunTwice",
                newly_running.iter().all(|id| !pre.started.contains(*id)),
            ),
            (
                "RunsInOrder",
                newly_running
                    .iter()
                    .all(|id| best_queued_after(pre, post, id)),
            ),
        ]
    }
}

/// The terminal prompts the queue holds.
fn held_terminal(s: &State) -> BTreeSet<String> {
    s.session
        .queue
        .prompts
        .values()
        .filter(|p| p.status.is_terminal())
        .map(|p| p.id.clone())
        .collect()
}

/// The last `window` prompts that ended, by the events.
fn last_ended(s: &State, window: usize) -> BTreeSet<String> {
    let from = s.ended.len().saturating_sub(window);
    s.ended[from..].iter().cloned().collect()
}

/// True when `id` is first by (priority desc, arrival asc) among prompts queued in `post` plus itself.
fn best_queued_after(_pre: &State, post: &State, id: &str) -> bool {
    let q = &post.session.queue;
    let Some(chosen) = q.prompts.get(id) else {
        return false;
    };
    q.prompts
        .values()
        .filter(|p| p.status == PromptStatus::Queued)
        .all(|p| {
            p.priority < chosen.priority
                || (p.priority == chosen.priority && p.arrival > chosen.arrival)
        })
}

/// Bound: 2 users, 3 prompt ids, 2 priorities, queue bound 2, a window of 1 terminal prompt,
/// sequences of up to DEPTH actions.
#[test]
fn prompt_queue_invariants_hold_up_to_bound() {
    let model = PromptQueueModel { window: WINDOW };
    let report = explore(&model, DEPTH)
        .unwrap_or_else(|v| panic!("invariant {} violated by {:?}", v.invariant, v.trace));
    println!("PromptQueue: {report:?}");
    assert!(report.states > 1_000, "exploration too small: {report:?}");
    assert_eq!(report.depth, DEPTH, "the bound was not reached: {report:?}");
    let pruning = PRUNING_STEPS.load(Ordering::Relaxed);
    assert!(pruning > 100, "pruning was reached {pruning} times only");
}

//! A small explicit-state model checker: breadth-first exploration of every action sequence up to a bound.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

/// A state machine to explore: its actions, transitions and invariants.
pub trait Model {
    type State: Clone + Eq + Hash + std::fmt::Debug;
    type Action: Clone + std::fmt::Debug;

    fn init(&self) -> Vec<Self::State>;
    fn actions(&self, s: &Self::State) -> Vec<Self::Action>;
    /// Applies an action; `None` when the action is refused (state unchanged).
    fn next(&self, s: &Self::State, a: &Self::Action) -> Option<Self::State>;
    /// Invariants as (name, holds).
    fn invariants(&self, s: &Self::State) -> Vec<(&'static str, bool)>;
    /// Properties of one step (pre, action, post), such as "terminal states stay terminal".
    fn step_properties(
        &self,
        _pre: &Self::State,
        _a: &Self::Action,
        _post: &Self::State,
    ) -> Vec<(&'static str, bool)> {
        Vec::new()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub states: usize,
    pub transitions: usize,
    pub depth: usize,
}

/// A broken invariant with the action trace that reaches it.
#[derive(Debug, Clone)]
pub struct Violation<A> {
    pub invariant: &'static str,
    pub trace: Vec<A>,
}

/// Explores all states reachable in at most `depth` actions, checking every invariant.
pub fn explore<M: Model>(model: &M, depth: usize) -> Result<Report, Violation<M::Action>> {
    let mut seen: HashSet<M::State> = HashSet::new();
    let mut frontier: VecDeque<(M::State, Vec<M::Action>)> = VecDeque::new();
    let mut transitions = 0usize;
    for s in model.init() {
        check_state(model, &s, &[])?;
        if seen.insert(s.clone()) {
            frontier.push_back((s, Vec::new()));
        }
    }
    while let Some((s, trace)) = frontier.pop_front() {
        if trace.len() >= depth {
            continue;
        }
        for a in model.actions(&s) {
            let Some(t) = model.next(&s, &a) else {
                continue;
            };
            transitions += 1;
            let mut tr = trace.clone();
            tr.push(a.clone());
            for (name, ok) in model.step_properties(&s, &a, &t) {
                if !ok {
                    return Err(Violation {
                        invariant: name,
                        trace: tr,
                    });
                }
            }
            check_state(model, &t, &tr)?;
            if seen.insert(t.clone()) {
                frontier.push_back((t, tr));
            }
        }
    }
    Ok(Report {
        states: seen.len(),
        transitions,
        depth,
    })
}

fn check_state<M: Model>(
    model: &M,
    s: &M::State,
    trace: &[M::Action],
) -> Result<(), Violation<M::Action>> {
    for (name, ok) in model.invariants(s) {
        if !ok {
            return Err(Violation {
                invariant: name,
                trace: trace.to_vec(),
            });
        }
    }
    Ok(())
}

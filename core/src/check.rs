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
    /// The deepest level reached: the most actions in any trace explored. Equal to the bound
    /// when states were still being found at the bound; below it when the state space was
    /// exhausted first (every reachable state was checked).
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
    let mut deepest = 0usize;
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
                deepest = deepest.max(tr.len());
                frontier.push_back((t, tr));
            }
        }
    }
    Ok(Report {
        states: seen.len(),
        transitions,
        depth: deepest,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter from 0 that may step up by one until `top`, with an invariant `n != bad`.
    struct Counter {
        top: u32,
        bad: u32,
    }

    impl Model for Counter {
        type State = u32;
        type Action = ();
        fn init(&self) -> Vec<u32> {
            vec![0]
        }
        fn actions(&self, _s: &u32) -> Vec<()> {
            vec![()]
        }
        fn next(&self, s: &u32, _a: &()) -> Option<u32> {
            (*s < self.top).then_some(s + 1)
        }
        fn invariants(&self, s: &u32) -> Vec<(&'static str, bool)> {
            vec![("NotBad", *s != self.bad)]
        }
        // No step properties: the trait's default (none) is used.
    }

    #[test]
    fn the_report_gives_the_deepest_level_reached() {
        let r = explore(&Counter { top: 3, bad: 99 }, 10).expect("holds");
        assert_eq!(
            r,
            Report {
                states: 4,
                transitions: 3,
                depth: 3
            },
            "exhausted below the bound"
        );
        let r = explore(&Counter { top: 30, bad: 99 }, 5).expect("holds");
        assert_eq!(
            r,
            Report {
                states: 6,
                transitions: 5,
                depth: 5
            },
            "cut at the bound"
        );
    }

    #[test]
    fn a_violation_carries_its_shortest_trace() {
        let v = explore(&Counter { top: 30, bad: 2 }, 5).expect_err("2 is reached");
        assert_eq!((v.invariant, v.trace.len()), ("NotBad", 2));
        assert!(
            explore(&Counter { top: 30, bad: 6 }, 5).is_ok(),
            "beyond the bound"
        );
        assert!(
            explore(&Counter { top: 30, bad: 0 }, 5).is_err(),
            "initial states are checked"
        );
    }
}

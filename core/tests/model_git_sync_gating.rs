//! Model check of specs/GitSyncGating.tla against the Rust gate: reads never wait, writes only after sync, no re-sync after a write.

use nightshift_core::check::{explore, Model};
use nightshift_core::gating::{Decision, Gate, SyncState};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    gate: Gate,
    /// Ghost: the last tool decision (tool, allowed, synced when decided, message).
    last: Option<(&'static str, bool, bool, String)>,
}

#[derive(Debug, Clone)]
enum Action {
    StartSync,
    Synced(&'static str),
    Fail,
    Tool(&'static str),
}

const TOOLS: [&str; 6] = ["read", "grep", "write", "edit", "bash", "spawn_session"];

struct Gating;

impl Model for Gating {
    type State = State;
    type Action = Action;

    fn init(&self) -> Vec<State> {
        vec![State {
            gate: Gate::default(),
            last: None,
        }]
    }

    fn actions(&self, _s: &State) -> Vec<Action> {
        let mut v = vec![
            Action::StartSync,
            Action::Synced("c1"),
            Action::Synced("c2"),
            Action::Fail,
        ];
        v.extend(TOOLS.iter().map(|t| Action::Tool(t)));
        v
    }

    fn next(&self, s: &State, a: &Action) -> Option<State> {
        let mut t = s.clone();
        let changed = match a {
            Action::StartSync => t.gate.start_sync(),
            Action::Synced(c) => t.gate.synced(c),
            Action::Fail => t.gate.failed("network"),
            Action::Tool(tool) => {
                let synced = matches!(t.gate.sync, SyncState::Synced { .. });
                let (allowed, msg) = match t.gate.check(tool) {
                    Decision::Allow => (true, String::new()),
                    Decision::Block { message } => (false, message),
                };
                t.last = Some((tool, allowed, synced, msg));
                true
            }
        };
        if !changed {
            assert_eq!(s.gate, t.gate, "refused {a:?} changed the gate");
            return None;
        }
        Some(t)
    }

    fn invariants(&self, s: &State) -> Vec<(&'static str, bool)> {
        let (reads_free, writes_after_sync, blocks_explain) = match &s.last {
            None => (true, true, true),
            Some((tool, allowed, synced, msg)) => {
                let write = ["write", "edit", "bash"].contains(tool);
                (
                    write || *allowed,
                    !write || !*allowed || *synced,
                    *allowed || (msg.contains("Blocked") && msg.contains(tool)),
                )
            }
        };
        vec![
            ("ReadsNeverBlocked", reads_free),
            ("NoWriteBeforeSync", writes_after_sync),
            ("BlockedWritesExplain", blocks_explain),
            (
                "NoResyncAfterWrite",
                !s.gate.wrote || matches!(s.gate.sync, SyncState::Synced { .. }),
            ),
        ]
    }

    fn step_properties(&self, pre: &State, _a: &Action, post: &State) -> Vec<(&'static str, bool)> {
        // Once synced and written, the synced commit never changes.
        let stable = match (&pre.gate.sync, pre.gate.wrote) {
            (SyncState::Synced { commit }, true) => {
                post.gate.sync
                    == SyncState::Synced {
                        commit: commit.clone(),
                    }
            }
            _ => true,
        };
        vec![("SyncedCheckoutStable", stable)]
    }
}

/// Bound: every sequence of up to 10 actions over 6 tools and 2 commits.
#[test]
fn git_sync_gating_invariants_hold_up_to_bound() {
    let report = explore(&Gating, 10)
        .unwrap_or_else(|v| panic!("invariant {} violated by {:?}", v.invariant, v.trace));
    println!("GitSyncGating: {report:?}");
    assert!(report.states > 20, "exploration too small: {report:?}");
}

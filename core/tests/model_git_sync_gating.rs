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

/// The tools that can change the checkout, written out here independently of
/// `gating::WRITE_TOOLS` (the invariants judge the gate against this list, not its own).
const WRITES: [&str; 6] = ["write", "edit", "patch", "multiedit", "apply_patch", "bash"];
/// Every write tool, some reads, an agent tool and one tool the gate has never heard of.
const TOOLS: [&str; 10] = [
    "read",
    "grep",
    "write",
    "edit",
    "patch",
    "multiedit",
    "apply_patch",
    "bash",
    "spawn_session",
    "frobnicate",
];

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
        // A sync step the gate accepts always moves it (the supervisor answers 409 otherwise).
        if !matches!(a, Action::Tool(_)) {
            assert_ne!(s.gate, t.gate, "accepted {a:?} changed nothing");
        }
        Some(t)
    }

    fn invariants(&self, s: &State) -> Vec<(&'static str, bool)> {
        let (reads_free, writes_after_sync, blocks_explain) = match &s.last {
            None => (true, true, true),
            Some((tool, allowed, synced, msg)) => {
                let write = WRITES.contains(tool);
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

/// Bound: every sequence of up to 10 actions over 10 tools (all six write tools, three others and
/// one unknown) and 2 commits. The state space is exhausted well before the bound: the search
/// ends with no new state left (its deepest level is below 10), so every reachable state was checked.
#[test]
fn git_sync_gating_invariants_hold_up_to_bound() {
    let report = explore(&Gating, 10)
        .unwrap_or_else(|v| panic!("invariant {} violated by {:?}", v.invariant, v.trace));
    println!("GitSyncGating: {report:?}");
    // Every reachable pair of gate (sync state, commit, wrote) and last decision: 115 states.
    assert!(report.states > 100, "exploration too small: {report:?}");
    assert!(
        report.depth < 10,
        "not exhausted within the bound: {report:?}"
    );
}

/// Every write tool is blocked before the sync and allowed after it; every other tool (an unknown
/// one included) is allowed at once.
#[test]
fn each_tool_is_classified_as_the_independent_list_says() {
    for tool in TOOLS {
        let mut g = Gate::default();
        let before = g.check(tool) == Decision::Allow;
        assert_eq!(before, !WRITES.contains(&tool), "{tool} before the sync");
        assert!(g.start_sync() && g.synced("c1"));
        assert_eq!(g.check(tool), Decision::Allow, "{tool} after the sync");
    }
}

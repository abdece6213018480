//! Model check of specs/HostedAgent.tla against the Rust session state machine (sessions, membership, client limits, edit locks, status).

use std::collections::BTreeMap;

use nightshift_core::check::{explore, Model};
use nightshift_core::events::EventKind;
use nightshift_core::ids::{Identity, Role};
use nightshift_core::session::{Limits, Meta, Session, SessionStatus};

const USERS: [&str; 3] = ["owner", "u1", "u2"];
const CLIENTS: [&str; 3] = ["c1", "c2", "c3"];
/// Depth of the exhaustive exploration (number of actions in a sequence).
const DEPTH: usize = 6;
const RESOURCES: [&str; 2] = ["repo", "src/main.rs"];
const MAX_CLIENTS: u32 = 2;
const MAX_TIME: u64 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    session: Session,
    now: u64,
    /// Ghost: lock holders as reconstructed from the emitted events alone.
    lock_view: BTreeMap<String, String>,
    /// Ghost: members as reconstructed from the emitted events alone.
    member_view: BTreeMap<String, Role>,
}

#[derive(Debug, Clone)]
enum Action {
    Join(usize, bool),
    Leave(usize),
    Connect(usize, usize),
    Disconnect(usize),
    Heartbeat(usize, usize),
    Acquire(usize, usize, u64),
    Release(usize, usize),
    Tick,
    Sweep,
    End(usize),
}

fn ident(u: usize) -> Identity {
    Identity {
        user: USERS[u].into(),
        name: USERS[u].to_uppercase(),
        email: None,
    }
}

struct HostedAgent;

impl Model for HostedAgent {
    type State = State;
    type Action = Action;

    fn init(&self) -> Vec<State> {
        let limits = Limits {
            max_clients_per_user: MAX_CLIENTS,
            max_members: 3,
            max_lock_ttl_ms: 2,
            heartbeat_timeout_ms: 2,
            ..Limits::default()
        };
        let meta = Meta {
            id: "s".into(),
            title: "t".into(),
            repository: None,
            owner: "owner".into(),
            invite: "secret".into(),
            created_at: 0,
            status: SessionStatus::Active,
            limits,
            next_arrival: 0,
            model: None,
            pull_request: None,
            pull_request_action: None,
        };
        let (mut session, out) = Session::create(meta, &ident(0));
        session.take_dirty();
        let mut st = State {
            session,
            now: 0,
            lock_view: BTreeMap::new(),
            member_view: BTreeMap::new(),
        };
        apply_events(
            &mut st,
            &out.events.into_iter().map(|e| e.1).collect::<Vec<_>>(),
        );
        vec![st]
    }

    fn actions(&self, _s: &State) -> Vec<Action> {
        let mut v = vec![Action::Tick, Action::Sweep];
        for u in 0..USERS.len() {
            v.push(Action::Join(u, true));
            v.push(Action::Join(u, false));
            v.push(Action::Leave(u));
            v.push(Action::End(u));
            for c in 0..CLIENTS.len() {
                v.push(Action::Connect(u, c));
                v.push(Action::Heartbeat(u, c));
            }
            for r in 0..RESOURCES.len() {
                v.push(Action::Acquire(u, r, 2));
                v.push(Action::Release(u, r));
            }
        }
        for c in 0..CLIENTS.len() {
            v.push(Action::Disconnect(c));
        }
        v
    }

    fn next(&self, s: &State, a: &Action) -> Option<State> {
        let mut t = s.clone();
        let now = t.now;
        let res = match a {
            Action::Join(u, good) => {
                t.session
                    .join(&ident(*u), if *good { "secret" } else { "wrong" }, now)
            }
            Action::Leave(u) => t.session.leave(&ident(*u)),
            Action::Connect(u, c) => t.session.connect(&ident(*u), CLIENTS[*c], "web", now),
            Action::Disconnect(c) => Ok(t.session.disconnect(CLIENTS[*c])),
            Action::Heartbeat(u, c) => t.session.heartbeat(&ident(*u), CLIENTS[*c], now),
            Action::Acquire(u, r, ttl) => {
                t.session.acquire_lock(&ident(*u), RESOURCES[*r], *ttl, now)
            }
            Action::Release(u, r) => t.session.release_lock(&ident(*u), RESOURCES[*r]),
            Action::Tick => {
                if t.now >= MAX_TIME {
                    return None;
                }
                t.now += 1;
                Ok(Default::default())
            }
            Action::Sweep => Ok(t.session.sweep(now)),
            Action::End(u) => t.session.end(&ident(*u), now),
        };
        match res {
            Ok(out) => {
                t.session.take_dirty();
                let kinds: Vec<EventKind> = out.events.into_iter().map(|e| e.1).collect();
                apply_events(&mut t, &kinds);
                Some(t)
            }
            Err(_) => {
                // A refused command must leave the state exactly as it was.
                let mut unchanged = s.session.clone();
                let mut after = t.session.clone();
                unchanged.take_dirty();
                after.take_dirty();
                assert_eq!(unchanged, after, "refused {a:?} changed the state");
                None
            }
        }
    }

    fn invariants(&self, s: &State) -> Vec<(&'static str, bool)> {
        let ses = &s.session;
        let owners: Vec<_> = ses
            .members
            .values()
            .filter(|m| m.role == Role::Owner)
            .collect();
        vec![
            (
                "ExactlyOneOwner",
                owners.len() == 1 && owners[0].user == ses.meta.owner,
            ),
            (
                "ClientsBelongToMembers",
                ses.clients
                    .values()
                    .all(|c| ses.members.contains_key(&c.user)),
            ),
            (
                "ClientLimit",
                USERS
                    .iter()
                    .all(|u| ses.clients_of(u) <= MAX_CLIENTS as usize),
            ),
            (
                "LockHoldersAreMembers",
                ses.locks
                    .values()
                    .all(|l| ses.members.contains_key(&l.holder)),
            ),
            (
                "EventsMirrorLocks",
                s.lock_view
                    == ses
                        .locks
                        .iter()
                        .map(|(r, l)| (r.clone(), l.holder.clone()))
                        .collect(),
            ),
            (
                "EventsMirrorMembers",
                s.member_view
                    == ses
                        .members
                        .iter()
                        .map(|(u, m)| (u.clone(), m.role))
                        .collect(),
            ),
        ]
    }

    fn step_properties(&self, pre: &State, a: &Action, post: &State) -> Vec<(&'static str, bool)> {
        // Single writer: a lock passes to another holder only when its previous holder's lease
        // ran out. A release (by the holder, or forced by the owner) or the holder leaving frees
        // it: the lock is absent afterwards, never handed straight to someone else.
        let single_writer =
            pre.session
                .locks
                .iter()
                .all(|(r, l)| match post.session.locks.get(r) {
                    Some(n) if n.holder != l.holder => {
                        l.expires_at <= pre.now
                            && !matches!(a, Action::Release(..) | Action::Leave(_))
                    }
                    _ => true,
                })
                && match a {
                    // An accepted release leaves the resource unlocked.
                    Action::Release(_, r) => !post.session.locks.contains_key(RESOURCES[*r]),
                    // Whoever left holds nothing any more.
                    Action::Leave(u) => post.session.locks.values().all(|l| l.holder != USERS[*u]),
                    _ => true,
                };
        // A sweep at time t leaves no lock whose lease ended by t and no client silent for the
        // whole timeout, and removes nothing else.
        let timeout = pre.session.meta.limits.heartbeat_timeout_ms;
        let sweep_clears = !matches!(a, Action::Sweep)
            || (post.session.clients.keys().collect::<Vec<_>>()
                == pre
                    .session
                    .clients
                    .values()
                    .filter(|c| c.last_seen + timeout > pre.now)
                    .map(|c| &c.id)
                    .collect::<Vec<_>>()
                && post.session.locks.keys().collect::<Vec<_>>()
                    == pre
                        .session
                        .locks
                        .values()
                        .filter(|l| l.expires_at > pre.now)
                        .map(|l| &l.resource)
                        .collect::<Vec<_>>());
        vec![
            ("SingleWriter", single_writer),
            ("SweepClears", sweep_clears),
            (
                "EndedIsFinal",
                pre.session.meta.status != SessionStatus::Ended
                    || post.session.meta.status == SessionStatus::Ended,
            ),
            (
                "EndedRefusesWork",
                pre.session.meta.status != SessionStatus::Ended
                    || !matches!(a, Action::Join(..) | Action::Acquire(..))
                    || pre.session == post.session,
            ),
        ]
    }
}

fn apply_events(t: &mut State, kinds: &[EventKind]) {
    for k in kinds {
        match k {
            EventKind::LockAcquired {
                resource, holder, ..
            } => {
                if let Some(prev) = t.lock_view.get(resource) {
                    assert_eq!(
                        prev, holder,
                        "lock.acquired over a live holder without a release event"
                    );
                }
                t.lock_view.insert(resource.clone(), holder.clone());
            }
            EventKind::LockReleased { resource, .. } => {
                t.lock_view.remove(resource);
            }
            EventKind::MemberJoined { user, role, .. } => {
                t.member_view.insert(user.clone(), *role);
            }
            EventKind::MemberLeft { user } => {
                t.member_view.remove(user);
            }
            _ => {}
        }
    }
}

/// Bound: 3 users, 3 client ids, 2 resources, 4 time steps, sequences of up to DEPTH actions.
#[test]
fn hosted_agent_invariants_hold_up_to_bound() {
    let report = explore(&HostedAgent, DEPTH)
        .unwrap_or_else(|v| panic!("invariant {} violated by {:?}", v.invariant, v.trace));
    println!("HostedAgent: {report:?}");
    assert!(report.states > 5_000, "exploration too small: {report:?}");
    assert_eq!(report.depth, DEPTH, "the bound was not reached: {report:?}");
}

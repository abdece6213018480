//! Model check of the hosted session (core/src/hosted.rs): prompts, the sandbox link, spawns, losses and retirements, explored exhaustively against ghosts.
//!
//! Checked (names as in `specs/SandboxLink.tla`):
//! - `RunningPromptProgresses`: a running prompt always has something that moves it on — a live
//!   sandbox (whose heartbeat, grace or spawn poll is a deadline), a provider answer being
//!   awaited, or a retry deadline. With the alarm firing at its deadline, this is the bounded
//!   form of "a running prompt always ends": within one heartbeat timeout plus grace of its
//!   sandbox going silent, the prompt has ended or moved to a new sandbox
//!   (`SilentSandboxEndsWithinDeadline`).
//! - `RetiredSandboxNeverChangesQueue`: a frame from a retired link generation changes neither
//!   the queue nor the event log.
//! - `AckedEventsStoredOnceInOrder`: every event number the session acknowledges was sent, the
//!   events stored carry increasing numbers with none twice, and an acknowledgement never comes
//!   before the store of what it acknowledges.
//! - `FailedSpawnFailsOnePrompt`: one provider failure ends at most one prompt.

use nightshift_core::check::{explore, Model};
use nightshift_core::events::EventKind;
use nightshift_core::hosted::{
    DownFrame, Effect, Entropy, HostedSession, Input, LinkTiming, SandboxOp, SpawnAnswer,
};
use nightshift_core::ids::Identity;
use nightshift_core::sandbox::{AgentEvent, SandboxMessage, Stage};
use nightshift_core::session::{Limits, Meta, Session, SessionStatus};
use nightshift_core::signing::sha256_hex;

const TIMING: LinkTiming = LinkTiming {
    heartbeat_timeout_ms: 4,
    grace_ms: 2,
};
const PROMPTS: u32 = 2;
const DEPTH: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Tokens(u32);

impl Entropy for Tokens {
    fn token(&mut self) -> String {
        self.0 += 1;
        format!("t{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    hosted: HostedSession,
    now: u64,
    tokens: Tokens,
    enqueued: u32,
    /// Link generations whose spawn the provider has not answered yet.
    spawning: Vec<String>,
    /// Stopped sandboxes whose start the provider has not answered yet.
    starting: Vec<String>,
    /// The link generation the sandbox's socket is open for, if any.
    socket: Option<String>,
    /// Every link generation that was once the session's and is no longer (ghost).
    retired: Vec<String>,
    /// Ghost sandbox: the highest event number it sent on the current socket's generation.
    sent: u64,
    /// Ghost: the highest number acknowledged, and the numbers stored, for the current generation.
    acked: u64,
    stored: Vec<u64>,
    /// The prompt the sandbox was last given (from `prompt` frames).
    given: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Action {
    Prompt,
    Stop,
    Created,
    Refused,
    Started(bool),
    Connect,
    Close,
    /// The sandbox sends its next event: text (false) or done (true) of the prompt it was given.
    Send(bool),
    /// The sandbox resends from the last acknowledged number (a reconnect).
    Resend,
    /// A number is skipped (a gap).
    Skip,
    /// A frame arrives on a socket of a retired generation.
    Retired,
    StopSandbox,
    /// Time passes by this much, and the alarm rings if it is due.
    Tick(u64),
    Typing,
}

fn alice() -> Identity {
    Identity {
        user: "alice".into(),
        name: "Alice".into(),
        email: None,
    }
}

struct SandboxLinkModel;

impl SandboxLinkModel {
    /// Applies the effects to the ghosts; false when an acknowledgement names an unsent number.
    fn observe(st: &mut State, effects: &[Effect]) -> bool {
        let mut in_order = true;
        for e in effects {
            match e {
                Effect::Store { events, .. } => {
                    st.stored
                        .extend(events.iter().filter_map(|(_, kind)| number(kind)));
                }
                Effect::Spawn { token, .. } => st.spawning.push(sha256_hex(token.as_bytes())),
                Effect::StartStopped { sandbox } => st.starting.push(sandbox.clone()),
                Effect::ToSandbox(DownFrame::Ack { n }) => {
                    in_order &= *n <= st.sent;
                    st.acked = st.acked.max(*n);
                }
                Effect::ToSandbox(DownFrame::Prompt { prompt }) => {
                    st.given = Some(prompt.id.clone())
                }
                Effect::CloseSandbox(_) => st.socket = None,
                Effect::Refuse { link } if st.socket.as_ref() == Some(link) => st.socket = None,
                _ => {}
            }
        }
        in_order
    }
}

/// The event number a stored event carries (the model's sandbox puts it in the text or reason).
fn number(kind: &EventKind) -> Option<u64> {
    match kind {
        EventKind::AgentText { text, .. } => text.parse().ok(),
        EventKind::PromptFinished {
            reason: Some(r), ..
        } => r.strip_prefix("n=").and_then(|n| n.parse().ok()),
        _ => None,
    }
}

impl Model for SandboxLinkModel {
    type State = State;
    type Action = Action;

    fn init(&self) -> Vec<State> {
        let meta = Meta {
            id: "s".into(),
            title: "t".into(),
            repository: Some("acme/app".into()),
            owner: "alice".into(),
            invite: "i".into(),
            created_at: 0,
            status: SessionStatus::Active,
            limits: Limits::default(),
            next_arrival: 0,
            model: None,
            pull_request: None,
            pull_request_action: None,
        };
        let (mut session, _) = Session::create(meta, &alice());
        session.take_dirty();
        vec![State {
            hosted: HostedSession::new(session, None, TIMING, true),
            now: 0,
            tokens: Tokens(0),
            enqueued: 0,
            spawning: Vec::new(),
            starting: Vec::new(),
            socket: None,
            retired: Vec::new(),
            sent: 0,
            acked: 0,
            stored: Vec::new(),
            given: None,
        }]
    }

    fn actions(&self, st: &State) -> Vec<Action> {
        let mut out = vec![Action::Tick(1), Action::Tick(TIMING.heartbeat_timeout_ms)];
        if st.enqueued < PROMPTS {
            out.push(Action::Prompt);
        }
        if st.hosted.session.queue.running.is_some() {
            out.push(Action::Stop);
        }
        if !st.spawning.is_empty() {
            out.extend([Action::Created, Action::Refused]);
        }
        if !st.starting.is_empty() {
            out.extend([Action::Started(true), Action::Started(false)]);
        }
        if st.socket.is_none() && st.hosted.link.as_ref().is_some_and(|l| l.sandbox.is_some()) {
            out.push(Action::Connect);
        }
        if st.socket.is_some() {
            out.extend([
                Action::Close,
                Action::Send(false),
                Action::Send(true),
                Action::Resend,
                Action::Skip,
            ]);
        }
        if !st.retired.is_empty() {
            out.push(Action::Retired);
        }
        if st.hosted.link.as_ref().is_some_and(|l| l.sandbox.is_some()) {
            out.push(Action::StopSandbox);
        }
        out.push(Action::Typing);
        out
    }

    fn next(&self, pre: &State, a: &Action) -> Option<State> {
        let mut st = pre.clone();
        let mut tokens = st.tokens.clone();
        let now = st.now;
        let effects = match a {
            Action::Prompt => {
                st.enqueued += 1;
                let id = format!("p{}", st.enqueued);
                st.hosted
                    .command(now, &mut tokens, |s, now| {
                        s.enqueue_prompt(&alice(), id.clone(), id, 0, None, now)
                    })
                    .ok()?
            }
            Action::Stop => st
                .hosted
                .command(now, &mut tokens, |s, now| s.stop_prompt(&alice(), now))
                .ok()?,
            Action::Created | Action::Refused => {
                let link = st.spawning.remove(0);
                let answer = if *a == Action::Created {
                    SpawnAnswer::Created {
                        sandbox: format!("sbx_{link:.6}"),
                        expires_at: None,
                        how: "started".into(),
                    }
                } else {
                    SpawnAnswer::Failed {
                        message: "down".into(),
                    }
                };
                st.hosted
                    .handle(Input::Spawned { link, answer }, now, &mut tokens)
            }
            Action::Started(ok) => {
                let sandbox = st.starting.remove(0);
                st.hosted
                    .handle(Input::Started { sandbox, ok: *ok }, now, &mut tokens)
            }
            Action::Connect => {
                let token = format!("t{}", tokens.0);
                let link = st.hosted.admit(&token).ok()?;
                if st.hosted.link.as_ref().map(|l| &l.token_hash) != Some(&link) {
                    return None;
                }
                st.socket = Some(link);
                // A (re)connected sandbox resends from what the session says it stored.
                st.sent = st.hosted.link.as_ref().map_or(0, |l| l.last_n);
                if st.hosted.link.as_ref().is_some_and(|l| l.last_n == 0) {
                    st.acked = 0;
                    st.stored.clear();
                }
                st.hosted.handle(Input::SandboxConnected, now, &mut tokens)
            }
            Action::Close => {
                let link = st.socket.take()?;
                st.hosted
                    .handle(Input::SandboxClosed { link }, now, &mut tokens)
            }
            Action::Send(_) | Action::Skip => {
                let link = st.socket.clone()?;
                let prompt = st.given.clone()?;
                let n = st.sent + if *a == Action::Skip { 2 } else { 1 };
                if n > 4 {
                    return None;
                }
                st.sent = n;
                let event = if matches!(a, Action::Send(true)) {
                    AgentEvent::Done {
                        prompt,
                        ok: true,
                        reason: Some(format!("n={n}")),
                        branch: None,
                        commit: None,
                        patch: None,
                    }
                } else {
                    AgentEvent::Text {
                        prompt,
                        text: n.to_string(),
                    }
                };
                let message = SandboxMessage::Events(vec![(n, event)]);
                st.hosted
                    .handle(Input::SandboxFrame { link, message }, now, &mut tokens)
            }
            Action::Resend => {
                let link = st.socket.clone()?;
                let prompt = st.given.clone()?;
                let n = st.acked.max(1);
                if n > st.sent {
                    return None;
                }
                let event = AgentEvent::Text {
                    prompt,
                    text: n.to_string(),
                };
                let message = SandboxMessage::Events(vec![(n, event)]);
                st.hosted
                    .handle(Input::SandboxFrame { link, message }, now, &mut tokens)
            }
            Action::Retired => {
                // The worst an old sandbox can do: finish the prompt that runs now.
                let link = st.retired.first()?.clone();
                let prompt = st.hosted.session.queue.running.clone()?;
                let event = AgentEvent::Done {
                    prompt,
                    ok: true,
                    reason: Some("n=99".into()),
                    branch: None,
                    commit: None,
                    patch: None,
                };
                let message = SandboxMessage::Events(vec![(1, event)]);
                st.hosted
                    .handle(Input::SandboxFrame { link, message }, now, &mut tokens)
            }
            Action::StopSandbox => {
                let sandbox = st.hosted.link.as_ref().and_then(|l| l.sandbox.clone());
                st.hosted.authorize(
                    "alice",
                    sandbox.as_deref(),
                    SandboxOp::Stop,
                    now,
                    &mut tokens,
                )
            }
            Action::Tick(ms) => {
                st.now += ms;
                if st.now > 12 {
                    return None;
                }
                match st.hosted.next_deadline() {
                    Some(t) if t <= st.now => st.hosted.handle(Input::Alarm, st.now, &mut tokens),
                    _ => Vec::new(),
                }
            }
            Action::Typing => st.hosted.handle(Input::Typing, now, &mut tokens),
        };
        st.tokens = tokens;
        if !SandboxLinkModel::observe(&mut st, &effects) {
            st.acked = u64::MAX;
        }
        // A generation that was live and was replaced, lost or failed is retired for good (a
        // stopped sandbox is only paused: started again, it is the same sandbox); its socket (if
        // the session did not close it) is gone with it.
        let live = |s: &State| {
            s.hosted
                .link
                .as_ref()
                .filter(|l| l.stage.is_live() || l.stage == Stage::Stopped)
                .map(|l| l.token_hash.clone())
        };
        if let Some(old) = live(pre) {
            if live(&st).as_ref() != Some(&old) && !st.retired.contains(&old) {
                st.retired.push(old.clone());
                if st.socket.as_ref() == Some(&old) {
                    st.socket = None;
                }
            }
        }
        Some(st)
    }

    fn invariants(&self, st: &State) -> Vec<(&'static str, bool)> {
        let h = &st.hosted;
        let running = h.session.queue.running.is_some();
        let link = h.link.as_ref();
        let awaited = link.is_some_and(|l| st.spawning.contains(&l.token_hash))
            || link.is_some_and(|l| l.sandbox.as_ref().is_some_and(|s| st.starting.contains(s)));
        let progresses = !running || h.next_deadline().is_some() || awaited;
        let increasing = st.stored.windows(2).all(|w| w[0] < w[1]);
        vec![
            ("RunningPromptProgresses", progresses),
            (
                "AckedEventsStoredOnceInOrder",
                increasing && st.acked != u64::MAX,
            ),
        ]
    }

    fn step_properties(&self, pre: &State, a: &Action, post: &State) -> Vec<(&'static str, bool)> {
        let unchanged = pre.hosted.session == post.hosted.session;
        let finished = |s: &State| {
            s.hosted
                .session
                .queue
                .prompts
                .values()
                .filter(|p| p.status.is_terminal())
                .count()
        };
        let mut out = vec![(
            "RetiredSandboxNeverChangesQueue",
            *a != Action::Retired || unchanged,
        )];
        if *a == Action::Refused {
            out.push((
                "FailedSpawnFailsOnePrompt",
                finished(post) <= finished(pre) + 1,
            ));
        }
        // Bounded response: the alarm at a silent sandbox's deadline ends its prompt or hands
        // the prompt to a new sandbox.
        if let Action::Tick(_) = a {
            let was_silent = pre.hosted.link.as_ref().is_some_and(|l| {
                l.stage.is_live()
                    && l.stage != Stage::Spawning
                    && l.is_lost(post.now, TIMING.heartbeat_timeout_ms, TIMING.grace_ms)
            });
            if was_silent {
                let same_prompt_same_link = pre.hosted.session.queue.running.is_some()
                    && pre.hosted.session.queue.running == post.hosted.session.queue.running
                    && pre.hosted.link.as_ref().map(|l| &l.token_hash)
                        == post.hosted.link.as_ref().map(|l| &l.token_hash);
                out.push(("SilentSandboxEndsWithinDeadline", !same_prompt_same_link));
            }
        }
        out
    }
}

#[test]
fn the_hosted_session_keeps_its_prompts_moving_and_its_events_in_order() {
    let report = explore(&SandboxLinkModel, DEPTH).unwrap_or_else(|v| {
        panic!("{} violated by {:?}", v.invariant, v.trace);
    });
    assert!(report.states > 1_000, "{report:?}");
    assert_eq!(report.depth, DEPTH, "{report:?}");
}

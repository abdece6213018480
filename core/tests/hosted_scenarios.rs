//! Scenario tests of the hosted session, written as data: a script of inputs, and the effects they produce as text.
//!
//! A script line is `who: what` (`alice: prompt p1`, `sandbox: events text p1 hi; done p1`,
//! `provider: created sbx_1`, `alarm +31s`); the expected log lists every effect of each line
//! under it, so a change in what the session does (or in the order it does it) shows as a diff.

use nightshift_core::events::EventKind;
use nightshift_core::hosted::{
    DownFrame, Effect, Entropy, EventLimit, HostedSession, Input, LinkTiming, PollAnswer,
    SandboxOp, SpawnAnswer,
};
use nightshift_core::ids::Identity;
use nightshift_core::sandbox::{AgentEvent, SandboxMessage};
use nightshift_core::session::{Limits, Meta, Session, SessionStatus};
use nightshift_core::signing::sha256_hex;

struct Counter(u32);

impl Entropy for Counter {
    fn token(&mut self) -> String {
        self.0 += 1;
        format!("token_{}", self.0)
    }
}

fn person(user: &str) -> Identity {
    Identity {
        user: user.into(),
        name: user.to_uppercase(),
        email: Some(format!("{user}@example.com")),
    }
}

const TIMING: LinkTiming = LinkTiming {
    heartbeat_timeout_ms: 30_000,
    grace_ms: 10_000,
};

fn hosted(repository: Option<&str>) -> HostedSession {
    let meta = Meta {
        id: "ses_1".into(),
        title: "t".into(),
        repository: repository.map(str::to_string),
        owner: "alice".into(),
        invite: "inv".into(),
        created_at: 0,
        status: SessionStatus::Active,
        limits: Limits::default(),
        next_arrival: 0,
        model: None,
        pull_request: None,
        pull_request_action: None,
    };
    let (mut session, _) = Session::create(meta, &person("alice"));
    session.take_dirty();
    let invite = session.meta.invite.clone();
    let _ = session.join(&person("bob"), &invite, 0);
    session.take_dirty();
    HostedSession::new(session, None, TIMING, true)
}

fn event(kind: &EventKind) -> String {
    match kind {
        EventKind::PromptQueued { prompt } => format!("prompt.queued {}", prompt.id),
        EventKind::PromptStarted { id, .. } => format!("prompt.started {id}"),
        EventKind::PromptStopped { id } => format!("prompt.stopped {id}"),
        EventKind::PromptFinished { id, ok, reason, .. } => match reason {
            Some(r) => format!("prompt.finished {id} ok={ok}: {r}"),
            None => format!("prompt.finished {id} ok={ok}"),
        },
        EventKind::SandboxStatus { stage, detail } => format!("sandbox.status {stage}: {detail}"),
        EventKind::AgentText { prompt, text } => format!("agent.text {prompt} {text}"),
        other => serde_json::to_value(other)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_string))
            .unwrap_or_default(),
    }
}

fn effect(e: &Effect) -> Vec<String> {
    match e {
        Effect::Store { events, .. } if events.is_empty() => vec!["store rows".into()],
        Effect::Store { events, .. } => events
            .iter()
            .map(|(_, k)| format!("store {}", event(k)))
            .collect(),
        Effect::SaveLink => vec!["save link".into()],
        Effect::Disconnect(c) => vec![format!("disconnect {}", c.join(","))],
        Effect::ToSandbox(DownFrame::Prompt { prompt }) => {
            vec![format!(
                "to sandbox: prompt {} by {}",
                prompt.id, prompt.author_email
            )]
        }
        Effect::ToSandbox(DownFrame::Welcome { last_n }) => {
            vec![format!("to sandbox: welcome {last_n}")]
        }
        Effect::ToSandbox(DownFrame::Ack { n }) => vec![format!("to sandbox: ack {n}")],
        Effect::ToSandbox(DownFrame::Stop { prompt }) => vec![format!("to sandbox: stop {prompt}")],
        Effect::ToSandbox(DownFrame::GitCredentials { .. }) => {
            vec!["to sandbox: git credentials".into()]
        }
        Effect::ToSandbox(DownFrame::Error { error }) => {
            vec![format!("to sandbox: error {}", error.code)]
        }
        Effect::CloseSandbox(code) => vec![format!("close sandbox {}", code.code())],
        Effect::Refuse { .. } => vec!["refuse socket".into()],
        Effect::Spawn { token, snapshot } => match snapshot {
            Some(s) => vec![format!("spawn {token} from {s}")],
            None => vec![format!("spawn {token}")],
        },
        Effect::StartStopped { sandbox } => vec![format!("start {sandbox}")],
        Effect::Poll { sandbox } => vec![format!("poll {sandbox}")],
        Effect::Terminate { sandbox } => vec![format!("terminate {sandbox}")],
        Effect::TakeSnapshot { sandbox, turn } => vec![format!(
            "snapshot {} for turn {turn}",
            sandbox.as_deref().unwrap_or("(no sandbox)")
        )],
        Effect::DeleteSnapshots { ids } => vec![format!("delete snapshots {}", ids.join(","))],
        Effect::SaveSnapshots => vec!["save snapshots".into()],
        Effect::SweepSandboxes => vec!["sweep the session's sandboxes".into()],
        Effect::SaveRunnerJob { prompt, due } => match due {
            Some(due) => vec![format!("echo {prompt} at {due}")],
            None => vec![format!("echo {prompt} cancelled")],
        },
        Effect::RememberBranch(b) => vec![format!("remember branch {b}")],
        Effect::SaveEgress(allow) => vec![format!("save egress {}", allow.join(","))],
        Effect::ApplyEgress { sandbox, allow } => {
            vec![format!("egress {} to {sandbox}", allow.join(","))]
        }
        Effect::Describe { sandbox } => vec![format!("describe {sandbox}")],
        Effect::StopSandbox { sandbox } => vec![format!("stop {sandbox}")],
        Effect::Ended { members } => vec![format!("ended for {}", members.join(","))],
    }
}

/// One sandbox event in script form: `text p1 hi`, `tool p1`, `done p1`, `status ready`.
fn agent_event(words: &[&str]) -> AgentEvent {
    match words {
        ["text", p, text @ ..] => AgentEvent::Text {
            prompt: p.to_string(),
            text: text.join(" "),
        },
        ["done", p] => AgentEvent::Done {
            prompt: p.to_string(),
            ok: true,
            reason: None,
            branch: Some("nightshift/ses_1".into()),
            commit: Some("abc".into()),
            patch: None,
        },
        ["status", stage] => AgentEvent::Status {
            stage: stage.to_string(),
            detail: String::new(),
        },
        _ => panic!("unknown event {words:?}"),
    }
}

/// Runs `script` and returns the log: each line, then its effects indented.
fn run(mut h: HostedSession, script: &str) -> String {
    let mut entropy = Counter(0);
    let mut now = 0u64;
    let mut n = 0u64;
    let mut log = String::new();
    // The link generation the sandbox's socket was opened for (its token's hash).
    let link = |h: &HostedSession| {
        h.link
            .as_ref()
            .map(|l| l.token_hash.clone())
            .unwrap_or_default()
    };
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        log.push_str(line);
        log.push('\n');
        let (who, what) = line.split_once(": ").unwrap_or((line, ""));
        let words: Vec<&str> = what.split_whitespace().collect();
        let effects: Result<Vec<Effect>, String> = match (who, words.as_slice()) {
            (w, _) if w.starts_with("alarm +") => {
                let secs: u64 = w
                    .trim_start_matches("alarm +")
                    .trim_end_matches('s')
                    .parse()
                    .unwrap_or(0);
                now += secs * 1000;
                Ok(h.handle(Input::Alarm, now, &mut entropy))
            }
            ("typing", _) => Ok(h.handle(Input::Typing, now, &mut entropy)),
            (user, ["prompt", id]) => {
                let who = person(user);
                let id = id.to_string();
                h.command(now, &mut entropy, |s, now| {
                    s.enqueue_prompt(&who, id.clone(), id, 0, None, now)
                })
                .map_err(|e| e.code().to_string())
            }
            (user, ["ends", "the", "session"]) => {
                let who = person(user);
                h.command(now, &mut entropy, |s, now| s.end(&who, now))
                    .map_err(|e| e.code().to_string())
            }
            (user, ["stop"]) => {
                let who = person(user);
                h.command(now, &mut entropy, |s, now| s.stop_prompt(&who, now))
                    .map_err(|e| e.code().to_string())
            }
            (user, ["stops", "sandbox"]) => {
                let sandbox = h.link.as_ref().and_then(|l| l.sandbox.clone());
                Ok(h.authorize(user, sandbox.as_deref(), SandboxOp::Stop, now, &mut entropy))
            }
            ("provider", ["created", id]) => {
                let link = link(&h);
                Ok(h.handle(
                    Input::Spawned {
                        link,
                        answer: SpawnAnswer::Created {
                            sandbox: id.to_string(),
                            expires_at: None,
                            how: "started".into(),
                        },
                    },
                    now,
                    &mut entropy,
                ))
            }
            ("provider", ["refuses", msg @ ..]) => {
                let link = link(&h);
                Ok(h.handle(
                    Input::Spawned {
                        link,
                        answer: SpawnAnswer::Failed {
                            message: msg.join(" "),
                        },
                    },
                    now,
                    &mut entropy,
                ))
            }
            ("provider", ["says", id, "gone"]) => Ok(h.handle(
                Input::Polled {
                    sandbox: id.to_string(),
                    answer: PollAnswer::Gone,
                },
                now,
                &mut entropy,
            )),
            ("sandbox", ["connects"]) => h
                .admit(&format!("token_{}", entropy.0))
                .map(|_| {
                    n = h.link.as_ref().map_or(0, |l| l.last_n);
                    h.handle(Input::SandboxConnected, now, &mut entropy)
                })
                .map_err(|e| e.code().to_string()),
            ("sandbox", ["closes"]) => {
                let link = link(&h);
                Ok(h.handle(Input::SandboxClosed { link }, now, &mut entropy))
            }
            ("sandbox", ["heartbeat"]) => {
                let link = link(&h);
                Ok(h.handle(
                    Input::SandboxFrame {
                        link,
                        message: SandboxMessage::Heartbeat,
                    },
                    now,
                    &mut entropy,
                ))
            }
            ("sandbox", ["events", ..]) | ("old sandbox", ["events", ..]) => {
                let batch = what["events".len()..]
                    .split(';')
                    .map(|e| {
                        n += 1;
                        let words: Vec<&str> = e.split_whitespace().collect();
                        (n, agent_event(&words))
                    })
                    .collect();
                let link = if who == "old sandbox" {
                    sha256_hex(b"token_1")
                } else {
                    link(&h)
                };
                Ok(h.handle(
                    Input::SandboxFrame {
                        link,
                        message: SandboxMessage::Events(batch),
                    },
                    now,
                    &mut entropy,
                ))
            }
            _ => panic!("unknown script line {line:?}"),
        };
        match effects {
            Ok(effects) => {
                for e in effects.iter().flat_map(effect) {
                    log.push_str("  ");
                    log.push_str(&e);
                    log.push('\n');
                }
            }
            Err(code) => log.push_str(&format!("  refused: {code}\n")),
        }
    }
    log
}

#[track_caller]
fn check(script: &str, expected: &str) {
    check_with(hosted(Some("acme/app")), script, expected);
}

#[track_caller]
fn check_with(h: HostedSession, script: &str, expected: &str) {
    // Compared line by line with the indentation dropped (effects are indented under their line).
    let lines = |text: &str| -> String {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let got = lines(&run(h, script));
    let want = lines(expected);
    assert_eq!(got, want, "\n--- got ---\n{got}\n--- want ---\n{want}");
}

#[test]
fn a_first_prompt_spawns_a_sandbox_which_runs_it_and_acknowledges_what_it_stored() {
    check(
        "alice: prompt p1
         provider: created sbx_1
         sandbox: connects
         sandbox: events status ready; text p1 hello
         sandbox: events done p1",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         sandbox: connects
           save link
           to sandbox: welcome 0
           to sandbox: prompt p1 by alice@example.com
         sandbox: events status ready; text p1 hello
           store sandbox.status ready: 
           store agent.text p1 hello
           save link
           to sandbox: ack 2
         sandbox: events done p1
           store prompt.finished p1 ok=true
           save link
           to sandbox: ack 3
           remember branch nightshift/ses_1
           save snapshots",
    );
}

#[test]
fn a_failed_spawn_fails_only_the_prompt_it_was_for_and_the_next_spawn_backs_off() {
    check(
        "alice: prompt p1
         bob: prompt p2
         bob: prompt p3
         provider: refuses the provider is down
         alarm +1s
         provider: refuses still down
         alarm +1s
         alarm +1s",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         bob: prompt p2
           store prompt.queued p2
         bob: prompt p3
           store prompt.queued p3
         provider: refuses the provider is down
           save link
           sweep the session's sandboxes
           store sandbox.status failed: the provider is down
           store prompt.finished p1 ok=false: sandbox_failed: the provider is down
           store prompt.started p2
         alarm +1s
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_2
         provider: refuses still down
           save link
           sweep the session's sandboxes
           store sandbox.status failed: still down
           store prompt.finished p2 ok=false: sandbox_failed: still down
           store prompt.started p3
         alarm +1s
         alarm +1s
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_3",
    );
}

#[test]
fn a_sandbox_that_dies_before_it_started_the_prompt_hands_it_to_the_next_sandbox() {
    // The follow-up is sent while the sandbox is disconnected but not yet declared lost.
    check(
        "alice: prompt p1
         provider: created sbx_1
         sandbox: connects
         sandbox: events status ready; text p1 one; done p1
         sandbox: closes
         alice: prompt p2
         alarm +10s",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         sandbox: connects
           save link
           to sandbox: welcome 0
           to sandbox: prompt p1 by alice@example.com
         sandbox: events status ready; text p1 one; done p1
           store sandbox.status ready: 
           store agent.text p1 one
           store prompt.finished p1 ok=true
           save link
           to sandbox: ack 3
           remember branch nightshift/ses_1
           save snapshots
         sandbox: closes
           save link
         alice: prompt p2
           store prompt.queued p2
           store prompt.started p2
           to sandbox: prompt p2 by alice@example.com
         alarm +10s
           save link
           close sandbox 4004
           store sandbox.status lost: the sandbox stopped responding before it started prompt p2; a new sandbox runs it
           terminate sbx_1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_2
           save snapshots",
    );
}

#[test]
fn a_sandbox_that_dies_while_the_agent_works_fails_that_prompt_with_the_reason() {
    check(
        "alice: prompt p1
         provider: created sbx_1
         sandbox: connects
         sandbox: events status ready; text p1 working
         bob: prompt p2
         alarm +30s",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         sandbox: connects
           save link
           to sandbox: welcome 0
           to sandbox: prompt p1 by alice@example.com
         sandbox: events status ready; text p1 working
           store sandbox.status ready: 
           store agent.text p1 working
           save link
           to sandbox: ack 2
         bob: prompt p2
           store prompt.queued p2
         alarm +30s
           save link
           close sandbox 4004
           store sandbox.status lost: the sandbox stopped responding; the next prompt gets a new sandbox
           store prompt.finished p1 ok=false: sandbox_lost: the sandbox stopped while this prompt ran; send it again to retry
           store prompt.started p2
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_2
           terminate sbx_1",
    );
}

#[test]
fn a_retired_sandbox_never_changes_the_queue_and_its_token_opens_nothing() {
    check(
        "alice: prompt p1
         provider: created sbx_1
         sandbox: connects
         sandbox: events status ready
         alice: stops sandbox
         old sandbox: events text p1 late; done p1
         sandbox: connects",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         sandbox: connects
           save link
           to sandbox: welcome 0
           to sandbox: prompt p1 by alice@example.com
         sandbox: events status ready
           store sandbox.status ready: 
           save link
           to sandbox: ack 1
         alice: stops sandbox
           save link
           store sandbox.status stopped: alice stopped the sandbox
           store prompt.finished p1 ok=false: sandbox_stopped: alice stopped the sandbox while this prompt ran
         old sandbox: events text p1 late; done p1
           refuse socket
         sandbox: connects
           refused: sandbox_retired",
    );
}

#[test]
fn typing_after_a_failed_spawn_does_not_spawn_again_until_someone_prompts() {
    check(
        "typing
         provider: refuses no capacity
         typing
         alarm +5s
         typing",
        "typing
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         provider: refuses no capacity
           save link
           sweep the session's sandboxes
           store sandbox.status failed: no capacity
         typing
         alarm +5s
         typing",
    );
}

#[test]
fn a_stop_is_sent_to_the_sandbox_and_the_next_prompt_follows() {
    check(
        "alice: prompt p1
         bob: prompt p2
         provider: created sbx_1
         sandbox: connects
         bob: stop
         alice: stop",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         bob: prompt p2
           store prompt.queued p2
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         sandbox: connects
           save link
           to sandbox: welcome 0
           to sandbox: prompt p1 by alice@example.com
         bob: stop
           refused: not_your_prompt
         alice: stop
           store prompt.stopped p1
           store prompt.started p2
           to sandbox: stop p1
           to sandbox: prompt p2 by bob@example.com",
    );
}

#[test]
fn a_spawning_sandbox_that_the_provider_lost_fails_its_prompt() {
    check(
        "alice: prompt p1
         provider: created sbx_1
         alarm +1s
         provider: says sbx_1 gone",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         alarm +1s
           save link
           poll sbx_1
         provider: says sbx_1 gone
           save link
           terminate sbx_1
           store sandbox.status failed: the provider no longer knows this sandbox
           store prompt.finished p1 ok=false: sandbox_failed: the provider no longer knows this sandbox",
    );
}

#[test]
fn ending_the_session_snapshots_and_terminates_its_sandbox() {
    check(
        "alice: prompt p1
         provider: created sbx_1
         sandbox: connects
         sandbox: events status ready; text p1 working
         alice: ends the session",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         sandbox: connects
           save link
           to sandbox: welcome 0
           to sandbox: prompt p1 by alice@example.com
         sandbox: events status ready; text p1 working
           store sandbox.status ready:
           store agent.text p1 working
           save link
           to sandbox: ack 2
         alice: ends the session
           store prompt.stopped p1
           store session.ended
           to sandbox: stop p1
           save link
           close sandbox 4005
           store sandbox.status terminated: the session ended: the sandbox's work was snapshotted and the sandbox terminated
           save snapshots
           snapshot sbx_1 for turn 0
           terminate sbx_1
           ended for alice,bob",
    );
}

#[test]
fn a_sandbox_created_after_the_session_ended_is_terminated() {
    check(
        "alice: prompt p1
         alice: ends the session
         provider: created sbx_late",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         alice: ends the session
           store prompt.stopped p1
           store session.ended
           to sandbox: stop p1
           save link
           close sandbox 4005
           store sandbox.status terminated: the session ended: the sandbox's work was snapshotted and the sandbox terminated
           ended for alice,bob
         provider: created sbx_late
           terminate sbx_late",
    );
}

#[test]
fn an_agent_that_floods_the_session_is_stopped_with_a_clear_error() {
    let mut h = hosted(Some("acme/app"));
    h.event_limit = EventLimit {
        events: 2,
        bytes: 1 << 20,
    };
    check_with(
        h,
        "alice: prompt p1
         bob: prompt p2
         provider: created sbx_1
         sandbox: connects
         sandbox: events text p1 a; text p1 b; text p1 c; text p1 d",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         bob: prompt p2
           store prompt.queued p2
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         sandbox: connects
           save link
           to sandbox: welcome 0
           to sandbox: prompt p1 by alice@example.com
         sandbox: events text p1 a; text p1 b; text p1 c; text p1 d
           store agent.text p1 a
           store agent.text p1 b
           save link
           to sandbox: ack 4
           store agent.error
           to sandbox: stop p1
           store prompt.finished p1 ok=false: event_limit: the agent's output for this prompt passed the session's limit
           store prompt.started p2
           to sandbox: prompt p2 by bob@example.com",
    );
}

#[test]
fn an_idle_sandbox_is_snapshotted_and_stopped_and_the_next_prompt_starts_it_again() {
    check_with(
        hosted(Some("acme/app")).with_idle(20_000),
        "alice: prompt p1
         provider: created sbx_1
         sandbox: connects
         sandbox: events status ready; text p1 one; done p1
         alarm +19s
         sandbox: heartbeat
         alarm +2s
         alice: prompt p2",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         sandbox: connects
           save link
           to sandbox: welcome 0
           to sandbox: prompt p1 by alice@example.com
         sandbox: events status ready; text p1 one; done p1
           store sandbox.status ready:
           store agent.text p1 one
           store prompt.finished p1 ok=true
           save link
           to sandbox: ack 3
           remember branch nightshift/ses_1
           save snapshots
         alarm +19s
           snapshot sbx_1 for turn 1
         sandbox: heartbeat
           save link
         alarm +2s
           stop sbx_1
           save link
           close sandbox 4005
           store sandbox.status stopped: the sandbox had nothing to do for 20 s: its work was snapshotted and it was stopped; the next prompt starts it again
         alice: prompt p2
           store prompt.queued p2
           store prompt.started p2
           start sbx_1",
    );
}

#[test]
fn a_quiet_running_prompt_is_work_not_idleness() {
    // X5: a long tool call sends nothing for a long time; its sandbox is never stopped for it.
    check_with(
        hosted(Some("acme/app")).with_idle(20_000),
        "alice: prompt p1
         provider: created sbx_1
         sandbox: connects
         sandbox: events status ready; text p1 running the test suite
         alarm +19s
         sandbox: heartbeat
         alarm +19s
         sandbox: heartbeat
         alarm +19s",
        "alice: prompt p1
           store prompt.queued p1
           store prompt.started p1
           save link
           store sandbox.status spawning: asking the provider for a sandbox
           spawn token_1
         provider: created sbx_1
           save link
           store sandbox.status spawning: started
         sandbox: connects
           save link
           to sandbox: welcome 0
           to sandbox: prompt p1 by alice@example.com
         sandbox: events status ready; text p1 running the test suite
           store sandbox.status ready:
           store agent.text p1 running the test suite
           save link
           to sandbox: ack 2
         alarm +19s
         sandbox: heartbeat
           save link
         alarm +19s
         sandbox: heartbeat
           save link
         alarm +19s",
    );
}

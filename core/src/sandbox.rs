//! The session's link to its sandbox: lifecycle stage, acknowledged delivery of agent events, and the messages a sandbox sends (parsed in `wire`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the session's sandbox is in its life, as the session sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// No sandbox yet (or the last one is gone).
    None,
    Spawning,
    Syncing,
    Ready,
    /// Stopped through the sandbox API: its disk is kept and it can be started again.
    Stopped,
    Lost,
    Failed,
}

impl Stage {
    /// A sandbox in this stage can still run prompts (or is on its way).
    pub fn is_live(self) -> bool {
        matches!(self, Stage::Spawning | Stage::Syncing | Stage::Ready)
    }
}

/// How often the provider is asked about a sandbox that has not dialled in yet.
pub const SPAWN_POLL_MS: u64 = 1_000;
/// How long a sandbox may take to dial in before it counts as failed.
pub const SPAWN_TIMEOUT_MS: u64 = 180_000;

/// Stored per session: which sandbox it has and how far its events have been taken in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SandboxLink {
    pub stage: Stage,
    /// The provider's id for the sandbox.
    pub sandbox: Option<String>,
    /// SHA-256 (hex) of the per-sandbox token; the token itself is never stored.
    pub token_hash: String,
    /// Highest event number stored; the next accepted is `last_n + 1`.
    pub last_n: u64,
    pub spawned_at: u64,
    /// Last message from the sandbox (heartbeat or event).
    pub last_seen: u64,
    /// When the sandbox's socket closed without a replacement (None: connected or never).
    pub disconnected_at: Option<u64>,
    /// When the provider ends the sandbox (its lifetime); it is snapshotted before.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// The prompt this sandbox acknowledged starting (it sent an event for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_on: Option<String>,
    /// How many times the running prompt was handed to a new sandbox because the last one died
    /// before it started it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub handovers: u32,
    /// Spawns that failed in a row (reset when a sandbox is ready).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// After a failed spawn: no new spawn for the running prompt before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
    /// Output stored for `working_on` so far (events, and their bytes as JSON).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub prompt_events: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub prompt_bytes: u64,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl SandboxLink {
    pub fn spawning(token_hash: String, now: u64) -> SandboxLink {
        SandboxLink {
            stage: Stage::Spawning,
            sandbox: None,
            token_hash,
            last_n: 0,
            spawned_at: now,
            last_seen: now,
            disconnected_at: None,
            expires_at: None,
            working_on: None,
            handovers: 0,
            failures: 0,
            retry_at: None,
            prompt_events: 0,
            prompt_bytes: 0,
        }
    }

    /// Takes in a batch of numbered events: duplicates are skipped, the in-order run is
    /// accepted, and the first gap stops the intake (the rest must be resent after it).
    pub fn intake(&self, batch: Vec<(u64, AgentEvent)>) -> Intake {
        let mut out = Intake {
            accepted: Vec::new(),
            last_n: self.last_n,
            gap: None,
            stage: None,
        };
        for (n, ev) in batch {
            if n <= out.last_n {
                continue;
            }
            if n != out.last_n + 1 {
                out.gap = Some((n, out.last_n + 1));
                break;
            }
            out.last_n = n;
            if let AgentEvent::Status { stage, .. } = &ev {
                match stage.as_str() {
                    "syncing" | "starting" => out.stage = Some(Stage::Syncing),
                    "ready" => out.stage = Some(Stage::Ready),
                    "failed" => out.stage = Some(Stage::Failed),
                    _ => {}
                }
            }
            out.accepted.push(ev);
        }
        out
    }

    /// The sandbox has said nothing for too long, or its socket has been gone past the grace period.
    pub fn is_lost(&self, now: u64, heartbeat_timeout_ms: u64, grace_ms: u64) -> bool {
        if !self.stage.is_live() {
            return false;
        }
        match self.disconnected_at {
            Some(at) => now >= at + grace_ms,
            None => self.stage != Stage::Spawning && now >= self.last_seen + heartbeat_timeout_ms,
        }
    }

    /// When the link must next be checked.
    pub fn deadline(&self, heartbeat_timeout_ms: u64, grace_ms: u64) -> Option<u64> {
        if !self.stage.is_live() {
            return None;
        }
        Some(match self.disconnected_at {
            Some(at) => at + grace_ms,
            None if self.stage == Stage::Spawning => self.last_seen + SPAWN_POLL_MS,
            None => self.last_seen + heartbeat_timeout_ms,
        })
    }

    /// A spawning sandbox has not reported for a poll interval: ask the provider how it is doing.
    pub fn needs_spawn_poll(&self, now: u64) -> bool {
        self.stage == Stage::Spawning
            && self.disconnected_at.is_none()
            && now >= self.last_seen + SPAWN_POLL_MS
    }

    /// A sandbox still spawning this long after it was asked for has failed.
    pub fn spawn_timed_out(&self, now: u64) -> bool {
        self.stage == Stage::Spawning && now >= self.spawned_at + SPAWN_TIMEOUT_MS
    }
}

/// What a batch changes: the accepted events, the new highest stored number, a gap if any
/// (got, expected), and the latest stage the sandbox reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Intake {
    pub accepted: Vec<AgentEvent>,
    pub last_n: u64,
    pub gap: Option<(u64, u64)>,
    pub stage: Option<Stage>,
}

/// What a sandbox reports, one numbered message at a time.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum AgentEvent {
    #[serde(rename = "sandbox.status")]
    Status { stage: String, detail: String },
    #[serde(rename = "agent.text")]
    Text { prompt: String, text: String },
    #[serde(rename = "agent.tool")]
    Tool {
        prompt: String,
        call: String,
        tool: String,
        status: String,
        #[serde(default)]
        input: Option<Value>,
        #[serde(default)]
        output: Option<Value>,
        #[serde(default)]
        error: Option<Value>,
    },
    #[serde(rename = "agent.step")]
    Step {
        prompt: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        tokens: Value,
        #[serde(default)]
        cost: Value,
    },
    #[serde(rename = "agent.error")]
    Error { prompt: String, message: String },
    #[serde(rename = "agent.blocked")]
    Blocked { tool: String, message: String },
    /// A connection the egress proxy refused (host outside the allowlist), with the tool that tried.
    #[serde(rename = "egress.blocked")]
    EgressBlocked {
        host: String,
        #[serde(default)]
        tool: Option<String>,
    },
    /// The sandbox took the prompt and handed it to the agent (its acknowledgement of starting it).
    #[serde(rename = "prompt.accepted")]
    Accepted { prompt: String },
    #[serde(rename = "prompt.done")]
    Done {
        prompt: String,
        ok: bool,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        branch: Option<String>,
        #[serde(default)]
        commit: Option<String>,
        /// The work as a patch, when it could not be pushed (a fork's pull request: its branch
        /// is read only here), at most [`MAX_PATCH_BYTES`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        patch: Option<String>,
    },
}

/// The largest patch a prompt's end carries (a fork's work, for a suggestion).
pub const MAX_PATCH_BYTES: usize = 16 * 1024;

/// A patch cut to [`MAX_PATCH_BYTES`] on a line boundary, with a note that the rest is left out
/// (the supervisor cuts what it sends; the session cuts again what a sandbox may send).
pub fn cut_patch(patch: &str) -> String {
    let max = MAX_PATCH_BYTES;
    if patch.len() <= max {
        return patch.to_string();
    }
    let mut end = max;
    while !patch.is_char_boundary(end) {
        end -= 1;
    }
    let kept = patch[..end]
        .rfind('\n')
        .map_or(&patch[..end], |nl| &patch[..=nl]);
    format!("{kept}… (the patch is longer; the rest is left out)\n")
}

impl AgentEvent {
    /// The prompt this event belongs to, if any.
    pub fn prompt(&self) -> Option<&str> {
        match self {
            AgentEvent::Text { prompt, .. }
            | AgentEvent::Tool { prompt, .. }
            | AgentEvent::Step { prompt, .. }
            | AgentEvent::Error { prompt, .. }
            | AgentEvent::Accepted { prompt }
            | AgentEvent::Done { prompt, .. } => Some(prompt),
            AgentEvent::Status { .. }
            | AgentEvent::Blocked { .. }
            | AgentEvent::EgressBlocked { .. } => None,
        }
    }
}

/// Frames a sandbox sends to its session, as the session takes them in (parsed from an
/// [`UpFrame`] by `wire::parse_sandbox_message`).
#[derive(Debug, Clone, PartialEq)]
pub enum SandboxMessage {
    Hello {
        sandbox: String,
    },
    Heartbeat,
    /// One or more numbered events (`event` carries one, `batch` several).
    Events(Vec<(u64, AgentEvent)>),
}

/// The sandbox link's up direction on the wire: the frames a sandbox's supervisor sends its
/// session, tagged by `type`. The supervisor serialises these; the session parses them with
/// `wire::parse_sandbox_message`, which enforces the limits (`wire::MAX_SANDBOX_FRAME`,
/// `wire::MAX_BATCH`, [`MAX_SANDBOX_ID`], `n > 0`). Unknown fields are ignored, so a newer
/// supervisor may add some; the field names never change (an older supervisor's frames must
/// still parse). The down direction is `hosted::DownFrame`.
///
/// `E` is the event's type: [`AgentEvent`] for every real frame. The parser reads a frame
/// with its events still raw JSON first, so a malformed frame (`invalid_message`) and a
/// malformed event (`invalid_event`) are told apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum UpFrame<E = AgentEvent> {
    /// First frame on every connection: which sandbox this is.
    Hello { sandbox: String },
    /// A sign of life (every few seconds; any frame counts as one).
    Heartbeat,
    /// One numbered event (older supervisors; the current one sends `batch`).
    Event(Numbered<E>),
    /// Numbered events in order, taken all or nothing.
    Batch { events: Vec<Numbered<E>> },
}

/// The `type` of every [`UpFrame`], as on the wire.
pub const UP_FRAME_TYPES: [&str; 4] = ["hello", "heartbeat", "event", "batch"];

/// Longest sandbox id a `hello` may name (bytes).
pub const MAX_SANDBOX_ID: usize = 100;

/// One event with its number: the sandbox numbers its events 1, 2, 3 … and resends every
/// event the session has not acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Numbered<E = AgentEvent> {
    pub n: u64,
    pub event: E,
}

impl From<UpFrame> for SandboxMessage {
    fn from(frame: UpFrame) -> SandboxMessage {
        let pair = |numbered: Numbered| (numbered.n, numbered.event);
        match frame {
            UpFrame::Hello { sandbox } => SandboxMessage::Hello { sandbox },
            UpFrame::Heartbeat => SandboxMessage::Heartbeat,
            UpFrame::Event(numbered) => SandboxMessage::Events(vec![pair(numbered)]),
            UpFrame::Batch { events } => {
                SandboxMessage::Events(events.into_iter().map(pair).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_skips_duplicates_accepts_the_run_and_stops_at_a_gap() {
        let text = |t: &str| AgentEvent::Text {
            prompt: "p".into(),
            text: t.into(),
        };
        let mut l = SandboxLink::spawning("h".into(), 0);
        l.last_n = 2;
        let i = l.intake(vec![
            (2, text("dup")),
            (3, text("a")),
            (4, text("b")),
            (6, text("gap")),
            (7, text("after")),
        ]);
        assert_eq!(i.last_n, 4);
        assert_eq!(i.accepted, vec![text("a"), text("b")]);
        assert_eq!(i.gap, Some((6, 5)));
        let ready = AgentEvent::Status {
            stage: "ready".into(),
            detail: String::new(),
        };
        assert_eq!(l.intake(vec![(3, ready)]).stage, Some(Stage::Ready));
    }

    #[test]
    fn spawning_is_polled_and_times_out() {
        let l = SandboxLink::spawning("h".into(), 1_000);
        assert_eq!(l.deadline(30_000, 5_000), Some(1_000 + SPAWN_POLL_MS));
        assert!(!l.needs_spawn_poll(1_500));
        assert!(l.needs_spawn_poll(2_000));
        assert!(!l.spawn_timed_out(1_000 + SPAWN_TIMEOUT_MS - 1));
        assert!(l.spawn_timed_out(1_000 + SPAWN_TIMEOUT_MS));
    }

    #[test]
    fn lost_after_grace_or_silence() {
        let mut l = SandboxLink::spawning("h".into(), 0);
        assert!(
            !l.is_lost(1_000_000, 30_000, 5_000),
            "spawning waits for the provider"
        );
        l.stage = Stage::Ready;
        l.last_seen = 100;
        assert!(!l.is_lost(20_000, 30_000, 5_000));
        assert!(l.is_lost(30_100, 30_000, 5_000));
        l.disconnected_at = Some(1_000);
        assert!(!l.is_lost(5_999, 30_000, 5_000));
        assert!(l.is_lost(6_000, 30_000, 5_000));
        l.stage = Stage::Lost;
        assert!(!l.is_lost(99_999, 30_000, 5_000));
    }

    #[test]
    fn intake_moves_the_stage_on_status_events() {
        let status = |stage: &str| AgentEvent::Status {
            stage: stage.into(),
            detail: "d".into(),
        };
        let l = SandboxLink::spawning("h".into(), 0);
        let stage_after = |stages: &[&str]| {
            let batch = stages
                .iter()
                .enumerate()
                .map(|(i, s)| (i as u64 + 1, status(s)))
                .collect();
            l.intake(batch).stage
        };
        assert_eq!(stage_after(&["syncing"]), Some(Stage::Syncing));
        assert_eq!(stage_after(&["starting"]), Some(Stage::Syncing));
        assert_eq!(stage_after(&["ready"]), Some(Stage::Ready));
        assert_eq!(stage_after(&["failed"]), Some(Stage::Failed));
        // Another stage name is taken in as an event but moves nothing.
        assert_eq!(stage_after(&["cloning"]), None);
        assert_eq!(stage_after(&[]), None);
        // The latest reported stage wins, and an unknown one does not undo it.
        assert_eq!(
            stage_after(&["syncing", "ready", "cloning"]),
            Some(Stage::Ready)
        );
        assert_eq!(stage_after(&["ready", "failed"]), Some(Stage::Failed));
        assert_eq!(
            stage_after(&["starting", "failed", "syncing"]),
            Some(Stage::Syncing)
        );
        // Events that are not statuses move nothing.
        let done = AgentEvent::Done {
            prompt: "p".into(),
            ok: false,
            reason: Some("failed".into()),
            branch: None,
            commit: None,
            patch: None,
        };
        let i = l.intake(vec![(1, done.clone())]);
        assert_eq!((i.stage, i.accepted), (None, vec![done]));
    }

    #[test]
    fn deadlines_for_spawning_connected_and_disconnected() {
        let (heartbeat, grace) = (30_000, 5_000);
        let mut l = SandboxLink::spawning("h".into(), 0);
        l.last_seen = 7_000;
        assert_eq!(l.deadline(heartbeat, grace), Some(7_000 + SPAWN_POLL_MS));
        for stage in [Stage::Syncing, Stage::Ready] {
            l.stage = stage;
            assert_eq!(l.deadline(heartbeat, grace), Some(37_000), "{stage:?}");
        }
        l.disconnected_at = Some(9_000);
        assert_eq!(l.deadline(heartbeat, grace), Some(14_000));
        l.stage = Stage::Spawning;
        assert_eq!(l.deadline(heartbeat, grace), Some(14_000));
        for stage in [Stage::None, Stage::Stopped, Stage::Lost, Stage::Failed] {
            l.stage = stage;
            assert_eq!(l.deadline(heartbeat, grace), None, "{stage:?}");
        }
    }

    #[test]
    fn events_name_their_prompt() {
        let p = || "pr_1".to_string();
        let with_prompt = [
            AgentEvent::Text {
                prompt: p(),
                text: "t".into(),
            },
            AgentEvent::Tool {
                prompt: p(),
                call: "c".into(),
                tool: "bash".into(),
                status: "done".into(),
                input: None,
                output: None,
                error: None,
            },
            AgentEvent::Step {
                prompt: p(),
                reason: None,
                tokens: Value::Null,
                cost: Value::Null,
            },
            AgentEvent::Error {
                prompt: p(),
                message: "m".into(),
            },
            AgentEvent::Accepted { prompt: p() },
            AgentEvent::Done {
                prompt: p(),
                ok: true,
                reason: None,
                branch: None,
                commit: None,
                patch: None,
            },
        ];
        for ev in &with_prompt {
            assert_eq!(ev.prompt(), Some("pr_1"), "{ev:?}");
        }
        let without = [
            AgentEvent::Status {
                stage: "ready".into(),
                detail: "pr_1".into(),
            },
            AgentEvent::Blocked {
                tool: "bash".into(),
                message: "pr_1".into(),
            },
            AgentEvent::EgressBlocked {
                host: "pr_1".into(),
                tool: None,
            },
        ];
        for ev in &without {
            assert_eq!(ev.prompt(), None, "{ev:?}");
        }
    }

    /// The counters are stored only when set: a link that never used them keeps its older
    /// stored shape, and set ones are written and read back.
    #[test]
    fn counters_are_stored_only_when_set() {
        let mut l = SandboxLink::spawning("h".into(), 0);
        let stored = serde_json::to_value(&l).expect("json");
        for key in ["handovers", "failures", "prompt_events", "prompt_bytes"] {
            assert!(stored.get(key).is_none(), "{key}");
        }
        (l.handovers, l.failures, l.prompt_events, l.prompt_bytes) = (1, 2, 3, 4);
        let stored = serde_json::to_value(&l).expect("json");
        for (key, n) in [
            ("handovers", 1),
            ("failures", 2),
            ("prompt_events", 3),
            ("prompt_bytes", 4),
        ] {
            assert_eq!(stored[key], n, "{key}");
        }
        assert_eq!(
            serde_json::from_value::<SandboxLink>(stored).expect("json"),
            l
        );
    }
}

//! The wire format: HTTP request bodies, WebSocket client messages and server frames, sandbox frames. The only module that parses input.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::error::WireError;
use crate::events::Event;
use crate::ids::Cursor;
use crate::sandbox::{
    AgentEvent, Numbered, SandboxMessage, UpFrame, MAX_SANDBOX_ID, UP_FRAME_TYPES,
};
use crate::session::Client;

/// Largest HTTP body the API accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest WebSocket message a client may send.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Parses a JSON body of a known shape, with a clear error for each way it can be wrong.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_BODY_BYTES {
        return Err(WireError::new(
            "body_too_large",
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
        ));
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| WireError::new("malformed_json", format!("body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(WireError::new("invalid_body", "body must be a JSON object"));
    }
    serde_json::from_value(v).map_err(|e| {
        WireError::new(
            "invalid_body",
            format!("body does not match the schema: {e}"),
        )
    })
}

// ---- HTTP bodies ------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevSignIn {
    pub user: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    pub title: String,
    #[serde(default)]
    pub repository: Option<String>,
    /// The session's model (`provider/model`, as OpenCode names it); a prompt may name another.
    #[serde(default)]
    pub model: Option<String>,
}

impl CreateSession {
    /// The title (trimmed) once the whole body is known to be acceptable.
    pub fn check(&self) -> Result<String, WireError> {
        let title = self.title.trim().to_string();
        if title.is_empty() || title.len() > crate::session::MAX_TITLE_LEN {
            return Err(WireError::new("invalid_input", "title must be 1-200 bytes"));
        }
        if self
            .repository
            .as_ref()
            .is_some_and(|r| r.is_empty() || r.len() > 1000)
        {
            return Err(WireError::new(
                "invalid_input",
                "repository must be 1-1000 bytes",
            ));
        }
        check_model(self.model.as_deref())?;
        Ok(title)
    }
}

/// A model is named `provider/model` (e.g. `anthropic/claude-sonnet-4-5`, `nightshift/scripted`).
pub fn check_model(model: Option<&str>) -> Result<(), WireError> {
    let Some(m) = model else {
        return Ok(());
    };
    let ok = m.len() <= 200
        && m.split_once('/')
            .is_some_and(|(p, id)| !p.is_empty() && !id.is_empty())
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:/-@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(WireError::new(
            "invalid_model",
            "a model is named `provider/model`, e.g. `anthropic/claude-sonnet-4-5`",
        ))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSession {
    pub invite: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CursorUpdate {
    pub client: String,
    #[serde(default)]
    pub file: Option<String>,
    pub line: u32,
    pub column: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptRequest {
    pub text: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub model: Option<String>,
    /// An idempotency key in the body, for clients that cannot set the `Idempotency-Key`
    /// header (the header is the primary way).
    #[serde(default)]
    pub key: Option<String>,
}

/// The HTTP header carrying a prompt's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

impl PromptRequest {
    /// The idempotency key from the `Idempotency-Key` header and/or the body's `key`; both
    /// may be given only if they agree. Its shape is checked when the prompt is submitted.
    pub fn idempotency_key(&self, header: Option<String>) -> Result<Option<String>, WireError> {
        match (header, &self.key) {
            (Some(h), Some(b)) if h != *b => Err(WireError::new(
                "invalid_input",
                "the Idempotency-Key header and the body's key differ; send one",
            )),
            (Some(h), _) => Ok(Some(h)),
            (None, b) => Ok(b.clone()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reprioritize {
    pub priority: i32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    pub resource: String,
    #[serde(default = "default_ttl")]
    pub ttl_ms: u64,
}

fn default_ttl() -> u64 {
    60_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlockRequest {
    pub resource: String,
}

// ---- WebSocket --------------------------------------------------------------------------

/// What a client may send over the session socket.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum ClientMessage {
    #[serde(rename = "ping")]
    Ping,
    #[serde(rename = "cursor")]
    Cursor {
        #[serde(default)]
        file: Option<String>,
        line: u32,
        column: u32,
    },
    #[serde(rename = "typing")]
    Typing { typing: bool },
    #[serde(rename = "prompt")]
    Prompt {
        text: String,
        #[serde(default)]
        priority: i32,
        #[serde(default)]
        model: Option<String>,
        /// Idempotency key: resending the frame with the same key acks the stored prompt.
        #[serde(default)]
        key: Option<String>,
    },
    #[serde(rename = "prompt.cancel")]
    Cancel { id: String },
    #[serde(rename = "prompt.reprioritize")]
    Reprioritize { id: String, priority: i32 },
    #[serde(rename = "stop")]
    Stop,
    #[serde(rename = "lock.acquire")]
    LockAcquire {
        resource: String,
        #[serde(default = "default_ttl")]
        ttl_ms: u64,
    },
    #[serde(rename = "lock.release")]
    LockRelease { resource: String },
}

impl ClientMessage {
    pub fn cursor(self) -> Option<Cursor> {
        match self {
            ClientMessage::Cursor { file, line, column } => Some(Cursor { file, line, column }),
            _ => None,
        }
    }
}

const CLIENT_TYPES: &[&str] = &[
    "ping",
    "cursor",
    "typing",
    "prompt",
    "prompt.cancel",
    "prompt.reprioritize",
    "stop",
    "lock.acquire",
    "lock.release",
];

/// Parses one client frame; returns the optional `ref` the client wants echoed back.
pub fn parse_client_message(text: &str) -> (Option<String>, Result<ClientMessage, WireError>) {
    if text.len() > MAX_MESSAGE_BYTES {
        return (
            None,
            Err(WireError::new(
                "message_too_large",
                format!("messages are limited to {MAX_MESSAGE_BYTES} bytes"),
            )),
        );
    }
    let mut v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return (
                None,
                Err(WireError::new(
                    "malformed_json",
                    format!("message is not valid JSON: {e}"),
                )),
            )
        }
    };
    let Some(obj) = v.as_object_mut() else {
        return (
            None,
            Err(WireError::new(
                "invalid_message",
                "message must be a JSON object",
            )),
        );
    };
    let reference = match obj.remove("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 128 => Some(s),
        Some(_) => {
            return (
                None,
                Err(WireError::new(
                    "invalid_message",
                    "ref must be a string of at most 128 bytes",
                )),
            )
        }
    };
    let ty = obj.get("type").and_then(Value::as_str).map(str::to_string);
    match ty {
        None => (
            reference,
            Err(WireError::new(
                "invalid_message",
                "message needs a string field \"type\"",
            )),
        ),
        Some(t) if !CLIENT_TYPES.contains(&t.as_str()) => (
            reference,
            Err(WireError::new(
                "unknown_message_type",
                format!(
                    "unknown message type {t:?}; known: {}",
                    CLIENT_TYPES.join(", ")
                ),
            )),
        ),
        Some(_) => {
            let parsed = serde_json::from_value(v).map_err(|e| {
                WireError::new(
                    "invalid_message",
                    format!("message does not match its schema: {e}"),
                )
            });
            (reference, parsed)
        }
    }
}

/// One presence entry as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub client: String,
    pub user: String,
    pub name: String,
    pub kind: String,
    pub color: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
    pub typing: bool,
    pub last_seen: u64,
}

impl From<&Client> for PresenceEntry {
    fn from(c: &Client) -> Self {
        PresenceEntry {
            client: c.id.clone(),
            user: c.user.clone(),
            name: c.name.clone(),
            kind: c.kind.clone(),
            color: c.color.clone(),
            cursor: c.cursor.clone(),
            typing: c.typing,
            last_seen: c.last_seen,
        }
    }
}

/// Frames the server sends on the session socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerMessage {
    /// First frame: who you are, and the log position the replay that follows ends at.
    #[serde(rename = "hello")]
    Hello {
        client: String,
        user: String,
        seq: u64,
    },
    /// Durable events, in sequence order.
    #[serde(rename = "events")]
    Events { events: Vec<Event> },
    /// Presence snapshot (capped) with the total count of connected clients.
    #[serde(rename = "presence")]
    Presence {
        clients: Vec<PresenceEntry>,
        total: usize,
    },
    /// Coalesced presence changes since the last frame.
    #[serde(rename = "presence.delta")]
    PresenceDelta {
        updated: Vec<PresenceEntry>,
        left: Vec<String>,
        total: usize,
        /// More changed than the frame carries (a burst of arrivals in a large session):
        /// `total` is exact; `GET /presence` gives everyone.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    #[serde(rename = "ack")]
    Ack {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
    },
    #[serde(rename = "error")]
    Error {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        error: ErrorBody,
    },
    #[serde(rename = "pong")]
    Pong,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// `{ "error": { "code", "message" } }`, the body of every HTTP error.
pub fn error_json(code: &str, message: &str) -> String {
    serde_json::json!({ "error": { "code": code, "message": message } }).to_string()
}

// ---- Sandbox frames ---------------------------------------------------------------------

/// Most events in one `batch` frame.
pub const MAX_BATCH: usize = 500;

/// Largest frame a sandbox may send.
pub const MAX_SANDBOX_FRAME: usize = 256 * 1024;

/// Parses one frame a sandbox sent up its link, as the session takes it in.
pub fn parse_sandbox_message(text: &str) -> Result<SandboxMessage, WireError> {
    parse_up_frame(text).map(SandboxMessage::from)
}

/// Parses one [`UpFrame`] with every limit of the link: at most [`MAX_SANDBOX_FRAME`] bytes, a
/// `hello` naming a sandbox of 1 to [`MAX_SANDBOX_ID`] bytes, a `batch` of 1 to [`MAX_BATCH`]
/// events, each numbered `n > 0`, and each event an [`AgentEvent`]. All or nothing: one bad
/// event refuses the whole frame. Codes: `frame_too_large`, `invalid_json`, `unknown_type`,
/// `invalid_message` (the frame's shape or a limit), `invalid_event` (an event, by number).
pub fn parse_up_frame(text: &str) -> Result<UpFrame, WireError> {
    if text.len() > MAX_SANDBOX_FRAME {
        return Err(WireError::new(
            "frame_too_large",
            format!("sandbox frames are at most {MAX_SANDBOX_FRAME} bytes"),
        ));
    }
    let v: Value = serde_json::from_str(text)
        .map_err(|e| WireError::new("invalid_json", format!("not JSON: {e}")))?;
    let named = v.get("type").and_then(Value::as_str);
    let Some(kind) = UP_FRAME_TYPES.into_iter().find(|t| named == Some(*t)) else {
        return Err(WireError::new(
            "unknown_type",
            "a sandbox sends hello, heartbeat, event or batch",
        ));
    };
    let batch_shape = || format!("a batch carries `events`: 1 to {MAX_BATCH} numbered events");
    // The frame with its events as raw JSON (absent: null), each checked below on its own.
    let raw: UpFrame<Option<Value>> = serde_json::from_value(v).map_err(|e| {
        let why = match kind {
            "hello" => "hello needs `sandbox`".to_string(),
            "batch" => format!("{} ({e})", batch_shape()),
            _ => format!("an event needs `n`, a positive integer ({e})"),
        };
        WireError::new("invalid_message", why)
    })?;
    match raw {
        UpFrame::Hello { sandbox } => {
            if sandbox.is_empty() || sandbox.len() > MAX_SANDBOX_ID {
                return Err(WireError::new("invalid_message", "hello needs `sandbox`"));
            }
            Ok(UpFrame::Hello { sandbox })
        }
        UpFrame::Heartbeat => Ok(UpFrame::Heartbeat),
        UpFrame::Event(numbered) => Ok(UpFrame::Event(typed_event(numbered)?)),
        UpFrame::Batch { events } => {
            if events.is_empty() || events.len() > MAX_BATCH {
                return Err(WireError::new("invalid_message", batch_shape()));
            }
            let events = events
                .into_iter()
                .map(typed_event)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(UpFrame::Batch { events })
        }
    }
}

/// One numbered event of a frame: its number first, then the event itself.
fn typed_event(raw: Numbered<Option<Value>>) -> Result<Numbered, WireError> {
    let n = raw.n;
    if n == 0 {
        return Err(WireError::new(
            "invalid_message",
            "an event needs `n`, a positive integer",
        ));
    }
    let event: AgentEvent = serde_json::from_value(raw.event.unwrap_or(Value::Null))
        .map_err(|e| WireError::new("invalid_event", format!("event {n}: {e}")))?;
    Ok(Numbered { n, event })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_with_ref() {
        let (r, m) = parse_client_message(r#"{"type":"typing","typing":true,"ref":"a1"}"#);
        assert_eq!(r.as_deref(), Some("a1"));
        assert_eq!(m, Ok(ClientMessage::Typing { typing: true }));
        let (_, m) = parse_client_message(r#"{"type":"prompt","text":"hi","key":"k1"}"#);
        assert_eq!(
            m,
            Ok(ClientMessage::Prompt {
                text: "hi".into(),
                priority: 0,
                model: None,
                key: Some("k1".into()),
            })
        );
        let (_, m) = parse_client_message(r#"{"type":"prompt","text":"hi"}"#);
        assert!(matches!(m, Ok(ClientMessage::Prompt { key: None, .. })));
    }

    #[test]
    fn a_prompt_key_comes_from_the_header_or_the_body_not_two_different_ones() {
        let req = |body: &str| parse_body::<PromptRequest>(body.as_bytes()).expect("body");
        let plain = req(r#"{"text":"hi"}"#);
        let keyed = req(r#"{"text":"hi","key":"k1"}"#);
        assert_eq!(plain.idempotency_key(None), Ok(None));
        assert_eq!(
            plain.idempotency_key(Some("h".into())),
            Ok(Some("h".into()))
        );
        assert_eq!(keyed.idempotency_key(None), Ok(Some("k1".into())));
        assert_eq!(
            keyed.idempotency_key(Some("k1".into())),
            Ok(Some("k1".into()))
        );
        assert_eq!(
            keyed.idempotency_key(Some("k2".into())).map_err(|e| e.code),
            Err("invalid_input")
        );
    }

    #[test]
    fn bad_client_messages_get_codes() {
        let code = |s: &str| parse_client_message(s).1.err().map(|e| e.code);
        assert_eq!(code("{"), Some("malformed_json"));
        assert_eq!(code("[1]"), Some("invalid_message"));
        assert_eq!(code(r#"{"x":1}"#), Some("invalid_message"));
        assert_eq!(code(r#"{"type":"launch"}"#), Some("unknown_message_type"));
        assert_eq!(
            code(r#"{"type":"typing","typing":"yes"}"#),
            Some("invalid_message")
        );
        assert_eq!(
            code(&"x".repeat(MAX_MESSAGE_BYTES + 1)),
            Some("message_too_large")
        );
    }

    #[test]
    fn models_are_provider_slash_id() {
        assert!(check_model(None).is_ok());
        assert!(check_model(Some("anthropic/claude-sonnet-4-5")).is_ok());
        assert!(check_model(Some("nightshift/scripted")).is_ok());
        for bad in ["scripted", "/x", "x/", "a b/c", "a/b;rm"] {
            assert_eq!(
                check_model(Some(bad)).err().map(|e| e.code),
                Some("invalid_model"),
                "{bad}"
            );
        }
    }

    #[test]
    fn bodies_refuse_wrong_shapes() {
        let e = parse_body::<PromptRequest>(br#"{"text":5}"#)
            .err()
            .map(|e| e.code);
        assert_eq!(e, Some("invalid_body"));
        let e = parse_body::<PromptRequest>(b"nope").err().map(|e| e.code);
        assert_eq!(e, Some("malformed_json"));
        let e = parse_body::<PromptRequest>(b"[]").err().map(|e| e.code);
        assert_eq!(e, Some("invalid_body"));
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(
            parse_body::<PromptRequest>(&big).err().map(|e| e.code),
            Some("body_too_large")
        );
        let ok = parse_body::<PromptRequest>(br#"{"text":"hi","priority":2}"#).map(|p| p.priority);
        assert_eq!(ok, Ok(2));
    }

    #[test]
    fn size_limits_are_64_kib_inclusive() {
        assert_eq!((MAX_BODY_BYTES, MAX_MESSAGE_BYTES), (65_536, 65_536));
        // A body of exactly the limit is read; one byte more is refused before parsing.
        let mut body = br#"{"text":"hi"}"#.to_vec();
        body.resize(MAX_BODY_BYTES, b' ');
        assert_eq!(
            parse_body::<PromptRequest>(&body).map(|p| p.text),
            Ok("hi".to_string())
        );
        let mut frame = r#"{"type":"ping"}"#.to_string();
        frame.push_str(&" ".repeat(MAX_MESSAGE_BYTES - frame.len()));
        assert_eq!(parse_client_message(&frame).1, Ok(ClientMessage::Ping));
    }

    #[test]
    fn a_session_title_is_trimmed_and_bounded() {
        let create = |title: &str, repository: Option<String>| CreateSession {
            title: title.to_string(),
            repository,
            model: None,
        };
        assert_eq!(
            create("  Fix the build ", None).check(),
            Ok("Fix the build".into())
        );
        let longest = "t".repeat(crate::session::MAX_TITLE_LEN);
        assert_eq!(create(&longest, None).check(), Ok(longest.clone()));
        for bad in ["", "   ", &format!("{longest}t")] {
            assert_eq!(
                create(bad, None).check().map_err(|e| e.code),
                Err("invalid_input"),
                "{bad:?}"
            );
        }
        assert!(create("x", Some("r".repeat(1000))).check().is_ok());
        for bad in [String::new(), "r".repeat(1001)] {
            assert_eq!(
                create("x", Some(bad)).check().map_err(|e| e.code),
                Err("invalid_input")
            );
        }
        let bad_model = CreateSession {
            model: Some("scripted".into()),
            ..create("x", None)
        };
        assert_eq!(bad_model.check().map_err(|e| e.code), Err("invalid_model"));
    }

    #[test]
    fn a_lock_lasts_a_minute_unless_asked() {
        let body = parse_body::<LockRequest>(br#"{"resource":"file:a"}"#).map(|l| l.ttl_ms);
        assert_eq!(body, Ok(60_000));
        let (_, frame) = parse_client_message(r#"{"type":"lock.acquire","resource":"file:a"}"#);
        assert_eq!(
            frame,
            Ok(ClientMessage::LockAcquire {
                resource: "file:a".into(),
                ttl_ms: 60_000
            })
        );
    }

    #[test]
    fn only_a_cursor_frame_is_a_cursor() {
        let (_, frame) =
            parse_client_message(r#"{"type":"cursor","file":"a.rs","line":3,"column":7}"#);
        let cursor = frame.ok().and_then(ClientMessage::cursor);
        assert_eq!(
            cursor,
            Some(Cursor {
                file: Some("a.rs".into()),
                line: 3,
                column: 7
            })
        );
        assert_eq!(ClientMessage::Ping.cursor(), None);
    }

    #[test]
    fn a_ref_is_at_most_128_bytes() {
        let frame = |reference: &str| format!(r#"{{"type":"ping","ref":"{reference}"}}"#);
        let longest = "r".repeat(128);
        let (echoed, parsed) = parse_client_message(&frame(&longest));
        assert_eq!((echoed, parsed), (Some(longest), Ok(ClientMessage::Ping)));
        let (echoed, parsed) = parse_client_message(&frame(&"r".repeat(129)));
        assert_eq!(echoed, None);
        assert_eq!(parsed.map_err(|e| e.code), Err("invalid_message"));
    }

    #[test]
    fn an_error_body_is_code_and_message() {
        let body: Value =
            serde_json::from_str(&error_json("not_found", "no such session")).unwrap_or_default();
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "not_found", "message": "no such session"}})
        );
    }

    #[test]
    fn an_exec_names_a_program() {
        let exec = |command: &[&str]| ExecRequest {
            command: command.iter().map(|c| c.to_string()).collect(),
            cwd: None,
            env: None,
            timeout_ms: None,
            stdin: None,
        };
        assert!(exec(&["git", "status"]).check().is_ok());
        for bad in [&[][..], &[""][..]] {
            assert_eq!(
                exec(bad).check().map_err(|e| e.code),
                Err("invalid_command"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sandbox_messages_parse_or_get_codes() {
        let code = |t: &str| parse_sandbox_message(t).err().map(|e| e.code);
        let ok = parse_sandbox_message(
            r#"{"type":"event","n":3,"event":{"kind":"agent.text","prompt":"p","text":"hi"}}"#,
        );
        assert!(matches!(ok, Ok(SandboxMessage::Events(ref v)) if v.len() == 1 && v[0].0 == 3));
        let batch = parse_sandbox_message(
            r#"{"type":"batch","events":[{"n":1,"event":{"kind":"agent.text","prompt":"p","text":"a"}},{"n":2,"event":{"kind":"agent.text","prompt":"p","text":"b"}}]}"#,
        );
        assert!(matches!(batch, Ok(SandboxMessage::Events(ref v)) if v.len() == 2));
        assert_eq!(
            code(r#"{"type":"batch","events":[]}"#),
            Some("invalid_message")
        );
        assert_eq!(
            code(
                r#"{"type":"batch","events":[{"n":1,"event":{"kind":"agent.text","prompt":"p","text":"a"}},{"n":2,"event":{"kind":"nope"}}]}"#
            ),
            Some("invalid_event")
        );
        assert_eq!(code("nope"), Some("invalid_json"));
        assert_eq!(code(r#"{"type":"x"}"#), Some("unknown_type"));
        assert_eq!(
            code(r#"{"type":"event","n":0,"event":{}}"#),
            Some("invalid_message")
        );
        assert_eq!(
            code(r#"{"type":"event","n":1,"event":{"kind":"agent.text","prompt":"p"}}"#),
            Some("invalid_event")
        );
        assert_eq!(
            code(
                r#"{"type":"event","n":1,"event":{"kind":"agent.text","prompt":"p","text":"t","x":1}}"#
            ),
            Some("invalid_event")
        );
    }

    #[test]
    fn an_older_supervisors_frames_still_parse() {
        // Byte for byte as the supervisor wrote them with `json!` (keys sorted, no null fields).
        let hello = parse_sandbox_message(r#"{"sandbox":"sbx_1","type":"hello"}"#);
        assert_eq!(
            hello,
            Ok(SandboxMessage::Hello {
                sandbox: "sbx_1".into()
            })
        );
        let batch = concat!(
            r#"{"events":["#,
            r#"{"event":{"kind":"prompt.accepted","prompt":"pr_1"},"n":1},"#,
            r#"{"event":{"call":"c1","input":{"command":"ls"},"kind":"agent.tool","prompt":"pr_1","status":"running","tool":"bash"},"n":2},"#,
            r#"{"event":{"cost":0,"kind":"agent.step","prompt":"pr_1","reason":"stop","tokens":{"output":3}},"n":3},"#,
            r#"{"event":{"kind":"egress.blocked","host":"evil.example:443","tool":null},"n":4},"#,
            r#"{"event":{"branch":"nightshift/ses_1","commit":"abc","kind":"prompt.done","ok":true,"prompt":"pr_1","reason":null},"n":5}"#,
            r#"],"type":"batch"}"#
        );
        let Ok(SandboxMessage::Events(events)) = parse_sandbox_message(batch) else {
            panic!(
                "an older batch is refused: {:?}",
                parse_sandbox_message(batch)
            );
        };
        let numbers: Vec<u64> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5]);
        assert_eq!(
            events[1].1,
            AgentEvent::Tool {
                prompt: "pr_1".into(),
                call: "c1".into(),
                tool: "bash".into(),
                status: "running".into(),
                input: Some(serde_json::json!({"command": "ls"})),
                output: None,
                error: None,
            }
        );
        assert_eq!(
            events[4].1,
            AgentEvent::Done {
                prompt: "pr_1".into(),
                ok: true,
                reason: None,
                branch: Some("nightshift/ses_1".into()),
                commit: Some("abc".into()),
                patch: None,
            }
        );
        assert_eq!(
            parse_sandbox_message(r#"{"type":"heartbeat"}"#),
            Ok(SandboxMessage::Heartbeat)
        );
    }

    #[test]
    fn an_up_frame_round_trips_through_the_parser() {
        let text = |t: &str| AgentEvent::Text {
            prompt: "pr_1".into(),
            text: t.into(),
        };
        let frames = [
            UpFrame::Hello {
                sandbox: "sbx_1".into(),
            },
            UpFrame::Heartbeat,
            UpFrame::Event(Numbered {
                n: 7,
                event: text("one"),
            }),
            UpFrame::Batch {
                events: vec![
                    Numbered {
                        n: 8,
                        event: text("a"),
                    },
                    Numbered {
                        n: 9,
                        event: AgentEvent::Accepted {
                            prompt: "pr_1".into(),
                        },
                    },
                ],
            },
        ];
        for frame in frames {
            let encoded = serde_json::to_string(&frame).unwrap_or_default();
            assert_eq!(parse_up_frame(&encoded), Ok(frame.clone()), "{encoded}");
        }
        // The wire names: `type` tags the frame, `n` and `event` each numbered event.
        let batch = UpFrame::Batch {
            events: vec![Numbered {
                n: 1,
                event: text("a"),
            }],
        };
        assert_eq!(
            serde_json::to_value(&batch).unwrap_or_default(),
            serde_json::json!({"type": "batch", "events": [{"n": 1, "event": {"kind": "agent.text", "prompt": "pr_1", "text": "a"}}]})
        );
    }

    #[test]
    fn a_bad_frame_and_a_bad_event_get_their_own_codes() {
        let code = |t: &str| parse_sandbox_message(t).err().map(|e| e.code);
        // The event's number is checked before the event; a missing event is a bad event.
        assert_eq!(code(r#"{"type":"event","n":1}"#), Some("invalid_event"));
        assert_eq!(
            code(r#"{"type":"event","n":1,"event":null}"#),
            Some("invalid_event")
        );
        assert_eq!(
            code(r#"{"type":"event","event":{"kind":"agent.text","prompt":"p","text":"t"}}"#),
            Some("invalid_message")
        );
        assert_eq!(
            code(r#"{"type":"event","n":"1","event":{}}"#),
            Some("invalid_message")
        );
        assert_eq!(code(r#"{"type":"batch"}"#), Some("invalid_message"));
        assert_eq!(
            code(r#"{"type":"batch","events":{"n":1}}"#),
            Some("invalid_message")
        );
        assert_eq!(
            code(r#"{"type":"batch","events":[5]}"#),
            Some("invalid_message")
        );
        assert_eq!(
            code(r#"{"type":"batch","events":[{"n":0,"event":{}}]}"#),
            Some("invalid_message")
        );
        // Not an object, or no string `type`: not a sandbox frame.
        for frame in ["5", "[1]", r#"{"type":5}"#, r#"{"sandbox":"s"}"#] {
            assert_eq!(code(frame), Some("unknown_type"), "{frame}");
        }
        // At most MAX_BATCH events in one frame.
        let item = r#"{"n":1,"event":{"kind":"prompt.accepted","prompt":"p"}}"#;
        let many = |k: usize| {
            format!(
                r#"{{"type":"batch","events":[{}]}}"#,
                vec![item; k].join(",")
            )
        };
        assert!(
            matches!(parse_sandbox_message(&many(MAX_BATCH)), Ok(SandboxMessage::Events(e)) if e.len() == MAX_BATCH)
        );
        assert_eq!(code(&many(MAX_BATCH + 1)), Some("invalid_message"));
        // Unknown fields of a frame are ignored (a newer supervisor may add some).
        assert_eq!(
            parse_sandbox_message(r#"{"type":"heartbeat","load":0.5}"#),
            Ok(SandboxMessage::Heartbeat)
        );
    }

    #[test]
    fn sandbox_frames_are_bounded_and_hello_names_its_sandbox() {
        let parse = |t: &str| parse_sandbox_message(t).map_err(|e| e.code);
        // 256 KiB inclusive: a heartbeat padded to exactly the limit is taken, one byte more is not.
        let heartbeat = r#"{"type":"heartbeat"}"#;
        let padded = |len: usize| format!("{heartbeat}{}", " ".repeat(len - heartbeat.len()));
        assert_eq!(parse(&padded(256 * 1024)), Ok(SandboxMessage::Heartbeat));
        assert_eq!(parse(&padded(256 * 1024 + 1)), Err("frame_too_large"));
        assert_eq!(parse(heartbeat), Ok(SandboxMessage::Heartbeat));
        // Hello: a sandbox id of 1 to 100 bytes.
        let hello = |id: &str| parse(&format!(r#"{{"type":"hello","sandbox":"{id}"}}"#));
        assert_eq!(
            hello("sbx_1"),
            Ok(SandboxMessage::Hello {
                sandbox: "sbx_1".into()
            })
        );
        let longest = "s".repeat(100);
        assert_eq!(
            hello(&longest),
            Ok(SandboxMessage::Hello {
                sandbox: longest.clone()
            })
        );
        assert_eq!(hello(&"s".repeat(101)), Err("invalid_message"));
        assert_eq!(hello(""), Err("invalid_message"));
        assert_eq!(parse(r#"{"type":"hello"}"#), Err("invalid_message"));
        assert_eq!(
            parse(r#"{"type":"hello","sandbox":7}"#),
            Err("invalid_message")
        );
    }
}

/// `POST /sandbox`: give a session its sandbox (or return the one it has).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxCreate {
    pub session_id: String,
}

/// `POST /sandbox/:id/exec`, checked at the edge before it reaches the provider.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

impl ExecRequest {
    pub fn check(&self) -> Result<(), WireError> {
        if self.command.first().is_none_or(|c| c.is_empty()) {
            return Err(WireError::new(
                "invalid_command",
                "`command` must name a program, e.g. [\"git\", \"status\"]",
            ));
        }
        Ok(())
    }
}

/// What the session object is asked before a sandbox API call is passed to the provider.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxAuthorize {
    #[serde(default)]
    pub sandbox: Option<String>,
    pub op: String,
}

/// `POST /sandbox/:id/snapshot`: no options (the session's `SNAPSHOT_TTL_MS` applies, as to a turn's snapshot).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {}

/// `PUT /sessions/:id/egress`: the hosts this session's sandboxes may reach beyond the
/// repository's egress allowlist (owner only; replaces the earlier list).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionEgress {
    pub allow: Vec<String>,
}

/// `POST /sandbox/restore`: a new sandbox for the session from one of its snapshots (the newest live one when `snapshot` is absent).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRestore {
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// The session object is asked to snapshot one of its sandboxes now (internal, from the sandbox API).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotNow {
    pub sandbox: String,
}

//! The scripted model: an OpenAI-compatible streaming chat-completions server that replays a recorded conversation, or records one through an upstream.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};

/// One recorded model reply: text, then tool calls, with optional pacing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Turn {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Wait before the first chunk ("think time").
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay_ms: u64,
    /// Wait between text chunks (to make a run last, e.g. to test stop).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_delay_ms: u64,
    /// Only for conversations whose first user message contains this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

/// A recorded conversation. Request N of a conversation (N = assistant messages already in it) gets
/// turn N of the turns that apply to it (those without `when`, or whose `when` its first user message contains).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recording {
    #[serde(default)]
    pub turns: Vec<Turn>,
}

impl Recording {
    pub fn parse(text: &str) -> Result<Recording, String> {
        serde_json::from_str(text).map_err(|e| format!("the recording is not valid: {e}"))
    }
}

/// How the server answers.
pub enum Mode {
    Replay(Recording),
    /// Forward to an upstream OpenAI-compatible API and append each reply to `file`.
    Record {
        upstream: String,
        api_key: Option<String>,
        file: PathBuf,
    },
}

struct Shared {
    mode: Mode,
    recorded: Mutex<Recording>,
    http: reqwest::Client,
}

pub fn router(mode: Mode) -> Router {
    let shared = Arc::new(Shared {
        mode,
        recorded: Mutex::new(Recording::default()),
        http: reqwest::Client::new(),
    });
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { Json(json!({"ok": true})) }))
        .with_state(shared)
}

async fn models() -> Json<Value> {
    Json(
        json!({"object":"list","data":[{"id":"scripted","object":"model","owned_by":"nightshift"}]}),
    )
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message, "type": "invalid_request_error"}})),
    )
        .into_response()
}

/// The text of the conversation's first user message.
pub fn first_user_text(request: &Value) -> String {
    let Some(m) = request["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "user"))
    else {
        return String::new();
    };
    match &m["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The turn a request asks for: how many assistant replies the conversation already holds.
pub fn turn_index(request: &Value) -> usize {
    request["messages"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] == "assistant").count())
        .unwrap_or(0)
}

async fn chat(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body is not JSON",
        );
    };
    if !request["messages"].is_array() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "`messages` must be an array",
        );
    }
    match &s.mode {
        Mode::Replay(rec) => {
            let index = turn_index(&request);
            let first = first_user_text(&request);
            let applicable: Vec<&Turn> = rec
                .turns
                .iter()
                .filter(|t| t.when.as_ref().is_none_or(|w| first.contains(w.as_str())))
                .collect();
            let turn = applicable.get(index).map(|t| (*t).clone()).unwrap_or_else(|| Turn {
                text: format!(
                    "(scripted model: the recording has {} turns and this is request {}; nothing more to say)",
                    applicable.len(),
                    index + 1
                ),
                ..Turn::default()
            });
            let model = request["model"].as_str().unwrap_or("scripted").to_string();
            // `{model}` in a turn's text names the model the request asked for.
            let mut turn = turn;
            turn.text = turn.text.replace("{model}", &model);
            let stream = request["stream"].as_bool().unwrap_or(false);
            let prompt_tokens = (body.len() / 4) as u64;
            if stream {
                stream_turn(turn, model, prompt_tokens, index)
            } else {
                Json(whole_turn(&turn, &model, prompt_tokens, index)).into_response()
            }
        }
        Mode::Record {
            upstream,
            api_key,
            file,
        } => record(&s, upstream, api_key.as_deref(), file, &headers, body).await,
    }
}

fn completion_tokens(turn: &Turn) -> u64 {
    let args: usize = turn
        .tool_calls
        .iter()
        .map(|c| c.arguments.to_string().len())
        .sum();
    ((turn.text.len() + args) / 4 + 1) as u64
}

/// Tool call ids are unique within a conversation (`call_<turn>_<i>`), as a real model's are.
fn call_id(turn: usize, i: usize) -> String {
    format!("call_{turn}_{i}")
}

fn whole_turn(turn: &Turn, model: &str, prompt_tokens: u64, index: usize) -> Value {
    let calls: Vec<Value> = turn
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"id": call_id(index, i), "type": "function", "function": {"name": c.name, "arguments": c.arguments.to_string()}}))
        .collect();
    let done = turn.completion_finish();
    let ct = completion_tokens(turn);
    json!({
        "id": "chatcmpl-scripted", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": done,
            "message": {"role": "assistant", "content": turn.text, "tool_calls": if calls.is_empty() { Value::Null } else { Value::Array(calls) }}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ct, "total_tokens": prompt_tokens + ct}
    })
}

impl Turn {
    fn completion_finish(&self) -> &'static str {
        if self.tool_calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        }
    }
}

/// Splits text into chunks of a few words, like a model's token stream.
pub fn chunks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for (i, word) in text.split_inclusive(' ').enumerate() {
        cur.push_str(word);
        if i % 3 == 2 {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Streams numbered so the log can name them.
static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The first `n` characters of `text` (for the log).
fn head(text: &str, n: usize) -> String {
    let mut out: String = text.chars().take(n).collect();
    if text.chars().count() > n {
        out.push('…');
    }
    out
}

/// How a streamed reply ended: all of it sent, or cut off because the client went away
/// (e.g. the run was stopped and OpenCode aborted its request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    Complete,
    /// Cut off after this many of the reply's text chunks had been sent.
    CutOff {
        sent: usize,
    },
}

/// The log line for one streamed reply (stdout; the tests read it to see a stream cut off at the source).
pub fn stream_log_line(
    n: u64,
    index: usize,
    turn_text: &str,
    total: usize,
    end: StreamEnd,
) -> String {
    let what = format!(
        "scripted-model: stream {n} (turn {index}, {:?})",
        head(turn_text, 40)
    );
    match end {
        StreamEnd::Complete => format!("{what}: complete, {total} text chunks"),
        StreamEnd::CutOff { sent } => {
            format!("{what}: cut off after {sent} of {total} text chunks (the client went away)")
        }
    }
}

fn stream_turn(turn: Turn, model: String, prompt_tokens: u64, index: usize) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let n = STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    tokio::spawn(async move {
        let pieces = chunks(&turn.text);
        let total = pieces.len();
        let mut sent = 0;
        let end = async {
            let chunk = |delta: Value, finish: Option<&str>| {
                sse(
                    &json!({"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
                )
            };
            if turn.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(turn.delay_ms)).await;
            }
            if tx
                .send(chunk(json!({"role": "assistant", "content": ""}), None))
                .await
                .is_err()
            {
                return StreamEnd::CutOff { sent };
            }
            for piece in &pieces {
                if turn.chunk_delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(turn.chunk_delay_ms)).await;
                }
                if tx
                    .send(chunk(json!({"content": piece}), None))
                    .await
                    .is_err()
                {
                    return StreamEnd::CutOff { sent }; // the client went away (e.g. the run was stopped)
                }
                sent += 1;
            }
            for (i, call) in turn.tool_calls.iter().enumerate() {
                let delta = json!({"tool_calls": [{"index": i, "id": call_id(index, i), "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments.to_string()}}]});
                if tx.send(chunk(delta, None)).await.is_err() {
                    return StreamEnd::CutOff { sent };
                }
            }
            let ct = completion_tokens(&turn);
            let finish = tx
                .send(chunk(json!({}), Some(turn.completion_finish())))
                .await;
            let usage = tx
                .send(sse(&json!({"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ct, "total_tokens": prompt_tokens + ct}})))
                .await;
            let done = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            if finish.is_err() || usage.is_err() || done.is_err() {
                return StreamEnd::CutOff { sent };
            }
            StreamEnd::Complete
        }
        .await;
        println!("{}", stream_log_line(n, index, &turn.text, total, end));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "response"))
}

/// Accumulates a streamed upstream reply into a turn.
#[derive(Default)]
pub struct TurnBuilder {
    text: String,
    calls: Vec<(String, String)>,
    buf: String,
}

impl TurnBuilder {
    /// Feeds raw SSE bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        while let Some(pos) = self.buf.find('\n') {
            let line: String = self.buf.drain(..=pos).collect();
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            self.absorb(&v["choices"][0]["delta"]);
            self.absorb(&v["choices"][0]["message"]);
        }
    }

    fn absorb(&mut self, delta: &Value) {
        if let Some(t) = delta["content"].as_str() {
            self.text.push_str(t);
        }
        for c in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().unwrap_or(self.calls.len() as u64) as usize;
            while self.calls.len() <= i {
                self.calls.push(Default::default());
            }
            if let Some(n) = c["function"]["name"].as_str() {
                self.calls[i].0.push_str(n);
            }
            if let Some(a) = c["function"]["arguments"].as_str() {
                self.calls[i].1.push_str(a);
            }
        }
    }

    pub fn finish(self) -> Turn {
        Turn {
            text: self.text,
            tool_calls: self
                .calls
                .into_iter()
                .map(|(name, args)| ToolCall {
                    name,
                    arguments: serde_json::from_str(&args).unwrap_or(Value::String(args)),
                })
                .collect(),
            ..Turn::default()
        }
    }
}

async fn record(
    s: &Arc<Shared>,
    upstream: &str,
    api_key: Option<&str>,
    file: &std::path::Path,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let url = format!("{}/chat/completions", upstream.trim_end_matches('/'));
    let mut req = s
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    } else if let Some(a) = headers.get("authorization") {
        req = req.header("authorization", a);
    }
    let upstream_res = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                &format!("could not reach {url}: {e}"),
            )
        }
    };
    let status = upstream_res.status().as_u16();
    let ctype = upstream_res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shared = s.clone();
    let file = file.to_path_buf();
    tokio::spawn(async move {
        let mut builder = TurnBuilder::default();
        let mut stream = upstream_res.bytes_stream();
        let mut whole = Vec::new();
        while let Some(Ok(b)) = stream.next().await {
            builder.feed(&b);
            whole.extend_from_slice(&b);
            let _ = tx.send(b).await;
        }
        if !ctype.contains("event-stream") {
            if let Ok(v) = serde_json::from_slice::<Value>(&whole) {
                builder.absorb(&v["choices"][0]["message"]);
            }
        }
        if status < 300 {
            let mut rec = shared.recorded.lock().await;
            rec.turns.push(builder.finish());
            if let Ok(text) = serde_json::to_string_pretty(&*rec) {
                if let Err(e) = tokio::fs::write(&file, text).await {
                    eprintln!("scripted-model: could not write {}: {e}", file.display());
                }
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .status(status)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_index_counts_assistant_replies() {
        let r = json!({"messages": [{"role":"system"},{"role":"user"},{"role":"assistant"},{"role":"tool"},{"role":"assistant"}]});
        assert_eq!(turn_index(&r), 2);
        assert_eq!(turn_index(&json!({})), 0);
    }

    #[test]
    fn builder_reassembles_streamed_tool_calls() {
        let mut b = TurnBuilder::default();
        b.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n");
        b.feed(b"\ndata: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"write\",\"arguments\":\"{\\\"filePath\\\":\"}}]}}]}\n\n");
        b.feed(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"a\\\"}\"}}]}}]}\n\ndata: [DONE]\n\n");
        let t = b.finish();
        assert_eq!(t.text, "Hello");
        assert_eq!(t.tool_calls.len(), 1);
        assert_eq!(t.tool_calls[0].name, "write");
        assert_eq!(t.tool_calls[0].arguments, json!({"filePath": "a"}));
    }

    #[test]
    fn first_user_text_reads_strings_and_parts() {
        let r = json!({"messages": [{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"Take your time"}]}]});
        assert_eq!(first_user_text(&r), "Take your time");
        let r = json!({"messages": [{"role":"user","content":"plain"}]});
        assert_eq!(first_user_text(&r), "plain");
    }

    #[test]
    fn stream_log_lines_say_how_a_stream_ended() {
        let text: String = (0..30).map(|i| format!("w{i} ")).collect();
        let line = stream_log_line(7, 0, &text, 10, StreamEnd::CutOff { sent: 3 });
        assert_eq!(
            line,
            "scripted-model: stream 7 (turn 0, \"w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w1…\"): cut off after 3 of 10 text chunks (the client went away)"
        );
        assert!(stream_log_line(1, 2, "short", 1, StreamEnd::Complete)
            .ends_with("(turn 2, \"short\"): complete, 1 text chunks"));
    }

    #[test]
    fn chunks_cover_the_text() {
        let t = "one two three four five six seven";
        assert_eq!(chunks(t).concat(), t);
        assert!(chunks(t).len() >= 3);
    }

    #[test]
    fn recordings_refuse_unknown_fields() {
        assert!(Recording::parse(r#"{"turns":[{"txt":"x"}]}"#).is_err());
        assert!(Recording::parse(
            r#"{"turns":[{"text":"x","tool_calls":[{"name":"read","arguments":{}}]}]}"#
        )
        .is_ok());
    }
}

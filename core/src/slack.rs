//! Slack's wire formats and the pure rules around them: `v0` request signatures, the Events API envelope and what a message asks for, block_actions interactions, the Web API envelope and its rate limits, the status and choice messages in Block Kit (within its limits), the repository choice, and a workspace's remembered event ids. Used by both the Worker and the fake Slack; no I/O.

use std::collections::VecDeque;

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

use crate::github::{form_decode, form_encode};
use crate::signing::{hex, unhex};
type HmacSha256 = Hmac<Sha256>;

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------

/// Header carrying the request's Unix time in seconds.
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Header carrying `v0=<hex HMAC-SHA256 of "v0:{ts}:{body}">`.
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
/// Header numbering a redelivery (`1`, `2`, `3`); absent on the first attempt.
pub const RETRY_NUM_HEADER: &str = "x-slack-retry-num";
/// Header saying why Slack redelivers (`http_timeout`, `http_error`, …).
pub const RETRY_REASON_HEADER: &str = "x-slack-retry-reason";
/// Header an answer sets (`1`) so that Slack does not retry a deliberate non-2xx.
pub const NO_RETRY_HEADER: &str = "x-slack-no-retry";
/// The signature scheme's version, the prefix of the signature and of the signed string.
pub const SIGNATURE_VERSION: &str = "v0";
/// How far a request's timestamp may be from now, either way, in seconds.
pub const MAX_CLOCK_SKEW_S: u64 = 300;
/// How long Slack waits for a 2xx before it retries an event, in milliseconds.
pub const ACK_DEADLINE_MS: u64 = 3_000;

/// The `action_id` of the Stop button (its `value` is the session id).
pub const ACTION_STOP: &str = "stop";
/// The `action_id` of a repository choice button (its `value` is the repository's name).
pub const ACTION_CHOOSE_REPOSITORY: &str = "choose_repository";
/// The `value` of the "None of these" choice button.
pub const CHOICE_NONE: &str = "__none__";
/// The `action_id` of the View session button (a link; Slack still reports the click).
pub const ACTION_VIEW_SESSION: &str = "view_session";
/// The `action_id` of the Open PR button (a link; Slack still reports the click).
pub const ACTION_OPEN_PR: &str = "open_pr";
/// At most this many repositories are offered in a choice (plus "None of these").
pub const MAX_CHOICES: usize = 5;

/// Block Kit: at most this many blocks in a message.
pub const MAX_BLOCKS: usize = 50;
/// Block Kit: a section's text, at most this many characters.
pub const MAX_SECTION_TEXT: usize = 3_000;
/// Block Kit: at most this many elements in a context block.
pub const MAX_CONTEXT_ELEMENTS: usize = 10;
/// Block Kit: at most this many elements in an actions block.
pub const MAX_ACTIONS_ELEMENTS: usize = 25;
/// Block Kit: a button's text, at most this many characters.
pub const MAX_BUTTON_TEXT: usize = 75;
/// Block Kit: a button's URL, at most this many characters.
pub const MAX_URL: usize = 3_000;
/// Block Kit: an `action_id` or `block_id`, at most this many characters.
pub const MAX_ACTION_ID: usize = 255;
/// Block Kit: a button's `value`, at most this many characters.
pub const MAX_VALUE: usize = 2_000;
/// `chat.postMessage`: the `text` fallback, at most this many characters.
pub const MAX_MESSAGE_TEXT: usize = 40_000;
/// What a cut text ends with.
pub const ELLIPSIS: char = '…';

/// How long a workspace remembers an event id, in milliseconds (Slack's last retry comes
/// about 6 minutes after the first attempt).
pub const SEEN_EVENTS_MS: u64 = 3_600_000;
/// At most this many event ids are remembered per workspace (the oldest go first).
pub const MAX_SEEN_EVENTS: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a request from Slack was refused, or a Web API call failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SlackError {
    /// No signing secret is configured, so no request can be trusted.
    #[error("no Slack signing secret is configured")]
    NotConfigured,
    /// The request has no `X-Slack-Request-Timestamp`, or it is not a number of seconds.
    #[error("the request has no valid {TIMESTAMP_HEADER} header")]
    TimestampMissing,
    /// The request's timestamp is more than five minutes from now.
    #[error("the request's timestamp is more than {MAX_CLOCK_SKEW_S} seconds from now")]
    TimestampStale,
    /// The request has no `X-Slack-Signature`.
    #[error("the request is not signed: Slack sends {SIGNATURE_HEADER}")]
    SignatureMissing,
    /// The signature is not `v0=<64 hex digits>`.
    #[error("the {SIGNATURE_HEADER} header is not `v0=<64 hex digits>`")]
    SignatureMalformed,
    /// The signature does not match the body.
    #[error("the Slack signature does not match; check the signing secret")]
    SignatureInvalid,
    /// The body is not the JSON (or form) Slack sends.
    #[error("the Slack payload is not valid: {0}")]
    BadPayload(String),
    /// The Web API answered `{"ok": false, "error": …}`.
    #[error("Slack refused the call: {0}")]
    Api(String),
    /// The Web API answered 429; retry after this many seconds.
    #[error("Slack is rate limiting this call; retry after {0} s")]
    RateLimited(u64),
    /// The Web API answered an HTTP status other than 200 or 429.
    #[error("Slack answered HTTP {0}")]
    Http(u16),
    /// The Web API's answer is not the JSON its method promises.
    #[error("Slack's answer is not valid: {0}")]
    BadAnswer(String),
    /// A message's blocks break a Block Kit limit.
    #[error("the message's blocks break a Block Kit limit: {0}")]
    InvalidBlocks(String),
    /// The model's answer to the repository question is not the JSON asked for.
    #[error("the model's repository answer is not valid: {0}")]
    BadModelAnswer(String),
}

impl SlackError {
    /// A stable machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            SlackError::NotConfigured => "slack_not_configured",
            SlackError::TimestampMissing => "slack_timestamp_missing",
            SlackError::TimestampStale => "slack_timestamp_stale",
            SlackError::SignatureMissing => "slack_signature_missing",
            SlackError::SignatureMalformed => "slack_signature_malformed",
            SlackError::SignatureInvalid => "slack_signature_invalid",
            SlackError::BadPayload(_) => "slack_payload_invalid",
            SlackError::Api(_) => "slack_api_error",
            SlackError::RateLimited(_) => "slack_rate_limited",
            SlackError::Http(_) => "slack_http_error",
            SlackError::BadAnswer(_) => "slack_answer_invalid",
            SlackError::InvalidBlocks(_) => "slack_invalid_blocks",
            SlackError::BadModelAnswer(_) => "slack_model_answer_invalid",
        }
    }

    /// The HTTP status the Worker answers Slack with for a refused request (401 for
    /// anything about the signature, 503 when unconfigured, 400 otherwise).
    pub fn status(&self) -> u16 {
        match self {
            SlackError::NotConfigured => 503,
            SlackError::TimestampMissing
            | SlackError::TimestampStale
            | SlackError::SignatureMissing
            | SlackError::SignatureMalformed
            | SlackError::SignatureInvalid => 401,
            SlackError::RateLimited(_) => 429,
            SlackError::Api(_) | SlackError::Http(_) | SlackError::BadAnswer(_) => 502,
            SlackError::BadPayload(_)
            | SlackError::InvalidBlocks(_)
            | SlackError::BadModelAnswer(_) => 400,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request signatures
// ---------------------------------------------------------------------------------------------

fn signature_mac(secret: &[u8], timestamp: &str, body: &[u8]) -> Option<HmacSha256> {
    // HMAC takes keys of any length, so this never fails in practice.
    let mut mac = HmacSha256::new_from_slice(secret).ok()?;
    mac.update(SIGNATURE_VERSION.as_bytes());
    mac.update(b":");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    Some(mac)
}

/// The value of [`SIGNATURE_HEADER`] for `body` sent at `timestamp` (the header's text):
/// `v0=<lowercase hex HMAC-SHA256 of "v0:{timestamp}:{body}">`.
pub fn sign(signing_secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    match signature_mac(signing_secret, timestamp, body) {
        Some(mac) => format!("{SIGNATURE_VERSION}={}", hex(&mac.finalize().into_bytes())),
        None => String::new(),
    }
}

/// Checks a request's timestamp and signature headers against its raw body (the exact bytes,
/// before any parsing), the signature in constant time. A timestamp more than
/// [`MAX_CLOCK_SKEW_S`] from `now_s`, either way, is refused.
pub fn verify(
    signing_secret: &[u8],
    timestamp_header: Option<&str>,
    signature_header: Option<&str>,
    raw_body: &[u8],
    now_s: u64,
) -> Result<(), SlackError> {
    if signing_secret.is_empty() {
        return Err(SlackError::NotConfigured);
    }
    let timestamp = timestamp_header
        .map(str::trim)
        .filter(|text| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
        .ok_or(SlackError::TimestampMissing)?;
    let sent_s: u64 = timestamp
        .parse()
        .map_err(|_| SlackError::TimestampMissing)?;
    if sent_s.abs_diff(now_s) > MAX_CLOCK_SKEW_S {
        return Err(SlackError::TimestampStale);
    }
    let signature = signature_header
        .map(str::trim)
        .filter(|text| !text.is_empty())
        .ok_or(SlackError::SignatureMissing)?;
    let digest = signature
        .strip_prefix("v0=")
        .filter(|hex_digits| hex_digits.len() == 64)
        .and_then(unhex)
        .ok_or(SlackError::SignatureMalformed)?;
    signature_mac(signing_secret, timestamp, raw_body)
        .ok_or(SlackError::NotConfigured)?
        .verify_slice(&digest)
        .map_err(|_| SlackError::SignatureInvalid)
}

// ---------------------------------------------------------------------------------------------
// Events API
// ---------------------------------------------------------------------------------------------

/// What `POST /webhook/slack/events` receives, by its `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Envelope {
    /// Slack checking the Request URL: answer 200 with the challenge.
    UrlVerification(UrlVerification),
    /// An event the app subscribed to.
    EventCallback(Box<EventCallback>),
    /// Anything else (`app_rate_limited`, …): acknowledged, ignored.
    #[serde(other)]
    Other,
}

impl Envelope {
    /// Parses an Events API body (after [`verify`]).
    pub fn parse(raw_body: &[u8]) -> Result<Envelope, SlackError> {
        serde_json::from_slice(raw_body).map_err(|error| SlackError::BadPayload(error.to_string()))
    }
}

/// `{"token", "challenge", "type": "url_verification"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlVerification {
    /// The deprecated verification token (not checked: the signature is).
    #[serde(default)]
    pub token: String,
    /// The text to answer with.
    pub challenge: String,
}

/// One installation the event is visible to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorization {
    /// The workspace.
    #[serde(default)]
    pub team_id: String,
    /// The app's bot user in that workspace.
    #[serde(default)]
    pub user_id: String,
    /// Whether `user_id` is a bot user.
    #[serde(default)]
    pub is_bot: bool,
}

/// `{type: "event_callback", team_id, api_app_id, event_id, event_time, authorizations, event}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventCallback {
    /// The deprecated verification token (not checked: the signature is).
    #[serde(default)]
    pub token: String,
    /// The workspace (`T…`): the key of its Durable Object.
    pub team_id: String,
    /// The app (`A…`).
    #[serde(default)]
    pub api_app_id: String,
    /// The event's id (`Ev…`), the same on every retry: what de-duplicates.
    pub event_id: String,
    /// When the event happened, Unix seconds.
    #[serde(default)]
    pub event_time: u64,
    /// Who the event is visible to (the app's bot user among them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorizations: Vec<Authorization>,
    /// Whether the channel is shared with another organisation.
    #[serde(default)]
    pub is_ext_shared_channel: bool,
    /// The inner event.
    pub event: Event,
}

impl EventCallback {
    /// The app's bot user id, from the first bot authorization.
    pub fn bot_user_id(&self) -> Option<&str> {
        self.authorizations
            .iter()
            .find(|authorization| authorization.is_bot && !authorization.user_id.is_empty())
            .map(|authorization| authorization.user_id.as_str())
    }
}

/// An inner event, by its `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The bot was mentioned in a channel (`<@UBOT> …`).
    AppMention(MessageEvent),
    /// A message in a channel or direct message the app can see.
    Message(MessageEvent),
    /// An event this service does not handle.
    #[serde(other)]
    Other,
}

/// A message edit: who and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edited {
    /// Who edited it.
    #[serde(default)]
    pub user: String,
    /// When, a Slack timestamp.
    #[serde(default)]
    pub ts: String,
}

/// The fields of `app_mention` and `message` events (and of `conversations.replies` messages).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEvent {
    /// The author (`U…`); missing on some subtypes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The text, in Slack's markup (`<@U…>`, `&amp;`).
    #[serde(default)]
    pub text: String,
    /// The message's timestamp, its id within the channel.
    #[serde(default)]
    pub ts: String,
    /// The channel (`C…`, `D…` for direct messages).
    #[serde(default)]
    pub channel: String,
    /// When the event happened (equal to `ts` for new messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_ts: Option<String>,
    /// The thread's root timestamp, for messages in a thread (equal to `ts` on the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
    /// The thread root's author, for replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_user_id: Option<String>,
    /// Set when a bot (or an app) posted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    /// `bot_message`, `message_changed`, `message_deleted`, `thread_broadcast`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtype: Option<String>,
    /// `im`, `channel`, `group` or `mpim` (on `message` events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_type: Option<String>,
    /// Set on a message that was edited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited: Option<Edited>,
    /// The message as it is now (`message_changed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Box<MessageEvent>>,
    /// The message as it was (`message_changed`, `message_deleted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_message: Option<Box<MessageEvent>>,
    /// The deleted message's timestamp (`message_deleted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_ts: Option<String>,
}

impl MessageEvent {
    /// The thread this message belongs to, when it is a reply (not the root).
    pub fn reply_of(&self) -> Option<&str> {
        self.thread_ts
            .as_deref()
            .filter(|thread_ts| !thread_ts.is_empty() && *thread_ts != self.ts)
    }
}

/// Why an event starts nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// The bot's own message.
    OwnMessage,
    /// Another bot's or app's message.
    Bot,
    /// A message edit (`message_changed`, or an `edited` message).
    Edited,
    /// A deletion (`message_deleted`).
    Deleted,
    /// Another subtype (`channel_join`, …).
    Subtype,
    /// No author.
    NoUser,
    /// Nothing left once the mention is removed.
    Empty,
    /// A channel message mentioning the bot: its `app_mention` event handles it.
    MentionEvent,
    /// A channel message outside a thread that does not mention the bot.
    NotAddressed,
    /// An event type this service does not handle.
    Unhandled,
}

impl Ignored {
    /// A stable machine-readable reason.
    pub fn code(self) -> &'static str {
        match self {
            Ignored::OwnMessage => "own_message",
            Ignored::Bot => "bot",
            Ignored::Edited => "edited",
            Ignored::Deleted => "deleted",
            Ignored::Subtype => "subtype",
            Ignored::NoUser => "no_user",
            Ignored::Empty => "empty",
            Ignored::MentionEvent => "mention_event",
            Ignored::NotAddressed => "not_addressed",
            Ignored::Unhandled => "unhandled",
        }
    }
}

/// What an event asks of the bot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// A new request: a mention outside a thread, or a direct message.
    Start {
        /// Where it was said.
        channel: String,
        /// Who said it.
        user: String,
        /// The request, the bot's mention removed.
        text: String,
        /// The message's timestamp: the thread the session's messages go to.
        ts: String,
        /// Whether it came as a direct message.
        direct: bool,
    },
    /// A message in a thread. If the thread is a session's, it is a follow-up prompt (a
    /// channel message without a mention only from a session member, per the channel's
    /// setting); if not, a `mentioned` one (or any in a direct message) starts a session
    /// answering in that thread, and any other is ignored.
    FollowUp {
        /// Where it was said.
        channel: String,
        /// Who said it.
        user: String,
        /// The prompt, the bot's mention removed.
        text: String,
        /// The message's own timestamp (for reactions).
        ts: String,
        /// The thread's root.
        thread_ts: String,
        /// Whether the bot was mentioned (an `app_mention` event).
        mentioned: bool,
        /// Whether it came in a direct message.
        direct: bool,
    },
    /// Nothing to do.
    Ignore(Ignored),
}

/// Removes every `<@BOT>` and `<@BOT|name>` from `text` and trims it.
pub fn strip_mention(text: &str, bot_user_id: &str) -> String {
    if bot_user_id.is_empty() {
        return text.trim().to_string();
    }
    let opening = format!("<@{bot_user_id}");
    let mut kept = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&opening) {
        let after = &rest[at + opening.len()..];
        let closing = match after.chars().next() {
            Some('>') => Some(0),
            Some('|') => after.find('>'),
            _ => None,
        };
        match closing {
            Some(end) => {
                kept.push_str(&rest[..at]);
                rest = &after[end + 1..];
            }
            None => {
                kept.push_str(&rest[..at + opening.len()]);
                rest = after;
            }
        }
    }
    kept.push_str(rest);
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `text` mentions the bot (`<@BOT>` or `<@BOT|name>`).
pub fn mentions(text: &str, bot_user_id: &str) -> bool {
    !bot_user_id.is_empty()
        && (text.contains(&format!("<@{bot_user_id}>"))
            || text.contains(&format!("<@{bot_user_id}|")))
}

/// What `event` asks of the bot whose user id is `bot_user_id`: the bot's own messages, other
/// bots', edits, deletions and other subtypes are ignored; a mention or a direct message starts
/// a session; a message in a thread may be a follow-up.
pub fn intent(event: &Event, bot_user_id: &str) -> Intent {
    let (message, mentioned) = match event {
        Event::AppMention(message) => (message, true),
        Event::Message(message) => (message, false),
        Event::Other => return Intent::Ignore(Ignored::Unhandled),
    };
    match message.subtype.as_deref() {
        None | Some("thread_broadcast") | Some("file_share") => {}
        Some("message_changed") => return Intent::Ignore(Ignored::Edited),
        Some("message_deleted") => return Intent::Ignore(Ignored::Deleted),
        Some("bot_message") => return Intent::Ignore(Ignored::Bot),
        Some(_) => return Intent::Ignore(Ignored::Subtype),
    }
    let user = match message.user.as_deref().filter(|user| !user.is_empty()) {
        Some(user) if user == bot_user_id => return Intent::Ignore(Ignored::OwnMessage),
        Some(user) => user,
        None if message.bot_id.is_some() => return Intent::Ignore(Ignored::Bot),
        None => return Intent::Ignore(Ignored::NoUser),
    };
    if message.bot_id.is_some() {
        return Intent::Ignore(Ignored::Bot);
    }
    if message.edited.is_some() {
        return Intent::Ignore(Ignored::Edited);
    }
    let direct = message.channel_type.as_deref() == Some("im");
    if !mentioned && !direct && mentions(&message.text, bot_user_id) {
        return Intent::Ignore(Ignored::MentionEvent);
    }
    let text = strip_mention(&message.text, bot_user_id);
    if text.is_empty() {
        return Intent::Ignore(Ignored::Empty);
    }
    match message.reply_of() {
        Some(thread_ts) => Intent::FollowUp {
            channel: message.channel.clone(),
            user: user.to_string(),
            text,
            ts: message.ts.clone(),
            thread_ts: thread_ts.to_string(),
            mentioned,
            direct,
        },
        None if mentioned || direct => Intent::Start {
            channel: message.channel.clone(),
            user: user.to_string(),
            text,
            ts: message.ts.clone(),
            direct,
        },
        None => Intent::Ignore(Ignored::NotAddressed),
    }
}

// ---------------------------------------------------------------------------------------------
// Interactivity
// ---------------------------------------------------------------------------------------------

/// What `POST /webhook/slack/interactions` receives (the `payload` form field), by its `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Interaction {
    /// A button or select in a message was used.
    BlockActions(Box<BlockActions>),
    /// Anything else (`view_submission`, `shortcut`, …): acknowledged, ignored.
    #[serde(other)]
    Other,
}

impl Interaction {
    /// Parses an interaction from its raw form body `payload=<url-encoded JSON>` (after
    /// [`verify`], which covers these exact bytes).
    pub fn parse(raw_body: &[u8]) -> Result<Interaction, SlackError> {
        let form = std::str::from_utf8(raw_body)
            .map_err(|_| SlackError::BadPayload("the form body is not UTF-8".to_string()))?;
        let payload = form_decode(form)
            .into_iter()
            .find(|(key, _)| key == "payload")
            .map(|(_, value)| value)
            .ok_or_else(|| SlackError::BadPayload("no `payload` form field".to_string()))?;
        serde_json::from_str(&payload).map_err(|error| SlackError::BadPayload(error.to_string()))
    }

    /// The raw form body Slack sends for this interaction: `payload=<url-encoded JSON>`.
    pub fn form_body(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        form_encode(&[("payload", &json)])
    }
}

/// The person who clicked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionUser {
    /// `U…`.
    pub id: String,
    /// Their handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Their workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
}

/// Where the clicked element is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// `message`, `view`, …
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The message's timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ts: Option<String>,
    /// The message's channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<String>,
    /// Whether the message is ephemeral.
    #[serde(default)]
    pub is_ephemeral: bool,
    /// The message's thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
}

/// A workspace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    /// `T…`.
    pub id: String,
    /// The workspace's subdomain.
    #[serde(default)]
    pub domain: String,
}

/// A channel as interactions name it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRef {
    /// `C…` or `D…`.
    pub id: String,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The message holding the clicked element.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionMessage {
    /// Its timestamp.
    pub ts: String,
    /// Its thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
    /// Its fallback text.
    #[serde(default)]
    pub text: String,
}

/// A select's chosen option.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectedOption {
    /// The option's value.
    pub value: String,
}

/// One used element.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// `button`, `static_select`, …
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The element's `action_id`.
    pub action_id: String,
    /// The element's block.
    #[serde(default)]
    pub block_id: String,
    /// A button's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A select's chosen option.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_option: Option<SelectedOption>,
    /// When it was used, a Slack timestamp.
    #[serde(default)]
    pub action_ts: String,
}

impl Action {
    /// The button's value or the select's chosen value.
    pub fn chosen(&self) -> Option<&str> {
        self.value.as_deref().or(self
            .selected_option
            .as_ref()
            .map(|option| option.value.as_str()))
    }
}

/// The `block_actions` payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockActions {
    /// Who clicked.
    pub user: ActionUser,
    /// The app.
    #[serde(default)]
    pub api_app_id: String,
    /// Where the element is.
    #[serde(default)]
    pub container: Container,
    /// For opening a modal.
    #[serde(default)]
    pub trigger_id: String,
    /// The workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<Team>,
    /// The channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelRef>,
    /// The message holding the element.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<ActionMessage>,
    /// Where to post a replacement or a reply (valid 30 minutes, 5 uses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_url: Option<String>,
    /// The used elements (one for a click).
    #[serde(default)]
    pub actions: Vec<Action>,
}

/// What a click asks of the bot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clicked {
    /// Stop the session.
    Stop {
        /// The session's id (the button's value).
        session_id: String,
    },
    /// A repository was chosen for a pending request (`None`: "None of these").
    Choose {
        /// The chosen repository's name.
        repository: Option<String>,
    },
    /// A link button or anything else: nothing to do.
    Nothing,
}

impl BlockActions {
    /// The workspace: `team.id`, else the user's `team_id`.
    pub fn team_id(&self) -> Option<&str> {
        self.team
            .as_ref()
            .map(|team| team.id.as_str())
            .or(self.user.team_id.as_deref())
            .filter(|team_id| !team_id.is_empty())
    }

    /// The channel: `channel.id`, else the container's.
    pub fn channel_id(&self) -> Option<&str> {
        self.channel
            .as_ref()
            .map(|channel| channel.id.as_str())
            .or(self.container.channel_id.as_deref())
            .filter(|channel_id| !channel_id.is_empty())
    }

    /// The clicked message's timestamp: `message.ts`, else the container's.
    pub fn message_ts(&self) -> Option<&str> {
        self.message
            .as_ref()
            .map(|message| message.ts.as_str())
            .or(self.container.message_ts.as_deref())
            .filter(|ts| !ts.is_empty())
    }

    /// The clicked message's thread, if it is in one.
    pub fn thread_ts(&self) -> Option<&str> {
        self.message
            .as_ref()
            .and_then(|message| message.thread_ts.as_deref())
            .or(self.container.thread_ts.as_deref())
            .filter(|ts| !ts.is_empty())
    }

    /// What the (first) action asks for.
    pub fn clicked(&self) -> Clicked {
        let Some(action) = self.actions.first() else {
            return Clicked::Nothing;
        };
        let chosen = action.chosen().filter(|value| !value.is_empty());
        match (action.action_id.as_str(), chosen) {
            (ACTION_STOP, Some(session_id)) => Clicked::Stop {
                session_id: session_id.to_string(),
            },
            (ACTION_CHOOSE_REPOSITORY, Some(CHOICE_NONE)) => Clicked::Choose { repository: None },
            (ACTION_CHOOSE_REPOSITORY, Some(repository)) => Clicked::Choose {
                repository: Some(repository.to_string()),
            },
            _ => Clicked::Nothing,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Web API
// ---------------------------------------------------------------------------------------------

/// The Web API methods the bot calls (`POST {base}/api/{name}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `auth.test`: the bot's own user id.
    AuthTest,
    /// `chat.postMessage`.
    PostMessage,
    /// `chat.postEphemeral`: a message only one person in the channel sees.
    PostEphemeral,
    /// `chat.update`.
    Update,
    /// `reactions.add`.
    ReactionsAdd,
    /// `users.info`: a person's email.
    UsersInfo,
    /// `conversations.replies`: a thread.
    ConversationsReplies,
}

impl Method {
    /// Every method, for routing in the fake.
    pub const ALL: [Method; 7] = [
        Method::AuthTest,
        Method::PostMessage,
        Method::PostEphemeral,
        Method::Update,
        Method::ReactionsAdd,
        Method::UsersInfo,
        Method::ConversationsReplies,
    ];

    /// The method's name in the URL.
    pub fn name(self) -> &'static str {
        match self {
            Method::AuthTest => "auth.test",
            Method::PostMessage => "chat.postMessage",
            Method::PostEphemeral => "chat.postEphemeral",
            Method::Update => "chat.update",
            Method::ReactionsAdd => "reactions.add",
            Method::UsersInfo => "users.info",
            Method::ConversationsReplies => "conversations.replies",
        }
    }

    /// The method named `name`.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|method| method.name() == name)
    }

    /// `{api_base}/{name}` (`api_base` is `https://slack.com/api` or a fake's).
    pub fn url(self, api_base: &str) -> String {
        format!("{}/{}", api_base.trim_end_matches('/'), self.name())
    }
}

/// Every Web API answer: `{ok, error?, warning?, …the method's fields}` (errors come as HTTP 200).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer<T> {
    /// Whether the call succeeded.
    pub ok: bool,
    /// Why not (`channel_not_found`, `invalid_auth`, `ratelimited`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A warning on success (`missing_charset`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// The method's own fields (absent, or not readable, on failure).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
}

impl<T> Answer<T> {
    /// A successful answer carrying `data`.
    pub fn success(data: T) -> Answer<T> {
        Answer {
            ok: true,
            error: None,
            warning: None,
            data: Some(data),
        }
    }

    /// A failed answer: `{"ok": false, "error": error}`.
    pub fn failure(error: &str) -> Answer<T> {
        Answer {
            ok: false,
            error: Some(error.to_string()),
            warning: None,
            data: None,
        }
    }
}

/// An answer with no fields of its own (`reactions.add`), or a call with no arguments
/// (`auth.test`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// How long to wait before retrying a call Slack answered with `status` and `Retry-After:
/// retry_after_header`: `None` unless the status is 429; a missing or unreadable header waits
/// one second, and a wait is at least 1 and at most 3600 seconds.
pub fn retry_after(status: u16, retry_after_header: Option<&str>) -> Option<u64> {
    if status != 429 {
        return None;
    }
    let seconds = retry_after_header
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Some(seconds.clamp(1, 3_600))
}

/// Reads a Web API answer: 429 is [`SlackError::RateLimited`], another non-200 status
/// [`SlackError::Http`], `ok: false` [`SlackError::Api`], and an answer without the method's
/// fields [`SlackError::BadAnswer`].
pub fn read_answer<T: DeserializeOwned>(
    status: u16,
    retry_after_header: Option<&str>,
    body: &[u8],
) -> Result<T, SlackError> {
    if let Some(seconds) = retry_after(status, retry_after_header) {
        return Err(SlackError::RateLimited(seconds));
    }
    if status != 200 {
        return Err(SlackError::Http(status));
    }
    let answer: Answer<T> =
        serde_json::from_slice(body).map_err(|error| SlackError::BadAnswer(error.to_string()))?;
    if !answer.ok {
        let error = answer.error.unwrap_or_else(|| "unknown_error".to_string());
        return Err(match error.as_str() {
            "ratelimited" | "rate_limited" => SlackError::RateLimited(1),
            _ => SlackError::Api(error),
        });
    }
    answer
        .data
        .ok_or_else(|| SlackError::BadAnswer("the answer lacks the method's fields".to_string()))
}

/// Structured data attached to a posted message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The kind of data (`nightshift_session`).
    pub event_type: String,
    /// The data.
    pub event_payload: serde_json::Map<String, serde_json::Value>,
}

/// The body of `chat.postMessage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostMessage {
    /// The channel.
    pub channel: String,
    /// The fallback text (notifications, screen readers); always set.
    #[serde(default)]
    pub text: String,
    /// The message's blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<Block>,
    /// Post as a reply in this thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
    /// Whether links unfurl (off for status messages).
    #[serde(default)]
    pub unfurl_links: bool,
    /// Structured data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// The body of `chat.postEphemeral`: shown to `user` only, in `channel` (in `thread_ts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostEphemeral {
    pub channel: String,
    /// The only person who sees it.
    pub user: String,
    #[serde(default)]
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<Block>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
}

/// `chat.postEphemeral`'s answer: `{ok, message_ts}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostEphemeralAnswer {
    pub message_ts: String,
}

/// The body of `chat.update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// The message's channel.
    pub channel: String,
    /// The message's timestamp.
    pub ts: String,
    /// The new fallback text.
    #[serde(default)]
    pub text: String,
    /// The new blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<Block>,
}

/// The body of `reactions.add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionAdd {
    /// The message's channel.
    pub channel: String,
    /// The message's timestamp.
    pub timestamp: String,
    /// The emoji's name without colons (`eyes`, `white_check_mark`).
    pub name: String,
}

/// The body (or query) of `users.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsersInfo {
    /// The person (`U…`).
    pub user: String,
}

/// The body (or query) of `conversations.replies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationsReplies {
    /// The channel.
    pub channel: String,
    /// The thread's root.
    pub ts: String,
    /// At most this many messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// A posted message, as `chat.postMessage` answers it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostedMessage {
    /// Its fallback text.
    #[serde(default)]
    pub text: String,
    /// Its timestamp.
    #[serde(default)]
    pub ts: String,
    /// Its thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
    /// The bot user that posted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The bot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    /// Its blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<Block>,
}

/// `chat.postMessage`'s answer: `{ok, channel, ts, message}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostMessageAnswer {
    /// The channel.
    pub channel: String,
    /// The message's timestamp: what `chat.update` needs.
    pub ts: String,
    /// The message.
    #[serde(default)]
    pub message: PostedMessage,
}

/// What the bot reads of `chat.postMessage`'s answer: the message's timestamp (the rest, the
/// message with its blocks, is not read back).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PostedTs {
    pub ts: String,
}

/// `chat.update`'s answer: `{ok, channel, ts, text}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateAnswer {
    /// The channel.
    pub channel: String,
    /// The message's timestamp.
    pub ts: String,
    /// The new text.
    #[serde(default)]
    pub text: String,
}

/// A person's profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Their email (needs the `users:read.email` scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Their full name.
    #[serde(default)]
    pub real_name: String,
    /// Their display name.
    #[serde(default)]
    pub display_name: String,
}

/// A person, as `users.info` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlackUser {
    /// `U…`.
    pub id: String,
    /// Their workspace.
    #[serde(default)]
    pub team_id: String,
    /// Their handle.
    #[serde(default)]
    pub name: String,
    /// Their full name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real_name: Option<String>,
    /// Whether the account is deactivated.
    #[serde(default)]
    pub deleted: bool,
    /// Whether it is a bot.
    #[serde(default)]
    pub is_bot: bool,
    /// Their profile.
    #[serde(default)]
    pub profile: Profile,
}

impl SlackUser {
    /// The verified email a Nightshift identity may be linked by (none for bots and the
    /// deactivated).
    pub fn email(&self) -> Option<&str> {
        if self.deleted || self.is_bot {
            return None;
        }
        self.profile
            .email
            .as_deref()
            .filter(|email| email.contains('@'))
    }

    /// The best name to show: the full name, else the display name, else the handle.
    pub fn shown_name(&self) -> &str {
        [
            self.real_name.as_deref().unwrap_or(""),
            self.profile.real_name.as_str(),
            self.profile.display_name.as_str(),
        ]
        .into_iter()
        .find(|name| !name.is_empty())
        .unwrap_or(self.name.as_str())
    }
}

/// `users.info`'s answer: `{ok, user}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsersInfoAnswer {
    /// The person.
    pub user: SlackUser,
}

/// `auth.test`'s answer: who the token is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthTestAnswer {
    /// The workspace's URL.
    #[serde(default)]
    pub url: String,
    /// The workspace's name.
    #[serde(default)]
    pub team: String,
    /// The bot user's handle.
    #[serde(default)]
    pub user: String,
    /// The workspace.
    #[serde(default)]
    pub team_id: String,
    /// The bot user (`U…`): its own messages are ignored, its mention stripped.
    pub user_id: String,
    /// The bot (`B…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
}

/// `conversations.replies`' answer: the thread, root first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepliesAnswer {
    /// The messages.
    pub messages: Vec<MessageEvent>,
    /// Whether more are left.
    #[serde(default)]
    pub has_more: bool,
}

// ---------------------------------------------------------------------------------------------
// Block Kit
// ---------------------------------------------------------------------------------------------

/// A text object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Text {
    /// Slack's markup (`*bold*`, `<url|label>`).
    #[serde(rename = "mrkdwn")]
    Mrkdwn {
        /// The text.
        text: String,
    },
    /// Plain text (buttons, headers).
    #[serde(rename = "plain_text")]
    Plain {
        /// The text.
        text: String,
        /// Whether `:emoji:` codes are shown as emoji.
        #[serde(default)]
        emoji: bool,
    },
}

impl Text {
    /// Mrkdwn text.
    pub fn mrkdwn(text: impl Into<String>) -> Text {
        Text::Mrkdwn { text: text.into() }
    }

    /// Plain text with emoji.
    pub fn plain(text: impl Into<String>) -> Text {
        Text::Plain {
            text: text.into(),
            emoji: true,
        }
    }

    /// The text itself.
    pub fn text(&self) -> &str {
        match self {
            Text::Mrkdwn { text } | Text::Plain { text, .. } => text,
        }
    }
}

/// An interactive element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Element {
    /// A button: a link when `url` is set, else an action the bot receives.
    Button {
        /// The label (plain text, ≤ 75 characters).
        text: Text,
        /// The action's id (≤ 255 characters).
        action_id: String,
        /// What the bot receives (≤ 2000 characters).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
        /// A link to open (≤ 3000 characters).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        /// `primary` or `danger`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        style: Option<String>,
    },
}

/// A layout block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    /// A text section, with an optional element beside it.
    Section {
        /// The text (≤ 3000 characters).
        text: Text,
        /// The block's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block_id: Option<String>,
        /// An element beside the text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        accessory: Option<Element>,
    },
    /// Small text elements on one line (≤ 10).
    Context {
        /// The elements.
        elements: Vec<Text>,
        /// The block's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block_id: Option<String>,
    },
    /// A row of interactive elements (≤ 25).
    Actions {
        /// The elements.
        elements: Vec<Element>,
        /// The block's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block_id: Option<String>,
    },
    /// A line.
    Divider {},
}

/// `text` cut to at most `max_chars` characters, ending with [`ELLIPSIS`] when cut.
pub fn cut(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let kept: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    format!("{kept}{ELLIPSIS}")
}

/// `text` with Slack's three control characters escaped (`&`, `<`, `>`), for text that is not
/// already Slack markup.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn too_long(what: &str, text: &str, max_chars: usize) -> Result<(), SlackError> {
    let length = text.chars().count();
    if length > max_chars {
        return Err(SlackError::InvalidBlocks(format!(
            "{what} has {length} characters, more than {max_chars}"
        )));
    }
    Ok(())
}

fn check_element(element: &Element) -> Result<(), SlackError> {
    match element {
        Element::Button {
            text,
            action_id,
            value,
            url,
            ..
        } => {
            too_long("a button's text", text.text(), MAX_BUTTON_TEXT)?;
            too_long("an action_id", action_id, MAX_ACTION_ID)?;
            too_long(
                "a button's value",
                value.as_deref().unwrap_or(""),
                MAX_VALUE,
            )?;
            too_long("a button's url", url.as_deref().unwrap_or(""), MAX_URL)
        }
    }
}

/// Checks `blocks` and the fallback `text` against Block Kit's limits (as Slack answers
/// `invalid_blocks` or `msg_too_long`).
pub fn check_message(text: &str, blocks: &[Block]) -> Result<(), SlackError> {
    too_long("the message text", text, MAX_MESSAGE_TEXT)?;
    if blocks.len() > MAX_BLOCKS {
        return Err(SlackError::InvalidBlocks(format!(
            "{} blocks, more than {MAX_BLOCKS}",
            blocks.len()
        )));
    }
    for block in blocks {
        match block {
            Block::Section {
                text,
                block_id,
                accessory,
            } => {
                too_long("a section's text", text.text(), MAX_SECTION_TEXT)?;
                too_long(
                    "a block_id",
                    block_id.as_deref().unwrap_or(""),
                    MAX_ACTION_ID,
                )?;
                if let Some(element) = accessory {
                    check_element(element)?;
                }
            }
            Block::Context { elements, block_id } => {
                if elements.len() > MAX_CONTEXT_ELEMENTS {
                    return Err(SlackError::InvalidBlocks(format!(
                        "a context block has {} elements, more than {MAX_CONTEXT_ELEMENTS}",
                        elements.len()
                    )));
                }
                too_long(
                    "a block_id",
                    block_id.as_deref().unwrap_or(""),
                    MAX_ACTION_ID,
                )?;
                for element in elements {
                    too_long("a context element", element.text(), MAX_SECTION_TEXT)?;
                }
            }
            Block::Actions { elements, block_id } => {
                if elements.len() > MAX_ACTIONS_ELEMENTS {
                    return Err(SlackError::InvalidBlocks(format!(
                        "an actions block has {} elements, more than {MAX_ACTIONS_ELEMENTS}",
                        elements.len()
                    )));
                }
                too_long(
                    "a block_id",
                    block_id.as_deref().unwrap_or(""),
                    MAX_ACTION_ID,
                )?;
                let mut action_ids: Vec<&str> = Vec::with_capacity(elements.len());
                for element in elements {
                    check_element(element)?;
                    let Element::Button { action_id, .. } = element;
                    if action_ids.contains(&action_id.as_str()) {
                        return Err(SlackError::InvalidBlocks(format!(
                            "the action_id {action_id} repeats within a block"
                        )));
                    }
                    action_ids.push(action_id);
                }
            }
            Block::Divider {} => {}
        }
    }
    Ok(())
}

fn button(label: &str, action_id: &str, value: Option<&str>, url: Option<&str>) -> Element {
    Element::Button {
        text: Text::plain(cut(label, MAX_BUTTON_TEXT)),
        action_id: cut(action_id, MAX_ACTION_ID),
        value: value.map(str::to_string),
        url: url.map(str::to_string),
        style: None,
    }
}

/// Where a session is, as its status message says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// The sandbox is starting.
    Starting,
    /// The agent is working.
    Working {
        /// Files changed so far.
        files_changed: u32,
    },
    /// Finished.
    Done {
        /// The pull request, when one was opened.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pr_url: Option<String>,
    },
    /// Failed.
    Failed {
        /// Why, in words.
        reason: String,
    },
}

impl Stage {
    /// Whether the session is over (no Stop button).
    pub fn is_final(&self) -> bool {
        matches!(self, Stage::Done { .. } | Stage::Failed { .. })
    }

    fn line(&self) -> String {
        match self {
            Stage::Starting => ":hourglass_flowing_sand: Starting the sandbox…".to_string(),
            Stage::Working { files_changed: 0 } => ":gear: Working…".to_string(),
            Stage::Working { files_changed: 1 } => ":gear: Working (1 file changed)".to_string(),
            Stage::Working { files_changed } => {
                format!(":gear: Working ({files_changed} files changed)")
            }
            Stage::Done { pr_url: Some(url) } if url.chars().count() <= MAX_URL => {
                format!(":white_check_mark: Done — <{url}|pull request>")
            }
            Stage::Done { .. } => ":white_check_mark: Done".to_string(),
            Stage::Failed { reason } => format!(":x: Failed: {}", escape(reason)),
        }
    }

    fn plain(&self) -> String {
        match self {
            Stage::Starting => "Starting".to_string(),
            Stage::Working { .. } => "Working".to_string(),
            Stage::Done { .. } => "Done".to_string(),
            Stage::Failed { .. } => "Failed".to_string(),
        }
    }
}

/// What a session's status message shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// The request, as Slack markup (the person's text as Slack sent it).
    pub task: String,
    /// The repository's name.
    pub repository: String,
    /// The session's branch.
    pub branch: String,
    /// The model.
    pub model: String,
    /// Who asked, as Slack markup (`<@U…>` mentions them).
    pub asked_by: String,
    /// Where the session is.
    pub stage: Stage,
    /// The session's id (the Stop button's value).
    pub session_id: String,
    /// The session in the web app.
    pub session_url: String,
    /// The pull request (else the `Done` stage's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_url: Option<String>,
}

impl StatusView {
    fn pr(&self) -> Option<&str> {
        let done_pr = match &self.stage {
            Stage::Done { pr_url } => pr_url.as_deref(),
            _ => None,
        };
        self.pr_url.as_deref().or(done_pr)
    }
}

/// The status message's blocks: the task; `repository · branch · model · asked by`; the stage
/// line; View session, Open PR (with a pull request) and Stop (until done or failed). Every
/// text is cut to Block Kit's limits; a link longer than a URL may be is left out.
pub fn status_blocks(view: &StatusView) -> Vec<Block> {
    let meta = [
        format!("`{}`", escape(&view.repository)),
        format!("`{}`", escape(&view.branch)),
        escape(&view.model),
        format!("asked by {}", view.asked_by),
    ]
    .iter()
    .map(|piece| cut(piece, 700))
    .collect::<Vec<_>>()
    .join(" · ");
    let mut buttons = Vec::new();
    if !view.session_url.is_empty() && view.session_url.chars().count() <= MAX_URL {
        buttons.push(button(
            "View session",
            ACTION_VIEW_SESSION,
            None,
            Some(&view.session_url),
        ));
    }
    if let Some(pr_url) = view
        .pr()
        .filter(|url| !url.is_empty() && url.chars().count() <= MAX_URL)
    {
        buttons.push(button("Open PR", ACTION_OPEN_PR, None, Some(pr_url)));
    }
    if !view.stage.is_final() && view.session_id.chars().count() <= MAX_VALUE {
        let mut stop = button("Stop", ACTION_STOP, Some(&view.session_id), None);
        let Element::Button { style, .. } = &mut stop;
        *style = Some("danger".to_string());
        buttons.push(stop);
    }
    let mut blocks = vec![
        Block::Section {
            text: Text::mrkdwn(cut(&view.task, MAX_SECTION_TEXT)),
            block_id: Some("task".to_string()),
            accessory: None,
        },
        Block::Context {
            elements: vec![Text::mrkdwn(cut(&meta, MAX_SECTION_TEXT))],
            block_id: Some("meta".to_string()),
        },
        Block::Section {
            text: Text::mrkdwn(cut(&view.stage.line(), MAX_SECTION_TEXT)),
            block_id: Some("stage".to_string()),
            accessory: None,
        },
    ];
    if !buttons.is_empty() {
        blocks.push(Block::Actions {
            elements: buttons,
            block_id: Some("actions".to_string()),
        });
    }
    blocks
}

/// The status message's fallback text (notifications): `Stage: task`, cut to the limit.
pub fn status_text(view: &StatusView) -> String {
    cut(
        &format!("{}: {}", view.stage.plain(), view.task),
        MAX_MESSAGE_TEXT,
    )
}

/// A repository offered in a choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranked {
    /// The repository's name.
    pub repository: String,
    /// Why it is offered (its description).
    pub why: String,
    /// Its score (the scorer's, or the model's confidence).
    pub score: f32,
}

/// The blocks asking which repository a request is for: the question, up to [`MAX_CHOICES`]
/// repositories each with a Choose button (`choose_repository`, value = the name), and
/// "None of these" (value [`CHOICE_NONE`]).
pub fn choice_blocks(question: &str, options: &[Ranked]) -> Vec<Block> {
    let mut blocks = vec![Block::Section {
        text: Text::mrkdwn(cut(question, MAX_SECTION_TEXT)),
        block_id: Some("question".to_string()),
        accessory: None,
    }];
    let offered = options
        .iter()
        .filter(|option| {
            !option.repository.is_empty() && option.repository.chars().count() <= MAX_VALUE
        })
        .take(MAX_CHOICES);
    for (index, option) in offered.enumerate() {
        let name = cut(&escape(&option.repository), 300);
        let label = if option.why.is_empty() {
            format!("*{name}*")
        } else {
            format!("*{name}* — {}", escape(&option.why))
        };
        blocks.push(Block::Section {
            text: Text::mrkdwn(cut(&label, MAX_SECTION_TEXT)),
            block_id: Some(format!("choice_{index}")),
            accessory: Some(button(
                "Choose",
                ACTION_CHOOSE_REPOSITORY,
                Some(&option.repository),
                None,
            )),
        });
    }
    blocks.push(Block::Actions {
        elements: vec![button(
            "None of these",
            ACTION_CHOOSE_REPOSITORY,
            Some(CHOICE_NONE),
            None,
        )],
        block_id: Some("choice_none".to_string()),
    });
    blocks
}

/// The choice message's fallback text.
pub fn choice_text(question: &str) -> String {
    cut(question, MAX_MESSAGE_TEXT)
}

// ---------------------------------------------------------------------------------------------
// Choosing the repository
// ---------------------------------------------------------------------------------------------

/// A routing rule: a message containing `pattern` (whole words, any case) goes to `repository`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingRule {
    /// One or more words.
    pub pattern: String,
    /// The repository's name.
    pub repository: String,
}

/// A repository the person may start a session in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The registered name (what a choice answers with).
    pub name: String,
    /// `owner/repo` on GitHub.
    #[serde(default)]
    pub full_name: String,
    /// Its description.
    #[serde(default)]
    pub description: String,
    /// Its topics.
    #[serde(default)]
    pub topics: Vec<String>,
}

impl Candidate {
    fn is(&self, name: &str) -> bool {
        !name.is_empty()
            && (self.name.eq_ignore_ascii_case(name) || self.full_name.eq_ignore_ascii_case(name))
    }
}

/// How a repository was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum How {
    /// `owner/repo` in the text.
    Explicit,
    /// A routing rule.
    Rule,
    /// The channel's default.
    ChannelDefault,
    /// The only repository the person may use.
    OnlyCandidate,
    /// The lexical scorer.
    Scorer,
    /// The model.
    Model,
}

/// The outcome of a repository choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "choice", rename_all = "snake_case")]
pub enum Choice {
    /// Start in this repository.
    Chosen {
        /// The repository's registered name.
        repository: String,
        /// How sure, 0 to 1.
        confidence: f32,
        /// Which step chose it.
        how: How,
    },
    /// Not clear: ask the model (after the scorer) or the person, offering these first.
    Ask {
        /// The likely repositories, best first.
        ranked: Vec<Ranked>,
    },
    /// The person may use no repository at all.
    NoRepository,
}

/// The scorer's lowest score for a choice.
pub const MIN_SCORE: f32 = 3.0;
/// The scorer chooses only when its best is at least this many times the runner-up's.
pub const LEAD_FACTOR: f32 = 2.0;

const STOPWORDS: &[&str] = &[
    "a",
    "an",
    "and",
    "are",
    "as",
    "at",
    "be",
    "by",
    "can",
    "could",
    "do",
    "for",
    "from",
    "in",
    "is",
    "it",
    "its",
    "me",
    "my",
    "of",
    "on",
    "or",
    "our",
    "please",
    "repo",
    "repository",
    "so",
    "that",
    "the",
    "this",
    "to",
    "we",
    "with",
    "you",
    "your",
];

/// Lowercase words of letters and digits, stopwords and one-letter words left out.
fn words(text: &str) -> Vec<String> {
    text.split(|ch: char| !ch.is_alphanumeric())
        .filter(|word| word.chars().count() > 1)
        .map(str::to_lowercase)
        .filter(|word| !STOPWORDS.contains(&word.as_str()))
        .collect()
}

/// Lowercase words, stopwords kept (for phrase matching).
fn all_words(text: &str) -> Vec<String> {
    text.split(|ch: char| !ch.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn contains_phrase(haystack: &[String], phrase: &[String]) -> bool {
    !phrase.is_empty()
        && haystack
            .windows(phrase.len())
            .any(|window| window == phrase)
}

/// The `owner/repo` names in `text` (also inside GitHub URLs), in order.
fn explicit_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let is_name_char = |ch: char| ch.is_ascii_alphanumeric() || "-_./".contains(ch);
    for token in text.split(|ch: char| !is_name_char(ch)) {
        let segments: Vec<&str> = token
            .split('/')
            .map(|segment| segment.trim_matches('.'))
            .collect();
        for pair in segments.windows(2) {
            if !pair[0].is_empty() && !pair[1].is_empty() {
                names.push(format!("{}/{}", pair[0], pair[1]));
            }
        }
    }
    names
}

fn score(text_words: &[String], candidate: &Candidate) -> f32 {
    let short = candidate
        .full_name
        .rsplit('/')
        .next()
        .filter(|short| !short.is_empty())
        .unwrap_or(candidate.name.as_str());
    let name_words = {
        let mut name_words = words(&candidate.name);
        name_words.extend(words(short));
        name_words.sort();
        name_words.dedup();
        name_words
    };
    let topic_words = {
        let mut topic_words: Vec<String> = candidate
            .topics
            .iter()
            .flat_map(|topic| {
                let mut pieces = words(topic);
                pieces.push(topic.to_lowercase());
                pieces
            })
            .collect();
        topic_words.sort();
        topic_words.dedup();
        topic_words
    };
    let description_words = {
        let mut description_words = words(&candidate.description);
        description_words.sort();
        description_words.dedup();
        description_words
    };
    let mut unique_words: Vec<&String> = text_words.iter().collect();
    unique_words.sort();
    unique_words.dedup();
    let mut total = 0.0;
    for word in unique_words {
        if name_words.contains(word) {
            total += 3.0;
        }
        if topic_words.contains(word) {
            total += 2.0;
        }
        if description_words.contains(word) {
            total += 1.0;
        }
    }
    let whole_name = all_words(short);
    let said = all_words(&text_words.join(" "));
    if whole_name.len() > 1 && contains_phrase(&said, &whole_name) {
        total += 3.0;
    }
    total
}

/// The candidates ranked by the scorer, best first (ties in the candidates' order).
pub fn rank(text: &str, candidates: &[Candidate]) -> Vec<Ranked> {
    let text_words = words(text);
    let mut ranked: Vec<Ranked> = candidates
        .iter()
        .map(|candidate| Ranked {
            repository: candidate.name.clone(),
            why: candidate.description.clone(),
            score: score(&text_words, candidate),
        })
        .collect();
    ranked.sort_by(|left, right| right.score.total_cmp(&left.score));
    ranked
}

/// Chooses the repository for `text` among `candidates` (the repositories the person may use),
/// in order: an explicit `owner/repo` that is a candidate; the first routing rule whose words
/// appear in the text; the channel's default; the only candidate; the scorer when its best is
/// clearly ahead. Otherwise [`Choice::Ask`] with the scorer's ranking (the model is next).
pub fn choose(
    text: &str,
    rules: &[RoutingRule],
    channel_default: Option<&str>,
    candidates: &[Candidate],
) -> Choice {
    if candidates.is_empty() {
        return Choice::NoRepository;
    }
    let find = |name: &str| candidates.iter().find(|candidate| candidate.is(name));
    let chosen = |candidate: &Candidate, confidence: f32, how: How| Choice::Chosen {
        repository: candidate.name.clone(),
        confidence,
        how,
    };
    if let Some(candidate) = explicit_names(text).iter().find_map(|name| find(name)) {
        return chosen(candidate, 1.0, How::Explicit);
    }
    let said = all_words(text);
    let rule_match = rules
        .iter()
        .filter(|rule| contains_phrase(&said, &all_words(&rule.pattern)))
        .find_map(|rule| find(&rule.repository));
    if let Some(candidate) = rule_match {
        return chosen(candidate, 1.0, How::Rule);
    }
    if let Some(candidate) = channel_default.and_then(find) {
        return chosen(candidate, 1.0, How::ChannelDefault);
    }
    if let [only] = candidates {
        return chosen(only, 1.0, How::OnlyCandidate);
    }
    let ranked = rank(text, candidates);
    let best = ranked.first().map_or(0.0, |ranked| ranked.score);
    let second = ranked.get(1).map_or(0.0, |ranked| ranked.score);
    if best >= MIN_SCORE && best >= LEAD_FACTOR * second {
        if let Some(candidate) = ranked.first().and_then(|top| find(&top.repository)) {
            return chosen(candidate, best / (best + second), How::Scorer);
        }
    }
    Choice::Ask {
        ranked: ranked.into_iter().take(MAX_CHOICES).collect(),
    }
}

/// The first repository `text` names explicitly (`owner/repo`) that is registered (one of
/// `registered`) but not one of the person's `candidates`: what they must be told they may not
/// use, rather than have another repository chosen for them.
pub fn named_but_not_allowed(
    text: &str,
    registered: &[Candidate],
    candidates: &[Candidate],
) -> Option<String> {
    let names = explicit_names(text);
    if names
        .iter()
        .any(|name| candidates.iter().any(|candidate| candidate.is(name)))
    {
        return None;
    }
    names.iter().find_map(|name| {
        registered
            .iter()
            .find(|repository| repository.is(name))
            .map(|repository| {
                if repository.full_name.is_empty() {
                    repository.name.clone()
                } else {
                    repository.full_name.clone()
                }
            })
    })
}

/// The model's answer to "which repository?": `{repository | "unknown", confidence, alternatives}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelPick {
    /// The pick; `None` for `"unknown"` (or nothing).
    pub repository: Option<String>,
    /// How sure, 0 to 1.
    pub confidence: f32,
    /// Other likely repositories.
    pub alternatives: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Loose {
    Number(f64),
    Text(String),
}

#[derive(Deserialize)]
struct RawPick {
    #[serde(default, alias = "repo")]
    repository: Option<String>,
    #[serde(default)]
    confidence: Option<Loose>,
    #[serde(default)]
    alternatives: Vec<String>,
}

/// Reads the model's answer tolerantly: code fences and text around the JSON object are
/// skipped, `repo` is accepted for `repository`, `"unknown"` (any case) or an empty name is
/// `None`, and a confidence given as text or as a percentage is read as 0 to 1.
pub fn parse_model_pick(answer: &str) -> Result<ModelPick, SlackError> {
    let start = answer.find('{');
    let end = answer.rfind('}');
    let json = match (start, end) {
        (Some(start), Some(end)) if start < end => &answer[start..=end],
        _ => {
            return Err(SlackError::BadModelAnswer(
                "no JSON object in the answer".to_string(),
            ))
        }
    };
    let raw: RawPick = serde_json::from_str(json)
        .map_err(|error| SlackError::BadModelAnswer(error.to_string()))?;
    let confidence = match raw.confidence {
        Some(Loose::Number(number)) => number,
        Some(Loose::Text(text)) => text.trim().trim_end_matches('%').parse().unwrap_or(0.0),
        None => 0.0,
    };
    let confidence = if confidence > 1.0 {
        confidence / 100.0
    } else {
        confidence
    };
    let repository = raw
        .repository
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty() && !name.eq_ignore_ascii_case("unknown"));
    Ok(ModelPick {
        repository,
        confidence: confidence.clamp(0.0, 1.0) as f32,
        alternatives: raw
            .alternatives
            .into_iter()
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty() && !name.eq_ignore_ascii_case("unknown"))
            .collect(),
    })
}

/// The model's pick as a choice: chosen when it is a candidate and at least `threshold` sure;
/// otherwise ask, offering the pick and its alternatives that are candidates (else the
/// candidates in order). A name that is no candidate is never chosen nor offered.
pub fn accept(pick: &ModelPick, candidates: &[Candidate], threshold: f32) -> Choice {
    if candidates.is_empty() {
        return Choice::NoRepository;
    }
    let find = |name: &str| candidates.iter().find(|candidate| candidate.is(name));
    if let Some(candidate) = pick.repository.as_deref().and_then(find) {
        if pick.confidence >= threshold {
            return Choice::Chosen {
                repository: candidate.name.clone(),
                confidence: pick.confidence,
                how: How::Model,
            };
        }
    }
    let mut ranked: Vec<Ranked> = Vec::new();
    let named = pick.repository.iter().chain(pick.alternatives.iter());
    for candidate in named.filter_map(|name| find(name)) {
        if ranked.iter().all(|seen| seen.repository != candidate.name) {
            ranked.push(Ranked {
                repository: candidate.name.clone(),
                why: candidate.description.clone(),
                score: if ranked.is_empty() {
                    pick.confidence
                } else {
                    0.0
                },
            });
        }
    }
    if ranked.is_empty() {
        ranked = candidates
            .iter()
            .map(|candidate| Ranked {
                repository: candidate.name.clone(),
                why: candidate.description.clone(),
                score: 0.0,
            })
            .collect();
    }
    ranked.truncate(MAX_CHOICES);
    Choice::Ask { ranked }
}

/// The prompt asking the model which repository `text` is for, listing each candidate's name,
/// description and topics, and the JSON to answer with.
pub fn model_prompt(text: &str, candidates: &[Candidate]) -> String {
    let mut prompt = String::from(
        "Which repository is this request about? Answer with one JSON object only: \
         {\"repository\": \"<name>\" or \"unknown\", \"confidence\": <0 to 1>, \
         \"alternatives\": [\"<name>\", …]}. Say \"unknown\" rather than guess.\n\nRepositories:\n",
    );
    for candidate in candidates.iter().take(200) {
        prompt.push_str(&format!(
            "- {} ({}): {} [topics: {}]\n",
            candidate.name,
            candidate.full_name,
            cut(&candidate.description, 300),
            candidate.topics.join(", ")
        ));
    }
    prompt.push_str("\nRequest:\n");
    prompt.push_str(&cut(text, 4_000));
    prompt
}

// ---------------------------------------------------------------------------------------------
// De-duplication
// ---------------------------------------------------------------------------------------------

/// The event ids a workspace has seen in the last hour (at most [`MAX_SEEN_EVENTS`]), stored
/// in its Durable Object: a retry or a duplicate of a seen id is not processed again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenEvents {
    /// `(event_id, first seen at, ms)`, oldest first.
    seen: VecDeque<(String, u64)>,
}

impl SeenEvents {
    /// An empty memory.
    pub fn new() -> SeenEvents {
        SeenEvents::default()
    }

    /// Whether `event_id` is new (then remembered from `now_ms`); ids older than an hour are
    /// forgotten first, and the oldest go when the memory is full.
    pub fn first_time(&mut self, event_id: &str, now_ms: u64) -> bool {
        self.forget_before(now_ms.saturating_sub(SEEN_EVENTS_MS));
        if self.seen.iter().any(|(seen_id, _)| seen_id == event_id) {
            return false;
        }
        while self.seen.len() >= MAX_SEEN_EVENTS {
            self.seen.pop_front();
        }
        self.seen.push_back((event_id.to_string(), now_ms));
        true
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn forget_before(&mut self, cutoff_ms: u64) {
        while self
            .seen
            .front()
            .is_some_and(|(_, seen_at)| *seen_at < cutoff_ms)
        {
            self.seen.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The worked example of api.slack.com/authentication/verifying-requests-from-slack.
    const DOC_SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";
    const DOC_TS: &str = "1531420618";
    const DOC_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const DOC_SIGNATURE: &str =
        "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
    const DOC_NOW: u64 = 1_531_420_618;
    const BOT: &str = "UBOT0001";

    fn check(
        timestamp: Option<&str>,
        signature: Option<&str>,
        now_s: u64,
    ) -> Result<(), SlackError> {
        verify(DOC_SECRET, timestamp, signature, DOC_BODY.as_bytes(), now_s)
    }

    #[test]
    fn slack_documented_signature_example() {
        assert_eq!(sign(DOC_SECRET, DOC_TS, DOC_BODY.as_bytes()), DOC_SIGNATURE);
        assert_eq!(
            check(Some(DOC_TS), Some(DOC_SIGNATURE), DOC_NOW + 60),
            Ok(())
        );
    }

    #[test]
    fn bad_signatures_and_timestamps_are_refused_with_their_codes() {
        let code = |result: Result<(), SlackError>| result.err().map(|error| error.code());
        let ok = Some(DOC_SIGNATURE);
        assert_eq!(
            verify(b"", Some(DOC_TS), ok, DOC_BODY.as_bytes(), DOC_NOW).map_err(|e| e.code()),
            Err("slack_not_configured")
        );
        assert_eq!(
            code(check(None, ok, DOC_NOW)),
            Some("slack_timestamp_missing")
        );
        assert_eq!(
            code(check(Some("12a"), ok, DOC_NOW)),
            Some("slack_timestamp_missing")
        );
        assert_eq!(
            code(check(Some("-5"), ok, DOC_NOW)),
            Some("slack_timestamp_missing")
        );
        // Five minutes either way is the edge.
        assert_eq!(code(check(Some(DOC_TS), ok, DOC_NOW + 300)), None);
        assert_eq!(code(check(Some(DOC_TS), ok, DOC_NOW - 300)), None);
        assert_eq!(
            code(check(Some(DOC_TS), ok, DOC_NOW + 301)),
            Some("slack_timestamp_stale")
        );
        assert_eq!(
            code(check(Some(DOC_TS), ok, DOC_NOW - 301)),
            Some("slack_timestamp_stale")
        );
        assert_eq!(
            code(check(Some(DOC_TS), ok, 0)),
            Some("slack_timestamp_stale")
        );
        assert_eq!(
            code(check(Some(DOC_TS), None, DOC_NOW)),
            Some("slack_signature_missing")
        );
        assert_eq!(
            code(check(Some(DOC_TS), Some(" "), DOC_NOW)),
            Some("slack_signature_missing")
        );
        let malformed = [
            "a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            "v1=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            "v0=a2114d57",
            "v0=zz114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
        ];
        for signature in malformed {
            assert_eq!(
                code(check(Some(DOC_TS), Some(signature), DOC_NOW)),
                Some("slack_signature_malformed"),
                "{signature}"
            );
        }
        let flipped = "v0=b2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        assert_eq!(
            code(check(Some(DOC_TS), Some(flipped), DOC_NOW)),
            Some("slack_signature_invalid")
        );
        // The same signature over another timestamp or body fails.
        assert_eq!(
            code(check(Some("1531420619"), ok, DOC_NOW)),
            Some("slack_signature_invalid")
        );
        assert_eq!(
            verify(DOC_SECRET, Some(DOC_TS), ok, b"token=other", DOC_NOW).map_err(|e| e.code()),
            Err("slack_signature_invalid")
        );
        assert_eq!(SlackError::SignatureInvalid.status(), 401);
        assert_eq!(SlackError::TimestampStale.status(), 401);
    }

    #[test]
    fn url_verification_and_event_callback_parse() {
        let challenge = br#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
        match Envelope::parse(challenge) {
            Ok(Envelope::UrlVerification(verification)) => assert_eq!(
                verification.challenge,
                "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
            ),
            other => panic!("{other:?}"),
        }
        let callback = br#"{
            "token": "XXYYZZ", "team_id": "T123ABC456", "api_app_id": "A123ABC456",
            "event": {
                "type": "app_mention", "user": "U123ABC456",
                "text": "<@UBOT0001> fix the login page", "ts": "1515449522.000016",
                "channel": "C123ABC456", "event_ts": "1515449522000016",
                "blocks": [{"type": "rich_text", "elements": []}]
            },
            "type": "event_callback", "event_id": "Ev123ABC456", "event_time": 1515449522000016,
            "authorizations": [{"enterprise_id": null, "team_id": "T123ABC456", "user_id": "UBOT0001", "is_bot": true, "is_enterprise_install": false}],
            "event_context": "EC12345", "is_ext_shared_channel": false
        }"#;
        let Ok(Envelope::EventCallback(callback)) = Envelope::parse(callback) else {
            panic!("not an event_callback");
        };
        assert_eq!(callback.team_id, "T123ABC456");
        assert_eq!(callback.event_id, "Ev123ABC456");
        assert_eq!(callback.bot_user_id(), Some(BOT));
        assert!(
            matches!(&callback.event, Event::AppMention(message) if message.channel == "C123ABC456")
        );
        // Round trip keeps the tags.
        let again = serde_json::to_vec(&Envelope::EventCallback(callback.clone())).expect("json");
        assert_eq!(
            Envelope::parse(&again),
            Ok(Envelope::EventCallback(callback))
        );

        let unknown_inner = br#"{"type":"event_callback","team_id":"T1","event_id":"Ev2","event":{"type":"reaction_added","user":"U1"}}"#;
        assert!(matches!(
            Envelope::parse(unknown_inner),
            Ok(Envelope::EventCallback(callback)) if callback.event == Event::Other
        ));
        assert_eq!(
            Envelope::parse(br#"{"type":"app_rate_limited"}"#),
            Ok(Envelope::Other)
        );
        assert_eq!(
            Envelope::parse(b"{").map_err(|error| error.code()),
            Err("slack_payload_invalid")
        );
    }

    fn message(text: &str) -> MessageEvent {
        MessageEvent {
            user: Some("UPERSON1".to_string()),
            text: text.to_string(),
            ts: "1700000000.000100".to_string(),
            channel: "C0CHANNEL".to_string(),
            channel_type: Some("channel".to_string()),
            ..MessageEvent::default()
        }
    }

    fn in_thread(mut message: MessageEvent) -> MessageEvent {
        message.thread_ts = Some("1690000000.000001".to_string());
        message
    }

    #[test]
    fn mentions_and_direct_messages_start_threads_follow_up() {
        let mention = Event::AppMention(message("<@UBOT0001>   fix the  login page"));
        assert_eq!(
            intent(&mention, BOT),
            Intent::Start {
                channel: "C0CHANNEL".to_string(),
                user: "UPERSON1".to_string(),
                text: "fix the login page".to_string(),
                ts: "1700000000.000100".to_string(),
                direct: false,
            }
        );
        let named = Event::AppMention(message("hey <@UBOT0001|nightshift> add tests"));
        assert!(
            matches!(intent(&named, BOT), Intent::Start { text, .. } if text == "hey add tests")
        );
        let mut direct = message("add a README");
        direct.channel_type = Some("im".to_string());
        assert!(matches!(
            intent(&Event::Message(direct.clone()), BOT),
            Intent::Start { direct: true, .. }
        ));
        assert!(matches!(
            intent(&Event::Message(in_thread(direct)), BOT),
            Intent::FollowUp {
                direct: true,
                mentioned: false,
                ..
            }
        ));
        assert!(matches!(
            intent(&Event::AppMention(in_thread(message("<@UBOT0001> also the footer"))), BOT),
            Intent::FollowUp { mentioned: true, thread_ts, text, .. }
                if thread_ts == "1690000000.000001" && text == "also the footer"
        ));
        assert!(matches!(
            intent(&Event::Message(in_thread(message("and the footer"))), BOT),
            Intent::FollowUp {
                mentioned: false,
                direct: false,
                ..
            }
        ));
        // The thread's root itself (thread_ts == ts) is not a reply.
        let mut root = message("<@UBOT0001> start");
        root.thread_ts = Some(root.ts.clone());
        assert!(matches!(
            intent(&Event::AppMention(root), BOT),
            Intent::Start { .. }
        ));
    }

    #[test]
    fn what_is_ignored_and_why() {
        let ignored = |event: Event| match intent(&event, BOT) {
            Intent::Ignore(reason) => reason.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ignored(Event::Message(message("lunch?"))), "not_addressed");
        assert_eq!(
            ignored(Event::Message(message("<@UBOT0001> fix it"))),
            "mention_event"
        );
        let mut own = message("status");
        own.user = Some(BOT.to_string());
        assert_eq!(ignored(Event::Message(in_thread(own))), "own_message");
        let mut bot = in_thread(message("beep"));
        bot.bot_id = Some("B0OTHER".to_string());
        assert_eq!(ignored(Event::Message(bot.clone())), "bot");
        bot.user = None;
        assert_eq!(ignored(Event::Message(bot)), "bot");
        for (subtype, code) in [
            ("bot_message", "bot"),
            ("message_changed", "edited"),
            ("message_deleted", "deleted"),
            ("channel_join", "subtype"),
        ] {
            let mut event = in_thread(message("x"));
            event.subtype = Some(subtype.to_string());
            assert_eq!(ignored(Event::Message(event)), code, "{subtype}");
        }
        let mut edited = in_thread(message("changed"));
        edited.edited = Some(Edited {
            user: "UPERSON1".to_string(),
            ts: "1700000001.000000".to_string(),
        });
        assert_eq!(ignored(Event::Message(edited)), "edited");
        assert_eq!(
            ignored(Event::AppMention(message("<@UBOT0001>  "))),
            "empty"
        );
        let mut anonymous = message("<@UBOT0001> hi");
        anonymous.user = None;
        assert_eq!(ignored(Event::AppMention(anonymous)), "no_user");
        assert_eq!(ignored(Event::Other), "unhandled");
        // A broadcast reply is still a reply.
        let mut broadcast = in_thread(message("also here"));
        broadcast.subtype = Some("thread_broadcast".to_string());
        assert!(matches!(
            intent(&Event::Message(broadcast), BOT),
            Intent::FollowUp { .. }
        ));
    }

    #[test]
    fn mention_stripping_keeps_other_people() {
        assert_eq!(
            strip_mention("<@UBOT0001> ask <@UOTHER>", BOT),
            "ask <@UOTHER>"
        );
        assert_eq!(strip_mention("<@UBOT00011> hi", BOT), "<@UBOT00011> hi");
        assert_eq!(strip_mention("<@UBOT0001|broken", BOT), "<@UBOT0001|broken");
        assert!(mentions("hi <@UBOT0001|nightshift>", BOT));
        assert!(!mentions("hi <@UBOT00011>", BOT));
        assert!(!mentions("hi", ""));
    }

    fn click_payload(action_id: &str, value: &str) -> String {
        serde_json::json!({
            "type": "block_actions",
            "user": {"id": "UPERSON1", "username": "ana", "team_id": "T0TEAM"},
            "api_app_id": "A0APP",
            "token": "deprecated",
            "container": {"type": "message", "message_ts": "1700000000.000200", "channel_id": "C0CHANNEL", "is_ephemeral": false, "thread_ts": "1700000000.000100"},
            "trigger_id": "123.456.abc",
            "team": {"id": "T0TEAM", "domain": "acme"},
            "channel": {"id": "C0CHANNEL", "name": "dev"},
            "message": {"type": "message", "ts": "1700000000.000200", "thread_ts": "1700000000.000100", "text": "Which repository?", "blocks": []},
            "state": {"values": {}},
            "response_url": "https://hooks.slack.com/actions/T0TEAM/1/abc",
            "actions": [{"type": "button", "action_id": action_id, "block_id": "choice_0", "value": value, "text": {"type": "plain_text", "text": "Choose"}, "action_ts": "1700000001.000000"}]
        })
        .to_string()
    }

    #[test]
    fn interactions_parse_from_the_form_body() {
        let body = form_encode(&[("payload", &click_payload("choose_repository", "acme/web"))]);
        let Ok(Interaction::BlockActions(actions)) = Interaction::parse(body.as_bytes()) else {
            panic!("not block_actions");
        };
        assert_eq!(actions.team_id(), Some("T0TEAM"));
        assert_eq!(actions.channel_id(), Some("C0CHANNEL"));
        assert_eq!(actions.message_ts(), Some("1700000000.000200"));
        assert_eq!(actions.thread_ts(), Some("1700000000.000100"));
        assert_eq!(
            actions.response_url.as_deref(),
            Some("https://hooks.slack.com/actions/T0TEAM/1/abc")
        );
        assert_eq!(
            actions.clicked(),
            Clicked::Choose {
                repository: Some("acme/web".to_string())
            }
        );
        // `+` for spaces, as browsers encode forms, decodes too.
        let plus = body.replace("%20", "+");
        assert!(Interaction::parse(plus.as_bytes()).is_ok());
        // Our own form body parses back.
        let again = Interaction::BlockActions(actions.clone()).form_body();
        assert_eq!(
            Interaction::parse(again.as_bytes()),
            Ok(Interaction::BlockActions(actions))
        );

        let stop = form_encode(&[("payload", &click_payload("stop", "s-123"))]);
        let Ok(Interaction::BlockActions(stop)) = Interaction::parse(stop.as_bytes()) else {
            panic!("not block_actions");
        };
        assert_eq!(
            stop.clicked(),
            Clicked::Stop {
                session_id: "s-123".to_string()
            }
        );
        let none = form_encode(&[("payload", &click_payload("choose_repository", CHOICE_NONE))]);
        let Ok(Interaction::BlockActions(none)) = Interaction::parse(none.as_bytes()) else {
            panic!("not block_actions");
        };
        assert_eq!(none.clicked(), Clicked::Choose { repository: None });
        let link = form_encode(&[("payload", &click_payload("view_session", ""))]);
        let Ok(Interaction::BlockActions(link)) = Interaction::parse(link.as_bytes()) else {
            panic!("not block_actions");
        };
        assert_eq!(link.clicked(), Clicked::Nothing);

        let other = form_encode(&[("payload", r#"{"type":"view_submission"}"#)]);
        assert_eq!(Interaction::parse(other.as_bytes()), Ok(Interaction::Other));
        for bad in [&b"nothing=here"[..], b"payload=%7B", b"\xff\xfe"] {
            assert_eq!(
                Interaction::parse(bad).map_err(|error| error.code()),
                Err("slack_payload_invalid")
            );
        }
    }

    #[test]
    fn web_api_answers_and_rate_limits() {
        let posted = br#"{"ok":true,"channel":"C0CHANNEL","ts":"1700000000.000300","message":{"text":"hi","ts":"1700000000.000300","bot_id":"B0BOT","type":"message"},"warning":"missing_charset"}"#;
        let answer: PostMessageAnswer = read_answer(200, None, posted).expect("posted");
        assert_eq!(answer.ts, "1700000000.000300");
        assert_eq!(answer.message.bot_id.as_deref(), Some("B0BOT"));
        assert_eq!(
            read_answer::<PostMessageAnswer>(
                200,
                None,
                br#"{"ok":false,"error":"channel_not_found"}"#
            ),
            Err(SlackError::Api("channel_not_found".to_string()))
        );
        assert_eq!(
            read_answer::<PostMessageAnswer>(429, Some("7"), b""),
            Err(SlackError::RateLimited(7))
        );
        assert_eq!(
            read_answer::<PostMessageAnswer>(200, None, br#"{"ok":false,"error":"ratelimited"}"#),
            Err(SlackError::RateLimited(1))
        );
        assert_eq!(
            read_answer::<Empty>(500, None, b"oops"),
            Err(SlackError::Http(500))
        );
        assert_eq!(
            read_answer::<PostMessageAnswer>(200, None, br#"{"ok":true}"#).map_err(|e| e.code()),
            Err("slack_answer_invalid")
        );
        assert_eq!(
            read_answer::<Empty>(200, None, br#"{"ok":true}"#),
            Ok(Empty {})
        );
        let auth: AuthTestAnswer = read_answer(
            200,
            None,
            br#"{"ok":true,"url":"https://acme.slack.com/","team":"Acme","user":"nightshift","team_id":"T0TEAM","user_id":"UBOT0001","bot_id":"B0BOT"}"#,
        )
        .expect("auth.test");
        assert_eq!(
            (auth.user_id.as_str(), auth.bot_id.as_deref()),
            ("UBOT0001", Some("B0BOT"))
        );
        let info: UsersInfoAnswer = read_answer(
            200,
            None,
            br#"{"ok":true,"user":{"id":"UPERSON1","team_id":"T0TEAM","name":"ana","real_name":"Ana Lima","deleted":false,"is_bot":false,"profile":{"email":"ana@example.com","real_name":"Ana Lima","display_name":"ana"}}}"#,
        )
        .expect("users.info");
        assert_eq!(info.user.email(), Some("ana@example.com"));
        assert_eq!(info.user.shown_name(), "Ana Lima");

        assert_eq!(
            serde_json::to_value(Answer::<PostMessageAnswer>::failure("invalid_auth"))
                .expect("json"),
            serde_json::json!({"ok": false, "error": "invalid_auth"})
        );
        assert_eq!(
            serde_json::to_value(Answer::success(Empty {})).expect("json"),
            serde_json::json!({"ok": true})
        );

        assert_eq!(retry_after(200, Some("5")), None);
        assert_eq!(retry_after(429, Some(" 5 ")), Some(5));
        assert_eq!(retry_after(429, None), Some(1));
        assert_eq!(retry_after(429, Some("soon")), Some(1));
        assert_eq!(retry_after(429, Some("0")), Some(1));
        assert_eq!(retry_after(429, Some("999999")), Some(3_600));
        assert_eq!(
            Method::from_name("chat.postMessage"),
            Some(Method::PostMessage)
        );
        assert_eq!(Method::from_name("chat.nothing"), None);
        assert_eq!(
            Method::ReactionsAdd.url("http://127.0.0.1:9/api/"),
            "http://127.0.0.1:9/api/reactions.add"
        );
    }

    #[test]
    fn request_bodies_have_slacks_shapes() {
        let post = PostMessage {
            channel: "C0CHANNEL".to_string(),
            text: "Starting".to_string(),
            blocks: vec![Block::Divider {}],
            thread_ts: Some("1700000000.000100".to_string()),
            unfurl_links: false,
            metadata: None,
        };
        assert_eq!(
            serde_json::to_value(&post).expect("json"),
            serde_json::json!({"channel": "C0CHANNEL", "text": "Starting", "blocks": [{"type": "divider"}], "thread_ts": "1700000000.000100", "unfurl_links": false})
        );
        let reaction = ReactionAdd {
            channel: "C0CHANNEL".to_string(),
            timestamp: "1700000000.000100".to_string(),
            name: "eyes".to_string(),
        };
        assert_eq!(
            serde_json::to_value(&reaction).expect("json"),
            serde_json::json!({"channel": "C0CHANNEL", "timestamp": "1700000000.000100", "name": "eyes"})
        );
        let update = Update {
            channel: "C0CHANNEL".to_string(),
            ts: "1".to_string(),
            text: "Done".to_string(),
            blocks: vec![Block::Context {
                elements: vec![Text::mrkdwn("a")],
                block_id: None,
            }],
        };
        assert_eq!(
            serde_json::to_value(&update).expect("json"),
            serde_json::json!({"channel": "C0CHANNEL", "ts": "1", "text": "Done", "blocks": [{"type": "context", "elements": [{"type": "mrkdwn", "text": "a"}]}]})
        );
    }

    fn view(stage: Stage) -> StatusView {
        StatusView {
            task: "fix the login page".to_string(),
            repository: "acme/web".to_string(),
            branch: "nightshift/fix-login".to_string(),
            model: "gpt-5".to_string(),
            asked_by: "<@UPERSON1>".to_string(),
            stage,
            session_id: "s-123".to_string(),
            session_url: "https://nightshift.example/sessions/s-123".to_string(),
            pr_url: None,
        }
    }

    fn buttons(blocks: &[Block]) -> Vec<(String, Option<String>, Option<String>)> {
        blocks
            .iter()
            .filter_map(|block| match block {
                Block::Actions { elements, .. } => Some(elements),
                _ => None,
            })
            .flatten()
            .map(
                |Element::Button {
                     text, value, url, ..
                 }| { (text.text().to_string(), value.clone(), url.clone()) },
            )
            .collect()
    }

    fn section_texts(blocks: &[Block]) -> Vec<String> {
        blocks
            .iter()
            .filter_map(|block| match block {
                Block::Section { text, .. } => Some(text.text().to_string()),
                Block::Context { elements, .. } => {
                    elements.first().map(|text| text.text().to_string())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn status_message_stages_and_buttons() {
        let starting = status_blocks(&view(Stage::Starting));
        assert_eq!(starting.len(), 4);
        let texts = section_texts(&starting);
        assert_eq!(texts[0], "fix the login page");
        assert_eq!(
            texts[1],
            "`acme/web` · `nightshift/fix-login` · gpt-5 · asked by <@UPERSON1>"
        );
        assert!(texts[2].contains("Starting the sandbox"), "{}", texts[2]);
        let labels: Vec<String> = buttons(&starting)
            .into_iter()
            .map(|(label, _, _)| label)
            .collect();
        assert_eq!(labels, ["View session", "Stop"]);
        assert_eq!(buttons(&starting)[1].1.as_deref(), Some("s-123"));

        let working = status_blocks(&view(Stage::Working { files_changed: 3 }));
        assert!(section_texts(&working)[2].contains("Working (3 files changed)"));
        let one = status_blocks(&view(Stage::Working { files_changed: 1 }));
        assert!(section_texts(&one)[2].contains("1 file changed"));

        let pr = "https://github.com/acme/web/pull/42".to_string();
        let done = status_blocks(&view(Stage::Done {
            pr_url: Some(pr.clone()),
        }));
        assert!(section_texts(&done)[2].contains(&format!("<{pr}|pull request>")));
        let done_buttons = buttons(&done);
        assert_eq!(done_buttons.len(), 2, "no Stop when done: {done_buttons:?}");
        assert_eq!(
            done_buttons[1],
            ("Open PR".to_string(), None, Some(pr.clone()))
        );

        let mut failed_view = view(Stage::Failed {
            reason: "the sandbox <died> & left".to_string(),
        });
        failed_view.pr_url = Some(pr);
        let failed = status_blocks(&failed_view);
        assert!(section_texts(&failed)[2].contains("Failed: the sandbox &lt;died&gt; &amp; left"));
        let labels: Vec<String> = buttons(&failed)
            .into_iter()
            .map(|(label, _, _)| label)
            .collect();
        assert_eq!(labels, ["View session", "Open PR"]);

        let json = serde_json::to_value(&starting).expect("json");
        assert_eq!(json[0]["type"], "section");
        assert_eq!(json[0]["text"]["type"], "mrkdwn");
        assert_eq!(json[1]["type"], "context");
        assert_eq!(json[3]["type"], "actions");
        assert_eq!(json[3]["elements"][0]["type"], "button");
        assert_eq!(json[3]["elements"][0]["text"]["type"], "plain_text");
        assert_eq!(json[3]["elements"][1]["style"], "danger");
        assert_eq!(
            status_text(&view(Stage::Starting)),
            "Starting: fix the login page"
        );
    }

    #[test]
    fn status_message_respects_block_kit_limits_with_huge_inputs() {
        let huge = "x".repeat(100_000);
        let huge_view = StatusView {
            task: huge.clone(),
            repository: huge.clone(),
            branch: huge.clone(),
            model: huge.clone(),
            asked_by: huge.clone(),
            stage: Stage::Failed {
                reason: huge.clone(),
            },
            session_id: huge.clone(),
            session_url: format!("https://x/{huge}"),
            pr_url: Some(format!("https://y/{huge}")),
        };
        for stage in [
            Stage::Starting,
            Stage::Working {
                files_changed: u32::MAX,
            },
            Stage::Done {
                pr_url: Some(format!("https://y/{huge}")),
            },
            Stage::Failed {
                reason: huge.clone(),
            },
        ] {
            let mut huge_view = huge_view.clone();
            huge_view.stage = stage;
            let blocks = status_blocks(&huge_view);
            let text = status_text(&huge_view);
            assert_eq!(
                check_message(&text, &blocks),
                Ok(()),
                "{:?}",
                huge_view.stage
            );
            assert!(text.ends_with(ELLIPSIS));
            assert_eq!(text.chars().count(), MAX_MESSAGE_TEXT);
            let texts = section_texts(&blocks);
            assert_eq!(texts[0].chars().count(), MAX_SECTION_TEXT);
            assert!(texts[0].ends_with(ELLIPSIS));
            // Over-long links and values are left out, never cut.
            assert!(buttons(&blocks).is_empty(), "{:?}", buttons(&blocks));
        }
        // Multi-byte text is cut by characters, not bytes.
        let mut emoji_view = view(Stage::Starting);
        emoji_view.task = "🚀".repeat(5_000);
        let blocks = status_blocks(&emoji_view);
        assert_eq!(check_message("t", &blocks), Ok(()));
        assert_eq!(section_texts(&blocks)[0].chars().count(), MAX_SECTION_TEXT);
    }

    #[test]
    fn check_message_refuses_what_slack_refuses() {
        let code = |result: Result<(), SlackError>| result.map_err(|error| error.code());
        let dividers = vec![Block::Divider {}; MAX_BLOCKS + 1];
        assert_eq!(
            code(check_message("t", &dividers)),
            Err("slack_invalid_blocks")
        );
        assert_eq!(code(check_message("t", &dividers[..MAX_BLOCKS])), Ok(()));
        let context = Block::Context {
            elements: vec![Text::mrkdwn("a"); MAX_CONTEXT_ELEMENTS + 1],
            block_id: None,
        };
        assert_eq!(
            code(check_message("t", &[context])),
            Err("slack_invalid_blocks")
        );
        let long_button = Block::Actions {
            elements: vec![Element::Button {
                text: Text::plain("b".repeat(MAX_BUTTON_TEXT + 1)),
                action_id: "a".to_string(),
                value: None,
                url: None,
                style: None,
            }],
            block_id: None,
        };
        assert_eq!(
            code(check_message("t", &[long_button])),
            Err("slack_invalid_blocks")
        );
        let twice = Block::Actions {
            elements: vec![
                button("One", "same", None, None),
                button("Two", "same", None, None),
            ],
            block_id: None,
        };
        assert_eq!(
            code(check_message("t", &[twice])),
            Err("slack_invalid_blocks")
        );
        let long_section = Block::Section {
            text: Text::mrkdwn("s".repeat(MAX_SECTION_TEXT + 1)),
            block_id: None,
            accessory: None,
        };
        assert_eq!(
            code(check_message("t", &[long_section])),
            Err("slack_invalid_blocks")
        );
        assert_eq!(
            code(check_message(&"m".repeat(MAX_MESSAGE_TEXT + 1), &[])),
            Err("slack_invalid_blocks")
        );
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcd", 3), "ab…");
        assert_eq!(cut("abcd", 0), "…");
    }

    fn ranked(name: &str, why: &str) -> Ranked {
        Ranked {
            repository: name.to_string(),
            why: why.to_string(),
            score: 1.0,
        }
    }

    #[test]
    fn choice_offers_at_most_five_and_none_of_these() {
        let options: Vec<Ranked> = (0..8)
            .map(|index| ranked(&format!("acme/repo{index}"), "the <web> app"))
            .collect();
        let blocks = choice_blocks("Which repository is this for?", &options);
        assert_eq!(
            check_message(&choice_text("Which repository is this for?"), &blocks),
            Ok(())
        );
        assert_eq!(blocks.len(), 1 + MAX_CHOICES + 1);
        let values: Vec<String> = blocks
            .iter()
            .flat_map(|block| match block {
                Block::Section {
                    accessory:
                        Some(Element::Button {
                            action_id, value, ..
                        }),
                    ..
                } => {
                    assert_eq!(action_id, ACTION_CHOOSE_REPOSITORY);
                    value.iter().cloned().collect()
                }
                Block::Actions { elements, .. } => elements
                    .iter()
                    .map(
                        |Element::Button {
                             action_id, value, ..
                         }| {
                            assert_eq!(action_id, ACTION_CHOOSE_REPOSITORY);
                            value.clone().unwrap_or_default()
                        },
                    )
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            values,
            [
                "acme/repo0",
                "acme/repo1",
                "acme/repo2",
                "acme/repo3",
                "acme/repo4",
                CHOICE_NONE
            ]
        );
        assert!(section_texts(&blocks)[1].contains("*acme/repo0* — the &lt;web&gt; app"));

        let huge = "w".repeat(50_000);
        let options = vec![ranked(&huge, &huge), ranked("acme/ok", &huge)];
        let blocks = choice_blocks(&huge, &options);
        assert_eq!(check_message(&choice_text(&huge), &blocks), Ok(()));
        // The over-long name is not offered (a cut value would name no repository).
        assert_eq!(blocks.len(), 3);
    }

    fn candidate(name: &str, description: &str, topics: &[&str]) -> Candidate {
        Candidate {
            name: name.to_string(),
            full_name: name.to_string(),
            description: description.to_string(),
            topics: topics.iter().map(|topic| topic.to_string()).collect(),
        }
    }

    fn candidates() -> Vec<Candidate> {
        vec![
            candidate(
                "acme/web",
                "The customer-facing website and login pages",
                &["frontend", "react"],
            ),
            candidate(
                "acme/billing-service",
                "Invoices, payments and subscriptions",
                &["payments", "backend"],
            ),
            candidate(
                "acme/mobile-app",
                "iOS and Android app",
                &["ios", "android"],
            ),
        ]
    }

    fn how(choice: &Choice) -> Option<(String, How)> {
        match choice {
            Choice::Chosen {
                repository, how, ..
            } => Some((repository.clone(), *how)),
            _ => None,
        }
    }

    #[test]
    fn a_registered_repository_named_but_not_allowed_is_reported() {
        let repo = |name: &str, full: &str| Candidate {
            name: name.to_string(),
            full_name: full.to_string(),
            ..Candidate::default()
        };
        let registered = [repo("web", "acme/web"), repo("secret", "acme/secret")];
        let allowed = [repo("web", "acme/web")];
        assert_eq!(
            named_but_not_allowed("fix acme/secret now", &registered, &allowed).as_deref(),
            Some("acme/secret")
        );
        assert_eq!(
            named_but_not_allowed("fix acme/web", &registered, &allowed),
            None
        );
        assert_eq!(
            named_but_not_allowed("fix acme/secret and acme/web", &registered, &allowed),
            None
        );
        assert_eq!(
            named_but_not_allowed("fix other/thing", &registered, &allowed),
            None
        );
        assert_eq!(
            named_but_not_allowed("fix the footer", &registered, &allowed),
            None
        );
    }

    #[test]
    fn explicit_names_come_first_when_they_are_candidates() {
        let rules = [RoutingRule {
            pattern: "invoice".to_string(),
            repository: "acme/billing-service".to_string(),
        }];
        let chosen = choose(
            "fix the invoice footer in acme/web.",
            &rules,
            Some("acme/mobile-app"),
            &candidates(),
        );
        assert_eq!(how(&chosen), Some(("acme/web".to_string(), How::Explicit)));
        let url = choose(
            "see <https://github.com/ACME/Mobile-App/issues/3|#3>",
            &[],
            None,
            &candidates(),
        );
        assert_eq!(
            how(&url),
            Some(("acme/mobile-app".to_string(), How::Explicit))
        );
        // A name the person cannot use is no explicit choice: the next step decides.
        let foreign = choose(
            "port evil/repo to the invoice code",
            &rules,
            None,
            &candidates(),
        );
        assert_eq!(
            how(&foreign),
            Some(("acme/billing-service".to_string(), How::Rule))
        );
    }

    #[test]
    fn rules_match_whole_words_then_the_channel_default() {
        let rules = [
            RoutingRule {
                pattern: "Mobile Login".to_string(),
                repository: "acme/mobile-app".to_string(),
            },
            RoutingRule {
                pattern: "billing".to_string(),
                repository: "acme/billing-service".to_string(),
            },
            RoutingRule {
                pattern: "secret".to_string(),
                repository: "acme/not-mine".to_string(),
            },
        ];
        let all = candidates();
        assert_eq!(
            how(&choose("the MOBILE login crashes", &rules, None, &all)),
            Some(("acme/mobile-app".to_string(), How::Rule))
        );
        assert_eq!(
            how(&choose(
                "Billing: refunds are off",
                &rules,
                Some("acme/web"),
                &all
            )),
            Some(("acme/billing-service".to_string(), How::Rule))
        );
        // No substring match ("rebilling"), and a rule to a repository the person cannot use is skipped.
        assert_eq!(
            how(&choose(
                "rebilling the secret thing",
                &rules,
                Some("acme/web"),
                &all
            )),
            Some(("acme/web".to_string(), How::ChannelDefault))
        );
        // A channel default the person cannot use is skipped too.
        assert!(matches!(
            choose("something vague", &[], Some("acme/not-mine"), &all),
            Choice::Ask { .. }
        ));
    }

    #[test]
    fn the_scorer_chooses_only_when_clearly_ahead() {
        let all = candidates();
        let scored = choose("payments fail when a subscription renews", &[], None, &all);
        match &scored {
            Choice::Chosen {
                repository,
                confidence,
                how,
            } => {
                assert_eq!(
                    (repository.as_str(), *how),
                    ("acme/billing-service", How::Scorer)
                );
                assert!(*confidence > 0.5 && *confidence <= 1.0, "{confidence}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            how(&choose("the web login page is slow", &[], None, &all)),
            Some(("acme/web".to_string(), How::Scorer))
        );
        assert_eq!(
            how(&choose("the billing service times out", &[], None, &all)),
            Some(("acme/billing-service".to_string(), How::Scorer))
        );
        // Nothing in common: ask, offering every candidate.
        match choose("make it faster", &[], None, &all) {
            Choice::Ask { ranked } => assert_eq!(ranked.len(), 3),
            other => panic!("{other:?}"),
        }
        // Two close candidates: ask, the best first.
        match choose("the react payments form", &[], None, &all) {
            Choice::Ask { ranked } => {
                assert_eq!(ranked.len(), 3);
                assert!(ranked[0].score >= ranked[1].score);
            }
            other => panic!("{other:?}"),
        }
        let only = [candidate("acme/web", "", &[])];
        assert_eq!(
            how(&choose("anything", &[], None, &only)),
            Some(("acme/web".to_string(), How::OnlyCandidate))
        );
        assert_eq!(choose("anything", &[], None, &[]), Choice::NoRepository);
        let registered = [
            Candidate {
                name: "web".to_string(),
                full_name: "acme/web".to_string(),
                ..Candidate::default()
            },
            Candidate {
                name: "api".to_string(),
                full_name: "acme/api".to_string(),
                ..Candidate::default()
            },
        ];
        // The registered name is what a choice answers with.
        assert_eq!(
            how(&choose("in acme/api please", &[], None, &registered)),
            Some(("api".to_string(), How::Explicit))
        );
    }

    #[test]
    fn model_answers_are_read_tolerantly() {
        let fenced = "Sure!\n```json\n{\"repository\": \"acme/web\", \"confidence\": 0.92, \"alternatives\": [\"acme/mobile-app\"]}\n```";
        assert_eq!(
            parse_model_pick(fenced),
            Ok(ModelPick {
                repository: Some("acme/web".to_string()),
                confidence: 0.92,
                alternatives: vec!["acme/mobile-app".to_string()],
            })
        );
        let unknown = parse_model_pick(
            r#"{"repository":"UNKNOWN","confidence":"0.3","alternatives":["unknown","acme/web"]}"#,
        )
        .expect("unknown");
        assert_eq!(unknown.repository, None);
        assert!((unknown.confidence - 0.3).abs() < 1e-6);
        assert_eq!(unknown.alternatives, ["acme/web"]);
        let percent = parse_model_pick(r#"{"repo":"acme/web","confidence":85}"#).expect("percent");
        assert_eq!(percent.repository.as_deref(), Some("acme/web"));
        assert!((percent.confidence - 0.85).abs() < 1e-6);
        assert_eq!(
            parse_model_pick(r#"{"confidence": 7000}"#).map(|pick| pick.confidence),
            Ok(1.0)
        );
        for bad in ["no json here", "} {", "{\"repository\": 5}"] {
            assert_eq!(
                parse_model_pick(bad).map_err(|error| error.code()),
                Err("slack_model_answer_invalid"),
                "{bad}"
            );
        }
    }

    #[test]
    fn accept_chooses_only_sure_candidates() {
        let all = candidates();
        let pick = |repository: Option<&str>, confidence: f32, alternatives: &[&str]| ModelPick {
            repository: repository.map(str::to_string),
            confidence,
            alternatives: alternatives.iter().map(|name| name.to_string()).collect(),
        };
        assert_eq!(
            how(&accept(&pick(Some("ACME/web"), 0.9, &[]), &all, 0.7)),
            Some(("acme/web".to_string(), How::Model))
        );
        match accept(
            &pick(
                Some("acme/web"),
                0.5,
                &["acme/evil", "acme/mobile-app", "acme/web"],
            ),
            &all,
            0.7,
        ) {
            Choice::Ask { ranked } => {
                let names: Vec<&str> = ranked
                    .iter()
                    .map(|ranked| ranked.repository.as_str())
                    .collect();
                assert_eq!(names, ["acme/web", "acme/mobile-app"]);
            }
            other => panic!("{other:?}"),
        }
        // A name that is no candidate is never chosen, however sure.
        match accept(&pick(Some("acme/evil"), 1.0, &[]), &all, 0.7) {
            Choice::Ask { ranked } => assert_eq!(ranked.len(), 3),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            accept(&pick(None, 1.0, &[]), &all, 0.7),
            Choice::Ask { .. }
        ));
        assert_eq!(
            accept(&pick(Some("acme/web"), 1.0, &[]), &[], 0.7),
            Choice::NoRepository
        );
        let prompt = model_prompt("fix login", &all);
        assert!(
            prompt.contains("acme/billing-service")
                && prompt.contains("fix login")
                && prompt.contains("unknown")
        );
    }

    #[test]
    fn seen_events_forget_after_an_hour_and_stay_bounded() {
        let mut seen = SeenEvents::new();
        assert!(seen.first_time("Ev1", 1_000));
        assert!(!seen.first_time("Ev1", 1_000 + 5 * 60_000));
        assert!(seen.first_time("Ev2", 2_000));
        // Kept across storage.
        let stored = serde_json::to_string(&seen).expect("json");
        let mut seen: SeenEvents = serde_json::from_str(&stored).expect("stored");
        assert!(!seen.first_time("Ev2", 3_000));
        assert!(seen.first_time("Ev1", 2_000 + SEEN_EVENTS_MS + 1));
        assert_eq!(seen.len(), 1, "Ev2 was forgotten with the old Ev1");

        let mut full = SeenEvents::new();
        for index in 0..(MAX_SEEN_EVENTS + 10) {
            assert!(full.first_time(&format!("Ev{index}"), 10_000));
        }
        assert_eq!(full.len(), MAX_SEEN_EVENTS);
        assert!(full.first_time("Ev0", 10_000), "the oldest went first");
        assert!(!full.first_time(&format!("Ev{}", MAX_SEEN_EVENTS + 9), 10_000));
    }
}

// ---------------------------------------------------------------------------------------------
// The chooser model (any OpenAI-compatible chat-completions endpoint)
// ---------------------------------------------------------------------------------------------

/// One message of a chat-completions request or answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: String,
}

/// `POST {base}/chat/completions`, not streamed: the repository question as one user message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub stream: bool,
    pub temperature: f32,
}

impl ChatRequest {
    /// The repository question for `text` among `candidates`, for `model`.
    pub fn choose_repository(model: &str, text: &str, candidates: &[Candidate]) -> ChatRequest {
        ChatRequest {
            model: model.to_string(),
            messages: vec![ChatMessage {
                role: "user".to_string(),
                content: model_prompt(text, candidates),
            }],
            stream: false,
            temperature: 0.0,
        }
    }
}

/// One choice of a chat-completions answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub message: ChatMessage,
}

/// A chat-completions answer: the first choice's text is the model's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatAnswer {
    #[serde(default)]
    pub choices: Vec<ChatChoice>,
}

impl ChatAnswer {
    /// The first choice's text (empty when there is none).
    pub fn text(&self) -> &str {
        self.choices
            .first()
            .map_or("", |choice| choice.message.content.as_str())
    }
}

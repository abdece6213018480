//! A local fake Slack for end-to-end tests: the Web API (`auth.test`, `chat.postMessage`, `chat.update`, `reactions.add`, `users.info`, `conversations.replies`) with its `{ok, error}` envelope and 429s, and the Events API and interactivity as Slack sends them: signed `v0`, form-encoded `payload=`, retried after 3 seconds without a 2xx.
//!
//! One axum server on 127.0.0.1 serves the Web API under `/api/<method>` and `response_url`s
//! under `/response/<n>`. Tests play the people: [`FakeSlack::mention`],
//! [`FakeSlack::reply_in_thread`], [`FakeSlack::direct_message`], edits, deletions, other bots'
//! messages and button clicks, each signed and delivered to the configured URLs; what the bot
//! did is read back through [`FakeSlack::messages`], [`FakeSlack::reactions`] and
//! [`FakeSlack::calls`], and how the receiver answered through [`FakeSlack::deliveries`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, Method as HttpMethod, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use nightshift_core::github::form_decode;
use nightshift_core::slack::{
    self, Action, ActionMessage, ActionUser, Answer, AuthTestAnswer, Authorization, Block,
    BlockActions, ChannelRef, Container, ConversationsReplies, Edited, Element, Empty, Envelope,
    Event, EventCallback, Interaction, MessageEvent, Method, PostEphemeral, PostEphemeralAnswer,
    PostMessage, PostMessageAnswer, PostedMessage, Profile, ReactionAdd, RepliesAnswer, SlackUser,
    Team, Update, UpdateAnswer, UrlVerification, UsersInfo, UsersInfoAnswer,
};
use serde::Serialize;
use serde_json::{json, Value};

/// The workspace, the app and its secrets a [`FakeSlack`] starts with.
#[derive(Debug, Clone)]
pub struct FakeSlackConfig {
    /// The workspace (`T…`).
    pub team_id: String,
    /// The workspace's subdomain.
    pub team_domain: String,
    /// The app (`A…`).
    pub api_app_id: String,
    /// The app's bot user (`U…`).
    pub bot_user_id: String,
    /// The app's bot (`B…`).
    pub bot_id: String,
    /// The bot token every Web API call must carry.
    pub bot_token: String,
    /// The secret requests to the app are signed with.
    pub signing_secret: String,
    /// How long a receiver has to answer 2xx before Slack retries (Slack: 3 s).
    pub ack_timeout: Duration,
    /// The delays before each retry, at most three (Slack: at once, 1 min, 5 min); empty: no retries.
    pub retry_delays: Vec<Duration>,
    /// Whether a mention in a channel also delivers the `message` event (as Slack does when the
    /// app subscribes to `message.channels`).
    pub message_events: bool,
}

impl Default for FakeSlackConfig {
    fn default() -> FakeSlackConfig {
        FakeSlackConfig {
            team_id: "T0FAKETEAM".to_string(),
            team_domain: "nightshift-test".to_string(),
            api_app_id: "A0FAKEAPP1".to_string(),
            bot_user_id: "U0FAKEBOT1".to_string(),
            bot_id: "B0FAKEBOT1".to_string(),
            bot_token: "xoxb-1111-2222-fakebottoken".to_string(),
            signing_secret: "fake-slack-signing-secret".to_string(),
            ack_timeout: Duration::from_secs(3),
            // Scaled down from Slack's schedule so tests see retries quickly.
            retry_delays: vec![
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(2),
            ],
            message_events: true,
        }
    }
}

/// What a request to the app was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryKind {
    /// An Events API `event_callback`.
    Event,
    /// An Events API `url_verification`.
    UrlVerification,
    /// A form-encoded interaction.
    Interaction,
}

/// One request the fake sent to the app, and how it was answered.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// What it was.
    pub kind: DeliveryKind,
    /// The event's id (the interaction's `trigger_id` for interactions).
    pub event_id: String,
    /// `X-Slack-Retry-Num`: 0 for the first attempt.
    pub retry_num: u32,
    /// `X-Slack-Retry-Reason` of a retry.
    pub retry_reason: Option<String>,
    /// The exact bytes sent.
    pub body: Vec<u8>,
    /// The answer's status; 0 when nothing answered in time.
    pub status: u16,
    /// The answer's body.
    pub answer: String,
    /// Whether the answer said `X-Slack-No-Retry: 1`.
    pub no_retry: bool,
    /// How long the answer took (the timeout when none came).
    pub elapsed: Duration,
    /// Whether a 2xx came within the acknowledgement timeout.
    pub acknowledged: bool,
}

/// A message in a channel, as the fake keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The channel.
    pub channel: String,
    /// Its timestamp.
    pub ts: String,
    /// Its thread's root, for replies.
    pub thread_ts: Option<String>,
    /// Its author (the bot user for the bot's messages).
    pub user: Option<String>,
    /// Set for bots' messages.
    pub bot_id: Option<String>,
    /// Its fallback text.
    pub text: String,
    /// Its blocks.
    pub blocks: Vec<Block>,
    /// How many times `chat.update` (or a `response_url`) changed it.
    pub updated: u32,
    /// Whether it was deleted.
    pub deleted: bool,
    /// For an ephemeral message (`chat.postEphemeral`): the only person who sees it.
    pub visible_to: Option<String>,
}

/// A reaction the bot added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaction {
    /// The message's channel.
    pub channel: String,
    /// The message's timestamp.
    pub timestamp: String,
    /// The emoji's name.
    pub name: String,
}

/// One Web API call the fake received.
#[derive(Debug, Clone)]
pub struct Call {
    /// The method (`chat.postMessage`), or `response_url`.
    pub method: String,
    /// Its arguments (a JSON body, or the form or query as an object of strings).
    pub body: Value,
    /// The HTTP status answered (200 or 429).
    pub status: u16,
    /// The `error` answered, if any.
    pub error: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

/// A handle on a running fake Slack; dropping it stops the server.
pub struct FakeSlack {
    ctx: Ctx,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

struct Inner {
    config: FakeSlackConfig,
    base_url: String,
    events_url: Option<String>,
    interactions_url: Option<String>,
    clock_offset_s: i64,
    users: BTreeMap<String, SlackUser>,
    messages: Vec<Message>,
    reactions: Vec<Reaction>,
    calls: Vec<Call>,
    deliveries: Vec<Delivery>,
    rate_limited: BTreeMap<String, u32>,
    failing: BTreeMap<String, (String, u32)>,
    next_sequence: u64,
}

impl Inner {
    fn now_s(&self) -> u64 {
        now_seconds().saturating_add_signed(self.clock_offset_s)
    }

    fn sequence(&mut self) -> u64 {
        self.next_sequence += 1;
        self.next_sequence
    }

    fn next_ts(&mut self) -> String {
        let sequence = self.sequence();
        format!("{}.{:06}", self.now_s(), sequence % 1_000_000)
    }

    fn next_event_id(&mut self) -> String {
        format!("Ev0{:09}", self.sequence())
    }

    fn message(&self, channel: &str, ts: &str) -> Option<&Message> {
        self.messages
            .iter()
            .find(|message| message.channel == channel && message.ts == ts && !message.deleted)
    }

    fn message_mut(&mut self, channel: &str, ts: &str) -> Option<&mut Message> {
        self.messages
            .iter_mut()
            .find(|message| message.channel == channel && message.ts == ts && !message.deleted)
    }

    fn callback(&mut self, event: Event) -> EventCallback {
        EventCallback {
            token: "fake-verification-token".to_string(),
            team_id: self.config.team_id.clone(),
            api_app_id: self.config.api_app_id.clone(),
            event_id: self.next_event_id(),
            event_time: self.now_s(),
            authorizations: vec![Authorization {
                team_id: self.config.team_id.clone(),
                user_id: self.config.bot_user_id.clone(),
                is_bot: true,
            }],
            is_ext_shared_channel: false,
            event,
        }
    }

    /// Records a person's (or another bot's) message and returns its event fields.
    fn said(
        &mut self,
        channel: &str,
        user: Option<&str>,
        thread_ts: Option<&str>,
        text: &str,
    ) -> MessageEvent {
        let ts = self.next_ts();
        self.messages.push(Message {
            channel: channel.to_string(),
            ts: ts.clone(),
            thread_ts: thread_ts.map(str::to_string),
            user: user.map(str::to_string),
            bot_id: None,
            text: text.to_string(),
            blocks: Vec::new(),
            updated: 0,
            deleted: false,
            visible_to: None,
        });
        let parent_user_id = thread_ts.and_then(|root| {
            self.message(channel, root)
                .and_then(|message| message.user.clone())
        });
        MessageEvent {
            user: user.map(str::to_string),
            text: text.to_string(),
            ts: ts.clone(),
            channel: channel.to_string(),
            event_ts: Some(ts),
            thread_ts: thread_ts.map(str::to_string),
            parent_user_id,
            ..MessageEvent::default()
        }
    }
}

#[derive(Clone)]
struct Ctx {
    inner: Arc<Mutex<Inner>>,
    client: reqwest::Client,
}

impl Ctx {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Seconds since the epoch.
pub fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The public handle
// ---------------------------------------------------------------------------------------------

impl FakeSlack {
    /// Starts serving on a free loopback port.
    ///
    /// Panics if no port can be bound (test setup).
    pub async fn start(config: FakeSlackConfig) -> FakeSlack {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Slack");
        let address = listener.local_addr().expect("fake Slack address");
        let inner = Inner {
            config,
            base_url: format!("http://{address}"),
            events_url: None,
            interactions_url: None,
            clock_offset_s: 0,
            users: BTreeMap::new(),
            messages: Vec::new(),
            reactions: Vec::new(),
            calls: Vec::new(),
            deliveries: Vec::new(),
            rate_limited: BTreeMap::new(),
            failing: BTreeMap::new(),
            next_sequence: 0,
        };
        let ctx = Ctx {
            inner: Arc::new(Mutex::new(inner)),
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("http client"),
        };
        let router = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(ctx.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeSlack { ctx, server }
    }

    /// The base URL: `http://127.0.0.1:P`.
    pub fn base_url(&self) -> String {
        self.ctx.lock().base_url.clone()
    }

    /// The Web API base URL (Slack's `https://slack.com/api`): `http://127.0.0.1:P/api`.
    pub fn api_url(&self) -> String {
        format!("{}/api", self.base_url())
    }

    /// The bot token.
    pub fn bot_token(&self) -> String {
        self.ctx.lock().config.bot_token.clone()
    }

    /// The signing secret.
    pub fn signing_secret(&self) -> String {
        self.ctx.lock().config.signing_secret.clone()
    }

    /// The workspace's id.
    pub fn team_id(&self) -> String {
        self.ctx.lock().config.team_id.clone()
    }

    /// The bot user's id.
    pub fn bot_user_id(&self) -> String {
        self.ctx.lock().config.bot_user_id.clone()
    }

    /// Sends events to `url` (the Worker's `/webhook/slack/events`) from now on; interactions go
    /// to its sibling `…/interactions` unless [`FakeSlack::interactions_to`] says otherwise.
    pub fn deliver_to(&self, url: &str) {
        let mut inner = self.ctx.lock();
        inner.events_url = Some(url.to_string());
        if inner.interactions_url.is_none() {
            let sibling = match url.strip_suffix("/events") {
                Some(stem) => format!("{stem}/interactions"),
                None => format!("{}/interactions", url.trim_end_matches('/')),
            };
            inner.interactions_url = Some(sibling);
        }
    }

    /// Sends interactions to `url` from now on.
    pub fn interactions_to(&self, url: &str) {
        self.ctx.lock().interactions_url = Some(url.to_string());
    }

    /// Moves the fake's clock (request timestamps, message timestamps, `event_time`) by
    /// `offset_s` seconds, to follow a Worker whose clock is injected.
    pub fn set_clock_offset(&self, offset_s: i64) {
        self.ctx.lock().clock_offset_s = offset_s;
    }

    /// Adds a person `users.info` knows.
    pub fn add_user(&self, id: &str, name: &str, email: &str) {
        let mut inner = self.ctx.lock();
        let team_id = inner.config.team_id.clone();
        inner.users.insert(
            id.to_string(),
            SlackUser {
                id: id.to_string(),
                team_id,
                name: name.to_lowercase().replace(' ', "."),
                real_name: Some(name.to_string()),
                deleted: false,
                is_bot: false,
                profile: Profile {
                    email: Some(email.to_string()).filter(|email| !email.is_empty()),
                    real_name: name.to_string(),
                    display_name: name.to_string(),
                },
            },
        );
    }

    /// Answers the next `count` calls of `method` (`chat.update`) with HTTP 429 and
    /// `Retry-After: 1`.
    pub fn rate_limit(&self, method: &str, count: u32) {
        self.ctx
            .lock()
            .rate_limited
            .insert(method.to_string(), count);
    }

    /// Answers the next `count` calls of `method` with `{"ok": false, "error": error}`.
    pub fn fail_next(&self, method: &str, error: &str, count: u32) {
        self.ctx
            .lock()
            .failing
            .insert(method.to_string(), (error.to_string(), count));
    }

    /// The direct-message channel between `user` and the bot.
    pub fn dm_channel(&self, user: &str) -> String {
        format!("D{}", user.trim_start_matches('U'))
    }

    /// `user` mentions the bot in `channel` with `text` (the mention is put first unless the
    /// text has one): delivers `app_mention` (and the `message` event when configured).
    /// Returns the `app_mention`'s event id and the message's ts.
    pub async fn mention(&self, channel: &str, user: &str, text: &str) -> (String, String) {
        self.mention_in(channel, user, None, text).await
    }

    /// `user` says `text` in the thread `thread_ts` of `channel`: delivers the `message` event
    /// (and first `app_mention` when the text mentions the bot). Returns the first event's id
    /// and the reply's ts.
    pub async fn reply_in_thread(
        &self,
        channel: &str,
        user: &str,
        thread_ts: &str,
        text: &str,
    ) -> (String, String) {
        let bot = self.bot_user_id();
        if slack::mentions(text, &bot) {
            return self.mention_in(channel, user, Some(thread_ts), text).await;
        }
        let message = {
            let mut inner = self.ctx.lock();
            let mut message = inner.said(channel, Some(user), Some(thread_ts), text);
            message.channel_type = Some("channel".to_string());
            message
        };
        let ts = message.ts.clone();
        let event_id = self.deliver_event(Event::Message(message)).await;
        (event_id, ts)
    }

    async fn mention_in(
        &self,
        channel: &str,
        user: &str,
        thread_ts: Option<&str>,
        text: &str,
    ) -> (String, String) {
        let (mention, also) = {
            let mut inner = self.ctx.lock();
            let bot = inner.config.bot_user_id.clone();
            let text = if slack::mentions(text, &bot) {
                text.to_string()
            } else {
                format!("<@{bot}> {text}")
            };
            let mention = inner.said(channel, Some(user), thread_ts, &text);
            let also = inner.config.message_events.then(|| MessageEvent {
                channel_type: Some("channel".to_string()),
                ..mention.clone()
            });
            (mention, also)
        };
        let ts = mention.ts.clone();
        let event_id = self.deliver_event(Event::AppMention(mention)).await;
        if let Some(message) = also {
            self.deliver_event(Event::Message(message)).await;
        }
        (event_id, ts)
    }

    /// `user` writes `text` to the bot directly: delivers a `message` event with
    /// `channel_type: "im"`. Returns its event id and ts.
    pub async fn direct_message(&self, user: &str, text: &str) -> (String, String) {
        self.direct_message_in_thread(user, None, text).await
    }

    /// `user` writes `text` in the thread `thread_ts` of their direct messages with the bot.
    pub async fn direct_message_in_thread(
        &self,
        user: &str,
        thread_ts: Option<&str>,
        text: &str,
    ) -> (String, String) {
        let channel = self.dm_channel(user);
        let message = {
            let mut inner = self.ctx.lock();
            let mut message = inner.said(&channel, Some(user), thread_ts, text);
            message.channel_type = Some("im".to_string());
            message
        };
        let ts = message.ts.clone();
        let event_id = self.deliver_event(Event::Message(message)).await;
        (event_id, ts)
    }

    /// `user` edits their message `ts` in `channel` to `text`: delivers `message_changed`.
    /// Returns its event id.
    pub async fn edit(&self, channel: &str, user: &str, ts: &str, text: &str) -> String {
        let event = {
            let mut inner = self.ctx.lock();
            let event_ts = inner.next_ts();
            let previous = inner.message(channel, ts).cloned();
            if let Some(message) = inner.message_mut(channel, ts) {
                message.text = text.to_string();
                message.updated += 1;
            }
            let thread_ts = previous
                .as_ref()
                .and_then(|message| message.thread_ts.clone());
            let now = MessageEvent {
                user: Some(user.to_string()),
                text: text.to_string(),
                ts: ts.to_string(),
                thread_ts: thread_ts.clone(),
                edited: Some(Edited {
                    user: user.to_string(),
                    ts: event_ts.clone(),
                }),
                ..MessageEvent::default()
            };
            let before = MessageEvent {
                user: Some(user.to_string()),
                text: previous.map(|message| message.text).unwrap_or_default(),
                ts: ts.to_string(),
                thread_ts,
                ..MessageEvent::default()
            };
            MessageEvent {
                subtype: Some("message_changed".to_string()),
                ts: event_ts.clone(),
                event_ts: Some(event_ts),
                channel: channel.to_string(),
                channel_type: Some(channel_type(channel).to_string()),
                message: Some(Box::new(now)),
                previous_message: Some(Box::new(before)),
                ..MessageEvent::default()
            }
        };
        self.deliver_event(Event::Message(event)).await
    }

    /// Message `ts` in `channel` is deleted: delivers `message_deleted`. Returns its event id.
    pub async fn delete(&self, channel: &str, ts: &str) -> String {
        let event = {
            let mut inner = self.ctx.lock();
            let event_ts = inner.next_ts();
            let previous = inner.message(channel, ts).cloned();
            if let Some(message) = inner.message_mut(channel, ts) {
                message.deleted = true;
            }
            MessageEvent {
                subtype: Some("message_deleted".to_string()),
                ts: event_ts.clone(),
                event_ts: Some(event_ts),
                channel: channel.to_string(),
                channel_type: Some(channel_type(channel).to_string()),
                deleted_ts: Some(ts.to_string()),
                previous_message: previous.map(|message| {
                    Box::new(MessageEvent {
                        user: message.user,
                        text: message.text,
                        ts: message.ts,
                        thread_ts: message.thread_ts,
                        ..MessageEvent::default()
                    })
                }),
                ..MessageEvent::default()
            }
        };
        self.deliver_event(Event::Message(event)).await
    }

    /// Another app's bot `bot_id` posts `text` in `channel` (in `thread_ts`): delivers a
    /// `bot_message`. Returns its event id and ts.
    pub async fn bot_message(
        &self,
        channel: &str,
        bot_id: &str,
        thread_ts: Option<&str>,
        text: &str,
    ) -> (String, String) {
        let message = {
            let mut inner = self.ctx.lock();
            let mut message = inner.said(channel, None, thread_ts, text);
            if let Some(stored) = inner.messages.last_mut() {
                stored.bot_id = Some(bot_id.to_string());
            }
            message.subtype = Some("bot_message".to_string());
            message.bot_id = Some(bot_id.to_string());
            message.channel_type = Some(channel_type(channel).to_string());
            message
        };
        let ts = message.ts.clone();
        let event_id = self.deliver_event(Event::Message(message)).await;
        (event_id, ts)
    }

    /// Wraps `event` in an `event_callback` and delivers it (retrying as Slack does);
    /// returns the event id. Waits for the first attempt only.
    pub async fn deliver_event(&self, event: Event) -> String {
        let callback = self.ctx.lock().callback(event);
        self.deliver_callback(callback).await
    }

    /// Delivers `callback` as it is (its event id kept: a duplicate delivery when it was sent
    /// before); returns the event id. Waits for the first attempt only.
    pub async fn deliver_callback(&self, callback: EventCallback) -> String {
        let event_id = callback.event_id.clone();
        let body =
            serde_json::to_vec(&Envelope::EventCallback(Box::new(callback))).unwrap_or_default();
        let target = self.ctx.lock().events_url.clone();
        if let Some(target) = target {
            let first = attempt(
                &self.ctx,
                &target,
                DeliveryKind::Event,
                &event_id,
                &body,
                0,
                None,
            )
            .await;
            if !first.acknowledged && !first.no_retry {
                tokio::spawn(retry(
                    self.ctx.clone(),
                    target,
                    event_id.clone(),
                    body,
                    reason(&first),
                ));
            }
        }
        event_id
    }

    /// The `event_callback` Slack would send for `event` (a fresh event id), undelivered.
    pub fn callback(&self, event: Event) -> EventCallback {
        self.ctx.lock().callback(event)
    }

    /// Sends a signed `url_verification`; returns (status, answer body, challenge).
    pub async fn url_verification(&self) -> (u16, String, String) {
        let challenge = format!("challenge-{}", self.ctx.lock().sequence());
        let body = serde_json::to_vec(&Envelope::UrlVerification(UrlVerification {
            token: "fake-verification-token".to_string(),
            challenge: challenge.clone(),
        }))
        .unwrap_or_default();
        let target = self.ctx.lock().events_url.clone();
        let Some(target) = target else {
            return (0, String::new(), challenge);
        };
        let delivery = attempt(
            &self.ctx,
            &target,
            DeliveryKind::UrlVerification,
            "",
            &body,
            0,
            None,
        )
        .await;
        (delivery.status, delivery.answer, challenge)
    }

    /// Sends `body` to the events URL with exactly these headers (omitted when `None`),
    /// unrecorded and never retried: for forged, stale or unsigned requests. Returns (status,
    /// answer body); 0 when nothing answered.
    pub async fn deliver_raw(
        &self,
        body: &[u8],
        timestamp: Option<&str>,
        signature: Option<&str>,
    ) -> (u16, String) {
        let target = self.ctx.lock().events_url.clone();
        let Some(target) = target else {
            return (0, String::new());
        };
        let mut request = self
            .ctx
            .client
            .post(&target)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, USER_AGENT)
            .body(body.to_vec());
        if let Some(timestamp) = timestamp {
            request = request.header(slack::TIMESTAMP_HEADER, timestamp);
        }
        if let Some(signature) = signature {
            request = request.header(slack::SIGNATURE_HEADER, signature);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }

    /// The current request timestamp and its signature of `body`, as Slack would send them.
    pub fn signed_headers(&self, body: &[u8]) -> (String, String) {
        let inner = self.ctx.lock();
        let timestamp = inner.now_s().to_string();
        let signature = slack::sign(inner.config.signing_secret.as_bytes(), &timestamp, body);
        (timestamp, signature)
    }

    /// `user` clicks the element `action_id` with `value` on message `message_ts` in
    /// `channel`: posts a signed, form-encoded `block_actions` to the interactions URL (not
    /// retried, as Slack does not retry interactions). Returns how it was answered.
    pub async fn click(
        &self,
        action_id: &str,
        value: &str,
        user: &str,
        channel: &str,
        message_ts: &str,
    ) -> Delivery {
        let (target, interaction) = {
            let mut inner = self.ctx.lock();
            let sequence = inner.sequence();
            let action_ts = inner.next_ts();
            let message = inner.message(channel, message_ts).cloned();
            let block_id = message
                .as_ref()
                .and_then(|message| block_of(&message.blocks, action_id, value))
                .unwrap_or_default();
            let thread_ts = message
                .as_ref()
                .and_then(|message| message.thread_ts.clone());
            let team_id = inner.config.team_id.clone();
            let interaction = Interaction::BlockActions(Box::new(BlockActions {
                user: ActionUser {
                    id: user.to_string(),
                    username: inner.users.get(user).map(|person| person.name.clone()),
                    team_id: Some(team_id.clone()),
                },
                api_app_id: inner.config.api_app_id.clone(),
                container: Container {
                    kind: "message".to_string(),
                    message_ts: Some(message_ts.to_string()),
                    channel_id: Some(channel.to_string()),
                    is_ephemeral: false,
                    thread_ts: thread_ts.clone(),
                },
                trigger_id: format!("{sequence}.{}.fake", now_seconds()),
                team: Some(Team {
                    id: team_id,
                    domain: inner.config.team_domain.clone(),
                }),
                channel: Some(ChannelRef {
                    id: channel.to_string(),
                    name: None,
                }),
                message: Some(ActionMessage {
                    ts: message_ts.to_string(),
                    thread_ts,
                    text: message.map(|message| message.text).unwrap_or_default(),
                }),
                response_url: Some(format!("{}/response/{sequence}", inner.base_url)),
                actions: vec![Action {
                    kind: "button".to_string(),
                    action_id: action_id.to_string(),
                    block_id,
                    value: Some(value.to_string()),
                    selected_option: None,
                    action_ts,
                }],
            }));
            (inner.interactions_url.clone(), interaction)
        };
        let body = interaction.form_body().into_bytes();
        let trigger_id = match &interaction {
            Interaction::BlockActions(actions) => actions.trigger_id.clone(),
            Interaction::Other => String::new(),
        };
        match target {
            Some(target) => {
                attempt(
                    &self.ctx,
                    &target,
                    DeliveryKind::Interaction,
                    &trigger_id,
                    &body,
                    0,
                    None,
                )
                .await
            }
            None => Delivery {
                kind: DeliveryKind::Interaction,
                event_id: trigger_id,
                retry_num: 0,
                retry_reason: None,
                body,
                status: 0,
                answer: String::new(),
                no_retry: false,
                elapsed: Duration::ZERO,
                acknowledged: false,
            },
        }
    }

    /// The buttons of message `ts` in `channel`: (action_id, value, url).
    pub fn buttons(
        &self,
        channel: &str,
        ts: &str,
    ) -> Vec<(String, Option<String>, Option<String>)> {
        let inner = self.ctx.lock();
        inner
            .message(channel, ts)
            .map(|message| {
                elements(&message.blocks)
                    .map(
                        |(
                            _,
                            Element::Button {
                                action_id,
                                value,
                                url,
                                ..
                            },
                        )| {
                            (action_id.clone(), value.clone(), url.clone())
                        },
                    )
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The messages the bot posted in `channel`, oldest first (with their updates applied).
    pub fn messages(&self, channel: &str) -> Vec<Message> {
        let inner = self.ctx.lock();
        let bot_user = inner.config.bot_user_id.clone();
        inner
            .messages
            .iter()
            .filter(|message| {
                message.channel == channel && message.user.as_deref() == Some(bot_user.as_str())
            })
            .cloned()
            .collect()
    }

    /// Every message in `channel` (people's, bots' and the bot's), oldest first.
    pub fn conversation(&self, channel: &str) -> Vec<Message> {
        let inner = self.ctx.lock();
        inner
            .messages
            .iter()
            .filter(|message| message.channel == channel)
            .cloned()
            .collect()
    }

    /// The reactions the bot added, oldest first.
    pub fn reactions(&self) -> Vec<Reaction> {
        self.ctx.lock().reactions.clone()
    }

    /// Every Web API call, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.ctx.lock().calls.clone()
    }

    /// The calls of `method`, oldest first.
    pub fn calls_of(&self, method: &str) -> Vec<Call> {
        self.ctx
            .lock()
            .calls
            .iter()
            .filter(|call| call.method == method)
            .cloned()
            .collect()
    }

    /// Every request sent to the app (retries included), oldest first.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.ctx.lock().deliveries.clone()
    }

    /// Waits until at least `count` deliveries are recorded (or `timeout` passes); returns them.
    pub async fn wait_for_deliveries(&self, count: usize, timeout: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + timeout;
        loop {
            let deliveries = self.deliveries();
            if deliveries.len() >= count || Instant::now() >= deadline {
                return deliveries;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `done` holds for the bot's messages in `channel` (or `timeout` passes);
    /// returns them.
    pub async fn wait_for_messages(
        &self,
        channel: &str,
        timeout: Duration,
        done: impl Fn(&[Message]) -> bool,
    ) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages(channel);
            if done(&messages) || Instant::now() >= deadline {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

const USER_AGENT: &str = "Slackbot 1.0 (+https://api.slack.com/robots)";

fn channel_type(channel: &str) -> &'static str {
    if channel.starts_with('D') {
        "im"
    } else {
        "channel"
    }
}

/// Every button of `blocks` with its block id.
fn elements(blocks: &[Block]) -> impl Iterator<Item = (Option<&String>, &Element)> {
    blocks.iter().flat_map(|block| match block {
        Block::Section {
            accessory: Some(element),
            block_id,
            ..
        } => vec![(block_id.as_ref(), element)],
        Block::Actions { elements, block_id } => elements
            .iter()
            .map(|element| (block_id.as_ref(), element))
            .collect(),
        _ => Vec::new(),
    })
}

/// The block id of the button `action_id` with `value` in `blocks`.
fn block_of(blocks: &[Block], action_id: &str, value: &str) -> Option<String> {
    elements(blocks)
        .find(
            |(
                _,
                Element::Button {
                    action_id: id,
                    value: button_value,
                    ..
                },
            )| {
                id == action_id && button_value.as_deref().is_none_or(|known| known == value)
            },
        )
        .and_then(|(block_id, _)| block_id.cloned())
}

fn reason(delivery: &Delivery) -> String {
    if delivery.status == 0 {
        "http_timeout".to_string()
    } else {
        "http_error".to_string()
    }
}

/// Redelivers an unacknowledged event up to three times, as Slack does.
async fn retry(ctx: Ctx, target: String, event_id: String, body: Vec<u8>, first_reason: String) {
    let delays = ctx.lock().config.retry_delays.clone();
    let mut why = first_reason;
    for (index, delay) in delays.into_iter().take(3).enumerate() {
        tokio::time::sleep(delay).await;
        let retry_num = u32::try_from(index + 1).unwrap_or(u32::MAX);
        let delivery = attempt(
            &ctx,
            &target,
            DeliveryKind::Event,
            &event_id,
            &body,
            retry_num,
            Some(&why),
        )
        .await;
        if delivery.acknowledged || delivery.no_retry {
            return;
        }
        why = reason(&delivery);
    }
}

/// Sends one signed request to the app and records how it was answered.
async fn attempt(
    ctx: &Ctx,
    target: &str,
    kind: DeliveryKind,
    event_id: &str,
    body: &[u8],
    retry_num: u32,
    retry_reason: Option<&str>,
) -> Delivery {
    let (timestamp, signature, timeout) = {
        let inner = ctx.lock();
        let timestamp = inner.now_s().to_string();
        let signature = slack::sign(inner.config.signing_secret.as_bytes(), &timestamp, body);
        (timestamp, signature, inner.config.ack_timeout)
    };
    let content_type = match kind {
        DeliveryKind::Interaction => "application/x-www-form-urlencoded",
        DeliveryKind::Event | DeliveryKind::UrlVerification => "application/json",
    };
    let mut request = ctx
        .client
        .post(target)
        .timeout(timeout)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::USER_AGENT, USER_AGENT)
        .header(slack::TIMESTAMP_HEADER, &timestamp)
        .header(slack::SIGNATURE_HEADER, &signature)
        .body(body.to_vec());
    if retry_num > 0 {
        request = request
            .header(slack::RETRY_NUM_HEADER, retry_num.to_string())
            .header(
                slack::RETRY_REASON_HEADER,
                retry_reason.unwrap_or("http_timeout"),
            );
    }
    let started = Instant::now();
    let (status, answer, no_retry) = match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let no_retry = response
                .headers()
                .get(slack::NO_RETRY_HEADER)
                .and_then(|value| value.to_str().ok())
                == Some("1");
            match tokio::time::timeout(timeout.saturating_sub(started.elapsed()), response.text())
                .await
            {
                Ok(text) => (status, text.unwrap_or_default(), no_retry),
                Err(_) => (0, String::new(), no_retry),
            }
        }
        Err(_) => (0, String::new(), false),
    };
    let elapsed = started.elapsed();
    let delivery = Delivery {
        kind,
        event_id: event_id.to_string(),
        retry_num,
        retry_reason: retry_reason.map(str::to_string),
        body: body.to_vec(),
        status,
        answer,
        no_retry,
        elapsed,
        acknowledged: (200..300).contains(&status) && elapsed <= timeout,
    };
    ctx.lock().deliveries.push(delivery.clone());
    delivery
}

// ---------------------------------------------------------------------------------------------
// The Web API
// ---------------------------------------------------------------------------------------------

fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

fn failure(error: &str) -> Result<Value, String> {
    Err(error.to_string())
}

fn to_value(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The call's arguments: the query, then a JSON or form body, as one object (form values are
/// strings; `blocks` given as a JSON string is parsed, `true`/`false` and numbers are read).
fn arguments(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Value {
    let mut object = serde_json::Map::new();
    let put_form = |object: &mut serde_json::Map<String, Value>, text: &str| {
        for (key, value) in form_decode(text) {
            let parsed = match (key.as_str(), value.as_str()) {
                ("blocks" | "metadata", json_text) => {
                    serde_json::from_str(json_text).unwrap_or(Value::String(value.clone()))
                }
                (_, "true") => Value::Bool(true),
                (_, "false") => Value::Bool(false),
                ("limit", number) => number
                    .parse::<u64>()
                    .map(Value::from)
                    .unwrap_or(Value::String(value.clone())),
                _ => Value::String(value.clone()),
            };
            object.insert(key, parsed);
        }
    };
    if let Some(query) = uri.query() {
        put_form(&mut object, query);
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if is_json {
        if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) {
            object.extend(fields);
        }
    } else if let Ok(text) = std::str::from_utf8(body) {
        put_form(&mut object, text);
    }
    Value::Object(object)
}

fn parse<T: serde::de::DeserializeOwned>(arguments: &Value) -> Result<T, String> {
    serde_json::from_value(arguments.clone()).map_err(|_| "invalid_arguments".to_string())
}

async fn handle(
    State(ctx): State<Ctx>,
    method: HttpMethod,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if let Some(number) = path.strip_prefix("/response/") {
        return response_url(&ctx, number, &uri, &headers, &body);
    }
    let Some(name) = path.strip_prefix("/api/") else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    if method != HttpMethod::POST && method != HttpMethod::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, "").into_response();
    }
    let arguments = arguments(&uri, &headers, &body);
    let mut inner = ctx.lock();
    let mut call = Call {
        method: name.to_string(),
        body: arguments.clone(),
        status: 200,
        error: None,
        at: Instant::now(),
    };
    if let Some(left) = inner.rate_limited.get_mut(name).filter(|left| **left > 0) {
        *left -= 1;
        call.status = 429;
        call.error = Some("ratelimited".to_string());
        inner.calls.push(call);
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &Answer::<Empty>::failure("ratelimited"),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_string)
        .or_else(|| {
            arguments
                .get("token")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    let outcome = match bearer {
        None => failure("not_authed"),
        Some(token) if token != inner.config.bot_token => failure("invalid_auth"),
        Some(_) => match inner.failing.get_mut(name).filter(|(_, left)| *left > 0) {
            Some((error, left)) => {
                *left -= 1;
                Err(error.clone())
            }
            None => match Method::from_name(name) {
                Some(method) => web_api(&mut inner, method, &arguments),
                None => failure("unknown_method"),
            },
        },
    };
    let answer = match outcome {
        Ok(Value::Object(mut fields)) => {
            fields.insert("ok".to_string(), Value::Bool(true));
            Value::Object(fields)
        }
        Ok(_) => json!({"ok": true}),
        Err(error) => {
            call.error = Some(error.clone());
            to_value(&Answer::<Empty>::failure(&error))
        }
    };
    inner.calls.push(call);
    json_response(StatusCode::OK, &answer)
}

fn web_api(inner: &mut Inner, method: Method, arguments: &Value) -> Result<Value, String> {
    match method {
        Method::AuthTest => Ok(to_value(&AuthTestAnswer {
            url: format!("https://{}.slack.com/", inner.config.team_domain),
            team: inner.config.team_domain.clone(),
            user: "nightshift".to_string(),
            team_id: inner.config.team_id.clone(),
            user_id: inner.config.bot_user_id.clone(),
            bot_id: Some(inner.config.bot_id.clone()),
        })),
        Method::PostMessage => {
            let post: PostMessage = parse(arguments)?;
            if post.channel.is_empty() {
                return failure("channel_not_found");
            }
            if post.text.is_empty() && post.blocks.is_empty() {
                return failure("no_text");
            }
            check(&post.text, &post.blocks)?;
            let ts = inner.next_ts();
            let bot_user = inner.config.bot_user_id.clone();
            let bot_id = inner.config.bot_id.clone();
            inner.messages.push(Message {
                channel: post.channel.clone(),
                ts: ts.clone(),
                thread_ts: post.thread_ts.clone(),
                user: Some(bot_user.clone()),
                bot_id: Some(bot_id.clone()),
                text: post.text.clone(),
                blocks: post.blocks.clone(),
                updated: 0,
                deleted: false,
                visible_to: None,
            });
            Ok(to_value(&PostMessageAnswer {
                channel: post.channel,
                ts: ts.clone(),
                message: PostedMessage {
                    text: post.text,
                    ts,
                    thread_ts: post.thread_ts,
                    user: Some(bot_user),
                    bot_id: Some(bot_id),
                    blocks: post.blocks,
                },
            }))
        }
        Method::PostEphemeral => {
            let post: PostEphemeral = parse(arguments)?;
            if post.channel.is_empty() {
                return failure("channel_not_found");
            }
            if !inner.users.contains_key(&post.user) {
                return failure("user_not_in_channel");
            }
            if post.text.is_empty() && post.blocks.is_empty() {
                return failure("no_text");
            }
            check(&post.text, &post.blocks)?;
            let ts = inner.next_ts();
            let bot_user = inner.config.bot_user_id.clone();
            let bot_id = inner.config.bot_id.clone();
            inner.messages.push(Message {
                channel: post.channel,
                ts: ts.clone(),
                thread_ts: post.thread_ts,
                user: Some(bot_user),
                bot_id: Some(bot_id),
                text: post.text,
                blocks: post.blocks,
                updated: 0,
                deleted: false,
                visible_to: Some(post.user),
            });
            Ok(to_value(&PostEphemeralAnswer { message_ts: ts }))
        }
        Method::Update => {
            let update: Update = parse(arguments)?;
            check(&update.text, &update.blocks)?;
            let bot_user = inner.config.bot_user_id.clone();
            let Some(message) = inner.message_mut(&update.channel, &update.ts) else {
                return failure("message_not_found");
            };
            if message.user.as_deref() != Some(bot_user.as_str()) {
                return failure("cant_update_message");
            }
            message.text = update.text.clone();
            message.blocks = update.blocks;
            message.updated += 1;
            Ok(to_value(&UpdateAnswer {
                channel: update.channel,
                ts: update.ts,
                text: update.text,
            }))
        }
        Method::ReactionsAdd => {
            let reaction: ReactionAdd = parse(arguments)?;
            if inner
                .message(&reaction.channel, &reaction.timestamp)
                .is_none()
            {
                return failure("message_not_found");
            }
            let added = Reaction {
                channel: reaction.channel,
                timestamp: reaction.timestamp,
                name: reaction.name,
            };
            if inner.reactions.contains(&added) {
                return failure("already_reacted");
            }
            inner.reactions.push(added);
            Ok(json!({}))
        }
        Method::UsersInfo => {
            let asked: UsersInfo = parse(arguments)?;
            match inner.users.get(&asked.user) {
                Some(user) => Ok(to_value(&UsersInfoAnswer { user: user.clone() })),
                None => failure("user_not_found"),
            }
        }
        Method::ConversationsReplies => {
            let asked: ConversationsReplies = parse(arguments)?;
            let limit = asked.limit.map_or(1_000, |limit| limit as usize);
            let thread: Vec<MessageEvent> = inner
                .messages
                .iter()
                .filter(|message| {
                    message.channel == asked.channel
                        && !message.deleted
                        && (message.ts == asked.ts
                            || message.thread_ts.as_deref() == Some(asked.ts.as_str()))
                })
                .map(|message| MessageEvent {
                    user: message.user.clone(),
                    text: message.text.clone(),
                    ts: message.ts.clone(),
                    thread_ts: Some(asked.ts.clone()),
                    bot_id: message.bot_id.clone(),
                    ..MessageEvent::default()
                })
                .collect();
            if thread.is_empty() {
                return failure("thread_not_found");
            }
            let has_more = thread.len() > limit;
            Ok(to_value(&RepliesAnswer {
                messages: thread.into_iter().take(limit).collect(),
                has_more,
            }))
        }
    }
}

/// Slack's refusals for messages over Block Kit's limits.
fn check(text: &str, blocks: &[Block]) -> Result<(), String> {
    if text.chars().count() > slack::MAX_MESSAGE_TEXT {
        return Err("msg_too_long".to_string());
    }
    slack::check_message(text, blocks).map_err(|_| "invalid_blocks".to_string())
}

/// A `response_url` post: `{replace_original, text, blocks}` replaces the clicked message,
/// anything else posts in its thread.
fn response_url(ctx: &Ctx, number: &str, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let arguments = arguments(uri, headers, body);
    let mut inner = ctx.lock();
    inner.calls.push(Call {
        method: "response_url".to_string(),
        body: arguments.clone(),
        status: 200,
        error: None,
        at: Instant::now(),
    });
    let clicked = inner.deliveries.iter().rev().find_map(|delivery| {
        let form = std::str::from_utf8(&delivery.body).ok()?;
        match Interaction::parse(form.as_bytes()).ok()? {
            Interaction::BlockActions(actions)
                if actions
                    .response_url
                    .as_deref()
                    .is_some_and(|url| url.ends_with(&format!("/response/{number}"))) =>
            {
                Some((
                    actions.channel_id()?.to_string(),
                    actions.message_ts()?.to_string(),
                ))
            }
            _ => None,
        }
    });
    let Some((channel, ts)) = clicked else {
        return (StatusCode::NOT_FOUND, "no_such_response_url").into_response();
    };
    let text = arguments
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let blocks: Vec<Block> = arguments
        .get("blocks")
        .cloned()
        .and_then(|blocks| serde_json::from_value(blocks).ok())
        .unwrap_or_default();
    let replace = arguments.get("replace_original") == Some(&Value::Bool(true));
    if replace {
        if let Some(message) = inner.message_mut(&channel, &ts) {
            message.text = text;
            message.blocks = blocks;
            message.updated += 1;
        }
    } else {
        let thread_ts = inner
            .message(&channel, &ts)
            .and_then(|message| message.thread_ts.clone())
            .unwrap_or(ts);
        let new_ts = inner.next_ts();
        let bot_user = inner.config.bot_user_id.clone();
        let bot_id = inner.config.bot_id.clone();
        inner.messages.push(Message {
            channel,
            ts: new_ts,
            thread_ts: Some(thread_ts),
            user: Some(bot_user),
            bot_id: Some(bot_id),
            text,
            blocks,
            updated: 0,
            deleted: false,
            visible_to: None,
        });
    }
    (StatusCode::OK, "ok").into_response()
}

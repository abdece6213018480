//! The SlackWorkspace Durable Object (one per Slack workspace, by team id): every event and click stored once and answered at once, the work they ask for done from its alarm (durable, retried), threads ↔ sessions, linked people, pending repository choices, the workspace's settings, and one status message per session kept up to date.

use nightshift_core::github::RepositoryAction;
use nightshift_core::ids::Identity;
use nightshift_core::quota::QuotaKind;
use nightshift_core::slack::{
    self as sl, Block, BlockActions, Candidate, Choice, Clicked, EventCallback, Intent, Method,
    PostEphemeral, PostMessage, ReactionAdd, Stage, StatusView, Update, UpdateAnswer,
    UsersInfoAnswer,
};
use nightshift_core::slack_status::ThreadStatus;
use serde::{Deserialize, Serialize};
use worker::*;

use crate::auth::{encode_identity, IDENTITY_HEADER};
use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::http::{ask, call, index_add, installation_index, session_stub};
use crate::objects::{
    encode, read_body, EventsPage, InstallationRoute, PersonFind, PersonFound, PromptAnswer,
    PromptAsk, SessionRoute, SlackAck, SlackEventAsk, SlackInteractionAsk, SlackLinkAnswer,
    SlackLinkAsk, SlackSettings, SlackWorkspaceRoute,
};
use crate::platform::{new_id, random_hex};
use crate::slack::{ask_model, now_ms, web_api, web_api_form};

/// Work that failed is tried again after this long (doubling, at most [`RETRY_MAX_MS`]).
const RETRY_MS: u64 = 2_000;
const RETRY_MAX_MS: u64 = 5 * 60 * 1000;
/// Work that failed this often is given up (kept as `failed`, and logged).
const MAX_ATTEMPTS: i64 = 12;
/// Events are remembered this long (Slack retries within minutes).
const SEEN_MS: u64 = 24 * 3600 * 1000;
/// A one-time link code is good this long.
const LINK_TTL_MS: u64 = 24 * 3600 * 1000;
/// How often a working session's status is read.
const FOLLOW_MS: u64 = 1_000;

#[durable_object]
pub struct SlackWorkspace {
    state: State,
    env: Env,
    /// Whether this instance created its tables already (once, not on every query).
    schema: std::cell::Cell<bool>,
}

impl DurableObject for SlackWorkspace {
    fn new(state: State, env: Env) -> Self {
        SlackWorkspace {
            state,
            env,
            schema: std::cell::Cell::new(false),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(e) => e.into_response(),
        }
    }

    async fn alarm(&self) -> Result<Response> {
        let next = match self.run().await {
            Ok(next) => next,
            Err(e) => {
                console_error!("slack workspace: {}", e.message);
                Some(RETRY_MS)
            }
        };
        if let Some(ms) = next {
            self.state
                .storage()
                .set_alarm(std::time::Duration::from_millis(ms.max(1)))
                .await?;
        }
        Response::empty()
    }
}

/// A request for work as it came: who asked what, where the answers go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Ask {
    channel: String,
    /// The Slack user (`U…`).
    user: String,
    text: String,
    /// The thread the session's messages go to.
    thread_ts: String,
    /// The person's message (reactions go on it).
    message_ts: String,
    /// The prompt's idempotency key (the event's id).
    key: String,
    /// A follow-up in a session's thread (else a new request).
    #[serde(default)]
    follow_up: bool,
    /// Whether the bot was mentioned or it came as a direct message.
    #[serde(default)]
    addressed: bool,
}

/// One stored unit of work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Work {
    Event { callback: String },
    Click { payload: String },
    Resume { ask: Ask },
}

#[derive(Deserialize)]
struct WorkRow {
    key: String,
    body: String,
    attempts: i64,
}

/// What a [`ThreadRow`] reads.
const THREAD_COLUMNS: &str =
    "SELECT channel, thread_ts, session, person, ask, status_ts, status, done_reacted FROM threads";

#[derive(Deserialize)]
struct ThreadRow {
    channel: String,
    thread_ts: String,
    session: String,
    person: String,
    ask: String,
    status_ts: String,
    status: String,
    done_reacted: i64,
}

#[derive(Deserialize)]
struct TextRow {
    body: String,
}

#[derive(Deserialize)]
struct NextRow {
    next_at: Option<i64>,
}

/// A thread's session, read back.
struct Thread {
    channel: String,
    thread_ts: String,
    session: String,
    person: Identity,
    ask: Ask,
    status_ts: String,
    status: ThreadStatus,
    done_reacted: bool,
}

fn int(n: u64) -> SqlStorageValue {
    SqlStorageValue::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

fn text(s: &str) -> SqlStorageValue {
    SqlStorageValue::String(s.to_string())
}

fn json<T: Serialize>(value: &T) -> ApiResult<String> {
    serde_json::to_string(value).map_err(ApiError::internal)
}

fn parse<T: for<'de> Deserialize<'de>>(body: &str) -> ApiResult<T> {
    serde_json::from_str(body).map_err(ApiError::internal)
}

/// A Slack failure as the object's error (retried by the alarm).
fn slack_failed(e: sl::SlackError) -> ApiError {
    EdgeError::internal(format!("Slack: {e}")).into()
}

impl SlackWorkspace {
    fn sql(&self) -> ApiResult<SqlStorage> {
        let sql = self.state.storage().sql();
        if self.schema.get() {
            return Ok(sql);
        }
        for ddl in [
            "CREATE TABLE IF NOT EXISTS work (key TEXT PRIMARY KEY, body TEXT NOT NULL, received_at INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at INTEGER NOT NULL DEFAULT 0)",
            "CREATE TABLE IF NOT EXISTS threads (channel TEXT NOT NULL, thread_ts TEXT NOT NULL, session TEXT NOT NULL, person TEXT NOT NULL, ask TEXT NOT NULL, status_ts TEXT NOT NULL DEFAULT '', status TEXT NOT NULL, following INTEGER NOT NULL DEFAULT 1, done_reacted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (channel, thread_ts))",
            "CREATE TABLE IF NOT EXISTS people (slack_user TEXT PRIMARY KEY, person TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS links (code TEXT PRIMARY KEY, slack_user TEXT NOT NULL, created_at INTEGER NOT NULL, ask TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS choices (channel TEXT NOT NULL, thread_ts TEXT NOT NULL, ask TEXT NOT NULL, choice_ts TEXT NOT NULL DEFAULT '', PRIMARY KEY (channel, thread_ts))",
            "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, body TEXT NOT NULL)",
        ] {
            sql.exec(ddl, None)?;
        }
        self.schema.set(true);
        Ok(sql)
    }

    fn now(&self) -> u64 {
        now_ms(&self.env)
    }

    fn kv_get(&self, k: &str) -> ApiResult<Option<String>> {
        let rows: Vec<TextRow> = self
            .sql()?
            .exec("SELECT body FROM kv WHERE k = ?", vec![text(k)])?
            .to_array()?;
        Ok(rows.into_iter().next().map(|r| r.body))
    }

    fn kv_put(&self, k: &str, body: &str) -> ApiResult<()> {
        self.sql()?.exec(
            "INSERT OR REPLACE INTO kv (k, body) VALUES (?, ?)",
            vec![text(k), text(body)],
        )?;
        Ok(())
    }

    fn settings(&self) -> ApiResult<SlackSettings> {
        let mut settings: SlackSettings = match self.kv_get("settings")? {
            Some(body) => parse(&body)?,
            None => SlackSettings::default(),
        };
        settings.team = self.kv_get("team")?.unwrap_or_default();
        Ok(settings)
    }

    fn origin(&self) -> String {
        self.kv_get("origin").ok().flatten().unwrap_or_default()
    }

    /// Rings the alarm within `ms` (an earlier one stays).
    async fn arm(&self, ms: u64) -> ApiResult<()> {
        let storage = self.state.storage();
        let at = crate::platform::now_ms().saturating_add(ms);
        let current = storage.get_alarm().await?;
        if current.is_none_or(|t| u64::try_from(t).unwrap_or(0) > at) {
            storage
                .set_alarm(std::time::Duration::from_millis(ms.max(1)))
                .await?;
        }
        Ok(())
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let Some(route) = SlackWorkspaceRoute::parse(&req.method(), &req.path()) else {
            return Err(EdgeError::NotFound("route").into());
        };
        match route {
            SlackWorkspaceRoute::Event => {
                let event: SlackEventAsk = read_body(&mut req).await?;
                let callback: EventCallback = parse(&event.callback)?;
                self.kv_put("team", &callback.team_id)?;
                if !event.origin.is_empty() {
                    self.kv_put("origin", &event.origin)?;
                }
                let work = Work::Event {
                    callback: event.callback,
                };
                let duplicate = !self.store_work(&format!("e:{}", event.event_id), &work)?;
                if !duplicate {
                    self.arm(0).await?;
                }
                json_of(200, &SlackAck { duplicate })
            }
            SlackWorkspaceRoute::Interaction => {
                let click: SlackInteractionAsk = read_body(&mut req).await?;
                if !click.origin.is_empty() {
                    self.kv_put("origin", &click.origin)?;
                }
                let work = Work::Click {
                    payload: click.payload,
                };
                let duplicate = !self.store_work(&format!("c:{}", click.key), &work)?;
                if !duplicate {
                    self.arm(0).await?;
                }
                json_of(200, &SlackAck { duplicate })
            }
            SlackWorkspaceRoute::SettingsGet => json_of(200, &self.settings()?),
            SlackWorkspaceRoute::SettingsPut => {
                let mut settings: SlackSettings = read_body(&mut req).await?;
                settings.team = String::new();
                self.kv_put("settings", &json(&settings)?)?;
                json_of(200, &self.settings()?)
            }
            SlackWorkspaceRoute::Link => {
                let link: SlackLinkAsk = read_body(&mut req).await?;
                json_of(200, &self.redeem(link).await?)
            }
        }
    }

    /// Stores work under `key` once; false when the key was seen before.
    fn store_work(&self, key: &str, work: &Work) -> ApiResult<bool> {
        let stored = self.sql()?.exec(
            "INSERT OR IGNORE INTO work (key, body, received_at, state, attempts, next_at) VALUES (?, ?, ?, 'pending', 0, 0)",
            vec![text(key), text(&json(work)?), int(self.now())],
        )?;
        Ok(stored.rows_written() > 0)
    }

    /// The alarm: pending work in order, then the followed sessions' status messages.
    /// Answers when to ring again.
    async fn run(&self) -> ApiResult<Option<u64>> {
        let now = self.now();
        let sql = self.sql()?;
        sql.exec(
            "DELETE FROM work WHERE state != 'pending' AND received_at < ?",
            vec![int(now.saturating_sub(SEEN_MS))],
        )?;
        sql.exec(
            "DELETE FROM links WHERE created_at < ?",
            vec![int(now.saturating_sub(LINK_TTL_MS))],
        )?;
        let due: Vec<WorkRow> = sql
            .exec(
                "SELECT key, body, attempts FROM work WHERE state = 'pending' AND next_at <= ? ORDER BY received_at LIMIT 20",
                vec![int(now)],
            )?
            .to_array()?;
        for row in due {
            let done = match parse::<Work>(&row.body) {
                Ok(work) => self.perform(work).await,
                Err(e) => Err(e),
            };
            match done {
                Ok(()) => {
                    sql.exec(
                        "UPDATE work SET state = 'done' WHERE key = ?",
                        vec![text(&row.key)],
                    )?;
                }
                Err(e) => {
                    let attempts = row.attempts + 1;
                    console_error!("slack work {} (attempt {attempts}): {}", row.key, e.message);
                    let state = if attempts >= MAX_ATTEMPTS {
                        "failed"
                    } else {
                        "pending"
                    };
                    let wait = RETRY_MS
                        .saturating_mul(1 << attempts.clamp(0, 16))
                        .min(RETRY_MAX_MS);
                    sql.exec(
                        "UPDATE work SET attempts = ?, state = ?, next_at = ? WHERE key = ?",
                        vec![
                            SqlStorageValue::Integer(attempts),
                            text(state),
                            int(self.now().saturating_add(wait)),
                            text(&row.key),
                        ],
                    )?;
                }
            }
        }
        let following = self.follow().await?;
        let next: Vec<NextRow> = sql
            .exec(
                "SELECT MIN(next_at) AS next_at FROM work WHERE state = 'pending'",
                None,
            )?
            .to_array()?;
        let now = self.now();
        let work_at = next
            .into_iter()
            .next()
            .and_then(|r| r.next_at)
            .map(|t| u64::try_from(t).unwrap_or(0).saturating_sub(now));
        Ok(match (work_at, following) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    async fn perform(&self, work: Work) -> ApiResult<()> {
        let Some(cfg) = config::slack(&self.env) else {
            return Ok(());
        };
        match work {
            Work::Event { callback } => {
                let callback: EventCallback = parse(&callback)?;
                self.event(&cfg, &callback).await
            }
            Work::Click { payload } => {
                let actions: BlockActions = parse(&payload)?;
                self.click(&cfg, &actions).await
            }
            Work::Resume { ask } => self.request(&cfg, ask).await,
        }
    }

    /// The bot's own user id (from the event, else `auth.test`, remembered).
    async fn bot_user(&self, cfg: &config::Slack, callback: &EventCallback) -> ApiResult<String> {
        if let Some(id) = callback.bot_user_id() {
            return Ok(id.to_string());
        }
        if let Some(id) = self.kv_get("bot_user")? {
            return Ok(id);
        }
        let me: sl::AuthTestAnswer = web_api(cfg, Method::AuthTest, &sl::Empty {})
            .await
            .map_err(slack_failed)?;
        self.kv_put("bot_user", &me.user_id)?;
        Ok(me.user_id)
    }

    async fn event(&self, cfg: &config::Slack, callback: &EventCallback) -> ApiResult<()> {
        let bot = self.bot_user(cfg, callback).await?;
        let ask = match sl::intent(&callback.event, &bot) {
            Intent::Start {
                channel,
                user,
                text,
                ts,
                ..
            } => Ask {
                channel,
                user,
                text,
                thread_ts: ts.clone(),
                message_ts: ts,
                key: callback.event_id.clone(),
                follow_up: false,
                addressed: true,
            },
            Intent::FollowUp {
                channel,
                user,
                text,
                ts,
                thread_ts,
                mentioned,
                direct,
            } => Ask {
                channel,
                user,
                text,
                thread_ts,
                message_ts: ts,
                key: callback.event_id.clone(),
                follow_up: true,
                addressed: mentioned || direct,
            },
            Intent::Ignore(_) => return Ok(()),
        };
        self.request(cfg, ask).await
    }

    /// A request or a follow-up: the person, then their session (an existing thread's, or a
    /// new one in the repository chosen for them).
    async fn request(&self, cfg: &config::Slack, ask: Ask) -> ApiResult<()> {
        let thread = self.thread(&ask.channel, &ask.thread_ts)?;
        if thread.is_none() && ask.follow_up && !ask.addressed {
            // Talk in a thread that is not a session's, not to the bot.
            return Ok(());
        }
        if thread.is_none() && self.pending_choice(&ask.channel, &ask.thread_ts)?.is_some() {
            // Waiting for the person's pick in this thread.
            return Ok(());
        }
        self.react(cfg, &ask.channel, &ask.message_ts, "eyes")
            .await?;
        let Some(person) = self.person(cfg, &ask.user).await? else {
            return self.offer_link(cfg, &ask).await;
        };
        match thread {
            Some(thread) => self.follow_up(cfg, thread, &person, &ask).await,
            None => self.choose(cfg, &person, ask).await,
        }
    }

    /// Adds a reaction (one already there is fine).
    async fn react(
        &self,
        cfg: &config::Slack,
        channel: &str,
        ts: &str,
        name: &str,
    ) -> ApiResult<()> {
        let reaction = ReactionAdd {
            channel: channel.to_string(),
            timestamp: ts.to_string(),
            name: name.to_string(),
        };
        match web_api::<_, sl::Empty>(cfg, Method::ReactionsAdd, &reaction).await {
            Ok(_) => Ok(()),
            Err(sl::SlackError::Api(e)) if e == "already_reacted" => Ok(()),
            Err(sl::SlackError::Api(e)) => {
                // A message deleted meanwhile: nothing to react on, nothing to retry.
                console_log!("reaction on {channel}/{ts}: {e}");
                Ok(())
            }
            Err(e) => Err(slack_failed(e)),
        }
    }

    /// Posts `text` (and `blocks`) in the thread; answers the message's ts.
    async fn say(
        &self,
        cfg: &config::Slack,
        channel: &str,
        thread_ts: &str,
        text: &str,
        blocks: Vec<Block>,
    ) -> ApiResult<String> {
        sl::check_message(text, &blocks).map_err(slack_failed)?;
        let message = PostMessage {
            channel: channel.to_string(),
            text: text.to_string(),
            blocks,
            thread_ts: Some(thread_ts.to_string()),
            unfurl_links: false,
            metadata: None,
        };
        let posted: sl::PostedTs = web_api(cfg, Method::PostMessage, &message)
            .await
            .map_err(slack_failed)?;
        Ok(posted.ts)
    }

    /// The Nightshift person a Slack user is: linked before, or by the verified email Slack
    /// and GitHub both give.
    async fn person(&self, cfg: &config::Slack, slack_user: &str) -> ApiResult<Option<Identity>> {
        let rows: Vec<TextRow> = self
            .sql()?
            .exec(
                "SELECT person AS body FROM people WHERE slack_user = ?",
                vec![text(slack_user)],
            )?
            .to_array()?;
        if let Some(row) = rows.into_iter().next() {
            return Ok(Some(parse(&row.body)?));
        }
        let info: UsersInfoAnswer =
            match web_api_form(cfg, Method::UsersInfo, &[("user", slack_user)]).await {
                Ok(info) => info,
                Err(sl::SlackError::Api(e)) => {
                    console_log!("users.info {slack_user}: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(slack_failed(e)),
            };
        let Some(email) = info.user.email() else {
            return Ok(None);
        };
        let find = PersonFind {
            email: email.to_ascii_lowercase(),
        };
        let found: PersonFound = ask(
            &installation_index(&self.env)?,
            InstallationRoute::PersonFind,
            Some(encode(&find)?),
        )
        .await?;
        if let Some(person) = &found.person {
            self.sql()?.exec(
                "INSERT OR REPLACE INTO people (slack_user, person) VALUES (?, ?)",
                vec![text(slack_user), text(&json(person)?)],
            )?;
        }
        Ok(found.person)
    }

    /// Someone Nightshift does not know: a one-time link to sign in and link, after which the
    /// request goes on by itself.
    async fn offer_link(&self, cfg: &config::Slack, ask: &Ask) -> ApiResult<()> {
        let code = random_hex(16);
        self.sql()?.exec(
            "INSERT INTO links (code, slack_user, created_at, ask) VALUES (?, ?, ?, ?)",
            vec![
                text(&code),
                text(&ask.user),
                int(self.now()),
                text(&json(ask)?),
            ],
        )?;
        let team = self.kv_get("team")?.unwrap_or_default();
        let url = format!("{}/#/slack/link/{team}/{code}", self.origin());
        let words = format!(
            "<@{}> I don't know who you are in Nightshift yet. Sign in with GitHub and link your Slack account here: <{url}|link my account> (only you see this; the link works once, for a day). I'll start on this as soon as it's done.",
            ask.user
        );
        // Only the person sees the link: whoever redeems it becomes who their Slack account
        // works as, so it is never posted where others could take it first.
        let message = PostEphemeral {
            channel: ask.channel.clone(),
            user: ask.user.clone(),
            text: words,
            blocks: Vec::new(),
            thread_ts: Some(ask.thread_ts.clone()),
        };
        web_api::<_, sl::PostEphemeralAnswer>(cfg, Method::PostEphemeral, &message)
            .await
            .map_err(slack_failed)?;
        Ok(())
    }

    /// A link code redeemed by the person signed in: the Slack account is theirs, and the
    /// request that waited goes on.
    async fn redeem(&self, link: SlackLinkAsk) -> ApiResult<SlackLinkAnswer> {
        #[derive(Deserialize)]
        struct LinkRow {
            slack_user: String,
            created_at: i64,
            ask: String,
        }
        let sql = self.sql()?;
        let rows: Vec<LinkRow> = sql
            .exec(
                "SELECT slack_user, created_at, ask FROM links WHERE code = ?",
                vec![text(&link.code)],
            )?
            .to_array()?;
        let Some(row) = rows.into_iter().next() else {
            return Err(EdgeError::SlackLinkUnknown.into());
        };
        let created = u64::try_from(row.created_at).unwrap_or(0);
        sql.exec("DELETE FROM links WHERE code = ?", vec![text(&link.code)])?;
        if created.saturating_add(LINK_TTL_MS) < self.now() {
            return Err(EdgeError::SlackLinkUnknown.into());
        }
        sql.exec(
            "INSERT OR REPLACE INTO people (slack_user, person) VALUES (?, ?)",
            vec![text(&row.slack_user), text(&json(&link.person)?)],
        )?;
        let ask: Ask = parse(&row.ask)?;
        let resumed = self.store_work(&format!("r:{}", link.code), &Work::Resume { ask })?;
        self.arm(0).await?;
        Ok(SlackLinkAnswer {
            team: self.kv_get("team")?.unwrap_or_default(),
            slack_user: row.slack_user,
            resumed,
        })
    }

    /// The registered repositories the person may work in.
    async fn candidates(&self, person: &Identity) -> ApiResult<Vec<Candidate>> {
        Ok(self.repositories(person).await?.1)
    }

    /// Every registered repository, and those the person may work in.
    async fn repositories(&self, person: &Identity) -> ApiResult<(Vec<Candidate>, Vec<Candidate>)> {
        let github = config::github(&self.env).is_some();
        let mut all = Vec::new();
        let mut out = Vec::new();
        for name in crate::access::registered(&self.env).await? {
            let Some(settings) = crate::access::settings(&self.env, &name).await? else {
                continue;
            };
            let candidate = Candidate {
                name: settings.name.clone(),
                full_name: settings.github.clone().unwrap_or_default(),
                description: settings.description.clone(),
                topics: settings.topics.clone(),
            };
            all.push(candidate.clone());
            if github {
                let Some(full_name) = settings.github.as_deref() else {
                    continue;
                };
                let role = crate::access::role(&self.env, person, full_name, false).await;
                if !role.is_ok_and(|r| RepositoryAction::Use.check(r).is_ok()) {
                    continue;
                }
            }
            out.push(candidate);
        }
        Ok((all, out))
    }

    /// Chooses the repository (rules, the channel's default, the scorer, the model) and
    /// starts there, or asks the person.
    async fn choose(&self, cfg: &config::Slack, person: &Identity, ask: Ask) -> ApiResult<()> {
        let (registered, candidates) = self.repositories(person).await?;
        if let Some(name) = sl::named_but_not_allowed(&ask.text, &registered, &candidates) {
            let words = format!(
                "<@{}> You may not work in `{}`: ask its admins on GitHub for write access, or name another repository.",
                ask.user,
                sl::escape(&name)
            );
            self.say(cfg, &ask.channel, &ask.thread_ts, &words, Vec::new())
                .await?;
            return Ok(());
        }
        let settings = self.settings()?;
        let default = settings
            .channel_defaults
            .get(&ask.channel)
            .map(String::as_str);
        let mut choice = sl::choose(&ask.text, &settings.routing_rules, default, &candidates);
        if let (Choice::Ask { .. }, Some(chooser)) = (&choice, &cfg.chooser) {
            match ask_model(chooser, &ask.text, &candidates).await {
                Ok(pick) => choice = sl::accept(&pick, &candidates, chooser.threshold),
                Err(e) => console_log!("the chooser model did not answer: {e}"),
            }
        }
        match choice {
            Choice::Chosen { repository, .. } => self.open(cfg, person, &ask, &repository).await,
            Choice::Ask { ranked } => {
                let question = format!(
                    "<@{}> Which repository is this for? Choose one and I'll start.",
                    ask.user
                );
                let blocks = sl::choice_blocks(&question, &ranked);
                let ts = self
                    .say(
                        cfg,
                        &ask.channel,
                        &ask.thread_ts,
                        &sl::choice_text(&question),
                        blocks,
                    )
                    .await?;
                self.sql()?.exec(
                    "INSERT OR REPLACE INTO choices (channel, thread_ts, ask, choice_ts) VALUES (?, ?, ?, ?)",
                    vec![text(&ask.channel), text(&ask.thread_ts), text(&json(&ask)?), text(&ts)],
                )?;
                Ok(())
            }
            Choice::NoRepository => {
                let words = format!(
                    "<@{}> There is no repository here you may work in: register one in Nightshift, or ask its admins on GitHub for write access, then ask again.",
                    ask.user
                );
                self.say(cfg, &ask.channel, &ask.thread_ts, &words, Vec::new())
                    .await?;
                Ok(())
            }
        }
    }

    fn pending_choice(&self, channel: &str, thread_ts: &str) -> ApiResult<Option<(Ask, String)>> {
        #[derive(Deserialize)]
        struct ChoiceRow {
            ask: String,
            choice_ts: String,
        }
        let rows: Vec<ChoiceRow> = self
            .sql()?
            .exec(
                "SELECT ask, choice_ts FROM choices WHERE channel = ? AND thread_ts = ?",
                vec![text(channel), text(thread_ts)],
            )?
            .to_array()?;
        match rows.into_iter().next() {
            Some(row) => Ok(Some((parse(&row.ask)?, row.choice_ts))),
            None => Ok(None),
        }
    }

    fn thread(&self, channel: &str, thread_ts: &str) -> ApiResult<Option<Thread>> {
        let rows: Vec<ThreadRow> = self
            .sql()?
            .exec(
                &format!("{THREAD_COLUMNS} WHERE channel = ? AND thread_ts = ?"),
                vec![text(channel), text(thread_ts)],
            )?
            .to_array()?;
        rows.into_iter().next().map(thread_of).transpose()
    }

    fn save_thread(&self, thread: &Thread, following: bool) -> ApiResult<()> {
        self.sql()?.exec(
            "INSERT OR REPLACE INTO threads (channel, thread_ts, session, person, ask, status_ts, status, following, done_reacted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            vec![
                text(&thread.channel),
                text(&thread.thread_ts),
                text(&thread.session),
                text(&json(&thread.person)?),
                text(&json(&thread.ask)?),
                text(&thread.status_ts),
                text(&json(&thread.status)?),
                SqlStorageValue::Integer(i64::from(following)),
                SqlStorageValue::Integer(i64::from(thread.done_reacted)),
            ],
        )?;
        Ok(())
    }

    /// Starts the person's session in `repository` for the request: recorded first (a retry
    /// finds the same session), then created, prompted, and its status message posted.
    async fn open(
        &self,
        cfg: &config::Slack,
        person: &Identity,
        ask: &Ask,
        repository: &str,
    ) -> ApiResult<()> {
        let mut thread = match self.thread(&ask.channel, &ask.thread_ts)? {
            Some(thread) => thread,
            None => {
                let session = new_id("ses");
                let origin = self.origin();
                let view = StatusView {
                    task: sl::cut(&ask.text, 2_000),
                    repository: repository.to_string(),
                    branch: format!("nightshift/{session}"),
                    model: "default".to_string(),
                    asked_by: format!("<@{}>", ask.user),
                    stage: Stage::Starting,
                    session_id: session.clone(),
                    session_url: format!("{origin}/#/s/{session}"),
                    pr_url: None,
                };
                let thread = Thread {
                    channel: ask.channel.clone(),
                    thread_ts: ask.thread_ts.clone(),
                    session,
                    person: person.clone(),
                    ask: ask.clone(),
                    status_ts: String::new(),
                    status: ThreadStatus::new(view),
                    done_reacted: false,
                };
                self.save_thread(&thread, true)?;
                thread
            }
        };
        let created = self
            .create_session(person, &thread.session, ask, repository)
            .await;
        if let Err(e) = created {
            return self.refused(cfg, &thread, &e).await;
        }
        match self.prompt(person, &thread.session, ask).await {
            Ok(prompt) => thread.status.follow_up(&prompt),
            Err(e) => return self.refused(cfg, &thread, &e).await,
        }
        self.post_status(cfg, &mut thread).await?;
        self.save_thread(&thread, true)?;
        self.arm(FOLLOW_MS).await
    }

    /// A refusal of the session's (no access, a quota): said in the thread, the thread no
    /// longer a session's.
    async fn refused(&self, cfg: &config::Slack, thread: &Thread, e: &ApiError) -> ApiResult<()> {
        if e.status >= 500 {
            return Err(e.clone());
        }
        let words = format!(
            "<@{}> I could not start: {} ({})",
            thread.ask.user, e.message, e.code
        );
        self.say(cfg, &thread.channel, &thread.thread_ts, &words, Vec::new())
            .await?;
        if thread.status_ts.is_empty() {
            self.sql()?.exec(
                "DELETE FROM threads WHERE channel = ? AND thread_ts = ?",
                vec![text(&thread.channel), text(&thread.thread_ts)],
            )?;
        }
        Ok(())
    }

    async fn create_session(
        &self,
        person: &Identity,
        id: &str,
        ask: &Ask,
        repository: &str,
    ) -> ApiResult<()> {
        let env = &self.env;
        let github =
            crate::access::require_session_repository(env, person, repository, false).await?;
        let title = sl::cut(ask.text.lines().next().unwrap_or("Slack request"), 190);
        let title = if title.trim().is_empty() {
            "Slack request".to_string()
        } else {
            title
        };
        let body = nightshift_core::wire::CreateSession {
            title: title.clone(),
            repository: Some(repository.to_string()),
            model: None,
        };
        let bytes = serde_json::to_vec(&body).map_err(ApiError::internal)?;
        // Asked again after a retry: the session may exist already.
        let stub = session_stub(env, id)?;
        let route = SessionRoute::Repository;
        let resp = call(&stub, route.method(), route.path(), None, None).await?;
        if resp.status_code() == 200 {
            return Ok(());
        }
        crate::access::take_quota(env, person, QuotaKind::Sessions, github.as_deref()).await?;
        let (status, answer) =
            crate::sessions::open(env, person, id, bytes, title, Some(repository.to_string()))
                .await?;
        if status == 201 || answer.contains("session_exists") {
            return Ok(());
        }
        Err(ApiError::refused(status, answer.as_bytes(), None))
    }

    /// Queues the request as the person's prompt (once per event, however often asked).
    async fn prompt(&self, person: &Identity, session: &str, ask: &Ask) -> ApiResult<String> {
        let body = PromptAsk {
            text: ask.text.clone(),
            key: ask.key.clone(),
        };
        let (status, answer) = self
            .as_person(
                person,
                session,
                worker::Method::Post,
                "/prompt",
                Some(encode(&body)?),
            )
            .await?;
        if status == 202 || status == 200 {
            let prompt: PromptAnswer = serde_json::from_str(&answer).map_err(ApiError::internal)?;
            return Ok(prompt.id);
        }
        Err(ApiError::refused(status, answer.as_bytes(), None))
    }

    /// Calls the session's object as the person.
    async fn as_person(
        &self,
        person: &Identity,
        session: &str,
        method: worker::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> ApiResult<(u16, String)> {
        let stub = session_stub(&self.env, session)?;
        let headers = Headers::new();
        headers.set(IDENTITY_HEADER, &encode_identity(person))?;
        let mut resp = call(&stub, method, path, Some(headers), body).await?;
        let status = resp.status_code();
        Ok((status, resp.text().await?))
    }

    /// A reply in a session's thread: a prompt of the person's (a member's without a mention;
    /// anyone else who mentions the bot joins first, if the repository lets them).
    async fn follow_up(
        &self,
        cfg: &config::Slack,
        mut thread: Thread,
        person: &Identity,
        ask: &Ask,
    ) -> ApiResult<()> {
        let prompted = match self.prompt(person, &thread.session, ask).await {
            Err(e) if e.code == "not_member" && ask.addressed => {
                match self.join(&thread, person).await {
                    Ok(()) => self.prompt(person, &thread.session, ask).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) if e.code == "not_member" => return Ok(()),
            other => other,
        };
        match prompted {
            Ok(prompt) => thread.status.follow_up(&prompt),
            Err(e) if e.status < 500 => {
                let words = format!("<@{}> {} ({})", ask.user, e.message, e.code);
                self.say(cfg, &thread.channel, &thread.thread_ts, &words, Vec::new())
                    .await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        thread.done_reacted = false;
        thread.ask.message_ts = ask.message_ts.clone();
        self.post_status(cfg, &mut thread).await?;
        self.save_thread(&thread, true)?;
        self.arm(FOLLOW_MS).await
    }

    /// The person joins the thread's session with its invite (their access to the repository
    /// is asked afresh).
    async fn join(&self, thread: &Thread, person: &Identity) -> ApiResult<()> {
        #[derive(Deserialize)]
        struct Invite {
            #[serde(default)]
            invite: String,
            #[serde(default)]
            repository: Option<String>,
        }
        let (status, answer) = self
            .as_person(
                &thread.person,
                &thread.session,
                worker::Method::Get,
                "/snapshot",
                None,
            )
            .await?;
        if status != 200 {
            return Err(ApiError::refused(status, answer.as_bytes(), None));
        }
        let invite: Invite = serde_json::from_str(&answer).map_err(ApiError::internal)?;
        if let Some(repository) = &invite.repository {
            crate::access::require_session_repository(&self.env, person, repository, true).await?;
        }
        let body = nightshift_core::wire::JoinSession {
            invite: invite.invite,
        };
        let (status, answer) = self
            .as_person(
                person,
                &thread.session,
                worker::Method::Post,
                "/join",
                Some(serde_json::to_vec(&body).map_err(ApiError::internal)?),
            )
            .await?;
        if status != 200 {
            return Err(ApiError::refused(status, answer.as_bytes(), None));
        }
        if let Ok(snap) = serde_json::from_str::<serde_json::Value>(&answer) {
            index_add(&self.env, &person.user, &snap).await?;
        }
        Ok(())
    }

    /// Posts the thread's status message if it has none, else updates it when due.
    async fn post_status(&self, cfg: &config::Slack, thread: &mut Thread) -> ApiResult<()> {
        let now = self.now();
        let view = thread.status.view.clone();
        let blocks = sl::status_blocks(&view);
        let words = sl::status_text(&view);
        if thread.status_ts.is_empty() {
            thread.status_ts = self
                .say(cfg, &thread.channel, &thread.thread_ts, &words, blocks)
                .await?;
            thread.status.shown_at(now);
            return Ok(());
        }
        if !thread.status.update_due(now) {
            return Ok(());
        }
        let update = Update {
            channel: thread.channel.clone(),
            ts: thread.status_ts.clone(),
            text: words,
            blocks,
        };
        match web_api::<_, UpdateAnswer>(cfg, Method::Update, &update).await {
            Ok(_) => thread.status.shown_at(now),
            Err(sl::SlackError::RateLimited(seconds)) => thread.status.rate_limited(now, seconds),
            Err(e) => console_error!("updating the status of {}: {e}", thread.session),
        }
        Ok(())
    }

    /// Every followed session: its new events folded into its status, the message updated
    /// (at most once a second), ✅ on the request when done. Answers when to look again.
    async fn follow(&self) -> ApiResult<Option<u64>> {
        let Some(cfg) = config::slack(&self.env) else {
            return Ok(None);
        };
        let rows: Vec<ThreadRow> = self
            .sql()?
            .exec(&format!("{THREAD_COLUMNS} WHERE following = 1"), None)?
            .to_array()?;
        let mut next: Option<u64> = None;
        for row in rows {
            let mut thread = thread_of(row)?;
            let path = format!("/events?since={}&limit=200", thread.status.last_seq);
            match self
                .as_person(
                    &thread.person,
                    &thread.session,
                    worker::Method::Get,
                    &path,
                    None,
                )
                .await
            {
                Ok((200, answer)) => match serde_json::from_str::<EventsPage>(&answer) {
                    Ok(page) => thread.status.apply(&page.events, self.now()),
                    Err(e) => console_error!("events of {}: {e}", thread.session),
                },
                Ok((status, answer)) => {
                    console_error!("events of {}: {status} {answer}", thread.session)
                }
                Err(e) => console_error!("events of {}: {}", thread.session, e.message),
            }
            self.post_status(&cfg, &mut thread).await?;
            let now = self.now();
            let done = matches!(thread.status.view.stage, Stage::Done { .. });
            let shown = thread.status.shown.as_ref() == Some(&thread.status.view);
            if done && shown && !thread.done_reacted {
                self.react(
                    &cfg,
                    &thread.channel,
                    &thread.ask.message_ts,
                    "white_check_mark",
                )
                .await?;
                thread.done_reacted = true;
            }
            let following = thread.status.following(now) || !shown;
            self.save_thread(&thread, following)?;
            if following {
                let wait = thread.status.not_before.saturating_sub(now).max(FOLLOW_MS);
                next = Some(next.map_or(wait, |n| n.min(wait)));
            }
        }
        Ok(next)
    }

    /// A button: a repository picked (by the person who asked), or Stop.
    async fn click(&self, cfg: &config::Slack, actions: &BlockActions) -> ApiResult<()> {
        let channel = actions.channel_id().unwrap_or_default().to_string();
        match actions.clicked() {
            Clicked::Choose { repository } => {
                let thread_ts = actions
                    .thread_ts()
                    .or(actions.message_ts())
                    .unwrap_or_default()
                    .to_string();
                let Some((ask, choice_ts)) = self.pending_choice(&channel, &thread_ts)? else {
                    return Ok(());
                };
                if actions.user.id != ask.user {
                    return Ok(());
                }
                let Some(person) = self.person(cfg, &ask.user).await? else {
                    return self.offer_link(cfg, &ask).await;
                };
                self.sql()?.exec(
                    "DELETE FROM choices WHERE channel = ? AND thread_ts = ?",
                    vec![text(&channel), text(&thread_ts)],
                )?;
                let words = match &repository {
                    Some(name) => format!("Starting in `{}`.", sl::escape(name)),
                    None => {
                        "None of these: say `owner/repo` in a new message and I'll start there."
                            .to_string()
                    }
                };
                let update = Update {
                    channel: channel.clone(),
                    ts: choice_ts,
                    text: words,
                    blocks: Vec::new(),
                };
                if let Err(e) = web_api::<_, UpdateAnswer>(cfg, Method::Update, &update).await {
                    console_log!("updating the choice: {e}");
                }
                let Some(name) = repository else {
                    return Ok(());
                };
                let candidates = self.candidates(&person).await?;
                if !candidates.iter().any(|c| c.name == name) {
                    let words = format!(
                        "<@{}> You may not work in `{}`.",
                        ask.user,
                        sl::escape(&name)
                    );
                    self.say(cfg, &channel, &thread_ts, &words, Vec::new())
                        .await?;
                    return Ok(());
                }
                self.open(cfg, &person, &ask, &name).await
            }
            Clicked::Stop { session_id } => {
                let Some(person) = self.person(cfg, &actions.user.id).await? else {
                    return Ok(());
                };
                let (status, answer) = self
                    .as_person(
                        &person,
                        &session_id,
                        worker::Method::Post,
                        "/stop",
                        Some(b"{}".to_vec()),
                    )
                    .await?;
                if status >= 400 {
                    console_log!("stop of {session_id} by {}: {status} {answer}", person.user);
                }
                self.arm(0).await
            }
            Clicked::Nothing => Ok(()),
        }
    }
}

fn thread_of(row: ThreadRow) -> ApiResult<Thread> {
    Ok(Thread {
        channel: row.channel,
        thread_ts: row.thread_ts,
        session: row.session,
        person: parse(&row.person)?,
        ask: parse(&row.ask)?,
        status_ts: row.status_ts,
        status: parse(&row.status)?,
        done_reacted: row.done_reacted != 0,
    })
}

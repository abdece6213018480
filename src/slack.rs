//! Slack at the edge: `POST /webhook/slack/events` and `/interactions` verified over the raw bytes before anything is parsed and handed to the workspace's object; the Web API and the chooser model as typed calls; the settings and the one-time link as signed-in routes.

use nightshift_core::slack::{
    self as sl, AuthTestAnswer, BlockActions, Candidate, ChatAnswer, ChatRequest, Envelope,
    Interaction, Method as SlackMethod, ModelPick, SlackError,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use worker::{Env, Fetch, Headers, Method, Request, RequestInit, Response, Stub};

use crate::auth;
use crate::config::{self, Chooser};
use crate::error::{json_of, ApiResult, EdgeError};
use crate::http::{ask, call, read_body, read_bytes_within};
use crate::objects::{
    encode, SlackAck, SlackEventAsk, SlackInteractionAsk, SlackLinkAnswer, SlackLinkAsk,
    SlackSettings, SlackWorkspaceRoute,
};

/// The largest body Slack sends (events are small; a form interaction carries whole messages).
const MAX_SLACK_BYTES: usize = 1024 * 1024;

/// The clock Slack's timestamps and the workspace's work are measured by (ms).
pub fn now_ms(env: &Env) -> u64 {
    crate::platform::now_ms().saturating_add_signed(config::clock_offset_ms(env))
}

fn configured(env: &Env) -> ApiResult<config::Slack> {
    config::slack(env).ok_or_else(|| EdgeError::Slack(SlackError::NotConfigured).into())
}

/// The workspace's object.
pub(crate) fn workspace(env: &Env, team: &str) -> ApiResult<Stub> {
    let valid =
        !team.is_empty() && team.len() <= 32 && team.bytes().all(|b| b.is_ascii_alphanumeric());
    if !valid {
        return Err(EdgeError::Slack(SlackError::BadPayload("no valid team id".into())).into());
    }
    Ok(env.durable_object("SLACK_WORKSPACE")?.get_by_name(team)?)
}

/// Reads the body and checks its signature and timestamp; nothing else is looked at before.
async fn verified(req: &mut Request, env: &Env) -> ApiResult<Vec<u8>> {
    let cfg = configured(env)?;
    let body = read_bytes_within(req, MAX_SLACK_BYTES).await?;
    let header = |name: &str| req.headers().get(name).ok().flatten();
    sl::verify(
        cfg.signing_secret.as_bytes(),
        header(sl::TIMESTAMP_HEADER).as_deref(),
        header(sl::SIGNATURE_HEADER).as_deref(),
        &body,
        now_ms(env) / 1000,
    )
    .map_err(EdgeError::Slack)?;
    Ok(body)
}

/// Where links in Slack messages point: this Worker's origin.
fn origin(req: &Request) -> String {
    req.url()
        .map(|url| url.origin().ascii_serialization())
        .unwrap_or_default()
}

/// The answer to `url_verification`.
#[derive(Serialize)]
struct Challenge {
    challenge: String,
}

/// `POST /webhook/slack/events`: verified, then `url_verification` answered, and an event
/// callback handed to its workspace's object, which stores its `event_id` once and answers at
/// once (the work is done from its alarm).
pub async fn events(req: &mut Request, env: &Env) -> ApiResult<Response> {
    let body = verified(req, env).await?;
    match Envelope::parse(&body).map_err(EdgeError::Slack)? {
        Envelope::UrlVerification(verification) => json_of(
            200,
            &Challenge {
                challenge: verification.challenge,
            },
        ),
        Envelope::EventCallback(callback) => {
            let stub = workspace(env, &callback.team_id)?;
            let ask_body = SlackEventAsk {
                event_id: callback.event_id.clone(),
                callback: serde_json::to_string(&callback).map_err(EdgeError::internal)?,
                origin: origin(req),
            };
            let ack: SlackAck =
                ask(&stub, SlackWorkspaceRoute::Event, Some(encode(&ask_body)?)).await?;
            json_of(200, &ack)
        }
        Envelope::Other => json_of(200, &SlackAck { duplicate: false }),
    }
}

/// `POST /webhook/slack/interactions`: a verified button click, handed to its workspace.
pub async fn interactions(req: &mut Request, env: &Env) -> ApiResult<Response> {
    let body = verified(req, env).await?;
    let actions: BlockActions = match Interaction::parse(&body).map_err(EdgeError::Slack)? {
        Interaction::BlockActions(actions) => *actions,
        Interaction::Other => return json_of(200, &SlackAck { duplicate: false }),
    };
    let team = actions.team_id().unwrap_or_default().to_string();
    let stub = workspace(env, &team)?;
    let key = if actions.trigger_id.is_empty() {
        format!(
            "{}:{}",
            actions.message_ts().unwrap_or_default(),
            actions.actions.first().map_or("", |a| a.action_ts.as_str())
        )
    } else {
        actions.trigger_id.clone()
    };
    let ask_body = SlackInteractionAsk {
        key,
        payload: serde_json::to_string(&actions).map_err(EdgeError::internal)?,
        origin: origin(req),
    };
    let ack: SlackAck = ask(
        &stub,
        SlackWorkspaceRoute::Interaction,
        Some(encode(&ask_body)?),
    )
    .await?;
    json_of(200, &ack)
}

/// The deployment's workspace: the one its bot token belongs to.
async fn deployment_workspace(env: &Env) -> ApiResult<Stub> {
    let cfg = configured(env)?;
    let me: AuthTestAnswer = web_api(&cfg, SlackMethod::AuthTest, &sl::Empty {})
        .await
        .map_err(|e| EdgeError::GithubRefused(format!("Slack: {e}")))?;
    workspace(env, &me.team_id)
}

/// `GET /slack/settings` (signed in): the workspace's channel defaults and routing rules.
pub async fn settings_get(req: &Request, env: &Env) -> ApiResult<Response> {
    auth::authenticate(req, env).await?;
    let stub = deployment_workspace(env).await?;
    let route = SlackWorkspaceRoute::SettingsGet;
    call(&stub, route.method(), route.path(), None, None).await
}

/// `PUT /slack/settings` (signed in): replaces them. Every repository named must be
/// registered; a rule never grants access (the choice is among what the asker may use).
pub async fn settings_put(req: &mut Request, env: &Env) -> ApiResult<Response> {
    auth::authenticate(req, env).await?;
    let settings: SlackSettings = read_body(req).await?;
    check_settings(env, &settings).await?;
    let stub = deployment_workspace(env).await?;
    let route = SlackWorkspaceRoute::SettingsPut;
    call(
        &stub,
        route.method(),
        route.path(),
        None,
        Some(encode(&settings)?),
    )
    .await
}

async fn check_settings(env: &Env, settings: &SlackSettings) -> ApiResult<()> {
    let invalid = |m: &'static str| -> crate::error::ApiError { EdgeError::InvalidInput(m).into() };
    if settings.channel_defaults.len() > 500 || settings.routing_rules.len() > 100 {
        return Err(invalid(
            "at most 500 channel defaults and 100 routing rules",
        ));
    }
    let channel_ok =
        |c: &str| !c.is_empty() && c.len() <= 32 && c.bytes().all(|b| b.is_ascii_alphanumeric());
    if !settings.channel_defaults.keys().all(|c| channel_ok(c)) {
        return Err(invalid("channel_defaults: keys are Slack channel ids (C…)"));
    }
    if settings
        .routing_rules
        .iter()
        .any(|rule| rule.pattern.trim().is_empty() || rule.pattern.len() > 200)
    {
        return Err(invalid(
            "routing_rules: each pattern is one or more words, at most 200 bytes",
        ));
    }
    let named = settings
        .channel_defaults
        .values()
        .chain(settings.routing_rules.iter().map(|rule| &rule.repository));
    for name in named {
        if crate::access::settings(env, name).await?.is_none() {
            return Err(EdgeError::RepositoryNotFound.into());
        }
    }
    Ok(())
}

/// The body of `POST /slack/link`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    pub team: String,
    pub code: String,
}

/// `POST /slack/link` (signed in): the one-time code the bot offered links that Slack
/// account to the person signed in; a request of theirs that waited for it goes on.
pub async fn link(req: &mut Request, env: &Env) -> ApiResult<Response> {
    let who = auth::authenticate(req, env).await?;
    let body: LinkBody = read_body(req).await?;
    if body.code.is_empty() || body.code.len() > 64 {
        return Err(EdgeError::SlackLinkUnknown.into());
    }
    let stub = workspace(env, &body.team).map_err(|_| EdgeError::SlackLinkUnknown)?;
    let ask_body = SlackLinkAsk {
        code: body.code,
        person: who,
    };
    let linked: SlackLinkAnswer =
        ask(&stub, SlackWorkspaceRoute::Link, Some(encode(&ask_body)?)).await?;
    json_of(200, &linked)
}

// ---------------------------------------------------------------------------------------------
// The Web API and the chooser model
// ---------------------------------------------------------------------------------------------

async fn send(
    url: &str,
    bearer: Option<&str>,
    body: Vec<u8>,
    content_type: &str,
) -> Result<(u16, Option<String>, Vec<u8>), SlackError> {
    let unreachable = |e: worker::Error| SlackError::BadAnswer(format!("unreachable: {e}"));
    let headers = Headers::new();
    headers
        .set("content-type", content_type)
        .map_err(unreachable)?;
    if let Some(token) = bearer {
        headers
            .set("authorization", &format!("Bearer {token}"))
            .map_err(unreachable)?;
    }
    let mut init = RequestInit::new();
    init.with_method(Method::Post);
    init.with_headers(headers);
    init.with_body(Some(js_sys::Uint8Array::from(body.as_slice()).into()));
    let req = Request::new_with_init(url, &init).map_err(unreachable)?;
    let mut resp = Fetch::Request(req).send().await.map_err(unreachable)?;
    let retry_after = resp.headers().get("retry-after").ok().flatten();
    let bytes = resp.bytes().await.map_err(unreachable)?;
    Ok((resp.status_code(), retry_after, bytes))
}

/// Calls a Web API method with a JSON body.
pub async fn web_api<B: Serialize, T: DeserializeOwned>(
    cfg: &config::Slack,
    method: SlackMethod,
    body: &B,
) -> Result<T, SlackError> {
    let bytes = serde_json::to_vec(body).map_err(|e| SlackError::BadPayload(e.to_string()))?;
    let (status, retry_after, answer) = send(
        &method.url(&cfg.api_url),
        Some(&cfg.bot_token),
        bytes,
        "application/json; charset=utf-8",
    )
    .await?;
    sl::read_answer(status, retry_after.as_deref(), &answer)
}

/// Calls a Web API method that takes form arguments (`users.info`).
pub async fn web_api_form<T: DeserializeOwned>(
    cfg: &config::Slack,
    method: SlackMethod,
    pairs: &[(&str, &str)],
) -> Result<T, SlackError> {
    let form = nightshift_core::github::form_encode(pairs).into_bytes();
    let (status, retry_after, answer) = send(
        &method.url(&cfg.api_url),
        Some(&cfg.bot_token),
        form,
        "application/x-www-form-urlencoded",
    )
    .await?;
    sl::read_answer(status, retry_after.as_deref(), &answer)
}

/// Asks the chooser model which of `candidates` `text` is about.
pub async fn ask_model(
    chooser: &Chooser,
    text: &str,
    candidates: &[Candidate],
) -> Result<ModelPick, SlackError> {
    let request = ChatRequest::choose_repository(&chooser.model, text, candidates);
    let bytes = serde_json::to_vec(&request).map_err(|e| SlackError::BadPayload(e.to_string()))?;
    let url = format!("{}/chat/completions", chooser.url);
    let (status, _, answer) = send(&url, chooser.key.as_deref(), bytes, "application/json").await?;
    if status != 200 {
        return Err(SlackError::Http(status));
    }
    let answer: ChatAnswer =
        serde_json::from_slice(&answer).map_err(|e| SlackError::BadModelAnswer(e.to_string()))?;
    sl::parse_model_pick(answer.text())
}

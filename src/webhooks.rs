//! `POST /webhook/github`: GitHub's deliveries, verified over the raw body in constant time, then handed to the installation index, which processes each `X-GitHub-Delivery` once.

use nightshift_core::github::{self as gh, WebhookError};
use worker::{Env, Request, Response};

use crate::config;
use crate::error::{ApiResult, EdgeError};
use crate::http::{ask, call, installation_index, read_bytes_within};
use crate::objects::{encode, InstallationRoute, WebhookDelivery};

fn header(req: &Request, name: &str) -> Option<String> {
    req.headers().get(name).ok().flatten()
}

/// Verifies and forwards one delivery. A forged or stale signature, a missing delivery id or a
/// body that is not JSON is refused before anything is stored.
pub async fn github(req: &mut Request, env: &Env) -> ApiResult<Response> {
    let secret = config::github(env)
        .and_then(|cfg| cfg.webhook_secret)
        .ok_or(EdgeError::Webhook(WebhookError::NotConfigured))?;
    let body = read_bytes_within(req, gh::MAX_WEBHOOK_BYTES).await?;
    gh::verify_webhook(
        secret.as_bytes(),
        &body,
        header(req, gh::SIGNATURE_HEADER).as_deref(),
    )
    .map_err(EdgeError::Webhook)?;
    let guid = header(req, gh::DELIVERY_HEADER)
        .filter(|g| gh::valid_delivery_id(g))
        .ok_or(EdgeError::InvalidInput(
            "X-GitHub-Delivery: the delivery's GUID is required",
        ))?;
    let event = header(req, gh::EVENT_HEADER)
        .filter(|e| !e.is_empty() && e.len() <= 64)
        .ok_or(EdgeError::InvalidInput(
            "X-GitHub-Event: the event name is required",
        ))?;
    // What is stored is the compact typed payload: a delivery may be 25 MB, a stored value
    // at most 2 MB. A known event whose body does not fit its shape is refused, nothing stored;
    // an event Nightshift does not handle is stored (so its id is seen once) and ignored.
    let parsed = if crate::pr_reviews::EVENTS.contains(&event.as_str()) {
        nightshift_core::pr_review::ReviewWebhook::parse(&event, &body).map(|w| w.to_json())
    } else {
        gh::WebhookEvent::parse(&event, &body).map(|w| w.to_json())
    };
    let body = match parsed {
        Ok(compact) => compact,
        Err(WebhookError::UnknownEvent) => {
            if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
                return Err(EdgeError::Webhook(WebhookError::BadPayload(
                    "the body is not JSON".into(),
                ))
                .into());
            }
            "{}".to_string()
        }
        Err(e) => return Err(EdgeError::Webhook(e).into()),
    };
    let stub = installation_index(env)?;
    let route = InstallationRoute::Delivery;
    let delivery = encode(&WebhookDelivery { guid, event, body })?;
    call(&stub, route.method(), route.path(), None, Some(delivery)).await
}

/// The cron's pass: asks GitHub again for the App's deliveries that failed and were never
/// stored (a deployment without a GitHub App has none).
pub async fn redeliver_failed(env: &Env) -> ApiResult<()> {
    if config::github(env).and_then(|cfg| cfg.app_id).is_none() {
        return Ok(());
    }
    let stub = installation_index(env)?;
    let answer: crate::objects::Redelivered =
        ask(&stub, InstallationRoute::Redeliver, None).await?;
    if answer.requested > 0 {
        worker::console_log!(
            "asked GitHub again for {} failed deliveries",
            answer.requested
        );
    }
    Ok(())
}

//! Who may do what with a repository: in a deployment with a GitHub App, GitHub's own permissions, asked with the person's user token through their index (cached a minute, asked afresh on a join); in a local run without GitHub, everyone signed in. Quotas per person, answered with 429 and `Retry-After`.

use nightshift_core::github::{RepositoryAction, Role};
use nightshift_core::ids::Identity;
use nightshift_core::quota::Limit;
use nightshift_core::repository::Settings;
use worker::Env;

use crate::config;
use crate::error::{ApiResult, EdgeError};
use crate::http::{ask, call, repository_stub, user_index};
use crate::objects::{
    encode, read_answer, OkAnswer, QuotaAsk, RepositoryInfo, RepositoryRoute, RoleAnswer, RoleAsk,
    UserIndexRoute,
};

/// The person's role on the GitHub repository `full_name`, from their own token.
pub async fn role(env: &Env, who: &Identity, full_name: &str, fresh: bool) -> ApiResult<Role> {
    let stub = user_index(env, &who.user)?;
    let body = encode(&RoleAsk {
        repository: full_name.to_string(),
        fresh,
    })?;
    let answer: RoleAnswer = ask(&stub, UserIndexRoute::GithubRole, Some(body)).await?;
    Ok(answer.role)
}

/// Refuses unless the person may do `action` on GitHub repository `full_name`.
pub async fn require(
    env: &Env,
    who: &Identity,
    full_name: &str,
    action: RepositoryAction,
    fresh: bool,
) -> ApiResult<()> {
    let role = role(env, who, full_name, fresh).await?;
    action
        .check(role)
        .map_err(|need| EdgeError::RoleRequired(need).into())
}

/// A registered repository's settings (`None`: not registered).
pub async fn settings(env: &Env, name: &str) -> ApiResult<Option<Settings>> {
    let stub = repository_stub(env, name)?;
    let route = RepositoryRoute::Info;
    let mut resp = call(&stub, route.method(), &route.path(), None, None).await?;
    if resp.status_code() != 200 {
        return Ok(None);
    }
    let info: RepositoryInfo = read_answer(&mut resp, &route.path()).await?;
    Ok(Some(info.repository))
}

/// Refuses unless the person may do `action` on the registered repository `name`. Without a
/// GitHub App (a local run), or for a repository that is not GitHub's, anyone signed in may.
pub async fn require_registered(
    env: &Env,
    who: &Identity,
    name: &str,
    action: RepositoryAction,
    fresh: bool,
) -> ApiResult<Option<Settings>> {
    let settings = settings(env, name).await?;
    if config::github(env).is_none() {
        return Ok(settings);
    }
    if let Some(full_name) = settings.as_ref().and_then(|s| s.github.as_deref()) {
        require(env, who, full_name, action, fresh).await?;
    }
    Ok(settings)
}

/// A session's repository (a registered name or, in a local run, a clone URL): in a
/// deployment with a GitHub App it must be a registered GitHub repository the person may use.
pub async fn require_session_repository(
    env: &Env,
    who: &Identity,
    repository: &str,
    fresh: bool,
) -> ApiResult<()> {
    if config::github(env).is_none() {
        return Ok(());
    }
    match require_registered(env, who, repository, RepositoryAction::Use, fresh).await? {
        Some(settings) if settings.github.is_some() => Ok(()),
        Some(_) => Ok(()),
        None => Err(EdgeError::RepositoryNotRegistered.into()),
    }
}

/// The quota people have of `what` per hour (`QUOTA_*_PER_HOUR`; 0 refuses everything). A
/// deployment with a GitHub App has the defaults; a local run has none unless one is set.
pub fn quota(env: &Env, what: &str) -> Option<Limit> {
    let (name, default) = match what {
        "sessions" => ("QUOTA_SESSIONS_PER_HOUR", 100),
        "builds" => ("QUOTA_BUILDS_PER_HOUR", 30),
        "spawns" => ("QUOTA_SPAWNS_PER_HOUR", 60),
        _ => ("QUOTA_SANDBOXES_PER_HOUR", 60),
    };
    let configured = config::has(env, name);
    if !configured && config::github(env).is_none() {
        return None;
    }
    Some(Limit {
        limit: config::number(env, name, default),
        window_ms: 3_600_000,
    })
}

/// Takes one of the person's `what` quota, or answers 429 with when to retry.
pub async fn take_quota(env: &Env, who: &Identity, what: &str) -> ApiResult<()> {
    let Some(limit) = quota(env, what) else {
        return Ok(());
    };
    let stub = user_index(env, &who.user)?;
    let body = encode(&QuotaAsk {
        what: what.to_string(),
        limit,
    })?;
    ask::<OkAnswer>(&stub, UserIndexRoute::Quota, Some(body)).await?;
    Ok(())
}

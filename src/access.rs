//! Who may do what with a repository: in a deployment with a GitHub App, GitHub's own permissions, asked with the person's user token through their index (cached a minute, asked afresh on a join); in a local run without GitHub, everyone signed in. Quotas per person and per installation, answered with 429 and `Retry-After`.

use nightshift_core::github::{RepositoryAction, Role};
use nightshift_core::ids::Identity;
use nightshift_core::provider::SandboxStatus;
use nightshift_core::quota::{check_ceiling, retry_after_s, QuotaKind, QuotaScope};
use nightshift_core::repository::Settings;
use worker::Env;

use crate::config;
use crate::error::{ApiResult, EdgeError};
use crate::http::{ask, call, installation_index, repository_index, repository_stub, user_index};
use crate::objects::{
    encode, read_answer, InstallationQuotaAsk, InstallationRoute, OkAnswer, QuotaAsk,
    RepositoryInfo, RepositoryRoute, RoleAnswer, RoleAsk, UserIndexRoute,
};
use crate::provider;

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

/// The names of every registered repository.
pub async fn registered(env: &Env) -> ApiResult<Vec<String>> {
    let stub = repository_index(env)?;
    let route = crate::objects::RepositoryIndexRoute::List;
    let mut resp = call(&stub, route.method(), route.path(), None, None).await?;
    let names: crate::objects::Names = read_answer(&mut resp, route.path()).await?;
    Ok(names.names)
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
/// Answers its GitHub name (`None` in a local run or for a repository not on GitHub).
pub async fn require_session_repository(
    env: &Env,
    who: &Identity,
    repository: &str,
    fresh: bool,
) -> ApiResult<Option<String>> {
    if config::github(env).is_none() {
        return Ok(None);
    }
    match require_registered(env, who, repository, RepositoryAction::Use, fresh).await? {
        Some(settings) => Ok(settings.github),
        None => Err(EdgeError::RepositoryNotRegistered.into()),
    }
}

/// The limit of `kind` for `scope` (`QUOTA_*`; 0 refuses everything). A deployment with a
/// GitHub App has the defaults; a local run has none unless one is set.
pub fn quota(env: &Env, kind: QuotaKind, scope: QuotaScope) -> Option<u32> {
    let name = kind.variable(scope);
    if !config::has(env, name) && config::github(env).is_none() {
        return None;
    }
    Some(config::number(env, name, kind.default_limit(scope)))
}

/// Takes one of `kind` (a per-hour quota) for the person and, when it is done on the GitHub
/// repository `github` (its full name), for that repository's installation; beyond either,
/// 429 with when to retry.
pub async fn take_quota(
    env: &Env,
    who: &Identity,
    kind: QuotaKind,
    github: Option<&str>,
) -> ApiResult<()> {
    if let Some(full_name) = github.filter(|_| config::github(env).is_some()) {
        if let Some(limit) = quota(env, kind, QuotaScope::Installation) {
            let body = encode(&InstallationQuotaAsk {
                repository: full_name.to_string(),
                what: kind,
                limit: kind.limit(limit),
            })?;
            let stub = installation_index(env)?;
            ask::<OkAnswer>(&stub, InstallationRoute::Quota, Some(body)).await?;
        }
    }
    let Some(limit) = quota(env, kind, QuotaScope::Person) else {
        return Ok(());
    };
    let stub = user_index(env, &who.user)?;
    let body = encode(&QuotaAsk {
        what: kind,
        limit: kind.limit(limit),
    })?;
    ask::<OkAnswer>(&stub, UserIndexRoute::Quota, Some(body)).await?;
    Ok(())
}

/// The labels a session's sandbox carries so that running ones can be counted per person and
/// per GitHub account (an installation is on one account).
pub fn sandbox_labels(owner: &str, github: Option<&str>) -> Vec<(String, String)> {
    let mut labels = vec![(PERSON_LABEL.to_string(), owner.to_string())];
    if let Some(account) = github.and_then(|full| full.split('/').next()) {
        labels.push((ACCOUNT_LABEL.to_string(), account.to_ascii_lowercase()));
    }
    labels
}

/// The label naming the person a session sandbox runs for.
pub const PERSON_LABEL: &str = "person";
/// The label naming the GitHub account (installation) a session sandbox's repository is on.
pub const ACCOUNT_LABEL: &str = "github_account";

/// Refuses a new session sandbox when the person, or the repository's installation, already has
/// as many running as `QUOTA_RUNNING_SANDBOXES` / `QUOTA_INSTALLATION_RUNNING_SANDBOXES` allow
/// (counted at the provider by label: nothing to drift).
pub async fn check_running_sandboxes(env: &Env, labels: &[(String, String)]) -> ApiResult<()> {
    let kind = QuotaKind::RunningSandboxes;
    for (key, value) in labels {
        let scope = match key.as_str() {
            PERSON_LABEL => QuotaScope::Person,
            ACCOUNT_LABEL => QuotaScope::Installation,
            _ => continue,
        };
        let Some(limit) = quota(env, kind, scope) else {
            continue;
        };
        let listed = match provider::list_labelled(env, key, value).await? {
            Ok(listed) => listed,
            // A provider that cannot list is not a reason to refuse work.
            Err(_) => continue,
        };
        let running = listed
            .sandboxes
            .iter()
            .filter(|s| !s.status.is_over() && s.status != SandboxStatus::Stopped)
            .count();
        if let Err(wait_ms) = check_ceiling(running, limit, config::sandbox_idle_ms(env)) {
            return Err(EdgeError::QuotaExceeded {
                what: kind.describe(scope),
                retry_after_s: retry_after_s(wait_ms),
            }
            .into());
        }
    }
    Ok(())
}

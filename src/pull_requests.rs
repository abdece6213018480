//! Opening a session's pull request in the prompting person's name: with their own user token (never the App's, so nobody approves their own change), reusing an open one on the branch, and falling back to the compare link as a "Create pull request" action when their token cannot.

use nightshift_core::events::PullRequestAction;
use nightshift_core::github::{self as gh, CreatePull};
use nightshift_core::hosted::Command;
use nightshift_core::session::PullRequestDue;
use worker::Env;

use crate::access;
use crate::config::{self, Github};
use crate::error::ApiResult;
use crate::github::{self, GithubError};
use crate::http::{ask, call, installation_index, user_index};
use crate::objects::{encode, InstallationRoute, PullLink, TokenAsk, UserIndexRoute, UserToken};

async fn user_token(env: &Env, user: &str, refresh: bool) -> ApiResult<UserToken> {
    let stub = user_index(env, user)?;
    let body = encode(&TokenAsk { refresh })?;
    ask(&stub, UserIndexRoute::GithubToken, Some(body)).await
}

/// Opens (or finds) the pull request for `due` on the session's repository `repository` (a
/// registered name). `None`: not a GitHub repository (nothing to open). The answer is the
/// command that records what happened in the session.
pub async fn open(
    env: &Env,
    session: &str,
    repository: &str,
    due: &PullRequestDue,
) -> ApiResult<Option<Command>> {
    let Some(cfg) = config::github(env) else {
        return Ok(None);
    };
    let Some(settings) = access::settings(env, repository).await? else {
        return Ok(None);
    };
    let Some(full_name) = settings.github.clone() else {
        return Ok(None);
    };
    let compare = |reason: &str| {
        Some(Command::PullRequestAction(PullRequestAction {
            kind: "create_pull_request".into(),
            url: gh::compare_url(&cfg.web_url, &full_name, &settings.base_branch, &due.branch),
            reason: reason.to_string(),
        }))
    };
    let token = match user_token(env, &due.author, false).await {
        Ok(token) => token,
        Err(e) => {
            return Ok(compare(&format!(
            "the pull request could not be opened in {}'s name ({}): open it from the compare page",
            due.author, e.code
        )))
        }
    };
    let pull = CreatePull {
        title: due.title.clone(),
        head: due.branch.clone(),
        base: settings.base_branch.clone(),
        body: Some(due.body.clone()),
        draft: false,
    };
    let mut answer = create_or_find(&cfg, &token.token, &full_name, &pull).await;
    if answer == Err(GithubError::Unauthorized) {
        // Refreshed once: GitHub may have ended the token early.
        answer = match user_token(env, &due.author, true).await {
            Ok(fresh) => create_or_find(&cfg, &fresh.token, &full_name, &pull).await,
            Err(_) => Err(GithubError::Unauthorized),
        };
    }
    match answer {
        Ok(opened) => {
            let link = PullLink {
                repository: full_name.clone(),
                number: opened.number,
                session: session.to_string(),
            };
            let stub = installation_index(env)?;
            let route = InstallationRoute::LinkPull;
            call(
                &stub,
                route.method(),
                route.path(),
                None,
                Some(encode(&link)?),
            )
            .await?;
            Ok(Some(Command::PullRequest {
                repository: full_name,
                pull: Box::new(opened),
            }))
        }
        Err(GithubError::Unreachable(e)) => Ok(compare(&format!(
            "GitHub did not answer ({e}): open the pull request from the compare page"
        ))),
        Err(e) => Ok(compare(&format!(
            "GitHub refused to open the pull request as {} ({}): open it from the compare page",
            token.login,
            e.edge().code()
        ))),
    }
}

/// Opens the pull request; when one is open on the branch already, that one.
async fn create_or_find(
    cfg: &Github,
    token: &str,
    full_name: &str,
    pull: &CreatePull,
) -> Result<gh::Pull, GithubError> {
    match github::create_pull(cfg, token, full_name, pull).await {
        Err(GithubError::Unprocessable(message)) => {
            match github::open_pull_for(cfg, token, full_name, &pull.head).await? {
                Some(open) => Ok(open),
                None => Err(GithubError::Unprocessable(message)),
            }
        }
        other => other,
    }
}

//! Installation tokens for a registered GitHub repository: scoped to that one repository with the least permission (contents:read to clone and build, contents:write for the supervisor's push), minted and cached by the installation index.

use nightshift_core::github::Access;
use worker::Env;

use crate::access;
use crate::config;
use crate::error::ApiResult;
use crate::http::{answer_of, call};
use crate::objects::{encode, InstallationRoute, InstallationTokenAnswer, InstallationTokenAsk};
use crate::webhooks::installation_index;

/// A token for the GitHub repository `full_name`.
pub async fn for_github(
    env: &Env,
    full_name: &str,
    access: Access,
) -> ApiResult<InstallationTokenAnswer> {
    let stub = installation_index(env)?;
    let route = InstallationRoute::Token;
    let body = encode(&InstallationTokenAsk {
        repository: full_name.to_string(),
        access,
    })?;
    let mut resp = call(&stub, route.method(), route.path(), None, Some(body)).await?;
    answer_of(&mut resp, route.path()).await
}

/// A token for the registered repository `name`; `None` when it is not a GitHub repository (or
/// the deployment has no GitHub App).
pub async fn for_registered(
    env: &Env,
    name: &str,
    access: Access,
) -> ApiResult<Option<InstallationTokenAnswer>> {
    if config::github(env).is_none() {
        return Ok(None);
    }
    let Some(full_name) = access::settings(env, name).await?.and_then(|s| s.github) else {
        return Ok(None);
    };
    Ok(Some(for_github(env, &full_name, access).await?))
}

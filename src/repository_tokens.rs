//! Installation tokens for a registered GitHub repository: scoped to that one repository with the least permission (contents:read to clone and build, contents:write for the supervisor's push), minted and cached by the installation index.

use nightshift_core::github::Access;
use worker::Env;

use crate::access;
use crate::config;
use crate::error::ApiResult;
use crate::http::{ask, installation_index};
use crate::objects::{encode, InstallationRoute, InstallationTokenAnswer, InstallationTokenAsk};

/// A token for the GitHub repository `full_name`.
pub async fn for_github(
    env: &Env,
    full_name: &str,
    access: Access,
) -> ApiResult<InstallationTokenAnswer> {
    let body = encode(&InstallationTokenAsk {
        repository: full_name.to_string(),
        access,
    })?;
    ask(
        &installation_index(env)?,
        InstallationRoute::Token,
        Some(body),
    )
    .await
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

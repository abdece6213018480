//! How a session gets a sandbox: restore its newest (or a named) snapshot, else claim a warm one from its repository's pool, else start one cold (from the latest image when there is one).

use std::collections::BTreeMap;

use nightshift_core::github::Access;
use nightshift_core::provider::{
    CreateSandbox, Repository, Sandbox, SandboxStatus, SetEgress, SupervisorSpec,
};
use nightshift_core::snapshot::Snapshots;
use serde::{Deserialize, Serialize};
use worker::{Env, SqlStorage};

use crate::config;
use crate::error::{ApiResult, EdgeError};
use crate::http::{call, repository_stub};
use crate::objects::{self, ClaimAnswer, ClaimRequest, RepositoryRoute};
use crate::provider::{self, AsSent};
use crate::store;

/// Where the session's repository is cloned from (kept after the first start, for restores).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Source {
    clone_url: String,
    base_branch: String,
    /// The repository's egress allowlist (empty: the provider's defaults only).
    #[serde(default)]
    egress: Vec<String>,
}

/// The key under which a session keeps where its repository is cloned from.
const SOURCE: nightshift_core::store::Kv = nightshift_core::store::Kv::Source;
/// The key under which a session keeps its owner's extra egress hosts.
pub const EGRESS: nightshift_core::store::Kv = nightshift_core::store::Kv::Egress;
/// The key under which a session keeps the branch its work was pushed to.
pub const BRANCH: nightshift_core::store::Kv = nightshift_core::store::Kv::Branch;

/// The sandbox a session got: the provider's Sandbox, or a warm one claimed from its
/// repository's pool (as much of it as the claim says). Serialised as the API answers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Got {
    /// As the provider sent it (the API answers with it unchanged).
    Sandbox(Box<AsSent<Sandbox>>),
    Claimed(Claimed),
}

/// A warm sandbox claimed from the pool (`status` is always `ready`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Claimed {
    pub id: String,
    pub status: SandboxStatus,
    pub expires_at: Option<u64>,
    pub image: Option<String>,
}

impl Got {
    pub fn id(&self) -> &str {
        match self {
            Got::Sandbox(sandbox) => &sandbox.id,
            Got::Claimed(claimed) => &claimed.id,
        }
    }

    /// When the provider ends the sandbox (its lifetime).
    pub fn expires_at(&self) -> Option<u64> {
        match self {
            Got::Sandbox(sandbox) => sandbox.expires_at,
            Got::Claimed(claimed) => claimed.expires_at,
        }
    }
}

/// The sandbox (or the provider's refusal), a sentence on how it was got, and the snapshots
/// found gone at the provider on the way (the session forgets them).
pub struct Started {
    pub answer: provider::Answer<Got>,
    pub how: String,
    pub lost: Vec<String>,
}

/// Starts (or claims) the session's sandbox. `repository` is a registered repository's name or a
/// clone URL. `only` restores exactly that snapshot (`POST /sandbox/restore`): its refusal is the
/// answer, with no fall-back to another snapshot or a fresh start.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    env: &Env,
    sql: &SqlStorage,
    snapshots: &Snapshots,
    session_id: &str,
    repository: &str,
    token: &str,
    now: u64,
    only: Option<&str>,
    labels: &[(String, String)],
) -> ApiResult<Started> {
    let control = config::control_url(env).unwrap_or_default();
    let mut notes = Vec::new();
    // The owner's extra egress hosts join the repository's for every sandbox of the session.
    let session_egress: Vec<String> = store::kv_get(sql, EGRESS)?.unwrap_or_default();
    // What every sandbox of the session is created with; a cold start adds its image and branch.
    let create = |src: &Source| {
        let mut egress = src.egress.clone();
        egress.extend(session_egress.iter().cloned());
        CreateSandbox {
            session_id: Some(session_id.to_string()),
            repository: Repository {
                clone_url: src.clone_url.clone(),
                base_branch: src.base_branch.clone(),
                egress,
                access_token: None,
            },
            image: None,
            snapshot: None,
            env: BTreeMap::new(),
            supervisor: Some(SupervisorSpec {
                control_url: control.clone(),
                sandbox_token: token.to_string(),
            }),
            timeout_ms: None,
            lifetime_ms: None,
            labels: labels
                .iter()
                .cloned()
                .chain([("session".to_string(), session_id.to_string())])
                .collect(),
        }
    };
    // 1. The newest live snapshot holds the session's earlier work.
    let mut snaps = snapshots.clone();
    let mut lost = Vec::new();
    let source: Option<Source> = store::kv_get(sql, SOURCE)?;
    while let (Some(snap), Some(src)) = (snaps.restorable(only, now).cloned(), source.as_ref()) {
        let (snapshot, turn) = (snap.id, snap.turn);
        let refused = match provider::restore_snapshot(env, &snapshot, &create(src)).await? {
            Ok(sandbox) => {
                return Ok(Started {
                    answer: Ok(Got::Sandbox(Box::new(sandbox))),
                    how: format!("restored snapshot {snapshot} (the work of prompt {turn})"),
                    lost,
                })
            }
            Err(refused) => refused,
        };
        // Expired or lost at the provider: forget it and try the next, then start cold.
        snaps.forget(&snapshot);
        lost.push(snapshot.clone());
        let code = refused.code().to_string();
        if only.is_some() {
            return Ok(Started {
                answer: Err(refused),
                how: format!("snapshot {snapshot} is gone ({code})"),
                lost,
            });
        }
        notes.push(format!(
            "snapshot {snapshot} is gone ({code}); starting fresh"
        ));
    }
    if let Some(snapshot) = only {
        return Err(EdgeError::NoLiveSnapshot(snapshot.to_string()).into());
    }
    // 2. A registered repository: a warm sandbox, or its latest image. A session with pushed
    // work continues its branch, which a pooled sandbox (synced to the base) does not have.
    let branch: Option<String> = store::kv_get(sql, BRANCH)?;
    let take = branch.is_none();
    let claimed = claim(env, session_id, repository, &control, token, take, labels).await;
    let src = match &claimed {
        Some(c) => Source {
            clone_url: c.clone_url.clone(),
            base_branch: c.base_branch.clone(),
            egress: c.egress.clone(),
        },
        None => Source {
            clone_url: repository.to_string(),
            base_branch: "main".into(),
            egress: Vec::new(),
        },
    };
    store::kv_put(sql, SOURCE, &src)?;
    if let Some(ClaimAnswer {
        sandbox: Some(id),
        expires_at,
        image,
        ..
    }) = &claimed
    {
        notes.push("claimed a warm sandbox from the pool".into());
        if !session_egress.is_empty() {
            apply_egress(env, id, &session_egress).await;
        }
        return Ok(Started {
            answer: Ok(Got::Claimed(Claimed {
                id: id.clone(),
                status: SandboxStatus::Ready,
                expires_at: *expires_at,
                image: image.clone(),
            })),
            how: notes.join("; "),
            lost,
        });
    }
    let image = claimed.and_then(|c| c.image);
    notes.push(match &image {
        Some(i) => format!("starting a sandbox from image {i}"),
        None => "starting a sandbox from a fresh clone".into(),
    });
    if let Some(b) = &branch {
        notes.push(format!("continuing {b}"));
    }
    let mut body = create(&src);
    body.image = image;
    if let Some(b) = branch {
        body.env.insert("NIGHTSHIFT_CONTINUE_BRANCH".into(), b);
    }
    // A GitHub repository is private: the clone gets a read token of its own, and the
    // supervisor's git waits for the session's credentials over the link.
    if let Some(read) =
        crate::repository_tokens::for_registered(env, repository, Access::Read).await?
    {
        body.repository.access_token = Some(read.token);
        body.env.insert("NIGHTSHIFT_GIT_AUTH".into(), "link".into());
    }
    let answer = provider::create_sandbox(env, &body).await?;
    Ok(Started {
        answer: answer.map(|sandbox| Got::Sandbox(Box::new(sandbox))),
        how: notes.join("; "),
        lost,
    })
}

/// Gives a live sandbox the session's extra egress hosts (`POST /v1/sandboxes/{id}/egress`);
/// whether the provider took them.
pub async fn apply_egress(env: &Env, sandbox: &str, allow: &[String]) -> bool {
    let egress = SetEgress {
        allow: allow.to_vec(),
    };
    matches!(provider::set_egress(env, sandbox, &egress).await, Ok(Ok(_)))
}

/// Asks the repository's pool; `None` when the repository is not registered (or does not answer).
async fn claim(
    env: &Env,
    session_id: &str,
    repository: &str,
    control: &str,
    token: &str,
    take: bool,
    labels: &[(String, String)],
) -> Option<ClaimAnswer> {
    let stub = repository_stub(env, repository).ok()?;
    let ask = ClaimRequest {
        control_url: control.to_string(),
        sandbox_token: token.to_string(),
        session_id: session_id.to_string(),
        take,
        labels: labels.iter().cloned().collect(),
    };
    let route = RepositoryRoute::Claim;
    let body = objects::encode(&ask).ok()?;
    let mut r = call(&stub, route.method(), &route.path(), None, Some(body))
        .await
        .ok()?;
    if r.status_code() != 200 {
        return None;
    }
    objects::read_answer(&mut r, &route.path()).await.ok()
}

/// The session's `kv` values this file reads: `repository_source`, `branch`, `session_egress`.
#[cfg(test)]
mod stored_formats {
    use super::Source;
    use crate::store::stored_formats::{older, pinned};

    #[test]
    fn source_format_unchanged() {
        pinned::<Source>(
            r#"{"clone_url":"https://github.com/acme/web.git","base_branch":"develop","egress":["registry.example.com"]}"#,
        );
        // Before repositories had an egress allowlist.
        let s = older::<Source>(
            r#"{"clone_url":"https://github.com/acme/web.git","base_branch":"main"}"#,
        );
        assert!(s.egress.is_empty());
    }

    #[test]
    fn branch_format_unchanged() {
        pinned::<String>(r#""nightshift/ses_1""#);
    }

    #[test]
    fn session_egress_format_unchanged() {
        pinned::<Vec<String>>(r#"["example.com","*.npmjs.org"]"#);
    }
}

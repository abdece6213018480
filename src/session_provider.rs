//! The session object's calls to the sandbox provider: each provider effect the core decides is carried out here, and answered with the inputs that report it back to the core.

use nightshift_core::hosted::{Effect, HostedSession, Input, PollAnswer, SpawnAnswer};
use nightshift_core::provider::{ErrorBody, SandboxStatus};
use nightshift_core::signing::sha256_hex;
use nightshift_core::snapshot::Snapshots;
use worker::{console_error, Env, SqlStorage};

use crate::error::{ApiError, ApiResult, EdgeError};
use crate::{provider, sandbox_start, snapshots};

/// What the provider answered to the last spawn an execution carried out: its status and body
/// (a refusal is answered as `sandbox_failed`), or the error that kept it from answering.
pub type SpawnResult = Option<ApiResult<(u16, serde_json::Value)>>;

/// The provider's answers an execution's caller may answer with: the last spawn's, the last
/// snapshot's (its id, or why it was not taken), and whether a live sandbox took a new egress
/// list.
#[derive(Default)]
pub struct Answers {
    pub spawned: SpawnResult,
    pub snapshot: Option<ApiResult<String>>,
    pub egress_applied: bool,
}

/// What a provider call needs to know of the session (read before anything awaits).
pub struct Context {
    pub session: String,
    pub repository: String,
    pub owner: String,
    pub snapshots: Snapshots,
    pub live_sandbox: Option<String>,
}

impl Context {
    pub fn of(hosted: &HostedSession) -> Context {
        let meta = &hosted.session.meta;
        Context {
            session: meta.id.clone(),
            repository: meta.repository.clone().unwrap_or_default(),
            owner: meta.owner.clone(),
            snapshots: hosted.snapshots.clone(),
            live_sandbox: hosted.live_sandbox().map(str::to_string),
        }
    }
}

/// The labels of the session's next sandbox (whose it is, which GitHub account), after checking
/// that neither the person nor the account has as many running as their quota allows.
async fn running_labels(env: &Env, ctx: &Context) -> ApiResult<Vec<(String, String)>> {
    let github = if crate::config::github(env).is_some() && !ctx.repository.is_empty() {
        crate::access::settings(env, &ctx.repository)
            .await?
            .and_then(|s| s.github)
    } else {
        None
    };
    let labels = crate::access::sandbox_labels(&ctx.owner, github.as_deref());
    crate::access::check_running_sandboxes(env, &labels).await?;
    Ok(labels)
}

/// Carries out one provider effect; answers with the inputs that report it.
pub async fn carry_out(
    env: &Env,
    sql: &SqlStorage,
    ctx: Context,
    effect: Effect,
    answers: &mut Answers,
    now: u64,
) -> ApiResult<Vec<Input>> {
    match effect {
        Effect::Spawn { token, snapshot } => {
            let link = sha256_hex(token.as_bytes());
            let labels = match running_labels(env, &ctx).await {
                Ok(labels) => labels,
                Err(e) => {
                    let message = e.message.clone();
                    answers.spawned = Some(Err(e));
                    let answer = SpawnAnswer::Failed { message };
                    return Ok(vec![Input::Spawned { link, answer }]);
                }
            };
            let started = sandbox_start::start(
                env,
                sql,
                &ctx.snapshots,
                &ctx.session,
                &ctx.repository,
                &token,
                now,
                snapshot.as_deref(),
                &labels,
            )
            .await;
            let mut lost = Vec::new();
            let answer = match started {
                Ok(s) => {
                    lost = s.lost;
                    match s.answer {
                        Ok(got) => {
                            let body = serde_json::to_value(&got).unwrap_or_default();
                            answers.spawned = Some(Ok((201, body)));
                            SpawnAnswer::Created {
                                sandbox: got.id().to_string(),
                                expires_at: got.expires_at(),
                                how: s.how,
                            }
                        }
                        Err(refused) => {
                            let message = format!(
                                "the provider refused the sandbox ({}): {}",
                                refused.status,
                                refused.message()
                            );
                            answers.spawned =
                                Some(Ok(EdgeError::SandboxFailed(message.clone()).answer()));
                            SpawnAnswer::Failed { message }
                        }
                    }
                }
                Err(e) => {
                    let message = e.message.clone();
                    answers.spawned = Some(Err(e));
                    SpawnAnswer::Failed { message }
                }
            };
            let mut next = vec![Input::Spawned { link, answer }];
            if !lost.is_empty() {
                next.insert(0, Input::SnapshotsLost { ids: lost });
            }
            Ok(next)
        }
        Effect::StartStopped { sandbox } => {
            let ok = matches!(provider::start_sandbox(env, &sandbox).await, Ok(Ok(_)));
            Ok(vec![Input::Started { sandbox, ok }])
        }
        Effect::Poll { sandbox } => {
            let answer = match provider::get_sandbox(env, &sandbox).await {
                Ok(Ok(found)) if found.status.is_over() => {
                    let error = found.value.error.unwrap_or(ErrorBody {
                        code: "unknown".into(),
                        message: "no reason given".into(),
                    });
                    PollAnswer::Failed {
                        code: error.code,
                        message: error.message,
                    }
                }
                Ok(Err(refused)) if refused.is_not_found() => PollAnswer::Gone,
                _ => PollAnswer::Pending,
            };
            Ok(vec![Input::Polled { sandbox, answer }])
        }
        Effect::TakeSnapshot { sandbox, turn } => {
            let taken = snapshots::take(env, sandbox.as_deref(), now).await;
            let next = match &taken {
                Ok((id, expires_at)) => Input::SnapshotTaken {
                    turn,
                    id: id.clone(),
                    expires_at: *expires_at,
                },
                Err(e) => {
                    console_error!("snapshot of turn {turn}: {}", e.message);
                    Input::SnapshotNotTaken { turn }
                }
            };
            answers.snapshot = Some(taken.map(|(id, _)| id));
            Ok(vec![next])
        }
        Effect::DeleteSnapshots { ids } => {
            let gone = snapshots::delete(env, &ids).await;
            Ok(vec![Input::SnapshotsDeleted { ids: gone }])
        }
        Effect::SweepSandboxes => {
            if let Ok(Ok(listed)) = provider::list_sandboxes(env, &ctx.session).await {
                for sandbox in listed.value.sandboxes {
                    let id = sandbox.id.as_str();
                    if id.is_empty()
                        || Some(id) == ctx.live_sandbox.as_deref()
                        || sandbox.status == SandboxStatus::Terminated
                    {
                        continue;
                    }
                    if let Err(e) = provider::terminate(env, id).await {
                        console_error!("terminating stray sandbox {id}: {}", e.message);
                    }
                }
            }
            Ok(Vec::new())
        }
        Effect::Terminate { sandbox } => {
            if let Err(e) = provider::terminate(env, &sandbox).await {
                console_error!("terminating sandbox {sandbox}: {}", e.message);
            }
            Ok(Vec::new())
        }
        Effect::StopSandbox { sandbox } => {
            let path = format!("/v1/sandboxes/{sandbox}/stop");
            if let Err(e) = provider::call(env, worker::Method::Post, &path, None).await {
                console_error!("stopping idle sandbox {sandbox}: {}", e.message);
            }
            Ok(Vec::new())
        }
        Effect::Describe { sandbox } => {
            let path = format!("/v1/sandboxes/{sandbox}");
            answers.spawned = Some(provider::call(env, worker::Method::Get, &path, None).await);
            Ok(Vec::new())
        }
        Effect::ApplyEgress { sandbox, allow } => {
            answers.egress_applied = sandbox_start::apply_egress(env, &sandbox, &allow).await;
            Ok(Vec::new())
        }
        other => Err(ApiError::internal(format!(
            "not a provider effect: {other:?}"
        ))),
    }
}

//! The session side of background agents: what an agent's session reports (its output, its end) and the sandbox's agent tools (`spawn_session`, `check_session`) calling the scheduler with the session's own scope.

use nightshift_core::events::{Event, EventKind};
use nightshift_core::ids::Identity;
use serde_json::Value;
use worker::{Env, SqlStorage};

use crate::error::{ApiError, ApiResult, EdgeError};
use crate::objects::{
    decode_answer, encode, AgentLink, AgentOutcome, AgentOutput, AgentOutputView, ChildrenAnswer,
    Finished, ParentEnded, SchedulerRoute, SpawnBody, Spawned, Viewer,
};
use crate::scheduler::{on_shard, shard_of};
use crate::store;

/// `kv` key: the agent this session runs (set when the scheduler creates it).
pub const LINK: nightshift_core::store::Kv = nightshift_core::store::Kv::AgentLink;
/// `kv` key: ids of the agents this session spawned (for cancelling them when it ends).
pub const CHILDREN: nightshift_core::store::Kv = nightshift_core::store::Kv::Children;

pub fn link(sql: &SqlStorage) -> ApiResult<Option<AgentLink>> {
    store::kv_get(sql, LINK)
}

/// What the agent's prompt ended with, if one of these events ends it.
pub fn ending(events: &[Event]) -> Option<(bool, AgentOutcome)> {
    events.iter().rev().find_map(|e| match &e.kind {
        EventKind::PromptFinished {
            ok,
            reason,
            branch,
            commit,
            ..
        } => Some((
            *ok,
            AgentOutcome::Finished {
                branch: branch.clone(),
                commit: commit.clone(),
                ok: *ok,
                reason: reason.clone(),
            },
        )),
        EventKind::PromptStopped { .. } => Some((
            false,
            AgentOutcome::Ended {
                ok: false,
                reason: STOPPED.to_string(),
            },
        )),
        _ => None,
    })
}

/// The reason of an agent whose prompt someone stopped.
const STOPPED: &str = "stopped: someone stopped the agent's prompt";

/// Tells the scheduler that this session's agent ended.
pub async fn report_end(
    env: &Env,
    link: &AgentLink,
    ok: bool,
    outcome: AgentOutcome,
) -> ApiResult<()> {
    let finished = Finished {
        id: link.agent.clone(),
        ok,
        result: outcome.value(),
    };
    let viewer = Viewer::Agent(link.agent.clone());
    let route = SchedulerRoute::Finished;
    let body = Some(encode(&finished)?);
    on_shard(env, &link.shard, &viewer, &route, "", body, None).await?;
    Ok(())
}

/// The agent's final message (its last prompt's text) and the files it changed.
pub fn output(sql: &SqlStorage) -> ApiResult<AgentOutput> {
    let mut message = String::new();
    let mut last_prompt: Option<String> = None;
    let mut files: Vec<String> = Vec::new();
    // The input comes with the `running` event, the outcome with `completed`.
    let mut paths: std::collections::BTreeMap<String, String> = Default::default();
    let mut since = 0u64;
    loop {
        let rows = store::events_after(sql, since, 500)?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let Ok(e) = serde_json::from_str::<Event>(row) else {
                continue;
            };
            since = e.seq;
            match e.kind {
                EventKind::AgentText { prompt, text } => {
                    if last_prompt.as_deref() != Some(prompt.as_str()) {
                        message.clear();
                        last_prompt = Some(prompt);
                    }
                    message.push_str(&text);
                }
                EventKind::AgentTool {
                    tool,
                    input,
                    status,
                    call,
                    prompt,
                    ..
                } if matches!(tool.as_str(), "write" | "edit" | "patch" | "multiedit") => {
                    let key = format!("{prompt}/{call}");
                    if let Some(f) = input.as_ref().and_then(|i| i["filePath"].as_str()) {
                        paths.insert(key.clone(), f.to_string());
                    }
                    if status == "completed" {
                        if let Some(f) = paths.get(&key) {
                            if !files.contains(f) {
                                files.push(f.clone());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(AgentOutput { files, message })
}

/// A request of the sandbox's agent tools (the protocol lives in the core, shared with the
/// supervisor).
pub use nightshift_core::tools::ToolRequest;

/// Runs one tool request for the session `session` on behalf of `author` (the person whose
/// prompt is running). The sandbox sees only this session's children.
pub async fn tool(
    env: &Env,
    sql: &SqlStorage,
    session: &str,
    repository: Option<String>,
    author: Identity,
    req: ToolRequest,
) -> ApiResult<(u16, Value)> {
    let own = link(sql)?;
    let shard = own
        .as_ref()
        .map_or("default".to_string(), |l| l.shard.clone());
    let depth = own.as_ref().map_or(0, |l| l.depth);
    let viewer = Viewer::Session(session.to_string());
    match req {
        ToolRequest::Spawn {
            prompt,
            repository: repo,
            model,
        } => {
            let body = SpawnBody {
                identity: author,
                model,
                parent: Some(session.to_string()),
                parent_depth: depth,
                prompt,
                repository: repo.or(repository),
                title: None,
            };
            let route = SchedulerRoute::Spawn;
            let mut resp =
                on_shard(env, &shard, &viewer, &route, "", Some(encode(&body)?), None).await?;
            let status = resp.status_code();
            let bytes = resp.bytes().await.map_err(ApiError::internal)?;
            // The whole answer goes back to the sandbox (an agent, or a refusal).
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if status == 201 {
                let spawned: Spawned = decode_answer(&route.path(), &bytes)?;
                let mut kids: Vec<String> = store::kv_get(sql, CHILDREN)?.unwrap_or_default();
                kids.push(spawned.id);
                store::kv_put(sql, CHILDREN, &kids)?;
            }
            Ok((status, answer))
        }
        ToolRequest::Check { id } => {
            let ids: Vec<String> = match id {
                Some(i) => vec![i],
                None => store::kv_get(sql, CHILDREN)?.unwrap_or_default(),
            };
            let mut children = Vec::new();
            for i in ids {
                let route = SchedulerRoute::AgentOutput(i);
                let mut r = on_shard(env, &shard, &viewer, &route, "", None, None).await?;
                let status = r.status_code();
                let bytes = r.bytes().await.map_err(ApiError::internal)?;
                if status != 200 {
                    // A refusal goes back to the sandbox as it is.
                    let refusal: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    return Ok((status, refusal));
                }
                let child: AgentOutputView = decode_answer(&route.path(), &bytes)?;
                children.push(child);
            }
            let answer = ChildrenAnswer { children };
            Ok((
                200,
                serde_json::to_value(&answer).map_err(ApiError::internal)?,
            ))
        }
    }
}

/// Cancels, in every shard, the agents this session spawned (it ended).
pub async fn end_children(env: &Env, sql: &SqlStorage, session: &str) {
    let kids: Vec<String> = store::kv_get(sql, CHILDREN)
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut shards: Vec<String> = kids.iter().filter_map(|k| shard_of(k).ok()).collect();
    shards.sort();
    shards.dedup();
    let ended = ParentEnded {
        session: session.to_string(),
    };
    let Ok(body) = encode(&ended) else { return };
    let viewer = Viewer::Session(session.to_string());
    let route = SchedulerRoute::ParentEnded;
    for shard in shards {
        let r = on_shard(env, &shard, &viewer, &route, "", Some(body.clone()), None).await;
        if let Err(e) = r {
            worker::console_error!("cancelling {session}'s agents in {shard}: {}", e.message);
        }
    }
}

/// A tool request that is not one: refused with a stable code.
pub fn bad_tool_request(e: impl std::fmt::Display) -> ApiError {
    EdgeError::InvalidToolRequest(e.to_string()).into()
}

/// The session's `kv` value `children` (its `background` link is pinned beside `AgentLink`).
#[cfg(test)]
mod stored_formats {
    use crate::store::stored_formats::pinned;

    #[test]
    fn children_format_unchanged() {
        pinned::<Vec<String>>(r#"["bg_acme_1f","bg_acme_2a"]"#);
    }
}

/// What an agent's session reports as its end is the result it reported before.
#[cfg(test)]
mod tests {
    use super::ending;
    use nightshift_core::events::{Event, EventKind};
    use nightshift_core::ids::Actor;
    use serde_json::json;

    fn event(kind: EventKind) -> Event {
        Event {
            seq: 1,
            at: 1,
            actor: Actor {
                user: "ada".into(),
                name: "Ada".into(),
            },
            kind,
        }
    }

    fn reported(kind: EventKind) -> Option<(bool, String)> {
        ending(&[event(kind)]).map(|(ok, outcome)| (ok, outcome.value().to_string()))
    }

    #[test]
    fn an_end_reports_the_result_it_reported_before() {
        for (ok, reason, branch, commit) in [
            (
                true,
                Some("done"),
                Some("nightshift/ses_2"),
                Some("4f2c9e1"),
            ),
            (false, None, None, None),
        ] {
            let finished = EventKind::PromptFinished {
                id: "p1".into(),
                ok,
                reason: reason.map(String::from),
                branch: branch.map(String::from),
                commit: commit.map(String::from),
                patch: None,
            };
            let old = json!({"ok": ok, "reason": reason, "branch": branch, "commit": commit});
            assert_eq!(reported(finished), Some((ok, old.to_string())));
        }
        let stopped = EventKind::PromptStopped { id: "p1".into() };
        let old = json!({"ok": false, "reason": "stopped: someone stopped the agent's prompt"});
        assert_eq!(reported(stopped), Some((false, old.to_string())));
        let text = EventKind::AgentText {
            prompt: "p1".into(),
            text: "hi".into(),
        };
        assert_eq!(reported(text), None);
    }
}

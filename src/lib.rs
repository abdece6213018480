//! The Nightshift Worker: thin edge that parses, authenticates and forwards to Durable Objects.

// Input arrives here (requests, socket frames, sandbox events, stored rows): a bad one is an
// error answer, never a panic (ARCHITECTURE.md, Invariants).
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod access;
mod agent_session;
mod auth;
mod auth_github;
mod background;
mod config;
mod error;
mod github;
mod http;
mod objects;
mod platform;
mod pr_reviews;
mod provider;
mod pull_requests;
mod repositories;
mod repository_tokens;
mod routes;
mod sandbox_api;
mod sandbox_start;
mod session_provider;
mod session_sockets;
mod sessions;
mod slack;
mod snapshots;
mod store;
mod webcrypto;
mod webhooks;

#[path = "../durable_objects/budget.rs"]
mod budget;
#[path = "../durable_objects/installation_index.rs"]
mod installation_index;
#[path = "../durable_objects/repository.rs"]
mod repository;
#[path = "../durable_objects/repository_index.rs"]
mod repository_index;
#[path = "../durable_objects/scheduler.rs"]
mod scheduler;
#[path = "../durable_objects/session.rs"]
mod session_object;
#[path = "../durable_objects/slack_workspace.rs"]
mod slack_workspace;
#[path = "../durable_objects/user_index.rs"]
mod user_index;

pub use budget::GlobalBudget;
pub use installation_index::InstallationIndex;
pub use repository::RepositoryObject;
pub use repository_index::RepositoryIndex;
pub use scheduler::SchedulerObject;
pub use session_object::SessionObject;
pub use slack_workspace::SlackWorkspace;
pub use user_index::UserIndex;

use worker::{event, Context, Env, Request, Response, Result, ScheduleContext, ScheduledEvent};

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> Result<Response> {
    routes::handle(req, env).await
}

#[event(scheduled)]
async fn scheduled(event: ScheduledEvent, env: Env, _ctx: ScheduleContext) {
    if let Err(e) = repositories::scheduled(&env, event.schedule() as u64).await {
        worker::console_error!("scheduled builds: {}", e.message);
    }
    if let Err(e) = webhooks::redeliver_failed(&env).await {
        worker::console_error!("webhook redelivery: {}", e.message);
    }
}

//! The Nightshift Worker: thin edge that parses, authenticates and forwards to Durable Objects.

mod auth;
mod config;
mod error;
mod platform;
mod provider;
mod routes;
mod runner;
mod sandbox_api;
mod store;

#[path = "../durable_objects/session.rs"]
mod session_object;
#[path = "../durable_objects/user_index.rs"]
mod user_index;

pub use session_object::SessionObject;
pub use user_index::UserIndex;

use worker::{event, Context, Env, Request, Response, Result};

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> Result<Response> {
    routes::handle(req, env).await
}

//! Nightshift's pure core: the rules of sessions, presence, edit locks, the prompt queue, background agents and their global budget, warm pools, images and snapshots, with no I/O.

pub mod api;
pub mod background;
pub mod budget;
pub mod check;
pub mod egress;
pub mod error;
pub mod events;
pub mod gating;
pub mod github;
pub mod hosted;
pub mod ids;
pub mod pool;
pub mod pr_review;
pub mod provider;
pub mod queue;
pub mod quota;
pub mod repository;
pub mod sandbox;
pub mod session;
pub mod signin;
pub mod signing;
pub mod slack;
pub mod slack_status;
pub mod snapshot;
pub mod store;
pub mod token;
pub mod tools;
pub mod wire;

pub use error::{CoreError, CoreResult};

//! Nightshift's pure core: the rules of sessions, presence, edit locks and the prompt queue, with no I/O.

pub mod check;
pub mod error;
pub mod events;
pub mod gating;
pub mod queue;
pub mod sandbox;
pub mod session;
pub mod signing;
pub mod token;
pub mod wire;

pub use error::{CoreError, CoreResult};

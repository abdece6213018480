//! The leaf types every layer names: who someone is (ids, identity, role), who caused an event, and where a cursor is.

use serde::{Deserialize, Serialize};

pub type UserId = String;
pub type ClientId = String;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub user: UserId,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

impl Identity {
    pub fn actor(&self) -> Actor {
        Actor {
            user: self.user.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Member,
}

/// Who caused an event: a person, or the system (sweeps, expiry, runner).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Actor {
    pub user: String,
    pub name: String,
}

impl Actor {
    pub fn system() -> Actor {
        Actor {
            user: "system".into(),
            name: "Nightshift".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub line: u32,
    pub column: u32,
}

//! Git sync gating: the agent may read at once; writes wait until the checkout has synced to the latest base branch.

use serde::{Deserialize, Serialize};

/// Where the sandbox's checkout is relative to the base branch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SyncState {
    NotStarted,
    Syncing,
    Synced { commit: String },
    Failed { reason: String },
}

/// Whether a tool reads or may change files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolClass {
    Read,
    Write,
}

/// Tools that can change the checkout. `bash` can write files, so it waits too.
pub const WRITE_TOOLS: &[&str] = &["write", "edit", "patch", "multiedit", "apply_patch", "bash"];

pub fn classify(tool: &str) -> ToolClass {
    if WRITE_TOOLS.contains(&tool) {
        ToolClass::Write
    } else {
        ToolClass::Read
    }
}

/// The answer to "may this tool run now?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused; the message is shown to the agent as the tool's result.
    Block {
        message: String,
    },
}

/// The gate of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gate {
    pub sync: SyncState,
    /// A write has been allowed: the checkout now holds the agent's work and must not be re-synced.
    pub wrote: bool,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            sync: SyncState::NotStarted,
            wrote: false,
        }
    }
}

impl Gate {
    /// Sync begins (or begins again, e.g. after a failure). Refused once the agent has written.
    pub fn start_sync(&mut self) -> bool {
        if self.wrote || self.sync == SyncState::Syncing {
            return false;
        }
        self.sync = SyncState::Syncing;
        true
    }

    pub fn synced(&mut self, commit: &str) -> bool {
        if self.sync != SyncState::Syncing {
            return false;
        }
        self.sync = SyncState::Synced {
            commit: commit.to_string(),
        };
        true
    }

    pub fn failed(&mut self, reason: &str) -> bool {
        if self.sync != SyncState::Syncing {
            return false;
        }
        self.sync = SyncState::Failed {
            reason: reason.to_string(),
        };
        true
    }

    /// Decides whether `tool` may run now.
    pub fn check(&mut self, tool: &str) -> Decision {
        if classify(tool) == ToolClass::Read {
            return Decision::Allow;
        }
        match &self.sync {
            SyncState::Synced { .. } => {
                self.wrote = true;
                Decision::Allow
            }
            SyncState::Failed { reason } => Decision::Block {
                message: format!(
                    "Blocked: the repository could not be synced to the latest base branch ({reason}), so `{tool}` may not change files. Keep reading; tell the user that the sync failed."
                ),
            },
            SyncState::NotStarted | SyncState::Syncing => Decision::Block {
                message: format!(
                    "Blocked: the repository is still syncing to the latest base branch, so `{tool}` may not change files yet. Read and plan now, then retry this call in a few seconds."
                ),
            },
        }
    }
}

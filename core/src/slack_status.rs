//! A Slack thread's status message folded from its session's events: which stage the work is in, how many files changed, the pull request, and when the message is due for an update (at most one `chat.update` a second, re-armed after a 429).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::events::{Event, EventKind};
use crate::slack::{Stage, StatusView};

/// At most one `chat.update` of a status message per this long (Slack allows about one a second
/// per channel).
pub const UPDATE_EVERY_MS: u64 = 1_000;

/// After the session is done, its message keeps following the session this long for a pull
/// request that is still being opened.
pub const PR_GRACE_MS: u64 = 60_000;

/// One thread's status: the view the message shows, what Slack last showed, and the events read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadStatus {
    /// What the message should show.
    pub view: StatusView,
    /// What Slack was last given (`None`: not posted yet).
    #[serde(default)]
    pub shown: Option<StatusView>,
    /// The session's events are read after this sequence number.
    #[serde(default)]
    pub last_seq: u64,
    /// Prompts of the session still queued or running (the thread's own and follow-ups).
    #[serde(default)]
    pub open_prompts: BTreeSet<String>,
    /// Files the agent wrote or edited.
    #[serde(default)]
    pub files: BTreeSet<String>,
    /// When the stage became final (ms).
    #[serde(default)]
    pub final_at: Option<u64>,
    /// No `chat.update` before this (rate limit, ms).
    #[serde(default)]
    pub not_before: u64,
}

impl ThreadStatus {
    /// A status for a session that was just asked for work: starting its sandbox.
    pub fn new(view: StatusView) -> ThreadStatus {
        ThreadStatus {
            view,
            shown: None,
            last_seq: 0,
            open_prompts: BTreeSet::new(),
            files: BTreeSet::new(),
            final_at: None,
            not_before: 0,
        }
    }

    /// A follow-up prompt was queued: the message says working again.
    pub fn follow_up(&mut self, prompt: &str) {
        self.open_prompts.insert(prompt.to_string());
        self.final_at = None;
        if self.view.stage.is_final() {
            self.view.stage = Stage::Working {
                files_changed: count(&self.files),
            };
        }
    }

    /// Folds the session's next events into the view (events at or before `last_seq` are
    /// skipped, so a page read twice changes nothing).
    pub fn apply(&mut self, events: &[Event], now: u64) {
        for event in events {
            if event.seq <= self.last_seq {
                continue;
            }
            self.last_seq = event.seq;
            self.apply_one(&event.kind, now);
        }
    }

    fn apply_one(&mut self, kind: &EventKind, now: u64) {
        match kind {
            EventKind::PromptQueued { prompt } => {
                self.open_prompts.insert(prompt.id.clone());
            }
            EventKind::PromptStarted { id, .. } => {
                self.open_prompts.insert(id.clone());
                if !matches!(self.view.stage, Stage::Working { .. }) {
                    self.view.stage = Stage::Starting;
                }
                self.final_at = None;
            }
            EventKind::SandboxStatus { stage, detail } => match stage.as_str() {
                "ready" | "synced" if !self.open_prompts.is_empty() => {
                    self.view.stage = Stage::Working {
                        files_changed: count(&self.files),
                    };
                }
                "failed" if !self.open_prompts.is_empty() => {
                    self.view.stage = Stage::Failed {
                        reason: detail.clone(),
                    };
                }
                _ => {}
            },
            EventKind::AgentText { .. } | EventKind::AgentStep { .. }
                if self.view.stage == Stage::Starting =>
            {
                self.view.stage = Stage::Working {
                    files_changed: count(&self.files),
                };
            }
            EventKind::AgentTool { tool, input, .. } => {
                let path = input.as_ref().and_then(|input| {
                    ["filePath", "path", "file"]
                        .iter()
                        .find_map(|key| input.get(key).and_then(|v| v.as_str()))
                });
                if let (true, Some(path)) = (writes(tool), path) {
                    self.files.insert(path.to_string());
                }
                if !self.view.stage.is_final() {
                    self.view.stage = Stage::Working {
                        files_changed: count(&self.files),
                    };
                }
            }
            EventKind::PromptCancelled { id } | EventKind::PromptStopped { id } => {
                self.open_prompts.remove(id);
                if self.open_prompts.is_empty() && !self.view.stage.is_final() {
                    self.view.stage = Stage::Failed {
                        reason: "stopped".to_string(),
                    };
                    self.final_at = Some(now);
                }
            }
            EventKind::PromptFinished { id, ok, reason, .. } => {
                self.open_prompts.remove(id);
                if !ok {
                    self.view.stage = Stage::Failed {
                        reason: reason
                            .clone()
                            .unwrap_or_else(|| "the agent failed".to_string()),
                    };
                    self.final_at = Some(now);
                } else if self.open_prompts.is_empty() {
                    self.view.stage = Stage::Done {
                        pr_url: self.view.pr_url.clone(),
                    };
                    self.final_at = Some(now);
                }
            }
            EventKind::PrOpened { pull_request } | EventKind::PrUpdated { pull_request } => {
                self.view.pr_url = Some(pull_request.url.clone());
                if let Stage::Done { pr_url } = &mut self.view.stage {
                    *pr_url = Some(pull_request.url.clone());
                }
            }
            EventKind::SessionEnded => {
                if !self.view.stage.is_final() {
                    self.view.stage = Stage::Done {
                        pr_url: self.view.pr_url.clone(),
                    };
                }
                self.final_at.get_or_insert(now);
                self.open_prompts.clear();
            }
            _ => {}
        }
    }

    /// Whether the session is still followed: work is open, or it is done without a pull
    /// request for less than [`PR_GRACE_MS`].
    pub fn following(&self, now: u64) -> bool {
        match self.final_at {
            None => true,
            Some(at) => {
                let waiting_for_pr = matches!(self.view.stage, Stage::Done { pr_url: None });
                waiting_for_pr && now < at.saturating_add(PR_GRACE_MS)
            }
        }
    }

    /// Whether Slack shows something else than the view and may be told now.
    pub fn update_due(&self, now: u64) -> bool {
        self.shown.as_ref() != Some(&self.view) && now >= self.not_before
    }

    /// Slack was given the view at `now`.
    pub fn shown_at(&mut self, now: u64) {
        self.shown = Some(self.view.clone());
        self.not_before = now.saturating_add(UPDATE_EVERY_MS);
    }

    /// Slack answered 429: no update before `retry_after_s` from `now`.
    pub fn rate_limited(&mut self, now: u64, retry_after_s: u64) {
        self.not_before = now.saturating_add(retry_after_s.saturating_mul(1_000));
    }
}

/// Tools whose calls change files.
fn writes(tool: &str) -> bool {
    matches!(tool, "write" | "edit" | "patch" | "multiedit")
}

fn count(files: &BTreeSet<String>) -> u32 {
    u32::try_from(files.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::github::PrLink;
    use crate::ids::Actor;
    use serde_json::json;

    fn view() -> StatusView {
        StatusView {
            task: "Fix the footer".into(),
            repository: "web".into(),
            branch: "nightshift/ses_1".into(),
            model: "default".into(),
            asked_by: "<@U1>".into(),
            stage: Stage::Starting,
            session_id: "ses_1".into(),
            session_url: "http://x/#/s/ses_1".into(),
            pr_url: None,
        }
    }

    fn at(seq: u64, kind: EventKind) -> Event {
        Event {
            seq,
            at: seq,
            actor: Actor::system(),
            kind,
        }
    }

    fn pr() -> PrLink {
        serde_json::from_value(json!({
            "repository": "acme/web", "number": 7, "url": "https://github.test/acme/web/pull/7",
            "head": "nightshift/ses_1", "base": "main", "state": "open", "draft": false,
            "title": "Fix the footer", "updated_at": "2026-12-02T00:00:00Z"
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_prompt_goes_from_starting_to_working_with_files_to_done_with_its_pull_request() {
        let mut status = ThreadStatus::new(view());
        status.apply(
            &[
                at(
                    1,
                    EventKind::PromptStarted {
                        id: "p1".into(),
                        author: "ada".into(),
                    },
                ),
                at(
                    2,
                    EventKind::SandboxStatus {
                        stage: "spawning".into(),
                        detail: String::new(),
                    },
                ),
            ],
            10,
        );
        assert_eq!(status.view.stage, Stage::Starting);
        let write = |seq, path: &str| {
            at(
                seq,
                EventKind::AgentTool {
                    prompt: "p1".into(),
                    call: format!("c{seq}"),
                    tool: "write".into(),
                    status: "running".into(),
                    input: Some(json!({"filePath": path})),
                    output: None,
                    error: None,
                },
            )
        };
        status.apply(
            &[write(3, "a.txt"), write(4, "a.txt"), write(5, "b.txt")],
            11,
        );
        assert_eq!(status.view.stage, Stage::Working { files_changed: 2 });
        // A page read again changes nothing.
        status.apply(&[write(5, "c.txt")], 12);
        assert_eq!(status.view.stage, Stage::Working { files_changed: 2 });
        let finished = EventKind::PromptFinished {
            id: "p1".into(),
            ok: true,
            reason: None,
            branch: Some("nightshift/ses_1".into()),
            commit: None,
            patch: None,
        };
        status.apply(&[at(6, finished)], 13);
        assert_eq!(status.view.stage, Stage::Done { pr_url: None });
        assert!(status.following(14), "waits for the pull request");
        status.apply(&[at(7, EventKind::PrOpened { pull_request: pr() })], 15);
        assert_eq!(
            status.view.stage,
            Stage::Done {
                pr_url: Some("https://github.test/acme/web/pull/7".into())
            }
        );
        assert!(!status.following(16));
    }

    #[test]
    fn a_failed_prompt_says_why_and_a_follow_up_works_again() {
        let mut status = ThreadStatus::new(view());
        status.apply(
            &[
                at(
                    1,
                    EventKind::PromptStarted {
                        id: "p1".into(),
                        author: "ada".into(),
                    },
                ),
                at(
                    2,
                    EventKind::PromptFinished {
                        id: "p1".into(),
                        ok: false,
                        reason: Some("the model is unreachable".into()),
                        branch: None,
                        commit: None,
                        patch: None,
                    },
                ),
            ],
            5,
        );
        assert_eq!(
            status.view.stage,
            Stage::Failed {
                reason: "the model is unreachable".into()
            }
        );
        assert!(!status.following(6));
        status.follow_up("p2");
        assert_eq!(status.view.stage, Stage::Working { files_changed: 0 });
        assert!(status.following(7));
    }

    #[test]
    fn updates_are_spaced_and_a_rate_limit_pushes_the_next_one_back() {
        let mut status = ThreadStatus::new(view());
        assert!(status.update_due(0));
        status.shown_at(100);
        assert!(!status.update_due(100), "nothing changed");
        status.view.stage = Stage::Working { files_changed: 0 };
        assert!(
            !status.update_due(500),
            "within a second of the last update"
        );
        assert!(status.update_due(1_100));
        status.rate_limited(1_100, 30);
        assert!(!status.update_due(20_000));
        assert!(status.update_due(31_100));
    }
}

//! The prompt queue: priority-then-arrival order, one running prompt, per-author cancel and re-prioritise, stop.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, CoreResult};

pub type PromptId = String;

/// Lowest and highest priority a prompt may carry; higher runs first.
pub const MIN_PRIORITY: i32 = -10;
pub const MAX_PRIORITY: i32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum PromptStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    Stopped,
}

impl PromptStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, PromptStatus::Queued | PromptStatus::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            PromptStatus::Queued => "queued",
            PromptStatus::Running => "running",
            PromptStatus::Completed => "completed",
            PromptStatus::Failed => "failed",
            PromptStatus::Cancelled => "cancelled",
            PromptStatus::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Prompt {
    pub id: PromptId,
    pub author: String,
    pub author_name: String,
    pub text: String,
    pub priority: i32,
    /// Arrival order within the session; ties in priority run first-come.
    pub arrival: u64,
    pub status: PromptStatus,
    pub queued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The author's idempotency key (`Idempotency-Key`, or `key` on the socket): the same
    /// author submitting it again gets this prompt back. Stored with the prompt, never shown
    /// (see [`Prompt::public`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
}

impl Prompt {
    /// The prompt as members and events see it: without its author's client key.
    pub fn public(&self) -> Prompt {
        Prompt {
            client_key: None,
            ..self.clone()
        }
    }
}

/// Terminal prompts (completed, failed, cancelled, stopped) a session's queue keeps, at least:
/// beyond them the oldest are pruned ([`PromptQueue::prune_terminal`]). Their events stay in the
/// log; only the queue (memory and the `prompts` rows) forgets them, so a session that has run
/// or cancelled any number of prompts wakes with at most this many (plus the queued and running
/// ones). The queue view's recent list shows [`RECENT_PROMPTS`] of them.
pub const TERMINAL_WINDOW: usize = 100;

/// Terminal prompts the queue view lists as "recent" (newest arrival first).
pub const RECENT_PROMPTS: usize = 20;

/// The window a session with at most `max_queued` waiting prompts keeps: [`TERMINAL_WINDOW`], or
/// more when the queue bound is so large that the recent list could otherwise lose an entry.
///
/// Pruning removes the prompts that ended first. A prompt among the [`RECENT_PROMPTS`] newest
/// by arrival can only be outlived by prompts that arrived after it (fewer than
/// `RECENT_PROMPTS`) or that arrived before it and were still waiting or running when it ended
/// (at most `max_queued + 1`). A window above their sum therefore never prunes it, and the
/// recent list is the one an unpruned queue would show (given a clock that does not go back:
/// ending times are the shell's `now`).
pub fn terminal_window(max_queued: u32) -> usize {
    let max_queued = usize::try_from(max_queued).unwrap_or(usize::MAX);
    TERMINAL_WINDOW.max(max_queued.saturating_add(RECENT_PROMPTS + 1))
}

/// Longest client key a prompt may carry.
pub const MAX_CLIENT_KEY_LEN: usize = 128;

/// A client key is 1-128 bytes of printable ASCII (space to `~`).
pub fn check_client_key(key: &str) -> CoreResult<()> {
    let printable = key.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    if key.is_empty() || key.len() > MAX_CLIENT_KEY_LEN || !printable {
        return Err(CoreError::Invalid(format!(
            "idempotency key must be 1-{MAX_CLIENT_KEY_LEN} bytes of printable ASCII"
        )));
    }
    Ok(())
}

/// What a caller asks to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPrompt {
    pub id: PromptId,
    pub author: String,
    pub author_name: String,
    pub text: String,
    pub priority: i32,
    pub model: Option<String>,
    /// The author's idempotency key, if any (checked with [`check_client_key`]).
    pub client_key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PromptQueue {
    pub prompts: BTreeMap<PromptId, Prompt>,
    pub next_arrival: u64,
    pub running: Option<PromptId>,
}

pub fn check_priority(priority: i32) -> CoreResult<i32> {
    if (MIN_PRIORITY..=MAX_PRIORITY).contains(&priority) {
        Ok(priority)
    } else {
        Err(CoreError::Invalid(format!(
            "priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}"
        )))
    }
}

impl PromptQueue {
    pub fn queued_count(&self) -> usize {
        self.prompts
            .values()
            .filter(|p| p.status == PromptStatus::Queued)
            .count()
    }

    /// Queued prompts in the order they will run.
    pub fn queued_in_order(&self) -> Vec<&Prompt> {
        let mut q: Vec<&Prompt> = self
            .prompts
            .values()
            .filter(|p| p.status == PromptStatus::Queued)
            .collect();
        q.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.arrival.cmp(&b.arrival)));
        q
    }

    pub fn get(&self, id: &str) -> CoreResult<&Prompt> {
        self.prompts
            .get(id)
            .ok_or_else(|| CoreError::PromptNotFound(id.to_string()))
    }

    /// The prompt `author` submitted with client key `key`, while the queue holds it (a pruned
    /// prompt's key is forgotten with it). Keys are per author: the same key from someone else
    /// names a different prompt.
    pub fn find_by_key(&self, author: &str, key: &str) -> Option<&Prompt> {
        self.prompts
            .values()
            .find(|p| p.author == author && p.client_key.as_deref() == Some(key))
    }

    pub fn enqueue(&mut self, new: NewPrompt, now: u64, max_queued: u32) -> CoreResult<&Prompt> {
        check_priority(new.priority)?;
        if new.text.trim().is_empty() {
            return Err(CoreError::Invalid("prompt text is empty".into()));
        }
        if self.prompts.contains_key(&new.id) {
            return Err(CoreError::Invalid(format!(
                "prompt id {} already used",
                new.id
            )));
        }
        if let Some(key) = &new.client_key {
            check_client_key(key)?;
            if self.find_by_key(&new.author, key).is_some() {
                return Err(CoreError::Invalid(
                    "idempotency key already names one of your prompts".into(),
                ));
            }
        }
        if self.queued_count() >= max_queued as usize {
            return Err(CoreError::QueueFull { max: max_queued });
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let id = new.id.clone();
        self.prompts.insert(
            id.clone(),
            Prompt {
                id: new.id,
                author: new.author,
                author_name: new.author_name,
                text: new.text,
                priority: new.priority,
                arrival,
                status: PromptStatus::Queued,
                queued_at: now,
                model: new.model,
                started_at: None,
                finished_at: None,
                reason: None,
                client_key: new.client_key,
            },
        );
        self.get(&id)
    }

    fn queued_mut_for(&mut self, id: &str, who: &str, is_owner: bool) -> CoreResult<&mut Prompt> {
        let p = self
            .prompts
            .get_mut(id)
            .ok_or_else(|| CoreError::PromptNotFound(id.to_string()))?;
        if p.author != who && !is_owner {
            return Err(CoreError::NotYourPrompt(id.to_string()));
        }
        if p.status != PromptStatus::Queued {
            return Err(CoreError::PromptNotQueued {
                id: id.to_string(),
                status: p.status.as_str().to_string(),
            });
        }
        Ok(p)
    }

    pub fn cancel(&mut self, id: &str, who: &str, is_owner: bool, now: u64) -> CoreResult<()> {
        let p = self.queued_mut_for(id, who, is_owner)?;
        p.status = PromptStatus::Cancelled;
        p.finished_at = Some(now);
        Ok(())
    }

    pub fn reprioritize(
        &mut self,
        id: &str,
        who: &str,
        is_owner: bool,
        priority: i32,
    ) -> CoreResult<()> {
        check_priority(priority)?;
        let p = self.queued_mut_for(id, who, is_owner)?;
        p.priority = priority;
        Ok(())
    }

    /// Starts the next queued prompt if none is running; returns its id.
    pub fn start_next(&mut self, now: u64) -> Option<PromptId> {
        if self.running.is_some() {
            return None;
        }
        let id = self.queued_in_order().first().map(|p| p.id.clone())?;
        if let Some(p) = self.prompts.get_mut(&id) {
            p.status = PromptStatus::Running;
            p.started_at = Some(now);
        }
        self.running = Some(id.clone());
        Some(id)
    }

    /// Stops the running prompt (its author or an owner may).
    pub fn stop(&mut self, who: &str, is_owner: bool, now: u64) -> CoreResult<PromptId> {
        let id = self.running.clone().ok_or(CoreError::NothingRunning)?;
        let p = self
            .prompts
            .get_mut(&id)
            .ok_or_else(|| CoreError::PromptNotFound(id.clone()))?;
        if p.author != who && !is_owner {
            return Err(CoreError::NotYourPrompt(id));
        }
        p.status = PromptStatus::Stopped;
        p.finished_at = Some(now);
        self.running = None;
        Ok(id)
    }

    /// Terminal prompts the queue holds.
    pub fn terminal_count(&self) -> usize {
        self.prompts
            .values()
            .filter(|p| p.status.is_terminal())
            .count()
    }

    /// Removes the terminal prompts beyond the `keep` that ended last and returns their ids
    /// (oldest first). Ended first means the earliest `finished_at`, then the earliest arrival
    /// (a prompt without `finished_at` counts as oldest). Queued and running prompts are never
    /// removed. A pruned id is unknown afterwards, so prompt ids must be fresh (the shell's are
    /// random) for an id never to name two prompts.
    pub fn prune_terminal(&mut self, keep: usize) -> Vec<PromptId> {
        let mut terminal: Vec<(Option<u64>, u64, &PromptId)> = self
            .prompts
            .values()
            .filter(|p| p.status.is_terminal())
            .map(|p| (p.finished_at, p.arrival, &p.id))
            .collect();
        let Some(excess) = terminal.len().checked_sub(keep).filter(|n| *n > 0) else {
            return Vec::new();
        };
        terminal.sort_unstable();
        let pruned: Vec<PromptId> = terminal
            .into_iter()
            .take(excess)
            .map(|(_, _, id)| id.clone())
            .collect();
        for id in &pruned {
            self.prompts.remove(id);
        }
        pruned
    }

    /// Ends the running prompt with an outcome reported by the runner.
    pub fn finish(
        &mut self,
        id: &str,
        ok: bool,
        reason: Option<String>,
        now: u64,
    ) -> CoreResult<()> {
        if self.running.as_deref() != Some(id) {
            return Err(CoreError::PromptNotQueued {
                id: id.to_string(),
                status: self
                    .prompts
                    .get(id)
                    .map(|p| p.status.as_str())
                    .unwrap_or("unknown")
                    .to_string(),
            });
        }
        if let Some(p) = self.prompts.get_mut(id) {
            p.status = if ok {
                PromptStatus::Completed
            } else {
                PromptStatus::Failed
            };
            p.finished_at = Some(now);
            p.reason = reason;
        }
        self.running = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(id: &str, author: &str) -> NewPrompt {
        NewPrompt {
            id: id.into(),
            author: author.into(),
            author_name: author.into(),
            text: "do it".into(),
            priority: 0,
            model: None,
            client_key: None,
        }
    }

    #[test]
    fn only_the_author_or_an_owner_may_cancel_reprioritise_or_stop() {
        let mut q = PromptQueue::default();
        q.enqueue(new("p1", "ada"), 0, 5).expect("p1");
        q.enqueue(new("p2", "bob"), 0, 5).expect("p2");
        q.enqueue(new("p3", "bob"), 0, 5).expect("p3");
        assert_eq!(q.queued_count(), 3);
        assert_eq!(q.start_next(1).as_deref(), Some("p1"));
        assert_eq!(q.queued_count(), 2);
        assert!(matches!(
            q.cancel("p2", "ada", false, 2),
            Err(CoreError::NotYourPrompt(_))
        ));
        assert!(matches!(
            q.reprioritize("p2", "ada", false, 5),
            Err(CoreError::NotYourPrompt(_))
        ));
        assert!(matches!(
            q.cancel("p1", "ada", false, 2),
            Err(CoreError::PromptNotQueued { ref status, .. }) if status == "running"
        ));
        assert!(matches!(
            q.stop("bob", false, 2),
            Err(CoreError::NotYourPrompt(_))
        ));
        assert_eq!(q.cancel("p2", "ada", true, 2), Ok(()), "an owner may");
        assert_eq!(q.cancel("p3", "bob", false, 2), Ok(()), "the author may");
        assert!(q.prompts["p2"].status.is_terminal());
        assert!(!q.prompts["p1"].status.is_terminal());
        assert!(matches!(
            q.finish("p2", true, None, 3),
            Err(CoreError::PromptNotQueued { ref status, .. }) if status == "cancelled"
        ));
        assert_eq!(
            q.stop("bob", true, 3).as_deref(),
            Ok("p1"),
            "an owner may stop"
        );
        assert!(matches!(
            q.stop("ada", false, 3),
            Err(CoreError::NothingRunning)
        ));
        q.enqueue(new("p4", "ada"), 4, 5).expect("p4");
        assert_eq!(q.start_next(4).as_deref(), Some("p4"));
        assert_eq!(q.finish("p4", true, None, 5), Ok(()));
        assert_eq!(q.prompts["p4"].status, PromptStatus::Completed);
        assert_eq!(q.running, None);
    }

    fn keyed(id: &str, author: &str, key: &str) -> NewPrompt {
        NewPrompt {
            client_key: Some(key.into()),
            ..new(id, author)
        }
    }

    #[test]
    fn a_client_key_is_one_to_128_bytes_of_printable_ascii() {
        for good in ["k", "retry-1 of 3", "~!@#$%^&*()", &"a".repeat(128)] {
            assert_eq!(check_client_key(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            &"a".repeat(129),
            "tab\there",
            "line\n",
            "caf\u{e9}",
            "\u{7f}",
        ] {
            assert!(
                matches!(check_client_key(bad), Err(CoreError::Invalid(_))),
                "{bad:?}"
            );
        }
        let mut q = PromptQueue::default();
        assert!(matches!(
            q.enqueue(keyed("p1", "ada", ""), 0, 5),
            Err(CoreError::Invalid(_))
        ));
        assert!(q.prompts.is_empty());
    }

    #[test]
    fn keys_are_per_author_and_never_name_two_prompts() {
        let mut q = PromptQueue::default();
        q.enqueue(keyed("p1", "ada", "k"), 0, 5).expect("p1");
        q.enqueue(keyed("p2", "bob", "k"), 0, 5)
            .expect("bob's k is his own");
        assert!(matches!(
            q.enqueue(keyed("p3", "ada", "k"), 0, 5),
            Err(CoreError::Invalid(_))
        ));
        assert_eq!(q.find_by_key("ada", "k").map(|p| p.id.as_str()), Some("p1"));
        assert_eq!(q.find_by_key("bob", "k").map(|p| p.id.as_str()), Some("p2"));
        assert_eq!(q.find_by_key("cy", "k"), None);
        assert_eq!(q.find_by_key("ada", "other"), None);
        // Still remembered once the prompt has run.
        q.start_next(1);
        q.finish("p1", true, None, 2).expect("finish");
        assert_eq!(q.find_by_key("ada", "k").map(|p| p.id.as_str()), Some("p1"));
    }

    #[test]
    fn pruning_removes_the_terminal_prompts_that_ended_first() {
        let mut q = PromptQueue::default();
        for id in ["a", "b", "c", "d", "e"] {
            q.enqueue(new(id, "ada"), 0, 10).expect("enqueue");
        }
        assert_eq!(q.start_next(1).as_deref(), Some("a"));
        // d ends first, then c and b in the same millisecond: the earlier arrival, b, counts
        // as ending first.
        q.cancel("d", "ada", false, 2).expect("d");
        q.cancel("c", "ada", false, 3).expect("c");
        q.cancel("b", "ada", false, 3).expect("b");
        assert_eq!(q.prune_terminal(3), Vec::<PromptId>::new());
        assert_eq!(q.prune_terminal(1), vec!["d".to_string(), "b".to_string()]);
        assert_eq!(q.terminal_count(), 1);
        assert!(q.prompts.contains_key("c"));
        // Running and queued prompts stay, whatever the window.
        assert_eq!(q.prune_terminal(0), vec!["c".to_string()]);
        assert_eq!(q.prompts.keys().collect::<Vec<_>>(), ["a", "e"]);
        assert_eq!(q.running.as_deref(), Some("a"));
    }

    #[test]
    fn the_key_is_stored_but_not_shown_and_old_rows_still_read() {
        let mut q = PromptQueue::default();
        let p = q
            .enqueue(keyed("p1", "ada", "k1"), 0, 5)
            .expect("p1")
            .clone();
        let stored = serde_json::to_value(&p).expect("json");
        assert_eq!(stored["client_key"], "k1");
        let back: Prompt = serde_json::from_value(stored).expect("row");
        assert_eq!(back, p);
        let shown = serde_json::to_value(p.public()).expect("json");
        assert!(shown.get("client_key").is_none(), "{shown}");
        let unkeyed = q.enqueue(new("p2", "ada"), 0, 5).expect("p2").clone();
        let row = serde_json::to_value(&unkeyed).expect("json");
        assert!(row.get("client_key").is_none(), "no key, no field: {row}");
        // A row stored before keys existed.
        let old = serde_json::json!({"id":"p0","author":"ada","author_name":"Ada","text":"x",
            "priority":0,"arrival":0,"status":"completed","queued_at":0});
        let old: Prompt = serde_json::from_value(old).expect("old row");
        assert_eq!(old.client_key, None);
    }
}

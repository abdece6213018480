//! Background agents: statuses that only move along valid transitions, and the scheduler of one shard (a tenant) with its limits, fair queue and cascading cancel — no I/O.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// Where a background agent is. Terminal states are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Starting,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// Holds a slot of the concurrency limits.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Starting | Status::Running)
    }

    /// queued → starting → running → completed | failed | cancelled; queued and starting may
    /// also fail or be cancelled.
    pub fn can_move(self, to: Status) -> bool {
        use Status::*;
        matches!(
            (self, to),
            (Queued, Starting)
                | (Starting, Running)
                | (Running, Completed)
                | (Queued | Starting | Running, Failed | Cancelled)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// Why a request was refused (stable codes).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BgError {
    #[error(
        "the background queue already holds {max} agents; wait for some to finish or cancel one"
    )]
    QueueFull { max: u32 },
    #[error("spawning would nest agents {depth} deep; the limit is {max}")]
    TooDeep { depth: u32, max: u32 },
    #[error("this session has already spawned {max} agents; the limit is {max}")]
    TooManyChildren { max: u32 },
    #[error("no background agent {0}")]
    NotFound(String),
    #[error("background agent {id} is {status}; it cannot become {to}")]
    InvalidTransition {
        id: String,
        status: String,
        to: String,
    },
    #[error("background agent {0} belongs to someone else")]
    NotYours(String),
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl BgError {
    pub fn code(&self) -> &'static str {
        match self {
            BgError::QueueFull { .. } => "queue_full",
            BgError::TooDeep { .. } => "too_deep",
            BgError::TooManyChildren { .. } => "too_many_children",
            BgError::NotFound(_) => "agent_not_found",
            BgError::InvalidTransition { .. } => "invalid_transition",
            BgError::NotYours(_) => "not_your_agent",
            BgError::Invalid(_) => "invalid_input",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            BgError::QueueFull { .. }
            | BgError::TooDeep { .. }
            | BgError::TooManyChildren { .. } => 429,
            BgError::NotFound(_) => 404,
            BgError::InvalidTransition { .. } => 409,
            BgError::NotYours(_) => 403,
            BgError::Invalid(_) => 400,
        }
    }
}

/// The scheduler's limits (per shard; `max_concurrent` is the shard's share of the global limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limits {
    /// Running (starting or running) agents in the shard.
    pub max_concurrent: u32,
    /// Running agents per user.
    pub max_per_user: u32,
    /// Running children per parent session.
    pub max_per_session: u32,
    /// Agents waiting in the shard.
    pub max_queued: u32,
    /// Nesting: a top-level agent is depth 1.
    pub max_depth: u32,
    /// Agents one parent session may ever spawn (fan-out).
    pub max_children: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent: 8,
            max_per_user: 4,
            max_per_session: 4,
            max_queued: 100,
            max_depth: 3,
            max_children: 20,
        }
    }
}

/// One background agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    /// The person it runs for (its commits are in their name).
    pub user: String,
    /// The session that spawned it (`None`: spawned through the API by a person).
    pub parent: Option<String>,
    /// Nesting depth (1 for a top-level agent).
    pub depth: u32,
    pub status: Status,
    /// Arrival order (first-come within a user).
    pub arrival: u64,
    /// The agent's own session, once started.
    pub session: Option<String>,
}

/// A status change to record as an event (and to act on: start or stop the agent's session).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Transition {
    pub id: String,
    pub from: Option<Status>,
    pub to: Status,
}

/// The agents of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scheduler {
    pub limits: Limits,
    pub agents: BTreeMap<String, Agent>,
    /// Children ever spawned, by parent session.
    pub spawned: BTreeMap<String, u32>,
    pub next_arrival: u64,
}

/// A request to spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawn {
    pub id: String,
    pub user: String,
    pub parent: Option<String>,
    /// The parent's depth (0 when a person spawns).
    pub parent_depth: u32,
}

impl Scheduler {
    pub fn new(limits: Limits) -> Scheduler {
        Scheduler {
            limits,
            ..Scheduler::default()
        }
    }

    fn active(&self, f: impl Fn(&Agent) -> bool) -> u32 {
        self.agents
            .values()
            .filter(|a| a.status.is_active() && f(a))
            .count() as u32
    }

    pub fn queued(&self) -> u32 {
        self.agents
            .values()
            .filter(|a| a.status == Status::Queued)
            .count() as u32
    }

    /// Slots of the global budget the shard can use now: its starting, running and queued
    /// agents plus `extra` about to be spawned, at most its own `max_concurrent` (call it
    /// before `hold` lowers that limit to the holding).
    pub fn slots_wanted(&self, extra: u32) -> u32 {
        let demand = self
            .active(|_| true)
            .saturating_add(self.queued())
            .saturating_add(extra);
        self.limits.max_concurrent.min(demand)
    }

    /// The shard holds `held` slots of the global budget: it runs at most that many agents at
    /// once (its own limit, or the holding when that is smaller).
    pub fn hold(&mut self, held: u32) {
        self.limits.max_concurrent = self.limits.max_concurrent.min(held);
    }

    /// Adds an agent (queued), then starts whatever the limits allow. Refused — never
    /// dropped — when it would nest too deep, exceed the parent's fan-out, or overflow the queue.
    pub fn spawn(&mut self, s: Spawn) -> Result<Vec<Transition>, BgError> {
        if s.id.is_empty() || self.agents.contains_key(&s.id) {
            return Err(BgError::Invalid(format!("agent id {} is taken", s.id)));
        }
        let depth = s.parent_depth + 1;
        if depth > self.limits.max_depth {
            return Err(BgError::TooDeep {
                depth,
                max: self.limits.max_depth,
            });
        }
        if let Some(p) = &s.parent {
            if self.spawned.get(p).copied().unwrap_or(0) >= self.limits.max_children {
                return Err(BgError::TooManyChildren {
                    max: self.limits.max_children,
                });
            }
        }
        let agent = Agent {
            id: s.id.clone(),
            user: s.user,
            parent: s.parent,
            depth,
            status: Status::Queued,
            arrival: self.next_arrival + 1,
            session: None,
        };
        // A full queue refuses only what would wait: an agent that can start at once is taken.
        if self.queued() >= self.limits.max_queued && !self.fits(&agent) {
            return Err(BgError::QueueFull {
                max: self.limits.max_queued,
            });
        }
        if let Some(p) = &agent.parent {
            *self.spawned.entry(p.clone()).or_default() += 1;
        }
        self.next_arrival += 1;
        self.agents.insert(s.id.clone(), agent);
        let mut out = vec![Transition {
            id: s.id,
            from: None,
            to: Status::Queued,
        }];
        out.extend(self.schedule());
        Ok(out)
    }

    fn fits(&self, a: &Agent) -> bool {
        let l = &self.limits;
        self.active(|_| true) < l.max_concurrent
            && self.active(|x| x.user == a.user) < l.max_per_user
            && a.parent
                .as_ref()
                .is_none_or(|p| self.active(|x| x.parent.as_ref() == Some(p)) < l.max_per_session)
    }

    /// Starts queued agents while capacity allows. Fair between users: the next start goes to
    /// the waiting user with the fewest running agents, then the earliest arrival.
    pub fn schedule(&mut self) -> Vec<Transition> {
        let mut out = Vec::new();
        loop {
            let pick = self
                .agents
                .values()
                .filter(|a| a.status == Status::Queued && self.fits(a))
                .min_by_key(|a| (self.active(|x| x.user == a.user), a.arrival))
                .map(|a| a.id.clone());
            let Some(id) = pick else { break };
            if let Some(a) = self.agents.get_mut(&id) {
                a.status = Status::Starting;
            }
            out.push(Transition {
                id,
                from: Some(Status::Queued),
                to: Status::Starting,
            });
        }
        out
    }

    /// Moves one agent; invalid moves are refused and change nothing. Freed capacity starts
    /// the next ones. Starting a queued agent is the scheduler's move alone (`schedule`, within
    /// the limits and in fair order): asked for here, it is refused. Cancelling is `cancel`: it
    /// cascades to the agent's descendants.
    pub fn transition(&mut self, id: &str, to: Status) -> Result<Vec<Transition>, BgError> {
        let a = self
            .agents
            .get_mut(id)
            .ok_or_else(|| BgError::NotFound(id.to_string()))?;
        if !a.status.can_move(to) || to == Status::Starting {
            return Err(BgError::InvalidTransition {
                id: id.to_string(),
                status: a.status.as_str().into(),
                to: to.as_str().into(),
            });
        }
        if to == Status::Cancelled {
            return self.cancel(id);
        }
        let from = a.status;
        a.status = to;
        let mut out = vec![Transition {
            id: id.to_string(),
            from: Some(from),
            to,
        }];
        if to.is_terminal() {
            out.extend(self.schedule());
        }
        Ok(out)
    }

    /// Records the session an agent runs in.
    pub fn attach(&mut self, id: &str, session: &str) -> Result<(), BgError> {
        let a = self
            .agents
            .get_mut(id)
            .ok_or_else(|| BgError::NotFound(id.to_string()))?;
        a.session = Some(session.to_string());
        Ok(())
    }

    /// Cancels an agent and, through their sessions, every descendant that has not ended.
    /// Cancelling a finished agent is refused.
    pub fn cancel(&mut self, id: &str) -> Result<Vec<Transition>, BgError> {
        let status = self
            .agents
            .get(id)
            .map(|a| a.status)
            .ok_or_else(|| BgError::NotFound(id.to_string()))?;
        if status.is_terminal() {
            return Err(BgError::InvalidTransition {
                id: id.to_string(),
                status: status.as_str().into(),
                to: "cancelled".into(),
            });
        }
        let mut out = self.cancel_tree(vec![id.to_string()], BTreeSet::new());
        out.extend(self.schedule());
        Ok(out)
    }

    /// Cancels every agent spawned by a session (its parent session ended or was cancelled),
    /// and, like `cancel`, their descendants — also those of a child that has already ended.
    pub fn cancel_children_of(&mut self, session: &str) -> Vec<Transition> {
        let mut out = self.cancel_tree(Vec::new(), BTreeSet::from([session.to_string()]));
        // Only once every one is cancelled: scheduling in between could start an agent that is
        // cancelled next.
        out.extend(self.schedule());
        out
    }

    /// Cancels, without scheduling, the agents `doomed` and everything spawned (transitively,
    /// through the sessions agents are attached to, ended ones included) from them or from
    /// `sessions`. Agents that have already ended keep their status.
    fn cancel_tree(
        &mut self,
        mut doomed: Vec<String>,
        mut sessions: BTreeSet<String>,
    ) -> Vec<Transition> {
        let mut i = 0;
        loop {
            let kids: Vec<String> = self
                .agents
                .values()
                .filter(|a| a.parent.as_ref().is_some_and(|p| sessions.contains(p)))
                .filter(|a| !doomed.contains(&a.id))
                .map(|a| a.id.clone())
                .collect();
            doomed.extend(kids);
            let Some(d) = doomed.get(i) else { break };
            if let Some(s) = self.agents.get(d).and_then(|a| a.session.clone()) {
                sessions.insert(s);
            }
            i += 1;
        }
        let mut out = Vec::new();
        for d in doomed {
            if let Some(a) = self.agents.get_mut(&d) {
                if !a.status.is_terminal() {
                    out.push(Transition {
                        id: d.clone(),
                        from: Some(a.status),
                        to: Status::Cancelled,
                    });
                    a.status = Status::Cancelled;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(s: &mut Scheduler, id: &str, user: &str, parent: Option<&str>) -> Vec<Transition> {
        s.spawn(Spawn {
            id: id.into(),
            user: user.into(),
            parent: parent.map(String::from),
            parent_depth: u32::from(parent.is_some()),
        })
        .expect("spawn")
    }

    #[test]
    fn limits_queue_and_fairness() {
        let mut s = Scheduler::new(Limits {
            max_concurrent: 2,
            max_per_user: 2,
            max_per_session: 2,
            max_queued: 2,
            max_depth: 2,
            max_children: 5,
        });
        assert_eq!(
            spawn(&mut s, "a1", "ada", None).len(),
            2,
            "queued then starting"
        );
        spawn(&mut s, "a2", "ada", None);
        assert_eq!(spawn(&mut s, "a3", "ada", None).len(), 1, "waits");
        spawn(&mut s, "b1", "bob", None);
        let full = s.spawn(Spawn {
            id: "x".into(),
            user: "cy".into(),
            parent: None,
            parent_depth: 0,
        });
        assert_eq!(full.map_err(|e| e.code()), Err("queue_full"));
        s.transition("a1", Status::Running).expect("run");
        let next = s.transition("a1", Status::Completed).expect("done");
        assert_eq!(next[1].id, "b1", "bob has nothing running: he goes first");
        assert_eq!(
            s.transition("a1", Status::Running).map_err(|e| e.code()),
            Err("invalid_transition"),
            "terminal states are final"
        );
    }

    #[test]
    fn cancel_cascades_through_sessions_and_depth_is_bounded() {
        let mut s = Scheduler::new(Limits::default());
        spawn(&mut s, "p", "ada", None);
        s.attach("p", "ses_p").expect("attach");
        spawn(&mut s, "c1", "ada", Some("ses_p"));
        s.attach("c1", "ses_c1").expect("attach");
        let deep = s.spawn(Spawn {
            id: "g".into(),
            user: "ada".into(),
            parent: Some("ses_c1".into()),
            parent_depth: 3,
        });
        assert_eq!(deep.map_err(|e| e.code()), Err("too_deep"));
        spawn(&mut s, "g1", "ada", Some("ses_c1"));
        let t = s.cancel("p").expect("cancel");
        let ids: Vec<&str> = t.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, vec!["p", "c1", "g1"]);
        assert_eq!(
            s.cancel("p").map_err(|e| e.code()),
            Err("invalid_transition")
        );
    }

    #[test]
    fn statuses_have_wire_names_and_errors_http_statuses() {
        use Status::*;
        let names: Vec<&str> = [Queued, Starting, Running, Completed, Failed, Cancelled]
            .into_iter()
            .map(Status::as_str)
            .collect();
        assert_eq!(
            names,
            [
                "queued",
                "starting",
                "running",
                "completed",
                "failed",
                "cancelled"
            ]
        );
        // The wire name is the stored (serde) name.
        for st in [Queued, Starting, Running, Completed, Failed, Cancelled] {
            assert_eq!(
                serde_json::to_value(st).expect("json"),
                serde_json::json!(st.as_str())
            );
        }
        let statuses: Vec<(&str, u16)> = [
            BgError::QueueFull { max: 1 },
            BgError::TooDeep { depth: 4, max: 3 },
            BgError::TooManyChildren { max: 2 },
            BgError::NotFound("a".into()),
            BgError::InvalidTransition {
                id: "a".into(),
                status: "completed".into(),
                to: "running".into(),
            },
            BgError::NotYours("a".into()),
            BgError::Invalid("x".into()),
        ]
        .iter()
        .map(|e| (e.code(), e.status()))
        .collect();
        assert_eq!(
            statuses,
            [
                ("queue_full", 429),
                ("too_deep", 429),
                ("too_many_children", 429),
                ("agent_not_found", 404),
                ("invalid_transition", 409),
                ("not_your_agent", 403),
                ("invalid_input", 400),
            ]
        );
    }

    /// First come, first started within a user, whatever the ids' order: the arrival numbers
    /// follow the spawns, and `next_arrival` is the last one handed out (as stored), so a
    /// spawn after a restore comes after every agent already there.
    #[test]
    fn arrival_follows_spawn_order_not_ids() {
        let limits = Limits {
            max_concurrent: 1,
            ..Limits::default()
        };
        let mut s = Scheduler::new(limits);
        for id in ["m", "z", "a", "k"] {
            spawn(&mut s, id, "ada", None);
            assert_eq!(s.agents[id].arrival, s.next_arrival, "{id}");
        }
        let arrivals: Vec<u64> = ["m", "z", "a", "k"]
            .iter()
            .map(|id| s.agents[*id].arrival)
            .collect();
        assert_eq!(arrivals, [1, 2, 3, 4]);
        let started = |t: Vec<Transition>| {
            t.into_iter()
                .filter(|t| t.to == Status::Starting)
                .map(|t| t.id)
                .collect::<Vec<_>>()
        };
        s.transition("m", Status::Running).expect("run");
        let next = s.transition("m", Status::Completed).expect("done");
        assert_eq!(started(next), ["z"]);
        // Restored from storage: a new spawn ("b", before "z"'s and "k"'s ids) waits behind both.
        let mut s: Scheduler =
            serde_json::from_value(serde_json::to_value(&s).expect("json")).expect("json");
        spawn(&mut s, "b", "ada", None);
        assert_eq!(s.agents["b"].arrival, 5);
        let next = s.transition("z", Status::Failed).expect("fail");
        assert_eq!(started(next), ["a"]);
        let next = s.cancel("a").expect("cancel");
        assert_eq!(started(next), ["k"]);
        let next = s.transition("k", Status::Failed).expect("fail");
        assert_eq!(started(next), ["b"]);
    }
}

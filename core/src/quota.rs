//! Quotas: how many of something a person (or an installation) may do per window, as fixed windows whose refusal says when to ask again.

use serde::{Deserialize, Serialize};

/// One quota's limit: at most `limit` per `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub limit: u32,
    pub window_ms: u64,
}

/// What has been used of a quota in its current window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Window {
    /// When the current window began (ms since the epoch).
    pub start: u64,
    pub used: u32,
}

impl Window {
    /// Takes one at `now`: the window after taking it, or the milliseconds until one is free.
    /// A limit of 0 refuses everything for a whole window.
    pub fn take(self, now: u64, limit: Limit) -> Result<Window, u64> {
        let expired = now >= self.start.saturating_add(limit.window_ms) || now < self.start;
        let window = if expired || self.used == 0 {
            Window {
                start: now,
                used: 0,
            }
        } else {
            self
        };
        if window.used >= limit.limit {
            return Err(window.start.saturating_add(limit.window_ms) - now);
        }
        Ok(Window {
            used: window.used + 1,
            ..window
        })
    }
}

/// What a quota counts. The per-hour kinds are fixed windows; `RunningSandboxes` is a
/// ceiling on sandboxes alive at once, counted at the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaKind {
    /// Sessions created (`POST /sessions`).
    Sessions,
    /// Image builds asked for (registration and `POST /repositories/:name/builds`).
    Builds,
    /// Background agents started (`POST /agents`).
    Spawns,
    /// Sandboxes started by hand (`POST /sandbox`).
    Sandboxes,
    /// Session sandboxes alive at once (not a window: a ceiling).
    RunningSandboxes,
}

/// Whose quota: one person's, or one GitHub installation's (an organisation's) over all of
/// its people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaScope {
    Person,
    Installation,
}

impl QuotaKind {
    /// Every kind, in the order the README lists them.
    pub const ALL: [QuotaKind; 5] = [
        QuotaKind::Sessions,
        QuotaKind::Builds,
        QuotaKind::Spawns,
        QuotaKind::Sandboxes,
        QuotaKind::RunningSandboxes,
    ];

    /// The kind's stable name (its storage key and wire name).
    pub fn key(self) -> &'static str {
        match self {
            QuotaKind::Sessions => "sessions",
            QuotaKind::Builds => "builds",
            QuotaKind::Spawns => "spawns",
            QuotaKind::Sandboxes => "sandboxes",
            QuotaKind::RunningSandboxes => "running_sandboxes",
        }
    }

    /// True for a ceiling on things alive at once, false for a count per hour.
    pub fn is_ceiling(self) -> bool {
        self == QuotaKind::RunningSandboxes
    }

    /// The variable that sets this quota for `scope`.
    pub fn variable(self, scope: QuotaScope) -> &'static str {
        match (scope, self) {
            (QuotaScope::Person, QuotaKind::Sessions) => "QUOTA_SESSIONS_PER_HOUR",
            (QuotaScope::Person, QuotaKind::Builds) => "QUOTA_BUILDS_PER_HOUR",
            (QuotaScope::Person, QuotaKind::Spawns) => "QUOTA_SPAWNS_PER_HOUR",
            (QuotaScope::Person, QuotaKind::Sandboxes) => "QUOTA_SANDBOXES_PER_HOUR",
            (QuotaScope::Person, QuotaKind::RunningSandboxes) => "QUOTA_RUNNING_SANDBOXES",
            (QuotaScope::Installation, QuotaKind::Sessions) => {
                "QUOTA_INSTALLATION_SESSIONS_PER_HOUR"
            }
            (QuotaScope::Installation, QuotaKind::Builds) => "QUOTA_INSTALLATION_BUILDS_PER_HOUR",
            (QuotaScope::Installation, QuotaKind::Spawns) => "QUOTA_INSTALLATION_SPAWNS_PER_HOUR",
            (QuotaScope::Installation, QuotaKind::Sandboxes) => {
                "QUOTA_INSTALLATION_SANDBOXES_PER_HOUR"
            }
            (QuotaScope::Installation, QuotaKind::RunningSandboxes) => {
                "QUOTA_INSTALLATION_RUNNING_SANDBOXES"
            }
        }
    }

    /// The limit a deployment with a GitHub App has when the variable is not set.
    pub fn default_limit(self, scope: QuotaScope) -> u32 {
        match (scope, self) {
            (QuotaScope::Person, QuotaKind::Sessions) => 100,
            (QuotaScope::Person, QuotaKind::Builds) => 30,
            (QuotaScope::Person, QuotaKind::Spawns) => 60,
            (QuotaScope::Person, QuotaKind::Sandboxes) => 60,
            (QuotaScope::Person, QuotaKind::RunningSandboxes) => 10,
            (QuotaScope::Installation, QuotaKind::Sessions) => 1_000,
            (QuotaScope::Installation, QuotaKind::Builds) => 200,
            (QuotaScope::Installation, QuotaKind::Spawns) => 600,
            (QuotaScope::Installation, QuotaKind::Sandboxes) => 600,
            (QuotaScope::Installation, QuotaKind::RunningSandboxes) => 50,
        }
    }

    /// The quota's name as people read it in a refusal.
    pub fn describe(self, scope: QuotaScope) -> &'static str {
        match (scope, self) {
            (QuotaScope::Person, QuotaKind::Sessions) => "sessions you may create per hour",
            (QuotaScope::Person, QuotaKind::Builds) => "image builds you may ask for per hour",
            (QuotaScope::Person, QuotaKind::Spawns) => {
                "background agents you may start per hour"
            }
            (QuotaScope::Person, QuotaKind::Sandboxes) => "sandboxes you may start per hour",
            (QuotaScope::Person, QuotaKind::RunningSandboxes) => {
                "sandboxes you may have running at once (stop one, or wait for one to go idle)"
            }
            (QuotaScope::Installation, QuotaKind::Sessions) => {
                "sessions your organisation may create per hour"
            }
            (QuotaScope::Installation, QuotaKind::Builds) => {
                "image builds your organisation may ask for per hour"
            }
            (QuotaScope::Installation, QuotaKind::Spawns) => {
                "background agents your organisation may start per hour"
            }
            (QuotaScope::Installation, QuotaKind::Sandboxes) => {
                "sandboxes your organisation may start per hour"
            }
            (QuotaScope::Installation, QuotaKind::RunningSandboxes) => {
                "sandboxes your organisation may have running at once (stop one, or wait for one to go idle)"
            }
        }
    }

    /// The window of a per-hour kind (a ceiling has none; it is checked against a count).
    pub fn limit(self, limit: u32) -> Limit {
        Limit {
            limit,
            window_ms: 3_600_000,
        }
    }
}

/// Checks a ceiling: `running` alive now against `limit`; how long to wait when it is reached
/// (an idle sandbox stops within `idle_ms`, so that is the honest answer).
pub fn check_ceiling(running: usize, limit: u32, idle_ms: u64) -> Result<(), u64> {
    if running < limit as usize {
        Ok(())
    } else {
        Err(idle_ms.max(1_000))
    }
}

/// Milliseconds to whole seconds for `Retry-After`, never 0.
pub fn retry_after_s(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Limit = Limit {
        limit: 2,
        window_ms: 3_600_000,
    };

    #[test]
    fn a_window_admits_its_limit_then_says_when() {
        let w = Window::default().take(1_000, HOUR).expect("first");
        assert_eq!(
            w,
            Window {
                start: 1_000,
                used: 1
            }
        );
        let w = w.take(2_000, HOUR).expect("second");
        assert_eq!(w.used, 2);
        assert_eq!(w.take(3_000, HOUR), Err(3_600_000 - 2_000));
        // The last millisecond of the window still refuses; the next window admits.
        assert_eq!(w.take(3_600_999, HOUR), Err(1));
        let next = w.take(3_601_000, HOUR).expect("new window");
        assert_eq!(
            next,
            Window {
                start: 3_601_000,
                used: 1
            }
        );
    }

    #[test]
    fn a_zero_limit_refuses_and_a_clock_going_back_starts_over() {
        let none = Limit {
            limit: 0,
            window_ms: 10,
        };
        assert_eq!(Window::default().take(5, none), Err(10));
        let w = Window {
            start: 100,
            used: 2,
        };
        assert_eq!(w.take(50, HOUR), Ok(Window { start: 50, used: 1 }));
    }

    #[test]
    fn every_kind_has_its_own_variables_and_a_refusal_that_names_it() {
        let mut seen = std::collections::BTreeSet::new();
        for kind in QuotaKind::ALL {
            for scope in [QuotaScope::Person, QuotaScope::Installation] {
                assert!(seen.insert(kind.variable(scope)), "{kind:?} {scope:?}");
                assert!(kind.default_limit(scope) > 0);
                assert!(!kind.describe(scope).is_empty());
            }
            // The installation's limit is never below one person's.
            assert!(
                kind.default_limit(QuotaScope::Installation)
                    >= kind.default_limit(QuotaScope::Person)
            );
            let wire = serde_json::to_string(&kind).expect("kind");
            assert_eq!(wire, format!("\"{}\"", kind.key()));
        }
    }

    #[test]
    fn a_ceiling_admits_below_its_limit_and_says_to_wait_for_an_idle_stop() {
        assert_eq!(check_ceiling(0, 2, 900_000), Ok(()));
        assert_eq!(check_ceiling(1, 2, 900_000), Ok(()));
        assert_eq!(check_ceiling(2, 2, 900_000), Err(900_000));
        assert_eq!(check_ceiling(0, 0, 5), Err(1_000));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_s(0), 1);
        assert_eq!(retry_after_s(1), 1);
        assert_eq!(retry_after_s(1_000), 1);
        assert_eq!(retry_after_s(1_001), 2);
    }
}

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
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_s(0), 1);
        assert_eq!(retry_after_s(1), 1);
        assert_eq!(retry_after_s(1_000), 1);
        assert_eq!(retry_after_s(1_001), 2);
    }
}

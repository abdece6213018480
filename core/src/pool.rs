//! The warm pool of one repository (specs/WarmPool.tla): ready sandboxes from the latest image, claimed by sessions at once, refilled and drained without I/O here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where one pooled sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// Asked of the provider; no sandbox id yet (the key stands in for it).
    Requested,
    /// The provider is booting it.
    Booting,
    /// Booted, idle, waiting for a session.
    Ready,
    /// From an image that is no longer the latest: to be terminated, never handed out.
    Draining,
}

/// One sandbox the pool keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pooled {
    /// The provider's sandbox id once known.
    pub sandbox: Option<String>,
    /// The image it boots from (`None`: a plain clone, the repository has no image yet).
    pub image: Option<String>,
    pub slot: Slot,
    /// When it was requested: a `Requested` or `Booting` entry older than the pending timeout
    /// is given up (see [`Pool::expire`]).
    pub since: u64,
}

/// What the shell must do after a decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Work {
    /// Create a pooled sandbox for this key from this image.
    Create { key: String, image: Option<String> },
    /// Terminate this provider sandbox (drained or no longer wanted).
    Terminate { sandbox: String },
    /// A create for this key may have succeeded at the provider without the answer ever being
    /// recorded (the object was evicted or crashed after the provider's 201): terminate every
    /// provider sandbox labelled with the key, then call [`Pool::swept`].
    Sweep { key: String },
}

/// How long a sandbox may stay `Requested` or `Booting` (from its request) before the pool gives
/// it up: the entry stops counting as idle, its sandbox (if recorded) is terminated and an
/// unrecorded create is swept by its key.
pub const PENDING_TIMEOUT_MS: u64 = 15 * 60_000;

/// The pool of one repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pool {
    /// How many idle (requested, booting or ready) sandboxes to keep.
    pub target: u32,
    /// The image new sandboxes come from.
    pub image: Option<String>,
    /// By key (a stable name chosen when the sandbox is requested).
    pub entries: BTreeMap<String, Pooled>,
    /// Claims made, by session: the sandbox handed over (a session claims at most once).
    pub claims: BTreeMap<String, String>,
    /// Counter for keys.
    pub next_key: u64,
    /// Keys given up before their create was recorded: the provider sandboxes labelled with them
    /// are still to be terminated (owed until [`Pool::swept`]).
    #[serde(default)]
    pub sweeps: std::collections::BTreeSet<String>,
}

impl Pool {
    pub fn new(target: u32, image: Option<String>) -> Pool {
        Pool {
            target,
            image,
            ..Pool::default()
        }
    }

    /// Idle sandboxes of the current image (requested, booting or ready).
    pub fn idle(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.slot != Slot::Draining)
            .count()
    }

    pub fn ready(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.slot == Slot::Ready)
            .count()
    }

    /// The sandboxes to create so the pool holds `target` idle ones. Each is recorded as
    /// requested before any I/O, so a second alarm (or a claim) running meanwhile plans nothing twice.
    pub fn refill(&mut self, now: u64) -> Vec<Work> {
        let mut out = Vec::new();
        while self.idle() < self.target as usize {
            self.next_key += 1;
            let key = format!("p{}", self.next_key);
            self.entries.insert(
                key.clone(),
                Pooled {
                    sandbox: None,
                    image: self.image.clone(),
                    slot: Slot::Requested,
                    since: now,
                },
            );
            out.push(Work::Create {
                key,
                image: self.image.clone(),
            });
        }
        out
    }

    /// The provider created `sandbox` for `key`. `None`: recorded, the sandbox boots (or the same
    /// answer again). Otherwise the sandbox is not wanted and the returned work terminates it:
    /// the key was drained while the create was in flight (the entry keeps the sandbox until
    /// [`Pool::drained`]), or is unknown (given up, lost).
    pub fn created(&mut self, key: &str, sandbox: &str) -> Option<Work> {
        let unwanted = Some(Work::Terminate {
            sandbox: sandbox.to_string(),
        });
        match self.entries.get_mut(key) {
            Some(e) if e.slot == Slot::Requested => {
                e.sandbox = Some(sandbox.to_string());
                e.slot = Slot::Booting;
                None
            }
            Some(e) if e.sandbox.as_deref() == Some(sandbox) => None,
            // Drained while the create was in flight: it is terminated as soon as it exists.
            Some(e) if e.slot == Slot::Draining && e.sandbox.is_none() => {
                e.sandbox = Some(sandbox.to_string());
                unwanted
            }
            _ => unwanted,
        }
    }

    /// Gives up what has been pending longer than `timeout` (from its request): a `Booting` entry
    /// drains (its terminate is owed until [`Pool::drained`]); an entry whose create was never
    /// recorded (`Requested`, or drained before the answer) is dropped and its key swept. The
    /// next refill replaces them.
    pub fn expire(&mut self, now: u64, timeout: u64) -> Vec<Work> {
        let mut out = Vec::new();
        let stale: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| Self::pending(e) && e.since.saturating_add(timeout) <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            let Some(e) = self.entries.get_mut(&k) else {
                continue;
            };
            match e.sandbox.clone() {
                Some(sandbox) => {
                    e.slot = Slot::Draining;
                    out.push(Work::Terminate { sandbox });
                }
                None => {
                    self.entries.remove(&k);
                    self.sweeps.insert(k.clone());
                    out.push(Work::Sweep { key: k });
                }
            }
        }
        out
    }

    /// Waiting on the provider: requested, booting, or drained before its create was answered.
    fn pending(e: &Pooled) -> bool {
        match e.slot {
            Slot::Requested | Slot::Booting => true,
            Slot::Draining => e.sandbox.is_none(),
            Slot::Ready => false,
        }
    }

    /// When the oldest pending entry times out (for the alarm): `None` when nothing is pending.
    pub fn next_deadline(&self, timeout: u64) -> Option<u64> {
        self.entries
            .values()
            .filter(|e| Self::pending(e))
            .map(|e| e.since.saturating_add(timeout))
            .min()
    }

    /// Keys whose sweep is (still) owed; safe to repeat.
    pub fn pending_sweeps(&self) -> Vec<String> {
        self.sweeps.iter().cloned().collect()
    }

    /// Every provider sandbox labelled with `key` has been terminated.
    pub fn swept(&mut self, key: &str) -> bool {
        self.sweeps.remove(key)
    }

    /// The sandbox reported ready.
    pub fn booted(&mut self, key: &str) -> bool {
        match self.entries.get_mut(key) {
            Some(e) if e.slot == Slot::Booting => {
                e.slot = Slot::Ready;
                true
            }
            _ => false,
        }
    }

    /// The create failed or the sandbox died while pooled: forget it (the next refill replaces it).
    pub fn lost(&mut self, key: &str) -> bool {
        self.entries.remove(key).is_some()
    }

    /// A draining sandbox has been terminated.
    pub fn drained(&mut self, key: &str) -> bool {
        match self.entries.get(key) {
            Some(e) if e.slot == Slot::Draining => self.entries.remove(key).is_some(),
            _ => false,
        }
    }

    /// Hands a ready sandbox of the current image to `session`, at most one per session: a
    /// second claim by the same session answers the same sandbox. `None`: the pool is empty
    /// (the caller starts one cold).
    pub fn claim(&mut self, session: &str) -> Option<String> {
        if let Some(s) = self.claims.get(session) {
            return Some(s.clone());
        }
        let key = self
            .entries
            .iter()
            .find(|(_, e)| e.slot == Slot::Ready && e.image == self.image)
            .map(|(k, _)| k.clone())?;
        let e = self.entries.remove(&key)?;
        let sandbox = e.sandbox?;
        self.claims.insert(session.to_string(), sandbox.clone());
        Some(sandbox)
    }

    /// A claimed sandbox could not be handed over after all (the assign failed): the session may
    /// claim again; the sandbox is not reused.
    pub fn unclaim(&mut self, session: &str) -> Option<String> {
        self.claims.remove(session)
    }

    /// A new image is ready: idle sandboxes of older images drain; the refill then starts new ones.
    pub fn new_image(&mut self, image: &str) -> Vec<Work> {
        self.image = Some(image.to_string());
        let mut out = Vec::new();
        for e in self.entries.values_mut() {
            if e.image.as_deref() != Some(image) && e.slot != Slot::Draining {
                e.slot = Slot::Draining;
                if let Some(s) = &e.sandbox {
                    out.push(Work::Terminate { sandbox: s.clone() });
                }
            }
        }
        out
    }

    /// Draining sandboxes whose terminate is (still) owed; safe to repeat.
    pub fn pending_drains(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.slot == Slot::Draining)
            .filter_map(|(k, e)| e.sandbox.clone().map(|s| (k.clone(), s)))
            .collect()
    }

    /// A new size: shrinking drains the surplus idle sandboxes (booting before ready).
    pub fn resize(&mut self, target: u32) -> Vec<Work> {
        self.target = target;
        let mut out = Vec::new();
        while self.idle() > target as usize {
            let pick = [Slot::Requested, Slot::Booting, Slot::Ready]
                .iter()
                .find_map(|want| {
                    self.entries
                        .iter()
                        .find(|(_, e)| e.slot == *want)
                        .map(|(k, _)| k.clone())
                });
            let Some(k) = pick else { break };
            if let Some(e) = self.entries.get_mut(&k) {
                e.slot = Slot::Draining;
                if let Some(s) = &e.sandbox {
                    out.push(Work::Terminate { sandbox: s.clone() });
                }
            }
        }
        out
    }

    /// The key of a provider sandbox, if the pool keeps it.
    pub fn key_of(&self, sandbox: &str) -> Option<String> {
        self.entries
            .iter()
            .find(|(_, e)| e.sandbox.as_deref() == Some(sandbox))
            .map(|(k, _)| k.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_claim_and_drain() {
        let mut p = Pool::new(2, Some("img_1".into()));
        let w = p.refill(0);
        assert_eq!(w.len(), 2);
        assert!(p.refill(0).is_empty(), "a second alarm plans nothing");
        assert_eq!(p.created("p1", "sbx_a"), None);
        assert_eq!(p.created("p2", "sbx_b"), None);
        assert_eq!(p.claim("ses_1"), None, "nothing ready yet");
        assert!(p.booted("p1"));
        assert_eq!(p.claim("ses_1").as_deref(), Some("sbx_a"));
        assert_eq!(
            p.claim("ses_1").as_deref(),
            Some("sbx_a"),
            "same session, same sandbox"
        );
        assert_eq!(p.claim("ses_2"), None);
        assert_eq!(p.refill(1).len(), 1);
        let w = p.new_image("img_2");
        assert_eq!(
            w,
            vec![Work::Terminate {
                sandbox: "sbx_b".into()
            }]
        );
        assert!(!p.booted("p3"));
        assert_eq!(
            p.created("p3", "sbx_c"),
            Some(Work::Terminate {
                sandbox: "sbx_c".into()
            }),
            "drained while its create was in flight"
        );
        assert!(
            p.pending_drains()
                .contains(&("p3".to_string(), "sbx_c".to_string())),
            "its terminate is owed until drained"
        );
        assert_eq!(p.idle(), 0);
        assert_eq!(p.refill(2).len(), 2);
        assert!(p.drained("p2") && p.drained("p3"));
    }

    #[test]
    fn counts_refusals_and_exact_resizes() {
        let mut p = Pool::new(3, Some("img_1".into()));
        p.refill(0);
        assert_eq!((p.idle(), p.ready()), (3, 0));
        assert_eq!(p.created("p1", "sbx_a"), None);
        assert_eq!(p.created("p2", "sbx_b"), None);
        assert!(p.booted("p1"));
        assert_eq!((p.idle(), p.ready()), (3, 1));
        assert!(!p.lost("nope"), "unknown key");
        assert!(!p.drained("p1"), "not draining");
        assert!(
            p.new_image("img_1").is_empty(),
            "the same image drains nothing"
        );
        assert_eq!(p.idle(), 3);
        assert_eq!(p.claim("ses_1").as_deref(), Some("sbx_a"));
        assert_eq!(p.unclaim("ses_1").as_deref(), Some("sbx_a"));
        assert_eq!(p.unclaim("ses_1"), None, "nothing left to unclaim");
        assert_eq!(
            p.resize(1),
            vec![],
            "requested ones drain first, and they have no sandbox yet"
        );
        assert_eq!(p.idle(), 1, "exactly the new size");
        assert_eq!(p.entries["p2"].slot, Slot::Booting);
        assert!(p.lost("p2") && !p.lost("p2"));
        assert_eq!(p.idle(), 0);
    }

    #[test]
    fn pending_entries_time_out_and_their_sandboxes_are_terminated() {
        // The repository object gives a pending entry 15 minutes (a cold image boot on a slow
        // provider takes minutes; a create still unanswered after this is lost).
        assert_eq!(PENDING_TIMEOUT_MS, 900_000);
        const T: u64 = 100;
        let mut p = Pool::new(3, Some("img_1".into()));
        assert_eq!(p.next_deadline(T), None);
        assert_eq!(p.refill(10).len(), 3);
        assert_eq!(p.next_deadline(T), Some(110));
        assert_eq!(p.created("p1", "sbx_a"), None);
        assert_eq!(p.created("p1", "sbx_a"), None, "the same answer again");
        assert_eq!(p.created("p2", "sbx_b"), None);
        assert!(p.booted("p2"));
        assert_eq!(p.expire(109, T), vec![], "not yet");
        // p1 is booting, p2 ready (kept), p3 was never answered (the object crashed).
        let w = p.expire(110, T);
        assert_eq!(
            w,
            vec![
                Work::Terminate {
                    sandbox: "sbx_a".into()
                },
                Work::Sweep { key: "p3".into() }
            ]
        );
        assert_eq!(p.entries["p1"].slot, Slot::Draining);
        assert!(!p.entries.contains_key("p3"));
        assert_eq!(p.pending_sweeps(), vec!["p3".to_string()]);
        assert_eq!(p.next_deadline(T), None, "nothing pending any more");
        assert_eq!(p.idle(), 1, "only the ready one counts");
        assert_eq!(p.refill(200).len(), 2, "the given-up ones are replaced");
        assert_eq!(p.next_deadline(T), Some(300));
        assert_eq!(
            p.created("p3", "sbx_late"),
            Some(Work::Terminate {
                sandbox: "sbx_late".into()
            }),
            "a late answer for a given-up key is not wanted"
        );
        assert!(p.swept("p3") && !p.swept("p3"));
        assert!(p.pending_sweeps().is_empty());
        assert!(p.drained("p1"));
        // A requested entry drained before its answer still times out (its answer may never come).
        p.resize(0);
        assert_eq!(p.idle(), 0);
        assert_eq!(p.next_deadline(T), Some(300));
        assert_eq!(
            p.expire(300, T),
            vec![
                Work::Sweep { key: "p4".into() },
                Work::Sweep { key: "p5".into() }
            ]
        );
    }
}

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
    pub since: u64,
}

/// What the shell must do after a decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Work {
    /// Create a pooled sandbox for this key from this image.
    Create { key: String, image: Option<String> },
    /// Terminate this provider sandbox (drained or no longer wanted).
    Terminate { sandbox: String },
}

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

    /// The provider accepted the create: the sandbox boots.
    pub fn created(&mut self, key: &str, sandbox: &str) -> bool {
        match self.entries.get_mut(key) {
            Some(e) if e.slot == Slot::Requested => {
                e.sandbox = Some(sandbox.to_string());
                e.slot = Slot::Booting;
                true
            }
            // Drained while the create was in flight: it is terminated as soon as it exists.
            Some(e) if e.slot == Slot::Draining && e.sandbox.is_none() => {
                e.sandbox = Some(sandbox.to_string());
                true
            }
            _ => false,
        }
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
        assert!(p.created("p1", "sbx_a") && p.created("p2", "sbx_b"));
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
        assert!(!p.booted("p3") && p.created("p3", "sbx_c"));
        assert_eq!(p.idle(), 0);
        assert_eq!(p.refill(2).len(), 2);
        assert!(p.drained("p2") && p.drained("p3"));
    }
}

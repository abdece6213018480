//! Registered repositories and their image registry: settings validation, builds, `latest` that only a ready build moves, tags, history and rollback.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a repository request was refused (stable codes).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RepoError {
    #[error("invalid repository settings: {0}")]
    Invalid(String),
    #[error("no image {0} of this repository")]
    ImageNotFound(String),
    #[error("image {id} is {status}; only a ready image can be made latest")]
    ImageNotReady { id: String, status: String },
}

impl RepoError {
    pub fn code(&self) -> &'static str {
        match self {
            RepoError::Invalid(_) => "invalid_repository",
            RepoError::ImageNotFound(_) => "image_not_found",
            RepoError::ImageNotReady { .. } => "image_not_ready",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            RepoError::Invalid(_) => 400,
            RepoError::ImageNotFound(_) => 404,
            RepoError::ImageNotReady { .. } => 409,
        }
    }
}

/// At most this many warm sandboxes per repository.
pub const MAX_POOL: u32 = 20;
/// Builds remembered per repository (older images are deleted at the provider).
pub const HISTORY: usize = 20;

/// A repository's settings, as registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub name: String,
    pub clone_url: String,
    #[serde(default = "main")]
    pub base_branch: String,
    #[serde(default)]
    pub setup: Vec<String>,
    #[serde(default)]
    pub test: Option<String>,
    #[serde(default)]
    pub pool_size: u32,
    /// Minutes between scheduled image builds (0: only on demand).
    #[serde(default = "thirty")]
    pub build_every_min: u32,
    /// Hosts this repository's sandboxes (builds included) may reach beyond the defaults
    /// (package registries, common git hosts, the control plane and the model): patterns as
    /// `example.com`, `*.example.com`, `host:port`.
    #[serde(default)]
    pub egress: Vec<String>,
}

fn main() -> String {
    "main".into()
}

fn thirty() -> u32 {
    30
}

/// A change to some settings (absent fields stay).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub clone_url: Option<String>,
    pub base_branch: Option<String>,
    pub setup: Option<Vec<String>>,
    pub test: Option<Option<String>>,
    pub pool_size: Option<u32>,
    pub build_every_min: Option<u32>,
    pub egress: Option<Vec<String>>,
}

fn invalid(m: impl Into<String>) -> RepoError {
    RepoError::Invalid(m.into())
}

impl Settings {
    /// Checks every field; the name is the repository's id in URLs.
    pub fn validate(&self) -> Result<(), RepoError> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 100
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || n.starts_with('.')
        {
            return Err(invalid(
                "name: 1–100 letters, digits, '-', '_' or '.', not starting with '.'",
            ));
        }
        if self.clone_url.trim().is_empty() || self.clone_url.len() > 2048 {
            return Err(invalid("clone_url: a git URL or a local path"));
        }
        let b = &self.base_branch;
        if b.is_empty()
            || b.len() > 200
            || b.starts_with('-')
            || b.contains("..")
            || b.contains(' ')
        {
            return Err(invalid("base_branch: a branch name"));
        }
        if self.setup.len() > 50 {
            return Err(invalid("setup: at most 50 commands"));
        }
        for c in self.setup.iter().chain(self.test.iter()) {
            if c.trim().is_empty() || c.len() > 4096 {
                return Err(invalid(
                    "setup and test: non-empty commands of at most 4096 bytes",
                ));
            }
        }
        if self.pool_size > MAX_POOL {
            return Err(invalid(format!("pool_size: at most {MAX_POOL}")));
        }
        if self.build_every_min > 7 * 24 * 60 {
            return Err(invalid("build_every_min: at most a week"));
        }
        if !crate::egress::valid_list(&self.egress) {
            return Err(invalid(format!(
                "egress: at most {} host patterns like `example.com`, `*.example.com` or `host:port`",
                crate::egress::MAX_PATTERNS
            )));
        }
        Ok(())
    }

    /// Applies a change, validated as a whole; on error nothing changes.
    pub fn apply(&self, c: Change) -> Result<Settings, RepoError> {
        let mut s = self.clone();
        if let Some(v) = c.clone_url {
            s.clone_url = v;
        }
        if let Some(v) = c.base_branch {
            s.base_branch = v;
        }
        if let Some(v) = c.setup {
            s.setup = v;
        }
        if let Some(v) = c.test {
            s.test = v;
        }
        if let Some(v) = c.pool_size {
            s.pool_size = v;
        }
        if let Some(v) = c.build_every_min {
            s.build_every_min = v;
        }
        if let Some(v) = c.egress {
            s.egress = v;
        }
        s.validate()?;
        Ok(s)
    }
}

/// One build and the image it made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    /// The provider's image id.
    pub image: String,
    /// `building`, `ready` or `failed`.
    pub status: String,
    /// Why it was built: `cron:<slot>`, `manual`, `registered`, `settings`.
    pub reason: String,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    pub commit: Option<String>,
    pub test_exit_code: Option<i32>,
    pub error: Option<String>,
}

/// The image history of one repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    /// Oldest first.
    pub builds: Vec<Build>,
    /// The image new sandboxes use; only a ready build moves it.
    pub latest: Option<String>,
}

/// What a finished build changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The new latest image, when this build became it.
    pub new_latest: Option<String>,
    /// Images dropped from the history (to delete at the provider).
    pub dropped: Vec<String>,
}

impl Registry {
    /// Whether a build for this reason already exists (a cron slot runs once even if the cron fires twice).
    pub fn has_reason(&self, reason: &str) -> bool {
        self.builds.iter().any(|b| b.reason == reason)
    }

    pub fn building(&self) -> Option<&Build> {
        self.builds.iter().find(|b| b.status == "building")
    }

    pub fn started(&mut self, image: &str, reason: &str, now: u64) {
        self.builds.push(Build {
            image: image.to_string(),
            status: "building".into(),
            reason: reason.to_string(),
            started_at: now,
            finished_at: None,
            commit: None,
            test_exit_code: None,
            error: None,
        });
    }

    /// Records the provider's answer for a build; a failed build never replaces `latest`.
    pub fn finished(
        &mut self,
        image: &str,
        ok: bool,
        commit: Option<String>,
        test_exit_code: Option<i32>,
        error: Option<String>,
        now: u64,
    ) -> Finished {
        let mut out = Finished {
            new_latest: None,
            dropped: Vec::new(),
        };
        let Some(b) = self
            .builds
            .iter_mut()
            .find(|b| b.image == image && b.status == "building")
        else {
            return out;
        };
        b.status = if ok { "ready" } else { "failed" }.into();
        b.finished_at = Some(now);
        b.commit = commit;
        b.test_exit_code = test_exit_code;
        b.error = error;
        if ok {
            self.latest = Some(image.to_string());
            out.new_latest = Some(image.to_string());
        }
        while self.builds.len() > HISTORY {
            // Never drop the latest image or a running build.
            let Some(i) = self
                .builds
                .iter()
                .position(|b| Some(&b.image) != self.latest.as_ref() && b.status != "building")
            else {
                break;
            };
            let b = self.builds.remove(i);
            if b.status == "ready" {
                out.dropped.push(b.image);
            }
        }
        out
    }

    /// Makes an earlier ready image the latest again (one call rolls back).
    pub fn rollback(&mut self, image: &str) -> Result<(), RepoError> {
        let b = self
            .builds
            .iter()
            .find(|b| b.image == image)
            .ok_or_else(|| RepoError::ImageNotFound(image.to_string()))?;
        if b.status != "ready" {
            return Err(RepoError::ImageNotReady {
                id: image.into(),
                status: b.status.clone(),
            });
        }
        self.latest = Some(image.to_string());
        Ok(())
    }

    /// An image's tags: `latest` when it is, its commit, and its build time.
    pub fn tags(&self, b: &Build) -> Vec<String> {
        let mut t = Vec::new();
        if self.latest.as_deref() == Some(&b.image) {
            t.push("latest".into());
        }
        if let Some(c) = &b.commit {
            t.push(format!("commit:{c}"));
        }
        if let Some(f) = b.finished_at.filter(|_| b.status == "ready") {
            t.push(format!("built:{f}"));
        }
        t
    }
}

/// The cron slot a time falls in for a build interval: one build per repository per slot.
pub fn cron_slot(now_ms: u64, every_min: u32) -> Option<u64> {
    let every = u64::from(every_min) * 60_000;
    (every > 0).then(|| now_ms / every)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        serde_json::from_str(r#"{"name":"demo","clone_url":"/srv/demo.git"}"#).expect("json")
    }

    #[test]
    fn defaults_and_validation() {
        let s = settings();
        assert_eq!(
            (s.base_branch.as_str(), s.build_every_min, s.pool_size),
            ("main", 30, 0)
        );
        assert!(s.validate().is_ok());
        for bad in [
            r#"{"name":"../x","clone_url":"u"}"#,
            r#"{"name":"a","clone_url":" "}"#,
            r#"{"name":"a","clone_url":"u","pool_size":99}"#,
            r#"{"name":"a","clone_url":"u","setup":[""]}"#,
            r#"{"name":"a","clone_url":"u","base_branch":"-x"}"#,
            r#"{"name":"a","clone_url":"u","egress":["http://x.com"]}"#,
            r#"{"name":"a","clone_url":"u","egress":["x.com:99999"]}"#,
        ] {
            let s: Settings = serde_json::from_str(bad).expect("json");
            assert_eq!(
                s.validate().map_err(|e| e.code()),
                Err("invalid_repository"),
                "{bad}"
            );
        }
        let c = Change {
            pool_size: Some(99),
            ..Change::default()
        };
        assert!(s.apply(c).is_err());
    }

    #[test]
    fn failed_builds_never_replace_latest_and_rollback_is_one_call() {
        let mut r = Registry::default();
        r.started("img_1", "manual", 0);
        r.finished("img_1", true, Some("c1".into()), Some(0), None, 1);
        r.started("img_2", "cron:1", 2);
        assert!(r.has_reason("cron:1"));
        let f = r.finished("img_2", false, None, None, Some("setup_failed".into()), 3);
        assert_eq!((f.new_latest, r.latest.as_deref()), (None, Some("img_1")));
        r.started("img_3", "manual", 4);
        r.finished("img_3", true, Some("c3".into()), None, None, 5);
        assert_eq!(r.latest.as_deref(), Some("img_3"));
        assert_eq!(r.tags(&r.builds[2]), vec!["latest", "commit:c3", "built:5"]);
        assert!(r.rollback("img_2").is_err());
        r.rollback("img_1").expect("rollback");
        assert_eq!(r.latest.as_deref(), Some("img_1"));
        assert_eq!(cron_slot(61 * 60_000, 30), Some(2));
    }
}

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
    /// The GitHub repository (`owner/name`) this is, when the deployment has a GitHub App:
    /// access follows GitHub's permissions and the clone URL is GitHub's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github: Option<String>,
    #[serde(default)]
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
    /// Review comments on the pull requests Nightshift opened start work only when they
    /// mention the App (by default, every comment of a person with write access does).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub review_mentions_only: bool,
    /// What the repository is (Slack's repository choice reads it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Words that say what it is about (Slack's repository choice reads them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
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
    pub review_mentions_only: Option<bool>,
    pub description: Option<String>,
    pub topics: Option<Vec<String>>,
}

fn invalid(m: impl Into<String>) -> RepoError {
    RepoError::Invalid(m.into())
}

/// A branch name git and GitHub take (`git check-ref-format --branch`'s rules, and at most 200
/// bytes): what a session may continue and push, never an option or a path trick.
pub fn valid_branch_name(name: &str) -> bool {
    let bad_char = |c: char| c.is_control() || " ~^:?*[\\".contains(c);
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with(['-', '/', '.'])
        && !name.ends_with(['/', '.'])
        && !name.ends_with(".lock")
        && !name.contains("..")
        && !name.contains("//")
        && !name.contains("@{")
        && !name.contains("/.")
        && name != "@"
        && !name.chars().any(bad_char)
}

/// A GitHub repository's full name: `owner/name`, each 1–100 of letters, digits, `-`, `_`, `.`
/// (not `.` or `..`).
pub fn valid_github_name(full_name: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 100
            && p != "."
            && p != ".."
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    matches!(full_name.split_once('/'), Some((owner, name)) if part(owner) && part(name))
}

impl Settings {
    /// Checks every field; the name is the repository's id in URLs.
    pub fn validate(&self) -> Result<(), RepoError> {
        if let Some(full_name) = &self.github {
            if !valid_github_name(full_name) {
                return Err(invalid("github: the GitHub repository as owner/name"));
            }
        }
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
        if self.description.len() > 1000 {
            return Err(invalid("description: at most 1000 bytes"));
        }
        if self.topics.len() > 20
            || self
                .topics
                .iter()
                .any(|t| t.trim().is_empty() || t.len() > 50)
        {
            return Err(invalid("topics: at most 20 words of at most 50 bytes"));
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
            if self.github.is_some() && v != self.clone_url {
                return Err(invalid(
                    "clone_url: a GitHub repository is cloned from GitHub; register another name for another remote",
                ));
            }
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
        if let Some(v) = c.review_mentions_only {
            s.review_mentions_only = v;
        }
        if let Some(v) = c.description {
            s.description = v;
        }
        if let Some(v) = c.topics {
            s.topics = v;
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
    /// A build asked for while another ran, whose inputs that one does not have (a push, a
    /// settings change): it starts when the running one ends, so images are never older than
    /// the last push. Several asks while one runs owe one build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owed: Option<String>,
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

    /// Asks for a build of `reason` while one runs: owed when the running build cannot have what
    /// the reason brings (a push, new settings); true when it is now owed.
    pub fn owe(&mut self, reason: &str) -> bool {
        if self.building().is_none() || !matches!(reason, "push" | "settings") {
            return false;
        }
        // A push after a settings change still owes one build: the next one has both.
        if self.owed.is_none() {
            self.owed = Some(reason.to_string());
        }
        true
    }

    /// The owed build's reason, once nothing is building (taken: it is asked for once).
    pub fn take_owed(&mut self) -> Option<String> {
        if self.building().is_some() {
            return None;
        }
        self.owed.take()
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

    #[test]
    fn branch_names_are_what_git_takes() {
        for good in ["main", "feature/x", "nightshift/ses_1", "fix-1.2", "a_b"] {
            assert!(valid_branch_name(good), "{good}");
        }
        for bad in [
            "", "-x", "/x", "x/", ".x", "x.", "x.lock", "a..b", "a//b", "a@{1}", "a b", "a~1",
            "a^", "a:b", "a?", "a*", "a[b", "a\\b", "x/.y", "@", "a\nb",
        ] {
            assert!(!valid_branch_name(bad), "{bad:?}");
        }
        assert!(!valid_branch_name(&"x".repeat(201)));
    }

    #[test]
    fn a_push_while_a_build_runs_owes_one_build_after_it() {
        let mut r = Registry::default();
        // Nothing running: nothing owed, the caller builds now.
        assert!(!r.owe("push"));
        r.started("img_1", "manual", 1);
        // A manual or cron ask during a build is that build; a push or a settings change is not.
        assert!(!r.owe("manual"));
        assert!(!r.owe("cron:5"));
        assert!(r.owe("push"));
        assert!(r.owe("settings"));
        assert!(r.owe("push"));
        assert_eq!(r.owed.as_deref(), Some("push"));
        // Still building: not yet.
        assert_eq!(r.take_owed(), None);
        r.finished("img_1", true, None, None, None, 2);
        assert_eq!(r.take_owed().as_deref(), Some("push"));
        assert_eq!(r.take_owed(), None);
    }

    #[test]
    fn a_registry_stored_before_owed_builds_reads_back() {
        let r: Registry =
            serde_json::from_str(r#"{"builds":[],"latest":"img_1"}"#).expect("older registry");
        assert_eq!(r.owed, None);
        let text = serde_json::to_string(&r).expect("registry");
        assert!(!text.contains("owed"), "{text}");
    }
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
            r#"{"name":"a","clone_url":"u","topics":[" "]}"#,
            r#"{"name":"a","clone_url":"u","topics":["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q","r","s","t","u"]}"#,
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

    #[test]
    fn errors_have_their_http_status() {
        let not_ready = RepoError::ImageNotReady {
            id: "img".into(),
            status: "failed".into(),
        };
        assert_eq!(
            [
                RepoError::Invalid("x".into()).status(),
                RepoError::ImageNotFound("img".into()).status(),
                not_ready.status(),
            ],
            [400, 404, 409]
        );
    }

    /// Each bound is inclusive: the settings are taken exactly at it and refused one past it.
    #[test]
    fn validation_bounds_are_inclusive() {
        let check = |f: &dyn Fn(&mut Settings)| {
            let mut s = settings();
            f(&mut s);
            s.validate().map_err(|e| e.code())
        };
        let ok = Ok(());
        let bad = Err("invalid_repository");
        // The name: 1 to 100 of letters, digits, '-', '_', '.', not starting with '.'.
        assert_eq!(check(&|s| s.name = "a".repeat(100)), ok);
        assert_eq!(check(&|s| s.name = "a".repeat(101)), bad);
        assert_eq!(check(&|s| s.name = "A-z_0.9".into()), ok);
        for name in ["", "a/b", "a b", "é", ".hidden"] {
            assert_eq!(check(&|s| s.name = name.into()), bad, "{name:?}");
        }
        // The clone URL: not blank, at most 2048 bytes.
        assert_eq!(check(&|s| s.clone_url = "u".repeat(2048)), ok);
        assert_eq!(check(&|s| s.clone_url = "u".repeat(2049)), bad);
        // The base branch: 1 to 200 bytes, no leading '-', no "..", no space.
        assert_eq!(check(&|s| s.base_branch = "b".repeat(200)), ok);
        assert_eq!(check(&|s| s.base_branch = "b".repeat(201)), bad);
        assert_eq!(check(&|s| s.base_branch = "feature/x-1".into()), ok);
        for b in ["", "-x", "a..b", "a b"] {
            assert_eq!(check(&|s| s.base_branch = b.into()), bad, "{b:?}");
        }
        // Setup: at most 50 commands; setup and test commands non-blank, at most 4096 bytes.
        assert_eq!(check(&|s| s.setup = vec!["make".into(); 50]), ok);
        assert_eq!(check(&|s| s.setup = vec!["make".into(); 51]), bad);
        assert_eq!(check(&|s| s.setup = vec!["x".repeat(4096)]), ok);
        assert_eq!(check(&|s| s.setup = vec!["x".repeat(4097)]), bad);
        assert_eq!(check(&|s| s.test = Some("cargo test".into())), ok);
        assert_eq!(check(&|s| s.test = Some("x".repeat(4096))), ok);
        assert_eq!(check(&|s| s.test = Some("x".repeat(4097))), bad);
        assert_eq!(check(&|s| s.test = Some(" ".into())), bad);
        // The pool: at most MAX_POOL warm sandboxes.
        assert_eq!(check(&|s| s.pool_size = MAX_POOL), ok);
        assert_eq!(check(&|s| s.pool_size = MAX_POOL + 1), bad);
        // Scheduled builds: at most once a week apart (0: on demand only).
        assert_eq!(check(&|s| s.build_every_min = 0), ok);
        assert_eq!(check(&|s| s.build_every_min = 10_080), ok);
        assert_eq!(check(&|s| s.build_every_min = 10_081), bad);
    }

    #[test]
    fn has_reason_and_building_tell_builds_apart() {
        let mut r = Registry::default();
        assert!(!r.has_reason("manual"));
        assert_eq!(r.building(), None);
        r.started("img_1", "manual", 0);
        r.finished("img_1", true, None, None, None, 1);
        assert!(r.has_reason("manual"));
        assert!(!r.has_reason("cron:7"));
        assert_eq!(r.building(), None, "a ready build is not building");
        r.started("img_2", "cron:7", 2);
        assert!(r.has_reason("cron:7"));
        assert_eq!(r.building().map(|b| b.image.as_str()), Some("img_2"));
    }

    #[test]
    fn finished_takes_only_the_running_build_of_that_image() {
        let mut r = Registry::default();
        r.started("img_1", "manual", 0);
        r.finished("img_1", true, Some("c1".into()), None, None, 1);
        r.started("img_2", "manual", 2);
        // A second answer for an image already finished changes nothing.
        let f = r.finished("img_1", false, None, None, Some("late".into()), 3);
        assert_eq!(f.new_latest, None);
        assert_eq!(
            (r.builds[0].status.as_str(), r.builds[0].error.as_deref()),
            ("ready", None)
        );
        assert_eq!(r.builds[1].status, "building");
        // Nor does one for an unknown image.
        let f = r.finished("img_9", true, None, None, None, 4);
        assert_eq!((f.new_latest, r.latest.as_deref()), (None, Some("img_1")));
        let f = r.finished("img_2", true, None, None, None, 5);
        assert_eq!(f.new_latest.as_deref(), Some("img_2"));
        assert_eq!(r.builds[1].finished_at, Some(5));
    }

    /// The history keeps HISTORY builds; past it the oldest that is neither the latest nor
    /// running goes, and only a ready one is reported for deletion at the provider.
    #[test]
    fn history_is_bounded_and_never_drops_the_latest_or_a_running_build() {
        let mut r = Registry::default();
        // img_0 stays running throughout; img_1 fails; the rest are ready.
        r.started("img_0", "manual", 0);
        r.started("img_1", "manual", 0);
        r.finished("img_1", false, None, None, Some("setup_failed".into()), 0);
        for i in 2..HISTORY {
            let img = format!("img_{i}");
            r.started(&img, "manual", i as u64);
            let f = r.finished(&img, true, None, None, None, i as u64);
            assert_eq!(f.dropped, Vec::<String>::new(), "{img}");
        }
        assert_eq!(r.builds.len(), HISTORY, "exactly HISTORY are all kept");
        // The oldest ready image is made latest again; later builds fail, so it stays latest.
        r.rollback("img_2").expect("rollback");
        // One past the bound: the failed img_1 goes, unreported (the provider kept no image).
        r.started("img_20", "manual", 20);
        let f = r.finished("img_20", false, None, None, None, 20);
        assert_eq!(f.dropped, Vec::<String>::new());
        assert_eq!(r.builds.len(), HISTORY);
        assert!(r.builds.iter().all(|b| b.image != "img_1"));
        // Next: not the running img_0, not the latest img_2, but the ready img_3.
        r.started("img_21", "manual", 21);
        let f = r.finished("img_21", false, None, None, None, 21);
        assert_eq!(f.dropped, vec!["img_3".to_string()]);
        assert_eq!(r.builds.len(), HISTORY);
        assert_eq!(
            (r.builds[0].image.as_str(), r.builds[0].status.as_str()),
            ("img_0", "building"),
            "the running build stays"
        );
        assert_eq!(r.builds[1].image, "img_2", "the latest stays");
        assert_eq!(r.latest.as_deref(), Some("img_2"));
    }

    #[test]
    fn no_cron_slot_without_an_interval() {
        assert_eq!(cron_slot(123_456, 0), None);
        assert_eq!(cron_slot(0, 0), None);
        assert_eq!(cron_slot(59_999, 1), Some(0));
        assert_eq!(cron_slot(60_000, 1), Some(1));
    }
}

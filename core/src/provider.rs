//! The provider contract, version 1 (`docs/provider-contract.md`): every body the control plane sends a compute provider and every object a provider answers, as one set of serde types. The Worker's client (`src/provider.rs`) and the local provider's server (`sandbox/`) both use them; the Modal app's tests check its answers against the same JSON fixtures (`core/tests/fixtures/provider/`).
//!
//! Requests refuse unknown fields (the contract says so); answers ignore them, so a provider
//! may add fields without breaking the control plane. Field names and shapes never change
//! within v1: the fixtures pin them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::gating::SyncState;

// ---- Paths ------------------------------------------------------------------------------

/// `POST` a [`CreateSandbox`] here; `GET` it (with a query) for a [`SandboxList`].
pub const SANDBOXES: &str = "/v1/sandboxes";
/// `POST` a [`BuildImage`] here.
pub const IMAGES: &str = "/v1/images";
/// `GET`: a [`Health`].
pub const HEALTH: &str = "/v1/health";

/// `/v1/sandboxes/{id}`: `GET` answers a [`Sandbox`].
pub fn sandbox_path(id: &str) -> String {
    format!("{SANDBOXES}/{id}")
}

/// `/v1/sandboxes/{id}/{op}`: `start`, `stop`, `terminate`, `assign`, `egress`, `snapshot`,
/// `exec`, `git`, `git/sync`, `logs/{service}`.
pub fn sandbox_op_path(id: &str, op: &str) -> String {
    format!("{SANDBOXES}/{id}/{op}")
}

/// The sandboxes of one session (`?session_id=`).
pub fn sandboxes_of_session(session: &str) -> String {
    format!("{SANDBOXES}?session_id={session}")
}

/// The sandboxes carrying label `key:value` (`?label=`).
pub fn sandboxes_labelled(key: &str, value: &str) -> String {
    format!("{SANDBOXES}?label={key}:{value}")
}

/// `/v1/snapshots/{id}`: `GET` answers a [`Snapshot`], `DELETE` a [`Deleted`].
pub fn snapshot_path(id: &str) -> String {
    format!("/v1/snapshots/{id}")
}

/// `/v1/snapshots/{id}/restore`: `POST` a [`CreateSandbox`] (without `snapshot`).
pub fn restore_path(id: &str) -> String {
    format!("/v1/snapshots/{id}/restore")
}

/// `/v1/images/{id}`: `GET` answers an [`Image`], `DELETE` a [`Deleted`].
pub fn image_path(id: &str) -> String {
    format!("{IMAGES}/{id}")
}

// ---- Shared pieces ----------------------------------------------------------------------

/// Where a sandbox's (or an image's) checkout comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    pub clone_url: String,
    #[serde(default = "main_branch")]
    pub base_branch: String,
    /// Hosts beyond the provider's defaults this repository's sandboxes may reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
    /// A short-lived token for this clone only (a GitHub installation token, contents:read):
    /// the provider hands it to the clone's `git` and nothing else — never into the checkout's
    /// config, a record, an image or a snapshot, and never back in an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

impl Repository {
    /// The repository as it may be kept and shown: without its token.
    pub fn without_token(&self) -> Repository {
        Repository {
            access_token: None,
            ..self.clone()
        }
    }
}

/// The git settings that authenticate one clone or fetch over HTTPS with `token`, as
/// `GIT_CONFIG_*` environment (never written to any git config): `x-access-token:<token>`
/// basic auth, as GitHub takes installation tokens.
pub fn git_auth_env(token: &str) -> Vec<(String, String)> {
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
    vec![
        ("GIT_CONFIG_COUNT".into(), "1".into()),
        ("GIT_CONFIG_KEY_0".into(), "http.extraHeader".into()),
        (
            "GIT_CONFIG_VALUE_0".into(),
            format!("Authorization: Basic {basic}"),
        ),
    ]
}

fn main_branch() -> String {
    "main".into()
}

/// No clone URL: a Sandbox answer that left its repository out (see [`Sandbox`]).
impl Default for Repository {
    fn default() -> Repository {
        Repository {
            clone_url: String::new(),
            base_branch: main_branch(),
            egress: Vec::new(),
            access_token: None,
        }
    }
}

/// Where a sandbox's supervisor dials its session, with the token it presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorSpec {
    pub control_url: String,
    pub sandbox_token: String,
}

/// A stable code and a sentence: why something failed (a refused request, a failed sandbox
/// or image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// The body of every 4xx/5xx answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: ErrorBody,
}

impl ErrorAnswer {
    pub fn new(code: &str, message: impl Into<String>) -> ErrorAnswer {
        ErrorAnswer {
            error: ErrorBody {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

/// How a provider contains its sandboxes (`none`: not at all, and it says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// The local provider: a fresh root and namespaces.
    Bubblewrap,
    /// The local provider with `NIGHTSHIFT_ISOLATION=none`.
    None,
    /// Modal.
    Gvisor,
}

// ---- Sandboxes --------------------------------------------------------------------------

/// `POST /v1/sandboxes` (and `POST /v1/snapshots/{id}/restore`, without `snapshot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// `None` (sent as `null`) for a pooled sandbox: it boots fully and waits for `assign`.
    pub session_id: Option<String>,
    pub repository: Repository,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Extra environment for the supervisor (never a model key).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<SupervisorSpec>,
    /// How long the boot may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The sandbox's lifetime (its `expires_at`); the provider's default and maximum apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Where a sandbox is in its life, as its provider says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    Creating,
    Syncing,
    Ready,
    /// Its processes ended; its disk is kept and `start` boots it again.
    Stopped,
    Terminated,
    /// Ended by a fault; `error` says which.
    Failed,
}

impl SandboxStatus {
    /// Over for good: `terminated` or `failed` (a stopped sandbox can start again).
    pub fn is_over(self) -> bool {
        matches!(self, SandboxStatus::Terminated | SandboxStatus::Failed)
    }

    /// As on the wire (`creating`, `ready`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Creating => "creating",
            SandboxStatus::Syncing => "syncing",
            SandboxStatus::Ready => "ready",
            SandboxStatus::Stopped => "stopped",
            SandboxStatus::Terminated => "terminated",
            SandboxStatus::Failed => "failed",
        }
    }
}

impl std::fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The contract's Sandbox object: the answer of create, restore, get, start, stop, terminate
/// and assign. A provider sends every field (the fixtures pin them), but the control plane
/// reads a Sandbox needing only `id` and `status`: what it does not track, a provider (or a
/// test's fake) may leave out, and it reads as absent (`repository`: no clone URL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    /// `None` while pooled (not yet assigned).
    #[serde(default)]
    pub session_id: Option<String>,
    pub status: SandboxStatus,
    /// Shown without URL credentials.
    #[serde(default)]
    pub repository: Repository,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub created_at: u64,
    #[serde(default)]
    pub ready_at: Option<u64>,
    #[serde(default)]
    pub terminated_at: Option<u64>,
    /// The provider terminates the sandbox at this time (its lifetime); the session snapshots
    /// it before.
    #[serde(default)]
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
    /// How the sandbox is contained. The Modal app reports it in `/v1/health` only, so far:
    /// absent means "see health".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

/// `GET /v1/sandboxes?session_id=&label=k:v`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

/// `POST /v1/sandboxes/{id}/assign`: a pooled, ready sandbox goes to a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assign {
    pub session_id: String,
    pub supervisor: SupervisorSpec,
    /// Labels the sandbox gains now that it is the session's (whose it is, so running ones
    /// are counted); they join its pool labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `POST /v1/sandboxes/{id}/egress`: the session owner's extra hosts (replacing the earlier list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetEgress {
    pub allow: Vec<String>,
}

/// The answer to [`SetEgress`]; `enforced: false` where the provider has no egress control.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressAnswer {
    pub id: String,
    pub allow: Vec<String>,
    pub enforced: bool,
}

/// `POST /v1/sandboxes/{id}/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// The answer to [`Exec`] (each stream cut at the provider's limit, then `truncated`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    pub truncated: bool,
}

/// `GET /v1/sandboxes/{id}/git`: the checkout as the sandbox's supervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitStatus {
    pub sync: SyncState,
    pub branch: Option<String>,
    pub head: Option<String>,
    pub dirty: bool,
}

impl GitStatus {
    /// Before the supervisor has said anything.
    pub fn not_started() -> GitStatus {
        GitStatus {
            sync: SyncState::NotStarted,
            branch: None,
            head: None,
            dirty: false,
        }
    }
}

// ---- Snapshots --------------------------------------------------------------------------

/// `POST /v1/sandboxes/{id}/snapshot` (an empty body is the same as `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeSnapshot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// The contract's Snapshot object: gone (`404 snapshot_not_found`) after `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub sandbox_id: String,
    pub created_at: u64,
    pub expires_at: u64,
}

/// The answer of an idempotent `DELETE` (snapshots, images): the same for an unknown id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub id: String,
    pub deleted: bool,
}

impl Deleted {
    pub fn new(id: &str) -> Deleted {
        Deleted {
            id: id.into(),
            deleted: true,
        }
    }
}

// ---- Images -----------------------------------------------------------------------------

/// `POST /v1/images`: clone, run `setup` in order, run `test` once (recorded, never failing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildImage {
    pub repository: Repository,
    #[serde(default)]
    pub setup: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    Building,
    Ready,
    Failed,
}

impl ImageStatus {
    /// As on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageStatus::Building => "building",
            ImageStatus::Ready => "ready",
            ImageStatus::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ImageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The contract's Image object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub status: ImageStatus,
    pub repository: Repository,
    /// The base branch's commit that was built.
    pub commit: Option<String>,
    pub created_at: u64,
    pub ready_at: Option<u64>,
    pub setup: Vec<String>,
    pub test: Option<String>,
    pub test_exit_code: Option<i32>,
    pub labels: BTreeMap<String, String>,
    pub error: Option<ErrorBody>,
}

// ---- Health -----------------------------------------------------------------------------

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    /// `local` or `modal`.
    pub provider: String,
    pub isolation: Isolation,
    /// The local provider's: how a whole sandbox's process count is limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// `cgroup`, `rlimit` or `none`.
    pub processes: String,
    /// The control-group controllers in use (`pids`, `memory`, `cpu`).
    pub cgroups: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_their_wire_names() {
        for status in [
            SandboxStatus::Creating,
            SandboxStatus::Syncing,
            SandboxStatus::Ready,
            SandboxStatus::Stopped,
            SandboxStatus::Terminated,
            SandboxStatus::Failed,
        ] {
            let json = serde_json::to_string(&status).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
            assert_eq!(
                status.is_over(),
                matches!(status.as_str(), "terminated" | "failed")
            );
        }
        for status in [
            ImageStatus::Building,
            ImageStatus::Ready,
            ImageStatus::Failed,
        ] {
            let json = serde_json::to_string(&status).unwrap_or_default();
            assert_eq!(json, format!("\"{status}\""));
        }
    }

    #[test]
    fn a_request_refuses_unknown_fields_and_an_answer_ignores_them() {
        let create = r#"{"session_id":"ses_1","repository":{"clone_url":"u"},"colour":"red"}"#;
        assert!(serde_json::from_str::<CreateSandbox>(create).is_err());
        let nested = r#"{"session_id":null,"repository":{"clone_url":"u","depth":1}}"#;
        assert!(serde_json::from_str::<CreateSandbox>(nested).is_err());
        let snapshot =
            r#"{"id":"snp_1","sandbox_id":"sbx_1","created_at":1,"expires_at":2,"size":3}"#;
        assert!(serde_json::from_str::<Snapshot>(snapshot).is_ok());
    }

    #[test]
    fn a_sandbox_is_read_from_its_id_and_status_alone() {
        let sparse: Result<Sandbox, _> =
            serde_json::from_str(r#"{"id":"sbx_1","session_id":"ses_1","status":"creating"}"#);
        let sparse = sparse.ok();
        assert_eq!(
            sparse
                .as_ref()
                .map(|s| (s.status, s.expires_at, s.error.is_none())),
            Some((SandboxStatus::Creating, None, true))
        );
        // Written back, it has every field of the contract.
        let written = serde_json::to_value(&sparse).unwrap_or_default();
        assert_eq!(written["expires_at"], serde_json::Value::Null);
        assert_eq!(written["repository"]["base_branch"], "main");
        for missing in [r#"{"id":"sbx_1"}"#, r#"{"status":"ready"}"#] {
            assert!(
                serde_json::from_str::<Sandbox>(missing).is_err(),
                "{missing}"
            );
        }
    }

    #[test]
    fn a_pooled_create_says_null_and_leaves_out_what_it_does_not_set() {
        let pooled = CreateSandbox {
            session_id: None,
            repository: Repository {
                clone_url: "https://github.com/acme/web.git".into(),
                base_branch: "main".into(),
                egress: Vec::new(),
                access_token: None,
            },
            image: None,
            snapshot: None,
            env: BTreeMap::new(),
            supervisor: None,
            timeout_ms: None,
            lifetime_ms: None,
            labels: BTreeMap::new(),
        };
        assert_eq!(
            serde_json::to_value(&pooled).unwrap_or_default(),
            serde_json::json!({"session_id": null, "repository": {"clone_url": "https://github.com/acme/web.git", "base_branch": "main"}})
        );
        // The base branch defaults to `main`.
        let read: Result<CreateSandbox, _> = serde_json::from_str(
            r#"{"repository":{"clone_url":"https://github.com/acme/web.git"}}"#,
        );
        assert_eq!(read.ok(), Some(pooled));
    }

    #[test]
    fn paths_are_the_contracts() {
        assert_eq!(sandbox_path("sbx_1"), "/v1/sandboxes/sbx_1");
        assert_eq!(
            sandbox_op_path("sbx_1", "start"),
            "/v1/sandboxes/sbx_1/start"
        );
        assert_eq!(
            sandboxes_of_session("ses_1"),
            "/v1/sandboxes?session_id=ses_1"
        );
        assert_eq!(
            sandboxes_labelled("pool_key", "k1"),
            "/v1/sandboxes?label=pool_key:k1"
        );
        assert_eq!(snapshot_path("snp_1"), "/v1/snapshots/snp_1");
        assert_eq!(restore_path("snp_1"), "/v1/snapshots/snp_1/restore");
        assert_eq!(image_path("img_1"), "/v1/images/img_1");
    }
}

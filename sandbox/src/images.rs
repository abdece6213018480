//! The local provider's images: build (clone, setup commands, one test run) into a directory that sandboxes start from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nightshift_core::provider::{BuildImage, Deleted};
use tokio::io::AsyncWriteExt;

use crate::procs;
use crate::state::{
    err, local_remote, now_ms, parse, random_hex, redact_url, run_git, signed, sse_lines, valid_id,
    ErrorBody, Image, ImageStatus, LogFile, LogQuery, Refusal, Repository, Shared,
};

/// A build gets this long when its request names no `timeout_ms`.
const DEFAULT_BUILD_TIMEOUT_MS: u64 = 20 * 60 * 1000;
/// At most this many setup commands, each at most this long.
const MAX_COMMANDS: usize = 50;
const MAX_COMMAND_BYTES: usize = 4096;

fn image_dir(p: &Shared, id: &str) -> PathBuf {
    p.cfg.root.join("images").join(id)
}

/// The build log: in the provider's own directory, never inside the image directory that
/// build steps can write.
fn build_log(p: &Shared, id: &str) -> PathBuf {
    p.host_dir(id).join("build.log")
}

fn get(p: &Shared, id: &str) -> Option<Image> {
    p.images.lock().ok()?.get(id).cloned()
}

fn update(p: &Shared, id: &str, f: impl FnOnce(&mut Image)) {
    let changed = p.images.lock().ok().and_then(|mut m| {
        m.get_mut(id).map(|i| {
            f(i);
            i.clone()
        })
    });
    if let Some(image) = changed {
        record(p, &image);
    }
}

/// Writes the image's record in its provider-owned folder (found again after a restart).
pub(crate) fn record(p: &Shared, image: &Image) {
    if let Ok(bytes) = serde_json::to_vec(image) {
        crate::state::write_record(&p.host_dir(&image.id), "image.json", &bytes);
    }
}

/// Images recorded by an earlier run of the provider: ready ones are usable again; a build
/// the restart interrupted is failed (`interrupted`), never left `building`.
pub(crate) fn recover(p: &Shared, records: &[(String, Image)]) {
    for (id, recorded) in records {
        let files_kept = image_dir(p, id).join("repo").exists();
        let (status, error) = match recorded.status {
            ImageStatus::Ready if files_kept => (ImageStatus::Ready, None),
            ImageStatus::Failed => (
                ImageStatus::Failed,
                Some(recorded.error.clone().unwrap_or(ErrorBody {
                    code: "internal".into(),
                    message: String::new(),
                })),
            ),
            _ => (
                ImageStatus::Failed,
                Some(ErrorBody {
                    code: "interrupted".into(),
                    message:
                        "the provider restarted during the build, or its files are gone; build again"
                            .into(),
                }),
            ),
        };
        let image = Image {
            id: id.clone(),
            status,
            error,
            ..recorded.clone()
        };
        record(p, &image);
        if let Ok(mut m) = p.images.lock() {
            m.insert(id.clone(), image);
        }
    }
}

fn not_found(id: &str) -> Refusal {
    Refusal(
        StatusCode::NOT_FOUND,
        "image_not_found",
        format!("no image {id}; it may have been deleted"),
    )
}

/// The directory of a ready image, for a sandbox to start from.
pub(crate) fn ready_dir(p: &Shared, id: &str) -> Result<PathBuf, Refusal> {
    let img = get(p, id).ok_or_else(|| not_found(id))?;
    if img.status != ImageStatus::Ready {
        return Err(Refusal(
            StatusCode::CONFLICT,
            "image_not_ready",
            format!("image {id} is {}; start from a ready image", img.status),
        ));
    }
    Ok(image_dir(p, id))
}

pub(crate) async fn build(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    signed!(p, m, u, h, body);
    let b: BuildImage = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let commands = b.setup.iter().chain(b.test.iter());
    if b.repository.clone_url.is_empty()
        || b.repository.base_branch.is_empty()
        || b.setup.len() > MAX_COMMANDS
        || commands
            .clone()
            .any(|c| c.trim().is_empty() || c.len() > MAX_COMMAND_BYTES)
    {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("a build needs repository.clone_url and base_branch, and at most {MAX_COMMANDS} non-empty commands of at most {MAX_COMMAND_BYTES} bytes"),
        );
    }
    if let Err(r) = p.check_clone(&b.repository).await {
        return r.into_response();
    }
    let id = format!("img_{}", random_hex(12));
    let img = Image {
        id: id.clone(),
        status: ImageStatus::Building,
        repository: Repository {
            clone_url: redact_url(&b.repository.clone_url),
            ..b.repository.without_token()
        },
        commit: None,
        created_at: now_ms(),
        ready_at: None,
        setup: b.setup.clone(),
        test: b.test.clone(),
        test_exit_code: None,
        labels: b.labels.clone(),
        error: None,
    };
    if let Ok(mut map) = p.images.lock() {
        map.insert(id.clone(), img.clone());
    }
    record(&p, &img);
    let p2 = p.clone();
    tokio::spawn(async move {
        let timeout = b.timeout_ms.unwrap_or(DEFAULT_BUILD_TIMEOUT_MS);
        let outcome = run_build(&p2, &id, &b, now_ms() + timeout).await;
        // Nothing a build step started outlives the build.
        p2.cfg.groups.kill_and_remove(&id).await;
        if let Err((code, message)) = outcome {
            let message = p2.scrub(&message);
            eprintln!("provider: image {id} failed: {code}: {message}");
            note(&build_log(&p2, &id), &format!("build failed: {message}")).await;
            update(&p2, &id, |i| {
                i.status = ImageStatus::Failed;
                i.error = Some(ErrorBody {
                    code: code.into(),
                    message,
                });
            });
        }
    });
    (StatusCode::CREATED, Json(img)).into_response()
}

/// Appends a line to the build log.
async fn note(log: &Path, line: &str) {
    if let Ok(f) = procs::open_log(log) {
        let mut f = tokio::fs::File::from_std(f);
        let _ = f.write_all(format!("{line}\n").as_bytes()).await;
    }
}

type BuildError = (&'static str, String);

async fn run_build(p: &Shared, id: &str, b: &BuildImage, deadline: u64) -> Result<(), BuildError> {
    let dir = image_dir(p, id);
    let log = build_log(p, id);
    let internal = |e: std::io::Error| ("internal", format!("cannot create the image: {e}"));
    tokio::fs::create_dir_all(dir.join("home"))
        .await
        .map_err(internal)?;
    tokio::fs::create_dir_all(p.host_dir(id))
        .await
        .map_err(internal)?;
    let url = &b.repository.clone_url;
    let shown = redact_url(url);
    let branch = &b.repository.base_branch;
    note(&log, &format!("$ git clone --branch {branch} {shown}")).await;
    let is_path = url.starts_with('/') || url.starts_with("file://");
    if is_path && local_remote(url).is_none() {
        return Err((
            "repository_not_found",
            format!("the repository {shown} does not exist"),
        ));
    }
    // The clone and the build steps get the repository's egress policy through a proxy of
    // their own; the clone runs inside the build's sandbox, never on the host.
    let run = p.host_dir(id).join("run");
    let _egress = if p.own_network() {
        let egress = crate::egress::Egress::new(
            id,
            p.policy_for(&b.repository, &[]),
            None,
            None,
            p.cfg.dev_mode,
        );
        Some(crate::egress::start(run.clone(), egress).map_err(internal)?)
    } else {
        None
    };
    let net = _egress.as_ref().map(|r| r.dir.as_path());
    let extra: Vec<PathBuf> = local_remote(url).into_iter().collect();
    let repo = dir.join("repo");
    p.clone_inside(
        &dir,
        &extra,
        url,
        branch,
        &repo,
        net,
        b.repository.access_token.as_deref(),
    )
    .await
    .map_err(|e| {
        let why = p.scrub(&e);
        (
            "clone_failed",
            format!("git clone of {shown} failed: {why}"),
        )
    })?;
    let commit = run_git(&["rev-parse", "HEAD"], Some(&repo)).await.ok();
    note(&log, &format!("at {}", commit.as_deref().unwrap_or("?"))).await;
    update(p, id, |i| i.commit = commit);
    for cmd in &b.setup {
        let code = run_step(p, &dir, &log, cmd, deadline, net).await?;
        if code != 0 {
            return Err((
                "setup_failed",
                format!("the setup command `{cmd}` exited with {code}; see the build log"),
            ));
        }
    }
    if let Some(test) = &b.test {
        let code = run_step(p, &dir, &log, test, deadline, net).await?;
        note(
            &log,
            &format!("tests exited with {code} (recorded; the image is kept)"),
        )
        .await;
        update(p, id, |i| i.test_exit_code = Some(code));
    }
    note(&log, "image ready").await;
    update(p, id, |i| {
        i.status = ImageStatus::Ready;
        i.ready_at = Some(now_ms());
    });
    Ok(())
}

/// Runs one command with `sh -c` in the checkout, isolated like a sandbox, output to the build log.
async fn run_step(
    p: &Shared,
    dir: &Path,
    log_path: &Path,
    cmd: &str,
    deadline: u64,
    net: Option<&Path>,
) -> Result<i32, BuildError> {
    note(log_path, &format!("$ {cmd}")).await;
    let cannot_log = |e: std::io::Error| ("internal", format!("cannot open the build log: {e}"));
    let log = procs::open_log(log_path).map_err(cannot_log)?;
    let log2 = log.try_clone().map_err(cannot_log)?;
    let argv = vec!["sh".to_string(), "-c".to_string(), cmd.to_string()];
    // No secrets: only PATH (added by isolate) and HOME.
    let env: BTreeMap<String, String> = [(
        "HOME".to_string(),
        dir.join("home").to_string_lossy().to_string(),
    )]
    .into_iter()
    .collect();
    let (argv, net) = match net {
        Some(run) => (p.through_egress(&argv), Some(run)),
        None => (argv, None),
    };
    let mut c = p.isolate(dir, &[], &argv, &env, &dir.join("repo"), net);
    c.stdin(Stdio::null()).stdout(log).stderr(log2);
    let mut child = c
        .spawn()
        .map_err(|e| ("internal", format!("cannot run `{cmd}`: {e}")))?;
    let pgid = child.id().map(|x| x as i32);
    let left = deadline.saturating_sub(now_ms());
    match tokio::time::timeout(Duration::from_millis(left), child.wait()).await {
        Ok(Ok(status)) => Ok(status.code().unwrap_or(-1)),
        Ok(Err(e)) => Err(("internal", format!("`{cmd}` could not be waited for: {e}"))),
        Err(_) => {
            if let Some(g) = pgid {
                procs::kill_tree(g);
                procs::kill_group(g);
            }
            let _ = child.kill().await;
            Err((
                "timeout",
                format!("the build ran past its time limit during `{cmd}`"),
            ))
        }
    }
}

pub(crate) async fn get_one(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    match get(&p, &id) {
        Some(i) => Json(i).into_response(),
        None => not_found(&id).into_response(),
    }
}

pub(crate) async fn delete(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    let removed = p.images.lock().ok().and_then(|mut m| m.remove(&id));
    if removed.is_some() && valid_id(&id, "img_") {
        let _ = tokio::fs::remove_dir_all(image_dir(&p, &id)).await;
        let _ = tokio::fs::remove_dir_all(p.host_dir(&id)).await;
    }
    Json(Deleted::new(&id)).into_response()
}

pub(crate) async fn logs(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
    q: Query<LogQuery>,
) -> Response {
    signed!(p, m, u, h, []);
    if get(&p, &id).is_none() {
        return not_found(&id).into_response();
    }
    let follow = q.follow.as_deref().is_some_and(|f| f == "1" || f == "true");
    let p2 = p.clone();
    sse_lines(LogFile::Owned(build_log(&p, &id)), follow, move || {
        get(&p2, &id).is_some_and(|i| i.status == ImageStatus::Building)
    })
}

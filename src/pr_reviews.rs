//! Review comments as work, on the installation index's side: who may trigger (the author's role asked of GitHub), the 👀 at once, a review's comments gathered into one batch, and the batch fired as one prompt of the reviewer's into the pull request's own session.

use nightshift_core::events::PrCommentNote;
use nightshift_core::github::{Access, Role};
use nightshift_core::ids::Identity;
use nightshift_core::pr_review::{
    self as review, BatchKey, ComposedPrompt, IssueComment, PrSubject, ReplyKind, Review,
    ReviewBatches, ReviewComment, ReviewMode, ReviewRound, ReviewWebhook, TriggerPolicy,
    ACK_REACTION,
};
use worker::{console_error, Env};

use crate::config::{self, Github};
use crate::error::{ApiResult, EdgeError};
use crate::github::{self, GithubError};
use crate::http::{ask, session_stub};
use crate::objects::{encode, ReviewPromptAnswer, ReviewPromptAsk, SessionRoute};

/// The webhook events that carry review comments.
pub const EVENTS: [&str; 3] = [
    "pull_request_review_comment",
    "pull_request_review",
    "issue_comment",
];

/// A comment's text as the session log shows it (the prompt fences the whole of it).
const NOTE_BYTES: usize = 1024;

/// What a review delivery did (its stored outcome).
pub enum Handled {
    /// Nothing to do, with the reason's stable code.
    Skipped(&'static str),
    /// A comment joined its review's batch; the batches changed.
    Batched,
    /// Batches to fire now (a submitted review), the review itself when one was submitted.
    Fire(BatchKey, Option<Box<Review>>),
    /// A conversation comment: a prompt now.
    Conversation(Box<IssueComment>),
}

/// Where a pull request's work goes: its session, if Nightshift has one for it.
pub struct PullContext {
    pub full_name: String,
    pub session: Option<String>,
    /// The repository asks for a mention even on Nightshift's pull requests.
    pub mentions_only: bool,
}

/// Decides what a verified, de-duplicated review delivery does. Bots, the App itself, edits
/// and people below write access never start work; the 👀 goes on at once when one does.
pub async fn handle(
    env: &Env,
    pull: &PullContext,
    webhook: &ReviewWebhook,
    batches: &mut ReviewBatches,
    token: &str,
    now_ms: u64,
) -> ApiResult<Handled> {
    let cfg = config::github(env).ok_or(EdgeError::GithubNotConfigured)?;
    let policy = TriggerPolicy {
        app_slug: &cfg.slug,
        nightshift_pr: pull.session.is_some(),
        mode: if pull.mentions_only {
            ReviewMode::MentionOnly
        } else {
            ReviewMode::Every
        },
    };
    let key = batch_key(pull, webhook);
    if let Err(skip) = review::precheck(webhook, &policy) {
        return Ok(skipped(batches, key, webhook, skip.code(), now_ms));
    }
    let login = webhook.author().login.clone();
    let role = match github::collaborator_role(&cfg, token, &pull.full_name, &login).await {
        Ok(role) => role,
        Err(GithubError::NoAccess(_)) => Role::None,
        Err(e) => return Err(e.edge().into()),
    };
    if let Err(skip) = review::may_trigger(webhook, &policy, role) {
        return Ok(skipped(batches, key, webhook, skip.code(), now_ms));
    }
    acknowledge(&cfg, token, &pull.full_name, webhook).await;
    Ok(match webhook {
        ReviewWebhook::Comment(event) => {
            let Some(key) = key else {
                return Ok(Handled::Skipped("ignored"));
            };
            batches.comment(key, event.comment.id, &login, now_ms);
            Handled::Batched
        }
        ReviewWebhook::Review(event) => {
            let Some(key) = key else {
                return Ok(Handled::Skipped("ignored"));
            };
            batches.submitted(key.clone(), true, &login, now_ms);
            Handled::Fire(key, Some(Box::new(event.review.clone())))
        }
        ReviewWebhook::Conversation(event) => {
            Handled::Conversation(Box::new(event.comment.clone()))
        }
    })
}

/// A delivery that starts nothing; a review submitted without triggering still fires the
/// comments of it that did.
fn skipped(
    batches: &mut ReviewBatches,
    key: Option<BatchKey>,
    webhook: &ReviewWebhook,
    code: &'static str,
    now_ms: u64,
) -> Handled {
    if let (ReviewWebhook::Review(event), Some(key)) = (webhook, key) {
        if event.action == "submitted"
            && batches.submitted(key.clone(), false, &event.review.user.login, now_ms)
        {
            return Handled::Fire(key, None);
        }
    }
    Handled::Skipped(code)
}

fn batch_key(pull: &PullContext, webhook: &ReviewWebhook) -> Option<BatchKey> {
    match webhook {
        ReviewWebhook::Comment(event) => Some(BatchKey::of_comment(
            &pull.full_name,
            event.pull_request.number,
            &event.comment,
        )),
        ReviewWebhook::Review(event) => Some(BatchKey {
            repository: pull.full_name.clone(),
            number: event.pull_request.number,
            review_id: event.review.id,
        }),
        ReviewWebhook::Conversation(_) => None,
    }
}

/// The 👀 on the comment (a review itself has no reactions); a failure is only logged.
async fn acknowledge(cfg: &Github, token: &str, full_name: &str, webhook: &ReviewWebhook) {
    let target = match webhook {
        ReviewWebhook::Comment(event) => Some((true, event.comment.id)),
        ReviewWebhook::Conversation(event) => Some((false, event.comment.id)),
        ReviewWebhook::Review(_) => None,
    };
    if let Some((on_review_comment, id)) = target {
        if let Err(e) =
            github::react(cfg, token, full_name, on_review_comment, id, ACK_REACTION).await
        {
            console_error!("👀 on {full_name} comment {id}: {}", e.edge());
        }
    }
}

/// Fires a review's batch: its comments read back from GitHub, one bounded prompt of the
/// reviewer's into the pull request's session.
pub async fn fire_review(
    env: &Env,
    key: &BatchKey,
    comment_ids: &[u64],
    author: &str,
    submitted: Option<&Review>,
    token: &str,
) -> ApiResult<Option<Prepared>> {
    let cfg = config::github(env).ok_or(EdgeError::GithubNotConfigured)?;
    let pr = match github::pull(&cfg, token, &key.repository, key.number).await {
        Ok(pr) => pr,
        // Gone (or never there): nothing to answer.
        Err(GithubError::NoAccess(_)) => return Ok(None),
        Err(e) => return Err(e.edge().into()),
    };
    let mut comments =
        github::review_comments(&cfg, token, &key.repository, key.number, key.review_id)
            .await
            .map_err(|e| e.edge())?;
    // Only the comments that triggered (a reviewer's edits and a bot's replies are not asks).
    comments.retain(|c| comment_ids.contains(&c.id));
    if comments.is_empty()
        && submitted.is_none_or(|r| r.body.as_deref().unwrap_or("").trim().is_empty())
    {
        return Ok(None);
    }
    let subject = PrSubject::from_pull(&key.repository, &pr);
    let composed = review::review_prompt(&subject, &comments, submitted);
    let included: Vec<&ReviewComment> = comments
        .iter()
        .filter(|c| composed.included.contains(&c.id))
        .collect();
    let mut roots: Vec<u64> = included.iter().map(|c| review::thread_root(c)).collect();
    roots.dedup();
    let notes = included.iter().map(|c| note_of_review_comment(c)).collect();
    let round = ReviewRound {
        prompt: String::new(),
        repository: key.repository.clone(),
        number: key.number,
        kind: ReplyKind::Thread,
        round: key.review_id,
        roots,
        fork: fork_of(&pr),
        answered: false,
        commit: None,
    };
    let ask = prompt_ask(
        author,
        composed,
        round,
        notes,
        format!("review-{}", key.review_id),
    );
    Ok(Some(Prepared { ask, pr }))
}

/// A prompt ready for the pull request's session, and the pull request as GitHub has it now.
pub struct Prepared {
    pub ask: ReviewPromptAsk,
    pub pr: nightshift_core::github::Pull,
}

/// Fires a conversation comment on the pull request as one prompt of its author's.
pub async fn fire_conversation(
    env: &Env,
    pull: &PullContext,
    number: u64,
    comment: &IssueComment,
    token: &str,
) -> ApiResult<Option<Prepared>> {
    let cfg = config::github(env).ok_or(EdgeError::GithubNotConfigured)?;
    let pr = match github::pull(&cfg, token, &pull.full_name, number).await {
        Ok(pr) => pr,
        Err(GithubError::NoAccess(_)) => return Ok(None),
        Err(e) => return Err(e.edge().into()),
    };
    let subject = PrSubject::from_pull(&pull.full_name, &pr);
    let composed = review::conversation_prompt(&subject, comment);
    let note = PrCommentNote {
        id: comment.id,
        root: comment.id,
        author: comment.user.login.clone(),
        path: None,
        lines: None,
        body: cut(&comment.body, NOTE_BYTES),
        url: comment.html_url.clone(),
    };
    let round = ReviewRound {
        prompt: String::new(),
        repository: pull.full_name.clone(),
        number,
        kind: ReplyKind::Conversation,
        round: comment.id,
        roots: vec![comment.id],
        fork: fork_of(&pr),
        answered: false,
        commit: None,
    };
    let ask = prompt_ask(
        &comment.user.login,
        composed,
        round,
        vec![note],
        format!("comment-{}", comment.id),
    );
    Ok(Some(Prepared { ask, pr }))
}

fn prompt_ask(
    login: &str,
    composed: ComposedPrompt,
    round: ReviewRound,
    comments: Vec<PrCommentNote>,
    key: String,
) -> ReviewPromptAsk {
    ReviewPromptAsk {
        author: reviewer(login),
        text: composed.text,
        key,
        round,
        comments,
        omitted: composed.omitted,
    }
}

/// The reviewer as Nightshift knows them: their GitHub login is their user name (a person
/// who signed in with GitHub is that same person).
fn reviewer(login: &str) -> Identity {
    let user = nightshift_core::signin::user_for_github_login(login)
        .unwrap_or_else(|| format!("github-{}", login.to_ascii_lowercase()));
    Identity {
        user,
        name: login.to_string(),
        email: None,
    }
}

fn fork_of(pr: &nightshift_core::github::Pull) -> Option<String> {
    if !pr.is_fork() {
        return None;
    }
    let head = pr.head.repo.as_ref().map(|r| r.full_name.clone());
    Some(head.unwrap_or_else(|| "a deleted fork".to_string()))
}

fn note_of_review_comment(comment: &ReviewComment) -> PrCommentNote {
    PrCommentNote {
        id: comment.id,
        root: review::thread_root(comment),
        author: comment.user.login.clone(),
        path: Some(comment.path.clone()),
        lines: Some(review::line_range(comment)),
        body: cut(&comment.body, NOTE_BYTES),
        url: comment.html_url.clone(),
    }
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Hands the prompt to session `session`.
pub async fn deliver(env: &Env, session: &str, ask: &ReviewPromptAsk) -> ApiResult<&'static str> {
    let stub = session_stub(env, session)?;
    let answer: ReviewPromptAnswer = ask_session(&stub, encode(ask)?).await?;
    Ok(if answer.new {
        "prompted"
    } else {
        "already_prompted"
    })
}

async fn ask_session(stub: &worker::Stub, body: Vec<u8>) -> ApiResult<ReviewPromptAnswer> {
    ask(stub, SessionRoute::ReviewPrompt, Some(body)).await
}

/// Starts session `id` for a pull request Nightshift has none for, owned by the person whose
/// comment asked: on the pull request's head branch (pushes go there), showing the pull
/// request. Answers when it exists (a retried start finds it made).
pub async fn start_session(
    env: &Env,
    id: &str,
    name: &str,
    full_name: &str,
    author: &Identity,
    pr: &nightshift_core::github::Pull,
) -> ApiResult<()> {
    let title = cut(&format!("PR #{}: {}", pr.number, pr.title.trim()), 190);
    let body = nightshift_core::wire::CreateSession {
        title: title.clone(),
        repository: Some(name.to_string()),
        model: None,
    };
    let bytes = serde_json::to_vec(&body).map_err(crate::error::ApiError::internal)?;
    let (status, text) =
        crate::sessions::open(env, author, id, bytes, title, Some(name.to_string())).await?;
    if status != 201 && !text.contains("session_exists") {
        return Err(crate::error::ApiError::internal(format!(
            "starting the pull request's session: {status} {text}"
        )));
    }
    let stub = session_stub(env, id)?;
    // A fork's branch is read here as the base repository's `pull/N/head` and never pushed.
    let branch = crate::objects::ContinueBranch {
        branch: if pr.is_fork() {
            format!("pull/{}/head", pr.number)
        } else {
            pr.head.git_ref.clone()
        },
    };
    ask::<crate::objects::OkAnswer>(&stub, SessionRoute::ContinueBranch, Some(encode(&branch)?))
        .await?;
    let update = crate::objects::PullUpdate {
        repository: full_name.to_string(),
        pull: pr.clone(),
    };
    ask::<crate::objects::OkAnswer>(&stub, SessionRoute::PullRequest, Some(encode(&update)?))
        .await?;
    Ok(())
}

/// The token the control plane reads and answers review comments with.
pub const ACCESS: Access = Access::Discussion;

/// The body of `POST /pr-session`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrSessionBody {
    /// `owner/name` on GitHub.
    pub repository: String,
    pub number: u64,
}

/// The answer of `/pr-session`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrSessionView {
    pub repository: String,
    pub number: u64,
    pub session: String,
    /// True when this call started it.
    pub started: bool,
}

fn pr_ref(repository: &str, number: u64) -> ApiResult<(String, u64)> {
    let full_name = repository.trim().to_ascii_lowercase();
    if !nightshift_core::repository::valid_github_name(&full_name) {
        return Err(EdgeError::InvalidInput("repository: `owner/name` on GitHub").into());
    }
    if number == 0 {
        return Err(EdgeError::InvalidInput("number: a pull request's number").into());
    }
    Ok((full_name, number))
}

async fn ask_index(
    env: &Env,
    ask: &crate::objects::PrSessionAsk,
) -> ApiResult<crate::objects::PrSessionAnswer> {
    let stub = crate::http::installation_index(env)?;
    crate::http::ask(
        &stub,
        crate::objects::InstallationRoute::PrSession,
        Some(encode(ask)?),
    )
    .await
}

/// `GET /pr-session?repository=owner/name&number=N`: the pull request's session (GitHub read
/// on the repository; 404 `pr_session_not_found` when it has none).
pub async fn get(req: &worker::Request, env: &Env) -> ApiResult<worker::Response> {
    let who = crate::auth::authenticate(req, env).await?;
    config::github(env).ok_or(EdgeError::GithubNotConfigured)?;
    let url = req.url().map_err(crate::error::ApiError::internal)?;
    let query = |k: &str| {
        url.query_pairs()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.into_owned())
    };
    let number = query("number").and_then(|n| n.parse().ok()).unwrap_or(0);
    let (full_name, number) = pr_ref(&query("repository").unwrap_or_default(), number)?;
    crate::access::require(
        env,
        &who,
        &full_name,
        nightshift_core::github::RepositoryAction::Read,
        false,
    )
    .await?;
    let ask = crate::objects::PrSessionAsk {
        repository: full_name.clone(),
        number,
        start: None,
    };
    let Some(session) = ask_index(env, &ask).await?.session else {
        return Err(EdgeError::PrSessionNotFound.into());
    };
    crate::error::json_of(
        200,
        &PrSessionView {
            repository: full_name,
            number,
            session,
            started: false,
        },
    )
}

/// `POST /pr-session {repository, number}`: the pull request's session, started by the caller
/// on its branch when it has none (GitHub write on the repository: its work is pushed there).
pub async fn post(req: &mut worker::Request, env: &Env) -> ApiResult<worker::Response> {
    let who = crate::auth::authenticate(req, env).await?;
    config::github(env).ok_or(EdgeError::GithubNotConfigured)?;
    let body: PrSessionBody = crate::http::read_body(req).await?;
    let (full_name, number) = pr_ref(&body.repository, body.number)?;
    crate::access::require(
        env,
        &who,
        &full_name,
        nightshift_core::github::RepositoryAction::Push,
        true,
    )
    .await?;
    let ask = crate::objects::PrSessionAsk {
        repository: full_name.clone(),
        number,
        start: Some(who),
    };
    let answer = ask_index(env, &ask).await?;
    let Some(session) = answer.session else {
        return Err(EdgeError::RepositoryNotRegistered.into());
    };
    crate::error::json_of(
        if answer.started { 201 } else { 200 },
        &PrSessionView {
            repository: full_name,
            number,
            session,
            started: answer.started,
        },
    )
}

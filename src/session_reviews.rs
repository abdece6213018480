//! A session's review rounds: review comments become one prompt of the reviewer's, and once that prompt ends each thread gets its answer, posted from an outbox that never posts a reply twice.

use nightshift_core::events::{Event, EventKind, PrReplyNote, ReviewNote};
use nightshift_core::github::Access;
use nightshift_core::hosted::{Command, Done, Effect};
use nightshift_core::pr_review::{OutboxEntry, ReplyKind, SessionReviews};
use nightshift_core::session::{PromptSubmission, Submitted};
use nightshift_core::store::Kv;
use worker::console_error;

use super::{system, SessionObject};
use crate::config;
use crate::error::ApiResult;
use crate::github::{self, GithubError};
use crate::objects::{ReviewPromptAnswer, ReviewPromptAsk};
use crate::platform::{new_id, now_ms};
use crate::store;

/// A reply GitHub did not take is posted again after this long.
const REPLY_RETRY_MS: u64 = 30_000;

/// How far back the log is read for the agent's last words of a prompt.
const SUMMARY_EVENTS: u64 = 500;

impl SessionObject {
    pub(super) fn reviews(&self) -> ApiResult<SessionReviews> {
        Ok(store::kv_get(&self.sql(), Kv::Reviews)?.unwrap_or_default())
    }

    fn save_reviews(&self, reviews: &SessionReviews) -> ApiResult<()> {
        store::kv_put(&self.sql(), Kv::Reviews, reviews)
    }

    /// Review comments as one prompt of the reviewer's: they join the session (the index
    /// checked they have write access), the prompt is queued under the review's key (a review
    /// fired twice is one prompt), and the log says which comments it answers.
    pub(super) async fn review_prompt(
        &self,
        ask: ReviewPromptAsk,
    ) -> ApiResult<ReviewPromptAnswer> {
        self.require_loaded()?;
        let invite = self.read(|h, _| h.session.meta.invite.clone())?;
        self.run(&ask.author, Command::Join { invite }).await?;
        // The round is recorded before the prompt can run, under the id it will get if new.
        let proposed = new_id("prm");
        let mut round = ask.round.clone();
        round.prompt = proposed.clone();
        let mut reviews = self.reviews()?;
        reviews.add(round);
        self.save_reviews(&reviews)?;
        let submission = PromptSubmission {
            id: proposed.clone(),
            text: ask.text,
            priority: 0,
            model: None,
            key: Some(ask.key),
        };
        let submitted = self.run(&ask.author, Command::Submit(submission)).await;
        let (prompt, new) = match submitted {
            Ok((Done::Submitted(Submitted::Queued(id)), _)) => (id, true),
            Ok((Done::Submitted(Submitted::Existing(id)), _)) => (id, false),
            Ok(_) => (proposed.clone(), false),
            Err(e) => {
                self.forget_round(&proposed)?;
                return Err(e);
            }
        };
        if !new {
            self.forget_round(&proposed)?;
            return Ok(ReviewPromptAnswer { prompt, new });
        }
        let note = ReviewNote::Received {
            repository: ask.round.repository,
            number: ask.round.number,
            prompt: prompt.clone(),
            comments: ask.comments,
            omitted: ask.omitted,
        };
        self.run(&system(), Command::PullRequestReview(note))
            .await?;
        Ok(ReviewPromptAnswer { prompt, new })
    }

    fn forget_round(&self, prompt: &str) -> ApiResult<()> {
        let mut reviews = self.reviews()?;
        reviews.rounds.retain(|r| r.prompt != prompt);
        self.save_reviews(&reviews)
    }

    /// Stored events: a review prompt that finished owes its threads their answers (posted
    /// once the effects are carried out). True when replies are owed.
    pub(super) fn review_prompts_finished(&self, events: &[Event]) -> ApiResult<bool> {
        let mut reviews = self.reviews()?;
        if reviews.rounds.iter().all(|r| r.answered) {
            return Ok(false);
        }
        let mut owed = false;
        for event in events {
            let EventKind::PromptFinished {
                id,
                ok,
                reason,
                commit,
                patch,
                ..
            } = &event.kind
            else {
                continue;
            };
            if !reviews
                .rounds
                .iter()
                .any(|r| r.prompt == *id && !r.answered)
            {
                continue;
            }
            let summary = self.last_words(id, event.seq)?;
            owed |= reviews
                .finished(
                    id,
                    *ok,
                    commit.as_deref(),
                    patch.as_deref(),
                    &summary,
                    reason.as_deref(),
                )
                .is_some();
        }
        if owed {
            self.save_reviews(&reviews)?;
        }
        Ok(owed)
    }

    /// What the agent said in its last step of `prompt` (the log read back a little way).
    fn last_words(&self, prompt: &str, upto: u64) -> ApiResult<String> {
        let since = upto.saturating_sub(SUMMARY_EVENTS);
        let limit = u32::try_from(SUMMARY_EVENTS).unwrap_or(500);
        let mut current = String::new();
        let mut last = String::new();
        for body in store::events_after(&self.sql(), since, limit)? {
            let Ok(event) = serde_json::from_str::<Event>(&body) else {
                continue;
            };
            match event.kind {
                EventKind::AgentText { prompt: p, text } if p == prompt => current.push_str(&text),
                EventKind::AgentStep { prompt: p, .. } | EventKind::AgentTool { prompt: p, .. }
                    if p == prompt && !current.trim().is_empty() =>
                {
                    last = std::mem::take(&mut current);
                }
                _ => {}
            }
        }
        Ok(if current.trim().is_empty() {
            last
        } else {
            current
        }
        .trim()
        .to_string())
    }

    /// Posts every reply still owed, with the App's discussion token; a round whose last reply
    /// went out is logged as addressed. A reply GitHub did not take is tried again later; one
    /// it can never take (the thread is gone) is given up, and said so in the log. Answers the
    /// effects of logging it.
    pub(super) async fn post_replies(&self) -> ApiResult<Vec<Effect>> {
        let mut effects = Vec::new();
        let pending = self.reviews()?.pending();
        if pending.is_empty() {
            return Ok(effects);
        }
        let Some(cfg) = config::github(&self.env) else {
            return Ok(effects);
        };
        let mut retry = false;
        for entry in pending {
            match self.post_reply(&cfg, &entry).await {
                Ok(()) => {}
                Err(PostError::Later(why)) => {
                    console_error!("reply to {} #{}: {why}", entry.repository, entry.key.root);
                    retry = true;
                    continue;
                }
                Err(PostError::Never(why)) => {
                    console_error!(
                        "reply to {} #{} given up: {why}",
                        entry.repository,
                        entry.key.root
                    );
                }
            }
            let mut reviews = self.reviews()?;
            let done = reviews.posted(&entry.key);
            self.save_reviews(&reviews)?;
            if let Some((round, entries)) = done {
                let note = ReviewNote::Addressed {
                    repository: round.repository,
                    number: round.number,
                    prompt: round.prompt,
                    commit: round.commit,
                    replies: entries
                        .into_iter()
                        .map(|e| PrReplyNote {
                            root: e.key.root,
                            body: e.body,
                        })
                        .collect(),
                };
                let command = Command::PullRequestReview(note);
                let (_, more) =
                    self.decide(|h, now, tokens| h.run(&system(), command, now, tokens))??;
                effects.extend(more);
            }
        }
        let mut reviews = self.reviews()?;
        reviews.retry_at = retry.then(|| now_ms() + REPLY_RETRY_MS);
        self.save_reviews(&reviews)?;
        Ok(effects)
    }

    async fn post_reply(&self, cfg: &config::Github, entry: &OutboxEntry) -> Result<(), PostError> {
        let token =
            crate::repository_tokens::for_github(&self.env, &entry.repository, Access::Discussion)
                .await
                .map_err(|e| PostError::Later(e.message))?;
        let posted = match entry.key.kind {
            ReplyKind::Thread => {
                github::reply_in_thread(
                    cfg,
                    &token.token,
                    &entry.repository,
                    entry.number,
                    entry.key.root,
                    &entry.body,
                )
                .await
            }
            ReplyKind::Conversation => {
                github::comment_on_pull(
                    cfg,
                    &token.token,
                    &entry.repository,
                    entry.number,
                    &entry.body,
                )
                .await
            }
        };
        match posted {
            Ok(()) => Ok(()),
            Err(e @ (GithubError::NoAccess(_) | GithubError::Unprocessable(_))) => {
                Err(PostError::Never(e.edge().to_string()))
            }
            Err(e) => Err(PostError::Later(e.edge().to_string())),
        }
    }
}

/// Why a reply was not posted.
enum PostError {
    /// GitHub could not be asked, or failed: try again.
    Later(String),
    /// GitHub will never take it (the thread or the access is gone).
    Never(String),
}

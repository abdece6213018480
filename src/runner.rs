//! The "run" step of the prompt queue, behind a trait: what happens when a prompt becomes running.
//!
//! Compute (sandboxes running OpenCode) arrives with the agent issue; until then two runners exist:
//! `none` leaves running prompts waiting for compute, and `echo` is a clearly-labelled local
//! stand-in that answers each prompt after a fixed delay, so the queue can be driven end to end.
//! Runner jobs are stored in SQLite and driven by the object's alarm, so they survive eviction.

use worker::SqlStorage;

use crate::error::ApiResult;
use crate::store;

pub trait PromptRunner {
    /// A prompt became running.
    fn start(&self, sql: &SqlStorage, prompt: &str, now: u64) -> ApiResult<()>;
    /// A running prompt was stopped.
    fn abort(&self, sql: &SqlStorage, prompt: &str) -> ApiResult<()>;
    /// Scheduled completions (prompt, due time).
    fn jobs(&self, sql: &SqlStorage) -> ApiResult<Vec<(String, u64)>>;
    /// The agent's answer to a finished prompt.
    fn reply(&self, text: &str) -> String;

    fn next_due(&self, sql: &SqlStorage) -> ApiResult<Option<u64>> {
        Ok(self.jobs(sql)?.into_iter().map(|(_, due)| due).min())
    }
}

/// Leaves running prompts for compute to pick up.
pub struct NoRunner;

impl PromptRunner for NoRunner {
    fn start(&self, _: &SqlStorage, _: &str, _: u64) -> ApiResult<()> {
        Ok(())
    }
    fn abort(&self, _: &SqlStorage, _: &str) -> ApiResult<()> {
        Ok(())
    }
    fn jobs(&self, _: &SqlStorage) -> ApiResult<Vec<(String, u64)>> {
        Ok(Vec::new())
    }
    fn reply(&self, _: &str) -> String {
        String::new()
    }
}

/// Local stand-in: finishes each prompt `run_ms` after it starts, echoing it.
pub struct EchoRunner {
    pub run_ms: u64,
}

impl PromptRunner for EchoRunner {
    fn start(&self, sql: &SqlStorage, prompt: &str, now: u64) -> ApiResult<()> {
        store::runner_schedule(sql, prompt, now + self.run_ms)
    }
    fn abort(&self, sql: &SqlStorage, prompt: &str) -> ApiResult<()> {
        store::runner_cancel(sql, prompt)
    }
    fn jobs(&self, sql: &SqlStorage) -> ApiResult<Vec<(String, u64)>> {
        store::runner_jobs(sql)
    }
    fn reply(&self, text: &str) -> String {
        format!("echo: {text}")
    }
}

pub fn from_config(name: &str, echo_run_ms: u64) -> Box<dyn PromptRunner> {
    match name {
        "echo" => Box::new(EchoRunner {
            run_ms: echo_run_ms,
        }),
        _ => Box::new(NoRunner),
    }
}

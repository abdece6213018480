//! The UserIndex Durable Object: one per person — the sessions they own or joined, their sign-ins (which sign-out ends), their GitHub identity with its sealed tokens (refreshed once at a time), their repository permissions (cached briefly) and their quotas.

use serde::Deserialize;
use worker::*;

use crate::error::{json_of, json_response, ApiError, ApiResult, EdgeError};
pub use crate::objects::SessionEntry;
use crate::objects::{
    read_body, BeginSignIn, OkAnswer, QuotaAsk, RedeemTicket, RemoveSession, Removed, RoleAsk,
    SignInRef, StatusChange, TokenAsk, Updated, UserIndexRoute,
};

#[derive(Deserialize)]
struct BodyRow {
    body: String,
}

#[durable_object]
pub struct UserIndex {
    state: State,
    env: Env,
    /// Held while a user token is refreshed: GitHub kills the old refresh token, so a second
    /// refresh at the same time would sign the person out (single flight).
    refreshing: futures_util::lock::Mutex<()>,
}

impl DurableObject for UserIndex {
    fn new(state: State, env: Env) -> Self {
        UserIndex {
            state,
            env,
            refreshing: futures_util::lock::Mutex::new(()),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(e) => e.into_response(),
        }
    }
}

impl UserIndex {
    fn sql(&self) -> Result<SqlStorage> {
        let sql = self.state.storage().sql();
        sql.exec(
            "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, joined_at INTEGER NOT NULL, body TEXT NOT NULL)",
            None,
        )?;
        sql.exec(
            "CREATE TABLE IF NOT EXISTS signins (sid TEXT PRIMARY KEY, body TEXT NOT NULL)",
            None,
        )?;
        sql.exec(
            "CREATE TABLE IF NOT EXISTS tickets (nonce TEXT PRIMARY KEY, exp INTEGER NOT NULL)",
            None,
        )?;
        sql.exec(
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, body TEXT NOT NULL)",
            None,
        )?;
        Ok(sql)
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let Some(route) = UserIndexRoute::parse(&req.method(), &req.path()) else {
            return Err(EdgeError::NotFound("route").into());
        };
        match route {
            UserIndexRoute::Add => {
                let entry: SessionEntry = read_body(&mut req).await?;
                let body = serde_json::to_string(&entry).map_err(ApiError::internal)?;
                self.sql()?.exec(
                    "INSERT OR REPLACE INTO sessions (id, joined_at, body) VALUES (?, ?, ?)",
                    vec![
                        entry.id.as_str().into(),
                        SqlStorageValue::Integer(i64::try_from(entry.joined_at).unwrap_or(0)),
                        body.into(),
                    ],
                )?;
                json_of(200, &entry)
            }
            UserIndexRoute::Remove => {
                let remove: RemoveSession = read_body(&mut req).await?;
                self.sql()?
                    .exec("DELETE FROM sessions WHERE id = ?", vec![remove.id.into()])?;
                json_of(200, &Removed { removed: true })
            }
            UserIndexRoute::Status => {
                let change: StatusChange = read_body(&mut req).await?;
                let sql = self.sql()?;
                let rows: Vec<BodyRow> = sql
                    .exec(
                        "SELECT body FROM sessions WHERE id = ?",
                        vec![change.id.as_str().into()],
                    )?
                    .to_array()?;
                if let Some(row) = rows.first() {
                    let mut entry: SessionEntry =
                        serde_json::from_str(&row.body).map_err(ApiError::internal)?;
                    entry.status = change.status;
                    let body = serde_json::to_string(&entry).map_err(ApiError::internal)?;
                    sql.exec(
                        "UPDATE sessions SET body = ? WHERE id = ?",
                        vec![body.into(), change.id.into()],
                    )?;
                }
                json_of(
                    200,
                    &Updated {
                        updated: !rows.is_empty(),
                    },
                )
            }
            UserIndexRoute::List => {
                let rows: Vec<BodyRow> = self
                    .sql()?
                    .exec(
                        "SELECT body FROM sessions ORDER BY joined_at DESC LIMIT 500",
                        None,
                    )?
                    .to_array()?;
                let bodies: Vec<String> = rows.into_iter().map(|r| r.body).collect();
                // The stored rows are `SessionEntry`s already: passed on as they are.
                json_response(200, format!("{{\"sessions\":[{}]}}", bodies.join(",")))
                    .map_err(ApiError::from)
            }
            UserIndexRoute::SignInBegin => {
                let begin: BeginSignIn = read_body(&mut req).await?;
                json_of(200, &self.begin_sign_in(&begin.via)?)
            }
            UserIndexRoute::SignInCheck => {
                let sign_in: SignInRef = read_body(&mut req).await?;
                json_of(200, &self.check_sign_in(&sign_in.sid)?)
            }
            UserIndexRoute::SignInEnd => {
                let sign_in: SignInRef = read_body(&mut req).await?;
                self.end_sign_in(&sign_in.sid)?;
                json_of(200, &OkAnswer::yes())
            }
            UserIndexRoute::TicketRedeem => {
                let ticket: RedeemTicket = read_body(&mut req).await?;
                self.redeem_ticket(&ticket)?;
                json_of(200, &OkAnswer::yes())
            }
            UserIndexRoute::GithubLink => {
                let link = read_body(&mut req).await?;
                json_of(200, &self.link_github(link).await?)
            }
            UserIndexRoute::GithubAccountGet => json_of(200, &self.github_account()?),
            UserIndexRoute::GithubToken => {
                let ask: TokenAsk = read_body(&mut req).await?;
                json_of(200, &self.user_token(ask.refresh).await?)
            }
            UserIndexRoute::GithubRole => {
                let ask: RoleAsk = read_body(&mut req).await?;
                json_of(200, &self.role(&ask).await?)
            }
            UserIndexRoute::Quota => {
                let ask: QuotaAsk = read_body(&mut req).await?;
                self.take_quota(&ask)?;
                json_of(200, &OkAnswer::yes())
            }
        }
    }
}

#[path = "../src/user_identity.rs"]
mod identity;

/// The rows of the `sessions` table.
#[cfg(test)]
mod stored_formats {
    use super::SessionEntry;
    use crate::store::stored_formats::{older, pinned};

    #[test]
    fn session_entry_format_unchanged() {
        pinned::<SessionEntry>(
            r#"{"id":"ses_1","title":"Fix the login","repository":"acme/web","role":"owner","joined_at":1700000000000,"status":"ended"}"#,
        );
        // Before entries recorded a repository and the session's status.
        let e = older::<SessionEntry>(
            r#"{"id":"ses_1","title":"Fix the login","role":"member","joined_at":1700000000000}"#,
        );
        assert_eq!((e.repository, e.status.as_str()), (None, "active"));
    }
}

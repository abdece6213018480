//! The person's identity in their `UserIndex`: sign-ins and one-time tickets, the GitHub link with its tokens sealed at rest (AES-GCM) and refreshed once at a time, repository permissions cached briefly, and quotas.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use nightshift_core::github::{Role, UserTokens};
use nightshift_core::quota::{retry_after_s, QuotaScope, Window};
use nightshift_core::signin::{SignIn, SignInError, TicketError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use worker::SqlStorageValue;

use super::{BodyRow, UserIndex};
use crate::config;
use crate::error::{ApiError, ApiResult, EdgeError};
use crate::github::{self, GithubError};
use crate::objects::{
    GithubAccount, LinkGithub, QuotaAsk, RedeemTicket, RoleAnswer, RoleAsk, UserToken,
};
use crate::platform::{new_id, now_ms, random_bytes};
use crate::webcrypto;

/// A token is refreshed when it has less than this left.
const REFRESH_MARGIN_MS: u64 = 5 * 60 * 1000;

/// The person's GitHub tokens as stored: each sealed with `TOKEN_ENCRYPTION_KEY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SealedTokens {
    access: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_expires_at: Option<u64>,
}

/// A cached permission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CachedRole {
    role: Role,
    checked_at: u64,
}

/// The first stored body of `rows`, read as `T`.
fn first_body<T: DeserializeOwned>(rows: Vec<BodyRow>) -> ApiResult<Option<T>> {
    rows.first()
        .map(|row| serde_json::from_str(&row.body).map_err(ApiError::internal))
        .transpose()
}

const ACCOUNT_KEY: &str = "github";
const TOKENS_KEY: &str = "github_tokens";

impl UserIndex {
    fn kv_get<T: DeserializeOwned>(&self, key: &str) -> ApiResult<Option<T>> {
        let rows: Vec<BodyRow> = self
            .sql()?
            .exec("SELECT body FROM kv WHERE key = ?", vec![key.into()])?
            .to_array()?;
        first_body(rows)
    }

    fn kv_put<T: Serialize>(&self, key: &str, value: &T) -> ApiResult<()> {
        let body = serde_json::to_string(value).map_err(ApiError::internal)?;
        self.sql()?.exec(
            "INSERT OR REPLACE INTO kv (key, body) VALUES (?, ?)",
            vec![key.into(), body.into()],
        )?;
        Ok(())
    }

    fn kv_delete(&self, key: &str) -> ApiResult<()> {
        self.sql()?
            .exec("DELETE FROM kv WHERE key = ?", vec![key.into()])?;
        Ok(())
    }

    fn sign_in(&self, sid: &str) -> ApiResult<Option<SignIn>> {
        let rows: Vec<BodyRow> = self
            .sql()?
            .exec("SELECT body FROM signins WHERE sid = ?", vec![sid.into()])?
            .to_array()?;
        first_body(rows)
    }

    fn put_sign_in(&self, sign_in: &SignIn) -> ApiResult<()> {
        let body = serde_json::to_string(sign_in).map_err(ApiError::internal)?;
        self.sql()?.exec(
            "INSERT OR REPLACE INTO signins (sid, body) VALUES (?, ?)",
            vec![sign_in.sid.as_str().into(), body.into()],
        )?;
        Ok(())
    }

    pub(super) fn begin_sign_in(&self, via: &str) -> ApiResult<SignIn> {
        let sign_in = SignIn::begin(new_id("sid"), via, now_ms());
        self.put_sign_in(&sign_in)?;
        Ok(sign_in)
    }

    pub(super) fn check_sign_in(&self, sid: &str) -> ApiResult<SignIn> {
        let sign_in = self
            .sign_in(sid)?
            .ok_or(EdgeError::SignIn(SignInError::Unknown))?;
        sign_in.check(now_ms()).map_err(EdgeError::SignIn)?;
        Ok(sign_in)
    }

    /// Sign-out: this sign-in's tokens and tickets are refused from now on. Ending an unknown
    /// or ended sign-in changes nothing.
    pub(super) fn end_sign_in(&self, sid: &str) -> ApiResult<()> {
        if let Some(mut sign_in) = self.sign_in(sid)? {
            sign_in.end(now_ms());
            self.put_sign_in(&sign_in)?;
        }
        Ok(())
    }

    /// A ticket's nonce is taken once; its sign-in must still be good.
    pub(super) fn redeem_ticket(&self, ticket: &RedeemTicket) -> ApiResult<()> {
        let now = now_ms();
        if ticket.exp <= now {
            return Err(EdgeError::Ticket(TicketError::Expired).into());
        }
        if let Some(sid) = &ticket.sid {
            self.check_sign_in(sid)?;
        }
        let sql = self.sql()?;
        sql.exec(
            "DELETE FROM tickets WHERE exp <= ?",
            vec![SqlStorageValue::Integer(
                i64::try_from(now).unwrap_or(i64::MAX),
            )],
        )?;
        #[derive(Deserialize)]
        struct Seen {
            n: i64,
        }
        let seen: Vec<Seen> = sql
            .exec(
                "SELECT COUNT(*) AS n FROM tickets WHERE nonce = ?",
                vec![ticket.nonce.as_str().into()],
            )?
            .to_array()?;
        if seen.first().is_some_and(|s| s.n > 0) {
            return Err(EdgeError::Ticket(TicketError::Used).into());
        }
        sql.exec(
            "INSERT INTO tickets (nonce, exp) VALUES (?, ?)",
            vec![
                ticket.nonce.as_str().into(),
                SqlStorageValue::Integer(i64::try_from(ticket.exp).unwrap_or(i64::MAX)),
            ],
        )?;
        Ok(())
    }

    fn key(&self) -> ApiResult<Vec<u8>> {
        config::token_encryption_key(&self.env).ok_or(EdgeError::TokenKeyNotConfigured.into())
    }

    async fn seal(&self, key: &[u8], token: &str) -> ApiResult<String> {
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&random_bytes(12));
        let sealed = webcrypto::seal(key, token.as_bytes(), iv)
            .await
            .map_err(|e| ApiError::internal(e.0))?;
        Ok(STANDARD.encode(sealed))
    }

    async fn unseal(&self, key: &[u8], sealed: &str) -> ApiResult<String> {
        let bytes = STANDARD.decode(sealed).map_err(ApiError::internal)?;
        let plain = webcrypto::open(key, &bytes)
            .await
            .map_err(|e| ApiError::internal(e.0))?;
        String::from_utf8(plain).map_err(ApiError::internal)
    }

    async fn store_tokens(&self, tokens: &UserTokens) -> ApiResult<()> {
        let key = self.key()?;
        let now = now_ms();
        let sealed = SealedTokens {
            access: self.seal(&key, &tokens.access_token).await?,
            access_expires_at: tokens.expires_in.map(|s| now + s * 1000),
            refresh: match &tokens.refresh_token {
                Some(refresh) => Some(self.seal(&key, refresh).await?),
                None => None,
            },
            refresh_expires_at: tokens.refresh_token_expires_in.map(|s| now + s * 1000),
        };
        self.kv_put(TOKENS_KEY, &sealed)
    }

    /// Links the GitHub identity and keeps its tokens (sealed). A different GitHub account
    /// under the same name replaces the old link, and the old permissions are forgotten.
    pub(super) async fn link_github(&self, link: LinkGithub) -> ApiResult<GithubAccount> {
        self.store_tokens(&link.tokens).await?;
        let old: Option<GithubAccount> = self.kv_get(ACCOUNT_KEY)?;
        if old.as_ref().is_some_and(|o| o.id != link.account.id) {
            self.forget_roles()?;
        }
        self.kv_put(ACCOUNT_KEY, &link.account)?;
        Ok(link.account)
    }

    fn forget_roles(&self) -> ApiResult<()> {
        self.sql()?
            .exec("DELETE FROM kv WHERE key LIKE 'role:%'", None)?;
        Ok(())
    }

    pub(super) fn github_account(&self) -> ApiResult<GithubAccount> {
        self.kv_get(ACCOUNT_KEY)?
            .ok_or(EdgeError::GithubNotLinked.into())
    }

    /// A user token with at least five minutes left, refreshing it first when needed (one
    /// refresh at a time: the others wait and read the new one).
    pub(super) async fn user_token(&self, force: bool) -> ApiResult<UserToken> {
        let account = self.github_account()?;
        let key = self.key()?;
        let seen: Option<SealedTokens> = self.kv_get(TOKENS_KEY)?;
        let _flight = self.refreshing.lock().await;
        let sealed: SealedTokens = self
            .kv_get(TOKENS_KEY)?
            .ok_or(EdgeError::GithubTokenInvalid)?;
        let now = now_ms();
        let fresh_enough = sealed
            .access_expires_at
            .is_none_or(|at| at > now + REFRESH_MARGIN_MS);
        // Someone refreshed while this one waited: theirs is the new token.
        let refreshed_meanwhile = seen.as_ref() != Some(&sealed);
        if (fresh_enough && !force) || (force && refreshed_meanwhile) {
            return Ok(UserToken {
                token: self.unseal(&key, &sealed.access).await?,
                login: account.login,
            });
        }
        let Some(refresh_sealed) = &sealed.refresh else {
            return Err(EdgeError::GithubTokenInvalid.into());
        };
        if sealed.refresh_expires_at.is_some_and(|at| at <= now) {
            self.kv_delete(TOKENS_KEY)?;
            return Err(EdgeError::GithubTokenInvalid.into());
        }
        let cfg = config::github(&self.env).ok_or(EdgeError::GithubNotConfigured)?;
        let refresh = self.unseal(&key, refresh_sealed).await?;
        match github::refresh(&cfg, &refresh).await {
            Ok(tokens) => {
                self.store_tokens(&tokens).await?;
                Ok(UserToken {
                    token: tokens.access_token,
                    login: account.login,
                })
            }
            Err(GithubError::Refused(_)) | Err(GithubError::Unauthorized) => {
                // GitHub no longer honours the refresh token: the person signs in again.
                self.kv_delete(TOKENS_KEY)?;
                Err(EdgeError::GithubTokenInvalid.into())
            }
            Err(e) => Err(e.edge().into()),
        }
    }

    /// The person's permission on a repository, from GitHub with their own token (cached for
    /// a minute unless `fresh`).
    pub(super) async fn role(&self, ask: &RoleAsk) -> ApiResult<RoleAnswer> {
        let cache_key = format!("role:{}", ask.repository.to_ascii_lowercase());
        let now = now_ms();
        if !ask.fresh {
            if let Some(cached) = self.kv_get::<CachedRole>(&cache_key)? {
                if cached.checked_at + config::role_cache_ms(&self.env) > now
                    && cached.checked_at <= now
                {
                    return Ok(RoleAnswer {
                        role: cached.role,
                        checked_at: cached.checked_at,
                    });
                }
            }
        }
        let cfg = config::github(&self.env).ok_or(EdgeError::GithubNotConfigured)?;
        let mut token = self.user_token(false).await?;
        let mut answer = github::repository(&cfg, &token.token, &ask.repository).await;
        if answer == Err(GithubError::Unauthorized) {
            token = self.user_token(true).await?;
            answer = github::repository(&cfg, &token.token, &ask.repository).await;
        }
        let role = match answer {
            Ok(repository) => Role::from_permissions(repository.permissions.as_ref()),
            Err(GithubError::NoAccess(_)) => Role::None,
            Err(e) => return Err(e.edge().into()),
        };
        self.kv_put(
            &cache_key,
            &CachedRole {
                role,
                checked_at: now,
            },
        )?;
        Ok(RoleAnswer {
            role,
            checked_at: now,
        })
    }

    /// Takes one of a quota, or refuses with when to retry.
    pub(super) fn take_quota(&self, ask: &QuotaAsk) -> ApiResult<()> {
        let key = format!("quota:{}", ask.what.key());
        let window: Window = self.kv_get(&key)?.unwrap_or_default();
        match window.take(now_ms(), ask.limit) {
            Ok(next) => self.kv_put(&key, &next),
            Err(wait_ms) => Err(EdgeError::QuotaExceeded {
                what: ask.what.describe(QuotaScope::Person),
                retry_after_s: retry_after_s(wait_ms),
            }
            .into()),
        }
    }
}

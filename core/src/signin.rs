//! Signing in: who may be a user name, the OAuth round trip's sealed state, sign-ins that sign-out ends, and the one-time tickets that open a session's WebSocket.
//!
//! Everything here is pure: randomness and the clock come from the caller. Sealed values
//! (the OAuth state cookie, tickets) are HMAC-SHA256 over a prefix and a JSON body, checked
//! in constant time, with their own prefixes so one kind can never pass as another.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

use crate::ids::Identity;

type HmacSha256 = Hmac<Sha256>;

/// Names the system uses for itself: never a person's user name (socket tags and the event
/// log's actors would be ambiguous).
pub const RESERVED_USERS: [&str; 3] = ["system", "sandbox", "people"];

/// The OAuth round trip's sealed state lives this long (the person has this long on GitHub's
/// page).
pub const OAUTH_FLOW_MS: u64 = 10 * 60 * 1000;

/// A WebSocket ticket is good for this long, once.
pub const TICKET_MS: u64 = 60 * 1000;

/// A sign-in lasts this long at most; its tokens are renewed within it.
pub const SIGN_IN_MAX_MS: u64 = 30 * 24 * 3600 * 1000;

const FLOW_PREFIX: &str = "nso1";
const TICKET_PREFIX: &str = "nst1";

/// A user name: 1–64 of `a-z 0-9 - _ .`, not one of [`RESERVED_USERS`].
pub fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && !RESERVED_USERS.contains(&user)
}

/// The user name of a GitHub account: its login in lower case (logins are 1–39 of
/// alphanumerics and `-`); a login that would be a reserved name gets the prefix `gh-`.
pub fn user_for_github_login(login: &str) -> Option<String> {
    let lower = login.to_ascii_lowercase();
    if lower.is_empty()
        || lower.len() > 39
        || !lower
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    if RESERVED_USERS.contains(&lower.as_str()) {
        return Some(format!("gh-{lower}"));
    }
    Some(lower)
}

/// Where to go after signing in: a path on this site only (`/…`, never `//host` or a
/// backslash trick), else `/`.
pub fn safe_return(path: Option<&str>) -> String {
    match path {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.contains('\\')
                && p.len() <= 512
                && p.bytes().all(|b| (0x21..0x7f).contains(&b)) =>
        {
            p.to_string()
        }
        _ => "/".to_string(),
    }
}

/// Why a sealed value is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SealError {
    #[error("malformed")]
    Malformed,
    #[error("the signature does not match")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("no signing secret is configured (set AUTH_SECRET)")]
    NoSecret,
}

fn mac(secret: &[u8], prefix: &str, body: &str) -> Result<HmacSha256, SealError> {
    if secret.is_empty() {
        return Err(SealError::NoSecret);
    }
    let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| SealError::NoSecret)?;
    mac.update(prefix.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    Ok(mac)
}

fn seal<T: Serialize>(prefix: &str, value: &T, secret: &[u8]) -> Result<String, SealError> {
    let json = serde_json::to_vec(value).map_err(|_| SealError::Malformed)?;
    let body = URL_SAFE_NO_PAD.encode(json);
    let sig = URL_SAFE_NO_PAD.encode(mac(secret, prefix, &body)?.finalize().into_bytes());
    Ok(format!("{prefix}.{body}.{sig}"))
}

fn open<T: DeserializeOwned>(prefix: &str, sealed: &str, secret: &[u8]) -> Result<T, SealError> {
    let mut parts = sealed.split('.');
    let (Some(head), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SealError::Malformed);
    };
    if head != prefix {
        return Err(SealError::Malformed);
    }
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| SealError::Malformed)?;
    mac(secret, prefix, body)?
        .verify_slice(&sig)
        .map_err(|_| SealError::BadSignature)?;
    let json = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| SealError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| SealError::Malformed)
}

/// The OAuth round trip's state, sealed into a short-lived cookie: the `state` GitHub must
/// hand back, the PKCE verifier only this browser knows, and where to go afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuthFlow {
    pub state: String,
    pub verifier: String,
    pub return_to: String,
    /// Expires at, ms since the epoch.
    pub exp: u64,
}

/// Why an OAuth callback is refused (stable codes).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FlowError {
    #[error(
        "the sign-in was not started in this browser, or took longer than 10 minutes; start again"
    )]
    NoFlow,
    #[error("the sign-in's state does not match; start again")]
    StateMismatch,
}

impl FlowError {
    pub fn code(&self) -> &'static str {
        match self {
            FlowError::NoFlow => "oauth_flow_missing",
            FlowError::StateMismatch => "oauth_state_mismatch",
        }
    }
}

impl OAuthFlow {
    /// A flow begun at `now` with fresh random `state` and `verifier` (43+ url-safe chars).
    pub fn begin(state: String, verifier: String, return_to: Option<&str>, now: u64) -> OAuthFlow {
        OAuthFlow {
            state,
            verifier,
            return_to: safe_return(return_to),
            exp: now + OAUTH_FLOW_MS,
        }
    }

    pub fn seal(&self, secret: &[u8]) -> Result<String, SealError> {
        seal(FLOW_PREFIX, self, secret)
    }

    /// Opens the cookie and checks the `state` GitHub sent back (constant time).
    pub fn finish(
        cookie: Option<&str>,
        state: &str,
        secret: &[u8],
        now: u64,
    ) -> Result<OAuthFlow, FlowError> {
        let flow: OAuthFlow = cookie
            .and_then(|c| open(FLOW_PREFIX, c, secret).ok())
            .ok_or(FlowError::NoFlow)?;
        if flow.exp <= now {
            return Err(FlowError::NoFlow);
        }
        use subtle::ConstantTimeEq;
        if state.is_empty() || !bool::from(flow.state.as_bytes().ct_eq(state.as_bytes())) {
            return Err(FlowError::StateMismatch);
        }
        Ok(flow)
    }
}

/// A one-time ticket that opens one session's WebSocket (so no long-lived token travels in
/// a URL). Its `nonce` is redeemed once at the person's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub sub: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The sign-in it was issued under (sign-out ends its tickets too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// The session it opens.
    pub session: String,
    pub nonce: String,
    pub exp: u64,
}

/// Why a ticket is refused (stable codes).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TicketError {
    #[error("the ticket is not valid; ask for a new one with POST /auth/ticket")]
    Invalid,
    #[error("the ticket expired; ask for a new one with POST /auth/ticket")]
    Expired,
    #[error("this ticket opens another session")]
    WrongSession,
    #[error("this ticket was already used; ask for a new one with POST /auth/ticket")]
    Used,
}

impl TicketError {
    pub fn code(&self) -> &'static str {
        match self {
            TicketError::Invalid => "ticket_invalid",
            TicketError::Expired => "ticket_expired",
            TicketError::WrongSession => "ticket_wrong_session",
            TicketError::Used => "ticket_used",
        }
    }
}

impl Ticket {
    pub fn issue(
        who: &Identity,
        sid: Option<String>,
        session: &str,
        nonce: String,
        now: u64,
    ) -> Ticket {
        Ticket {
            sub: who.user.clone(),
            name: who.name.clone(),
            email: who.email.clone(),
            sid,
            session: session.to_string(),
            nonce,
            exp: now + TICKET_MS,
        }
    }

    pub fn seal(&self, secret: &[u8]) -> Result<String, SealError> {
        seal(TICKET_PREFIX, self, secret)
    }

    /// Checks the seal, the expiry and the session; the caller redeems the nonce once.
    pub fn open(
        sealed: &str,
        session: &str,
        secret: &[u8],
        now: u64,
    ) -> Result<Ticket, TicketError> {
        let ticket: Ticket =
            open(TICKET_PREFIX, sealed, secret).map_err(|_| TicketError::Invalid)?;
        if ticket.exp <= now {
            return Err(TicketError::Expired);
        }
        if ticket.session != session {
            return Err(TicketError::WrongSession);
        }
        Ok(ticket)
    }

    pub fn identity(&self) -> Identity {
        Identity {
            user: self.sub.clone(),
            name: self.name.clone(),
            email: self.email.clone(),
        }
    }
}

/// One sign-in of a person, kept by their index: its tokens are good while it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignIn {
    pub sid: String,
    /// `github` or `dev`.
    pub via: String,
    pub created_at: u64,
    pub expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
}

/// Why a sign-in no longer admits its tokens (stable codes).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignInError {
    #[error("this sign-in was ended (signed out); sign in again")]
    SignedOut,
    #[error("this sign-in is older than 30 days; sign in again")]
    TooOld,
    #[error("this sign-in is not known; sign in again")]
    Unknown,
}

impl SignInError {
    pub fn code(&self) -> &'static str {
        match self {
            SignInError::SignedOut => "signed_out",
            SignInError::TooOld => "sign_in_expired",
            SignInError::Unknown => "sign_in_unknown",
        }
    }
}

impl SignIn {
    pub fn begin(sid: String, via: &str, now: u64) -> SignIn {
        SignIn {
            sid,
            via: via.to_string(),
            created_at: now,
            expires_at: now + SIGN_IN_MAX_MS,
            ended_at: None,
        }
    }

    /// Whether tokens of this sign-in are admitted at `now`.
    pub fn check(&self, now: u64) -> Result<(), SignInError> {
        if self.ended_at.is_some() {
            return Err(SignInError::SignedOut);
        }
        if self.expires_at <= now {
            return Err(SignInError::TooOld);
        }
        Ok(())
    }

    /// Sign-out: the sign-in admits nothing from now on.
    pub fn end(&mut self, now: u64) {
        self.ended_at.get_or_insert(now);
    }

    /// A renewed token's expiry: `ttl` from now, never past the sign-in's own end.
    pub fn token_expiry(&self, now: u64, ttl: u64) -> u64 {
        (now + ttl).min(self.expires_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ada() -> Identity {
        Identity {
            user: "ada".into(),
            name: "Ada".into(),
            email: None,
        }
    }

    #[test]
    fn user_names_exclude_the_reserved_ones() {
        for ok in ["ada", "a.b-c_d", "x1"] {
            assert!(valid_user(ok), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in ["", "Ada", "system", "sandbox", "people", "a b", &long] {
            assert!(!valid_user(bad), "{bad}");
        }
        assert!(valid_user(&"a".repeat(64)));
    }

    #[test]
    fn github_logins_become_user_names() {
        assert_eq!(user_for_github_login("Ada-L").as_deref(), Some("ada-l"));
        assert_eq!(
            user_for_github_login("System").as_deref(),
            Some("gh-system")
        );
        assert_eq!(
            user_for_github_login("people").as_deref(),
            Some("gh-people")
        );
        assert_eq!(user_for_github_login(""), None);
        assert_eq!(user_for_github_login("a_b"), None);
        assert_eq!(user_for_github_login(&"a".repeat(40)), None);
        assert!(user_for_github_login(&"a".repeat(39)).is_some());
        for login in ["Ada-L", "System", "x"] {
            let user = user_for_github_login(login).unwrap_or_default();
            assert!(valid_user(&user), "{user}");
        }
    }

    #[test]
    fn only_local_paths_are_returned_to() {
        assert_eq!(safe_return(Some("/#/s/ses_1")), "/#/s/ses_1");
        for bad in [
            None,
            Some("https://evil.example"),
            Some("//evil.example"),
            Some("/\\evil.example"),
            Some("relative"),
            Some("/a b"),
        ] {
            assert_eq!(safe_return(bad), "/", "{bad:?}");
        }
        assert_eq!(safe_return(Some(&format!("/{}", "a".repeat(512)))), "/");
    }

    #[test]
    fn the_oauth_flow_round_trips_and_refuses_what_it_should() {
        let key = b"k";
        let flow = OAuthFlow::begin("st".into(), "v".repeat(43), Some("/x"), 1_000);
        assert_eq!(flow.exp, 1_000 + OAUTH_FLOW_MS);
        let cookie = flow.seal(key).expect("seal");
        let back = OAuthFlow::finish(Some(&cookie), "st", key, 2_000).expect("finish");
        assert_eq!(back, flow);
        let refuse = |cookie: Option<&str>, state: &str, key: &[u8], now: u64| {
            OAuthFlow::finish(cookie, state, key, now).err()
        };
        assert_eq!(refuse(None, "st", key, 2_000), Some(FlowError::NoFlow));
        assert_eq!(
            refuse(Some(&cookie), "st", b"other", 2_000),
            Some(FlowError::NoFlow)
        );
        assert_eq!(
            refuse(Some(&cookie), "st", key, flow.exp),
            Some(FlowError::NoFlow)
        );
        assert_eq!(
            refuse(Some(&cookie), "sT", key, 2_000),
            Some(FlowError::StateMismatch)
        );
        assert_eq!(
            refuse(Some(&cookie), "", key, 2_000),
            Some(FlowError::StateMismatch)
        );
        // A ticket is not a flow, though both are sealed with the same key.
        let ticket = Ticket::issue(&ada(), None, "ses_1", "n".into(), 0)
            .seal(key)
            .expect("seal");
        assert_eq!(refuse(Some(&ticket), "st", key, 0), Some(FlowError::NoFlow));
        assert_eq!(FlowError::NoFlow.code(), "oauth_flow_missing");
        assert_eq!(FlowError::StateMismatch.code(), "oauth_state_mismatch");
    }

    #[test]
    fn tickets_open_one_session_until_they_expire() {
        let key = b"k";
        let ticket = Ticket::issue(&ada(), Some("sid_1".into()), "ses_1", "n1".into(), 1_000);
        assert_eq!(ticket.exp, 1_000 + TICKET_MS);
        let sealed = ticket.seal(key).expect("seal");
        let back = Ticket::open(&sealed, "ses_1", key, 1_001).expect("open");
        assert_eq!(back.identity(), ada());
        assert_eq!(back.sid.as_deref(), Some("sid_1"));
        assert_eq!(
            Ticket::open(&sealed, "ses_2", key, 1_001),
            Err(TicketError::WrongSession)
        );
        assert_eq!(
            Ticket::open(&sealed, "ses_1", key, ticket.exp),
            Err(TicketError::Expired)
        );
        assert_eq!(
            Ticket::open(&sealed, "ses_1", b"other", 1_001),
            Err(TicketError::Invalid)
        );
        let flow = OAuthFlow::begin("s".into(), "v".into(), None, 0)
            .seal(key)
            .expect("seal");
        assert_eq!(
            Ticket::open(&flow, "ses_1", key, 0),
            Err(TicketError::Invalid)
        );
        for (error, code) in [
            (TicketError::Invalid, "ticket_invalid"),
            (TicketError::Expired, "ticket_expired"),
            (TicketError::WrongSession, "ticket_wrong_session"),
            (TicketError::Used, "ticket_used"),
        ] {
            assert_eq!(error.code(), code);
        }
        assert_eq!(
            Ticket::issue(&ada(), None, "s", "n".into(), 0).seal(b""),
            Err(SealError::NoSecret)
        );
    }

    #[test]
    fn sign_ins_end_at_sign_out_or_age() {
        let mut sign_in = SignIn::begin("sid_1".into(), "github", 1_000);
        assert_eq!(sign_in.check(1_000), Ok(()));
        assert_eq!(
            sign_in.check(1_000 + SIGN_IN_MAX_MS),
            Err(SignInError::TooOld)
        );
        assert_eq!(sign_in.token_expiry(2_000, 10), 2_010);
        assert_eq!(
            sign_in.token_expiry(SIGN_IN_MAX_MS, 10_000),
            1_000 + SIGN_IN_MAX_MS
        );
        sign_in.end(5_000);
        sign_in.end(6_000);
        assert_eq!(sign_in.ended_at, Some(5_000));
        assert_eq!(sign_in.check(5_001), Err(SignInError::SignedOut));
        for (error, code) in [
            (SignInError::SignedOut, "signed_out"),
            (SignInError::TooOld, "sign_in_expired"),
            (SignInError::Unknown, "sign_in_unknown"),
        ] {
            assert_eq!(error.code(), code);
        }
    }
}

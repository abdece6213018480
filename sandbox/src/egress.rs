//! A sandbox's only way out: an allowlist proxy outside it, on a unix socket bound into the sandbox (HTTP `CONNECT` and plain-HTTP forwarding), with the model proxy that adds the model key.
//!
//! The sandbox has its own network namespace (loopback only); its supervisor forwards a
//! loopback port to this socket and points every tool at it (`HTTP(S)_PROXY`). The proxy
//! allows the hosts of the sandbox's [`Policy`] and refuses everything else with `403` and the
//! header [`BLOCKED_HEADER`], which the supervisor turns into an `egress.blocked` event. Requests
//! to [`MODEL_HOST`] go to the configured model with the provider's key added; the sandbox
//! holds only a token good for itself.

use std::path::Path;

pub use nightshift_core::egress::{is_internal, valid_pattern, Policy, DEFAULT_ALLOW};
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// The virtual host a sandbox's OpenCode uses as its model endpoint (`http://MODEL_HOST/v1`).
pub const MODEL_HOST: &str = "model.nightshift.internal";
/// The virtual host of the push relay (`POST http://RELAY_HOST/relay?branch=nightshift/…`).
pub const RELAY_HOST: &str = "git.nightshift.internal";
/// Header on the proxy's refusal naming the host that was refused.
pub const BLOCKED_HEADER: &str = "x-nightshift-egress-blocked";
/// The longest request head the proxy reads.
const MAX_HEAD: usize = 32 * 1024;

/// The model endpoints behind [`MODEL_HOST`]: `/v1/…` is the `nightshift` OpenAI-compatible
/// model, `/<vendor>/…` one of OpenCode's own providers (Anthropic, OpenAI, …).
#[derive(Debug, Clone, Default)]
pub struct ModelRoute {
    /// OpenAI-compatible base URL (`…/v1`) of the `nightshift` provider.
    pub upstream: Option<String>,
    /// The key added to each of its requests (never given to the sandbox).
    pub key: Option<String>,
    /// What the sandbox presents as its API key (its own, random).
    pub token: String,
    /// OpenCode provider id → its upstream base URL and key.
    pub vendors: std::collections::BTreeMap<String, (String, String)>,
}

/// Where OpenCode's own providers are, by the variable their key comes in.
const VENDORS: &[(&str, &str, &str)] = &[
    ("ANTHROPIC", "anthropic", "https://api.anthropic.com/v1"),
    ("OPENAI", "openai", "https://api.openai.com/v1"),
    (
        "GOOGLE_GENERATIVE_AI",
        "google",
        "https://generativelanguage.googleapis.com/v1beta",
    ),
    (
        "GEMINI",
        "google",
        "https://generativelanguage.googleapis.com/v1beta",
    ),
    ("GROQ", "groq", "https://api.groq.com/openai/v1"),
    ("MISTRAL", "mistral", "https://api.mistral.ai/v1"),
    ("OPENROUTER", "openrouter", "https://openrouter.ai/api/v1"),
    ("XAI", "xai", "https://api.x.ai/v1"),
    ("DEEPSEEK", "deepseek", "https://api.deepseek.com/v1"),
];

/// The vendor routes for the `*_API_KEY` variables of the provider's environment: the
/// OpenCode provider id, and its base URL (`<PREFIX>_BASE_URL`, else the vendor's own). A key
/// of an unknown vendor without a base URL is left out (it never enters the sandbox).
pub fn vendor_routes(
    env: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, (String, String)> {
    let mut out = std::collections::BTreeMap::new();
    for (k, key) in env {
        let Some(prefix) = k.strip_suffix("_API_KEY") else {
            continue;
        };
        if prefix == "NIGHTSHIFT_MODEL" || prefix.is_empty() {
            continue;
        }
        let known = VENDORS.iter().find(|(p, _, _)| *p == prefix);
        let id = known
            .map(|(_, id, _)| id.to_string())
            .unwrap_or_else(|| prefix.to_ascii_lowercase().replace('_', "-"));
        let base = env
            .get(&format!("{prefix}_BASE_URL"))
            .cloned()
            .or_else(|| known.map(|(_, _, url)| url.to_string()));
        if let Some(base) = base {
            out.insert(id, (base, key.clone()));
        } else {
            eprintln!(
                "provider: {k} names no known provider and no {prefix}_BASE_URL; it is not used"
            );
        }
    }
    out
}

/// Headers that carry an API key, as the SDKs send it.
const KEY_HEADERS: &[&str] = &["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// A dev-mode local remote's push relay: the sandbox pushes to `outbox` (a bare repository in
/// the provider-owned folder), the provider fetches the session's branch into `remote`.
#[derive(Debug, Clone)]
pub struct Relay {
    pub outbox: std::path::PathBuf,
    pub remote: std::path::PathBuf,
}

/// One sandbox's egress: its policy, its model route, and a note of what it refused.
pub struct Egress {
    pub sandbox: String,
    policy: std::sync::Mutex<Policy>,
    /// The session owner's extra hosts (replaced as a whole when they change).
    session: std::sync::Mutex<Policy>,
    pub model: Option<ModelRoute>,
    pub relay: Option<Relay>,
    /// `host:port`s the provider itself allowed (the session's control plane): the only
    /// internal addresses a sandbox may reach, unless `dev_mode`.
    trusted: std::sync::Mutex<Vec<String>>,
    /// Single-user dev mode: a repository's or a session's pattern may name an internal
    /// address too (a developer's own git server on loopback).
    dev_mode: bool,
    http: reqwest::Client,
}

/// Where a sandbox finds its egress socket (the provider-owned folder is bound read-only there).
pub const SOCKET_DIR_INSIDE: &str = "/run/nightshift";
pub const SOCKET_INSIDE: &str = "/run/nightshift/egress.sock";

/// A sandbox's egress proxy while it runs; dropping it closes the socket and removes its folder.
pub struct Running {
    pub dir: std::path::PathBuf,
    pub egress: Arc<Egress>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the proxy of one sandbox on `dir/egress.sock` (`dir` is provider-owned).
pub fn start(dir: std::path::PathBuf, egress: Arc<Egress>) -> std::io::Result<Running> {
    std::fs::create_dir_all(&dir)?;
    let listener = bind(&dir, "egress.sock")?;
    let task = tokio::spawn(serve(listener, egress.clone()));
    Ok(Running { dir, egress, task })
}

impl Egress {
    pub fn new(
        sandbox: &str,
        policy: Policy,
        model: Option<ModelRoute>,
        relay: Option<Relay>,
        dev_mode: bool,
    ) -> Arc<Egress> {
        Arc::new(Egress {
            sandbox: sandbox.to_string(),
            policy: std::sync::Mutex::new(policy),
            session: std::sync::Mutex::new(Policy::default()),
            model,
            relay,
            trusted: std::sync::Mutex::new(Vec::new()),
            dev_mode,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap_or_default(),
        })
    }

    /// Allows the session's control plane (`host:port`), internal address or not: the one
    /// destination the provider vouches for (at boot, or when a pooled sandbox is assigned).
    pub fn trust(&self, authority: &str) {
        if let Ok(mut p) = self.policy.lock() {
            if !p.allow.iter().any(|a| a == authority) {
                p.allow.push(authority.to_string());
            }
        }
        if let Ok(mut t) = self.trusted.lock() {
            if !t.iter().any(|a| a == authority) {
                t.push(authority.to_string());
            }
        }
    }

    /// Replaces the session owner's extra hosts.
    pub fn set_session(&self, allow: &[String]) {
        if let Ok(mut p) = self.session.lock() {
            p.allow = allow.to_vec();
        }
    }

    fn allows(&self, host: &str, port: u16) -> bool {
        let base = self
            .policy
            .lock()
            .map(|p| p.allows(host, port))
            .unwrap_or(false);
        base || self
            .session
            .lock()
            .map(|p| p.allows(host, port))
            .unwrap_or(false)
    }

    /// Whether `host:port` may be an internal address: the provider vouched for it, or dev mode.
    fn may_be_internal(&self, host: &str, port: u16) -> bool {
        let exact = nightshift_core::egress::authority(host, port);
        self.dev_mode
            || self
                .trusted
                .lock()
                .map(|t| t.iter().any(|a| a.eq_ignore_ascii_case(&exact)))
                .unwrap_or(false)
    }
}

/// `host:port` of a URL's authority (the control plane's, for its allowlist entry).
pub fn authority_of_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "https" | "wss" => 443,
        _ => 80,
    };
    let (host, port) = split_authority(authority, default)?;
    (!host.is_empty()).then(|| nightshift_core::egress::authority(&host, port))
}

/// Serves the sandbox's socket until the listener is dropped (the sandbox ended).
pub async fn serve(listener: UnixListener, egress: Arc<Egress>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            return;
        };
        let egress = egress.clone();
        tokio::spawn(async move {
            let _ = handle(conn, &egress).await;
        });
    }
}

/// Binds the sandbox's socket `dir/name` (a stale one from an earlier boot is replaced),
/// however deep `dir` is.
pub fn bind(dir: &Path, name: &str) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(dir.join(name));
    let named = crate::socket_path::SocketPath::new(dir, name)?;
    UnixListener::bind(named.path())
}

struct Head {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the request head; returns it and any bytes read past it.
async fn read_head(conn: &mut UnixStream) -> std::io::Result<Option<(Head, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let rest = buf.split_off(end + 4);
    let Ok(text) = std::str::from_utf8(&buf[..end]) else {
        return Ok(None);
    };
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Ok(None);
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some((
        Head {
            method: method.to_string(),
            target: target.to_string(),
            version: version.to_string(),
            headers,
        },
        rest,
    )))
}

/// A refusal the sandbox's tools see as an HTTP answer (and the supervisor reports).
async fn refuse(
    conn: &mut UnixStream,
    status: &str,
    code: &str,
    host: Option<&str>,
    message: &str,
) -> std::io::Result<()> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let blocked = host
        .map(|h| format!("{BLOCKED_HEADER}: {h}\r\n"))
        .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{blocked}connection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(answer.as_bytes()).await?;
    conn.shutdown().await
}

/// `host:port` of a `CONNECT` target or a URL's authority.
fn split_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), default_port)),
    }
}

/// Connects to an allowed host. An internal address (loopback, private, link-local), named
/// or literal, is refused unless the provider vouched for that `host:port` (the control
/// plane) or runs in dev mode: a repository's or an owner's pattern never opens the host's
/// own services (the provider, wrangler's inspector, other sandboxes' ports).
async fn connect(egress: &Egress, host: &str, port: u16) -> Result<TcpStream, String> {
    let internal_ok = egress.may_be_internal(host, port);
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| format!("{host} does not resolve"))?
        .collect();
    let Some(addr) = addrs.iter().find(|a| internal_ok || !is_internal(a.ip())) else {
        return Err(format!("{host} resolves to an internal address"));
    };
    TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{host}:{port} refused the connection: {e}"))
}

async fn handle(mut conn: UnixStream, egress: &Egress) -> std::io::Result<()> {
    let Some((head, rest)) = read_head(&mut conn).await? else {
        return refuse(
            &mut conn,
            "400 Bad Request",
            "invalid_request",
            None,
            "not an HTTP proxy request",
        )
        .await;
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let Some((host, port)) = split_authority(&head.target, 443) else {
            return refuse(
                &mut conn,
                "400 Bad Request",
                "invalid_request",
                None,
                "bad CONNECT target",
            )
            .await;
        };
        return tunnel(conn, egress, &host, port, rest).await;
    }
    let Some(after) = head.target.strip_prefix("http://") else {
        return refuse(
            &mut conn,
            "400 Bad Request",
            "invalid_request",
            None,
            "use an absolute http:// URL or CONNECT",
        )
        .await;
    };
    let (authority, path) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    let Some((host, port)) = split_authority(authority, 80) else {
        return refuse(
            &mut conn,
            "400 Bad Request",
            "invalid_request",
            None,
            "bad URL",
        )
        .await;
    };
    if host.eq_ignore_ascii_case(MODEL_HOST) {
        return model(conn, egress, &head, path, rest).await;
    }
    if host.eq_ignore_ascii_case(RELAY_HOST) {
        return relay(conn, egress, path).await;
    }
    if !egress.allows(&host, port) {
        return blocked(conn, egress, &host, port).await;
    }
    let mut upstream = match connect(egress, &host, port).await {
        Ok(u) => u,
        Err(e) => {
            return refuse(&mut conn, "502 Bad Gateway", "egress_unreachable", None, &e).await
        }
    };
    // Origin-form request line; proxy headers dropped; one request per connection.
    let mut out = format!("{} {path} {}\r\n", head.method, head.version);
    for (k, v) in &head.headers {
        let lower = k.to_ascii_lowercase();
        if lower.starts_with("proxy-") || lower == "connection" || lower == "keep-alive" {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("connection: close\r\n\r\n");
    upstream.write_all(out.as_bytes()).await?;
    upstream.write_all(&rest).await?;
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    Ok(())
}

async fn blocked(
    mut conn: UnixStream,
    egress: &Egress,
    host: &str,
    port: u16,
) -> std::io::Result<()> {
    let target = format!("{host}:{port}");
    eprintln!(
        "provider: sandbox {} egress blocked: {target}",
        egress.sandbox
    );
    let msg = format!(
        "{target} is not on this sandbox's egress allowlist; the repository's owner can allow it (repository setting `egress`)"
    );
    refuse(
        &mut conn,
        "403 Forbidden",
        "egress_blocked",
        Some(&target),
        &msg,
    )
    .await
}

async fn tunnel(
    mut conn: UnixStream,
    egress: &Egress,
    host: &str,
    port: u16,
    rest: Vec<u8>,
) -> std::io::Result<()> {
    if !egress.allows(host, port) {
        return blocked(conn, egress, host, port).await;
    }
    let mut upstream = match connect(egress, host, port).await {
        Ok(u) => u,
        Err(e) => {
            return refuse(&mut conn, "502 Bad Gateway", "egress_unreachable", None, &e).await
        }
    };
    conn.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    upstream.write_all(&rest).await?;
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    Ok(())
}

/// A branch the relay may bring over: the session's own `nightshift/…`, a plain ref name.
pub fn relayable(branch: &str) -> bool {
    branch.starts_with("nightshift/")
        && branch.len() < 200
        && !branch.contains("..")
        && !branch.ends_with('/')
        && !branch.ends_with(".lock")
        && branch
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_-.".contains(c))
}

/// The push relay: the session's branch is fetched from the outbox into the real remote by
/// the remote's own git (the outbox's config and hooks are never run on the host).
async fn relay(mut conn: UnixStream, egress: &Egress, path: &str) -> std::io::Result<()> {
    let Some(r) = &egress.relay else {
        return refuse(
            &mut conn,
            "404 Not Found",
            "no_relay",
            None,
            "this sandbox pushes to its remote directly",
        )
        .await;
    };
    let branch = path
        .split_once("branch=")
        .map(|(_, b)| b.split('&').next().unwrap_or(""))
        .unwrap_or("");
    if !relayable(branch) {
        return refuse(
            &mut conn,
            "400 Bad Request",
            "branch_refused",
            None,
            "only the session's nightshift/… branch is pushed",
        )
        .await;
    }
    let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
    let outbox = r.outbox.to_string_lossy().to_string();
    let out = tokio::process::Command::new("git")
        .arg("-C")
        .arg(&r.remote)
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "fetch",
            "--quiet",
            "--no-write-fetch-head",
            "--",
            &outbox,
            &refspec,
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("HOME", "/nonexistent")
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => {
            let body = serde_json::json!({"relayed": branch}).to_string();
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            conn.write_all(answer.as_bytes()).await?;
            conn.shutdown().await
        }
        _ => {
            refuse(
                &mut conn,
                "502 Bad Gateway",
                "relay_failed",
                None,
                "the branch could not be brought to the remote",
            )
            .await
        }
    }
}

/// The model proxy: checks the sandbox's token, adds the key, streams the answer back.
async fn model(
    mut conn: UnixStream,
    egress: &Egress,
    head: &Head,
    path: &str,
    mut body: Vec<u8>,
) -> std::io::Result<()> {
    let Some(route) = &egress.model else {
        return refuse(
            &mut conn,
            "404 Not Found",
            "no_model",
            None,
            "no model is configured for this sandbox",
        )
        .await;
    };
    // The token may come in whichever header the sandbox's SDK puts its key.
    let carrier = KEY_HEADERS.iter().find_map(|name| {
        let v = head.header(name)?;
        let token = v.strip_prefix("Bearer ").unwrap_or(v);
        nightshift_core::signing::secrets_match(token, &route.token).then_some(*name)
    });
    let Some(carrier) = carrier else {
        return refuse(
            &mut conn,
            "401 Unauthorized",
            "bad_model_token",
            None,
            "the model token is not this sandbox's",
        )
        .await;
    };
    // `/v1/…`: the nightshift model; `/<vendor>/…`: one of OpenCode's own providers.
    let target = match (path.strip_prefix("/v1"), &route.upstream) {
        (Some(rel), Some(up)) => Some((up.clone(), rel.to_string(), route.key.clone())),
        _ => path
            .trim_start_matches('/')
            .split_once('/')
            .and_then(|(vendor, rel)| {
                route
                    .vendors
                    .get(vendor)
                    .map(|(up, key)| (up.clone(), format!("/{rel}"), Some(key.clone())))
            }),
    };
    let Some((upstream, rel, key)) = target else {
        return refuse(
            &mut conn,
            "404 Not Found",
            "not_found",
            None,
            "no model route here: /v1/… or /<provider>/…",
        )
        .await;
    };
    let len: usize = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if len > 16 << 20 {
        return refuse(
            &mut conn,
            "413 Payload Too Large",
            "too_large",
            None,
            "request body over 16 MiB",
        )
        .await;
    }
    let mut chunk = vec![0u8; 16 * 1024];
    while body.len() < len {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    let method =
        reqwest::Method::from_bytes(head.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let url = format!("{}{rel}", upstream.trim_end_matches('/'));
    let mut req = egress.http.request(method, &url).body(body);
    for (k, v) in &head.headers {
        let lower = k.to_ascii_lowercase();
        let hop = matches!(
            lower.as_str(),
            "host" | "content-length" | "connection" | "keep-alive" | "transfer-encoding" | "te"
        ) || lower.starts_with("proxy-");
        if !hop && !KEY_HEADERS.contains(&lower.as_str()) {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    // The real key goes where the token came (the SDK's own header and form).
    if let Some(key) = &key {
        req = match carrier {
            "authorization" => req.bearer_auth(key),
            other => req.header(other, key.as_str()),
        };
    }
    let answer = match req.send().await {
        Ok(a) => a,
        Err(_) => {
            return refuse(
                &mut conn,
                "502 Bad Gateway",
                "model_unreachable",
                None,
                "the model endpoint did not answer",
            )
            .await
        }
    };
    let status = answer.status();
    let content_type = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let start = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    conn.write_all(start.as_bytes()).await?;
    let mut stream = answer.bytes_stream();
    while let Some(Ok(bytes)) = stream.next().await {
        if bytes.is_empty() {
            continue;
        }
        conn.write_all(format!("{:x}\r\n", bytes.len()).as_bytes())
            .await?;
        conn.write_all(&bytes).await?;
        conn.write_all(b"\r\n").await?;
        conn.flush().await?;
    }
    conn.write_all(b"0\r\n\r\n").await?;
    conn.shutdown().await
}

#[cfg(test)]
mod proxy_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A loopback server that counts connections and answers `ok`.
    async fn counting_server() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            }
        });
        (port, hits)
    }

    /// One `CONNECT` through the proxy's socket; answers the status line.
    async fn tunnel_status(sock: &Path, target: &str) -> String {
        let mut conn = UnixStream::connect(sock).await.expect("proxy socket");
        conn.write_all(format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut answer = vec![0u8; 512];
        let n = conn.read(&mut answer).await.unwrap_or(0);
        String::from_utf8_lossy(&answer[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }

    #[test]
    fn a_control_plane_url_gives_its_authority_ipv6_in_brackets() {
        for (url, want) in [
            ("http://[::1]:8787/x", Some("[::1]:8787")),
            ("https://[2001:db8::1]/", Some("[2001:db8::1]:443")),
            ("http://127.0.0.1:8787", Some("127.0.0.1:8787")),
            (
                "wss://cp.example.com/sandbox-link",
                Some("cp.example.com:443"),
            ),
            ("not a url", None),
        ] {
            assert_eq!(authority_of_url(url).as_deref(), want, "{url}");
        }
    }

    #[tokio::test]
    async fn outside_dev_mode_only_the_vouched_for_control_plane_may_be_internal() {
        let (control, control_hits) = counting_server().await;
        let (other, other_hits) = counting_server().await;
        let dir = std::env::temp_dir().join(format!("egress-test-{}", rand::random::<u32>()));
        // The repository (or the session's owner) names a loopback port: outside dev mode it
        // stays closed; the control plane the provider vouched for is reached.
        let policy = Policy::with_defaults(&[format!("127.0.0.1:{other}")]);
        let egress = Egress::new("sbx_test", policy, None, None, false);
        egress.trust(&format!("127.0.0.1:{control}"));
        egress.set_session(&[format!("localhost:{other}")]);
        let running = start(dir.clone(), egress).expect("start");
        let sock = running.dir.join("egress.sock");
        let ok = tunnel_status(&sock, &format!("127.0.0.1:{control}")).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        for target in [format!("127.0.0.1:{other}"), format!("localhost:{other}")] {
            let refused = tunnel_status(&sock, &target).await;
            assert!(refused.starts_with("HTTP/1.1 502"), "{target}: {refused}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(other_hits.load(Ordering::SeqCst), 0);
        assert_eq!(control_hits.load(Ordering::SeqCst), 1);
        drop(running);
        // In dev mode a developer's own loopback server may be named.
        let policy = Policy::with_defaults(&[format!("127.0.0.1:{other}")]);
        let running = start(dir, Egress::new("sbx_dev", policy, None, None, true)).expect("start");
        let ok = tunnel_status(
            &running.dir.join("egress.sock"),
            &format!("127.0.0.1:{other}"),
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    }
}

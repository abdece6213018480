//! Egress policy: which hosts a sandbox may reach through its provider's allowlist proxy, and which addresses count as internal (never reached through a name, never a clone URL's host).

use std::net::IpAddr;

/// Hosts every sandbox may reach unless its policy says otherwise: package registries and the
/// common git hosts.
pub const DEFAULT_ALLOW: &[&str] = &[
    "registry.npmjs.org",
    "registry.yarnpkg.com",
    "pypi.org",
    "files.pythonhosted.org",
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    "proxy.golang.org",
    "sum.golang.org",
    "rubygems.org",
    "repo.maven.apache.org",
    "github.com",
    "codeload.github.com",
    "objects.githubusercontent.com",
    "gitlab.com",
    "bitbucket.org",
];
/// Where a sandbox may connect: host patterns (`example.com`, `*.example.com`, optionally with
/// `:port`); a pattern without a port allows 80 and 443 only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub allow: Vec<String>,
}

/// A host pattern is a DNS name or IP literal, optionally `*.`-prefixed and `:port`-suffixed.
pub fn valid_pattern(p: &str) -> bool {
    let (host, port) = match p.rsplit_once(':') {
        Some((h, port)) => (h, Some(port)),
        None => (p, None),
    };
    let name = host.strip_prefix("*.").unwrap_or(host);
    p.len() <= 255
        && !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && port.is_none_or(|port| port.parse::<u16>().is_ok_and(|n| n > 0))
}

/// `host:port`, with an IPv6 host in brackets (`[::1]:8787`), as patterns and authorities are written.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A pattern's host and port (`[v6]:port` included); a port that does not parse matches none.
fn split_pattern(pattern: &str) -> (&str, Option<u16>) {
    if let Some(v6) = pattern.strip_prefix('[') {
        if let Some((host, rest)) = v6.split_once(']') {
            return (host, rest.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match pattern.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok()),
        None => (pattern, None),
    }
}

impl Policy {
    /// The default allowlist plus `extra`.
    pub fn with_defaults(extra: &[String]) -> Policy {
        let mut allow: Vec<String> = DEFAULT_ALLOW.iter().map(|h| h.to_string()).collect();
        allow.extend(extra.iter().cloned());
        Policy { allow }
    }

    /// Whether `host:port` is allowed.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow.iter().any(|pattern| {
            let (pat, pat_port) = split_pattern(pattern);
            let port_ok = match pat_port {
                Some(p) => p == port,
                None => port == 443 || port == 80,
            };
            let pat = pat.to_ascii_lowercase();
            let host_ok = match pat.strip_prefix("*.") {
                Some(suffix) => host.ends_with(&format!(".{suffix}")),
                None => host == pat,
            };
            port_ok && host_ok
        })
    }
}

/// Whether an address is one a sandbox must never reach through an allowlisted *name*
/// (loopback, private, link-local, unspecified) — an allowlisted IP literal is taken as meant.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_internal(IpAddr::V4(v4)))
        }
    }
}

/// The most patterns a repository's `egress` setting may hold.
pub const MAX_PATTERNS: usize = 100;

/// A valid allowlist: at most [`MAX_PATTERNS`] patterns, each [`valid_pattern`].
pub fn valid_list(patterns: &[String]) -> bool {
    patterns.len() <= MAX_PATTERNS && patterns.iter().all(|p| valid_pattern(p))
}

/// How a clone URL may be used: where the clone comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneSource {
    /// A remote git host on the allowlist (`https://`, or `ssh://` where configured).
    Remote { host: String, port: u16 },
    /// A directory on the provider's machine (single-user dev mode only).
    Local(String),
}

/// Why a clone URL is refused (stable code `invalid_repository`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloneUrlError {
    #[error("local paths and file:// URLs are accepted only by a provider in single-user dev mode; use an https:// URL")]
    LocalOutsideDevMode,
    #[error("only https:// (and ssh:// where the provider allows it) clone URLs are accepted")]
    Scheme,
    #[error("the clone URL has no host")]
    NoHost,
    #[error("{0} is an internal address; clone from a public git host")]
    Internal(String),
    #[error("{0} is not on the egress allowlist; add it to the repository's `egress` setting")]
    NotAllowed(String),
}

/// Checks a clone URL against the provider's mode and the repository's egress policy. DNS is
/// the caller's: a name that resolves to an internal address must be refused there too
/// ([`is_internal`]).
pub fn check_clone_url(
    url: &str,
    dev_mode: bool,
    allow_ssh: bool,
    policy: &Policy,
) -> Result<CloneSource, CloneUrlError> {
    let lower = url.to_ascii_lowercase();
    if url.starts_with('/') || lower.starts_with("file://") {
        return if dev_mode {
            Ok(CloneSource::Local(
                url.strip_prefix("file://").unwrap_or(url).to_string(),
            ))
        } else {
            Err(CloneUrlError::LocalOutsideDevMode)
        };
    }
    let (scheme, rest) = url.split_once("://").ok_or(CloneUrlError::Scheme)?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        "ssh" if allow_ssh => 22,
        // Plain http only for a developer's own git server in dev mode.
        "http" if dev_mode => 80,
        _ => return Err(CloneUrlError::Scheme),
    };
    let authority = rest.split('/').next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => match p.parse::<u16>() {
            Ok(port) => (h.to_string(), port),
            Err(_) => (authority.to_string(), default_port),
        },
        _ => (authority.to_string(), default_port),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(CloneUrlError::NoHost);
    }
    let lower_host = host.to_ascii_lowercase();
    if let Ok(ip) = host.parse::<IpAddr>() {
        if is_internal(ip) && !dev_mode {
            return Err(CloneUrlError::Internal(host));
        }
    } else if (lower_host == "localhost" || lower_host.ends_with(".localhost")) && !dev_mode {
        return Err(CloneUrlError::Internal(host));
    }
    let ssh_on_allowed_host = port == 22 && policy.allows(&host, 443);
    if !(dev_mode || policy.allows(&host, port) || ssh_on_allowed_host) {
        return Err(CloneUrlError::NotAllowed(host));
    }
    Ok(CloneSource::Remote { host, port })
}

/// The URL with any credentials (userinfo) replaced by `***`, for logs, events and answers.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{path}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_authority_is_bracketed_and_matched_exactly() {
        assert_eq!(authority("::1", 8787), "[::1]:8787");
        assert_eq!(authority("example.com", 443), "example.com:443");
        let policy = Policy {
            allow: vec![authority("::1", 8787)],
        };
        assert!(policy.allows("::1", 8787));
        assert!(!policy.allows("::1", 8788));
        assert!(!policy.allows("::", 1));
    }

    #[test]
    fn the_policy_allows_named_hosts_on_their_ports_only() {
        let p = Policy::with_defaults(&["*.example.com".into(), "127.0.0.1:8787".into()]);
        assert!(p.allows("registry.npmjs.org", 443));
        assert!(!p.allows("registry.npmjs.org", 22));
        assert!(p.allows("git.example.com", 443));
        assert!(!p.allows("example.com.evil.net", 443));
        assert!(!p.allows("evil-example.com", 443));
        assert!(p.allows("127.0.0.1", 8787));
        assert!(!p.allows("127.0.0.1", 8790));
        assert!(!p.allows("169.254.169.254", 80));
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "100.64.0.1",
            "0.0.0.0",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["140.82.112.3", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn clone_url_hosts_and_ports_are_read_exactly() {
        let p = Policy::with_defaults(&["git.example.com:8443".into()]);
        let check = |u: &str, dev: bool| check_clone_url(u, dev, false, &p);
        // Host and port, IPv6 literals in brackets, with and without a port.
        assert_eq!(
            check("https://git.example.com:8443/a.git", false),
            Ok(CloneSource::Remote {
                host: "git.example.com".into(),
                port: 8443
            })
        );
        assert_eq!(
            check("http://[::1]:8080/a.git", true),
            Ok(CloneSource::Remote {
                host: "::1".into(),
                port: 8080
            })
        );
        assert_eq!(
            check("https://[2001:db8::1]/a.git", true),
            Ok(CloneSource::Remote {
                host: "2001:db8::1".into(),
                port: 443
            })
        );
        assert_eq!(
            check("https://[::1]/a.git", false),
            Err(CloneUrlError::Internal("::1".into()))
        );
        // Dev mode: local paths, plain http, and internal hosts are a developer's own.
        assert_eq!(
            check("file:///srv/a.git", true),
            Ok(CloneSource::Local("/srv/a.git".into()))
        );
        assert!(check("http://localhost:9418/a.git", true).is_ok());
        assert_eq!(
            check("http://github.com/a", false),
            Err(CloneUrlError::Scheme)
        );
        // An internal name outside dev mode, even on the allowlist's port.
        assert!(matches!(
            check("https://localhost/a.git", false),
            Err(CloneUrlError::Internal(_))
        ));
    }

    /// A port is split off only after a host, or after a whole bracketed IPv6 literal: text
    /// between the `]` and the last `:` makes the authority malformed, so it is not read as a
    /// host and port that a wildcard pattern could allow.
    #[test]
    fn a_malformed_bracketed_authority_is_not_split_into_host_and_port() {
        let p = Policy::with_defaults(&["*.example.com:8443".into()]);
        let check = |u: &str| check_clone_url(u, false, false, &p);
        assert_eq!(
            check("https://git.example.com:8443/a.git"),
            Ok(CloneSource::Remote {
                host: "git.example.com".into(),
                port: 8443
            })
        );
        assert_eq!(
            check("https://[x]git.example.com:8443/a.git"),
            Err(CloneUrlError::NotAllowed("x]git.example.com:8443".into()))
        );
    }

    #[test]
    fn clone_urls_are_checked_against_mode_and_policy() {
        let p = Policy::with_defaults(&["git.example.com".into()]);
        let ok = |u: &str| check_clone_url(u, false, false, &p);
        assert!(matches!(
            ok("https://github.com/a/b.git"),
            Ok(CloneSource::Remote { .. })
        ));
        assert!(ok("https://git.example.com/a.git").is_ok());
        assert_eq!(ok("/srv/repo.git"), Err(CloneUrlError::LocalOutsideDevMode));
        assert_eq!(
            ok("file:///srv/repo.git"),
            Err(CloneUrlError::LocalOutsideDevMode)
        );
        assert_eq!(ok("http://github.com/a/b"), Err(CloneUrlError::Scheme));
        assert_eq!(ok("ssh://git@github.com/a/b"), Err(CloneUrlError::Scheme));
        assert!(check_clone_url("ssh://git@github.com/a/b", false, true, &p).is_ok());
        assert_eq!(ok("git@github.com:a/b.git"), Err(CloneUrlError::Scheme));
        assert!(matches!(
            ok("https://169.254.169.254/x"),
            Err(CloneUrlError::Internal(_))
        ));
        assert!(matches!(
            ok("https://10.0.0.8/x"),
            Err(CloneUrlError::Internal(_))
        ));
        assert!(matches!(
            ok("https://[::1]/x"),
            Err(CloneUrlError::Internal(_))
        ));
        assert!(matches!(
            ok("https://localhost/x"),
            Err(CloneUrlError::Internal(_))
        ));
        assert!(matches!(
            ok("https://evil.example.net/x"),
            Err(CloneUrlError::NotAllowed(_))
        ));
        assert!(matches!(
            ok("https://u:tok@github.com:8443/x"),
            Err(CloneUrlError::NotAllowed(_))
        ));
        assert_eq!(
            check_clone_url("/srv/repo.git", true, false, &p),
            Ok(CloneSource::Local("/srv/repo.git".into()))
        );
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redact_url("https://u:tok@github.com/a.git"),
            "https://***@github.com/a.git"
        );
        assert_eq!(
            redact_url("https://github.com/a.git"),
            "https://github.com/a.git"
        );
        assert_eq!(redact_url("/srv/x.git"), "/srv/x.git");
    }

    #[test]
    fn patterns_are_checked() {
        assert!(valid_pattern("example.com"));
        assert!(valid_pattern("*.example.com:8443"));
        assert!(!valid_pattern("exa mple.com"));
        assert!(!valid_pattern("example.com:0"));
        assert!(!valid_pattern("http://example.com"));
    }
}

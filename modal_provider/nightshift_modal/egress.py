"""Egress policy of a Modal sandbox: the hosts it may reach (the defaults, the repository's `egress`, the clone
host, the control plane and the model endpoint), and how that list maps onto Modal's own network controls
(`outbound_domain_allowlist` for names, `outbound_cidr_allowlist` for IP literals)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# Hosts every sandbox may reach: package registries and the common git hosts (as core/src/egress.rs).
DEFAULT_ALLOW: tuple[str, ...] = (
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
)


def url_host(url: str | None) -> str | None:
    """The host of an `http(s)://` or `ssh://` URL (lowercase, without port or credentials), or None."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme not in ("http", "https", "ssh") or not host:
        return None
    return host.lower()


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Egress:
    """The host patterns (`example.com`, `*.example.com`, `host:port`) a sandbox may reach, in order, without repeats."""

    allow: tuple[str, ...]

    @staticmethod
    def of(patterns: Iterable[str]) -> Egress:
        seen: dict[str, None] = {}
        for p in patterns:
            seen.setdefault(p.lower().rstrip("."), None)
        return Egress(tuple(seen))

    def with_host(self, host: str | None) -> Egress:
        return self if host is None else Egress.of((*self.allow, host))

    def modal_domains(self) -> list[str]:
        """Names for `outbound_domain_allowlist` (Modal matches the TLS server name, port 443 only; no ports here)."""
        out: dict[str, None] = {}
        for p in self.allow:
            host = p.rsplit(":", 1)[0] if ":" in p else p
            if _ip(host) is None:
                out.setdefault(host, None)
        return list(out)

    def modal_cidrs(self) -> list[str]:
        """IP literals as single-address ranges for `outbound_cidr_allowlist` (Modal opens every port of them)."""
        out: dict[str, None] = {}
        for p in self.allow:
            host = p.rsplit(":", 1)[0] if ":" in p else p
            ip = _ip(host)
            if ip is not None:
                out.setdefault(f"{ip}/{ip.max_prefixlen}", None)
        return list(out)


def policy(
    repository_egress: Iterable[str],
    *,
    clone_url: str | None,
    control_url: str | None,
    model_urls: Iterable[str] = (),
) -> Egress:
    """A sandbox's allowlist: the defaults, the repository's patterns, then the clone, control and model hosts."""
    allow = Egress.of((*DEFAULT_ALLOW, *repository_egress))
    for url in (clone_url, control_url, *model_urls):
        allow = allow.with_host(url_host(url))
    return allow

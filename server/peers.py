"""Who is on the other end: the client address of a request.

The TCP peer is the only address the server knows for certain. A reverse proxy in front
of the server (nginx, a load balancer) makes every request come from the proxy; the
proxy then names the real client in ``X-Forwarded-For`` (or the standard ``Forwarded:
for=``, RFC 7239). Anybody can send those headers, so they are believed only when the
peer is a proxy the administrator listed (``medview-server serve --trusted-proxy CIDR``,
repeatable; default none): with no trusted proxy, the client address *is* the peer.

With trusted proxies, the header is read from the right (the entry the nearest proxy
added) to the left, skipping entries that are themselves trusted proxies; the first
untrusted entry is the client. Entries further left were written by the client and are
ignored. An entry that is not an IP address stops the walk at the last proxy.

:func:`client_address` is the one place this is decided; the login throttle, the audit
log and the site policy's "place" all use it (through :func:`peer_of`). uvicorn's own
proxy-header handling (which trusts 127.0.0.1 by default) is switched off where the
server is started.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Sequence

__all__ = ["HEADERS", "parse_networks", "client_address", "peer_of", "has_forwarding"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")
_FOR_RE = re.compile(r'(?:^|;)\s*for\s*=\s*("([^"]*)"|[^;,\s]*)', re.IGNORECASE)


def parse_networks(specs: Iterable[str]) -> tuple[Network, ...]:
    """CIDR blocks (or single addresses) → networks; a clear ValueError otherwise."""
    out = []
    for spec in specs:
        if isinstance(spec, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            out.append(spec)
            continue
        try:
            out.append(ipaddress.ip_network(str(spec).strip(), strict=False))
        except ValueError:
            raise ValueError(f"--trusted-proxy wants an address or a CIDR block such as "
                             f"10.0.0.0/8, got {spec!r}") from None
    return tuple(out)


def _ip(text: str | None):
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:          # [v6]:port (Forwarded)
        text = text[1:text.index("]")]
    elif text.count(":") == 1:                         # v4:port
        text = text.split(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip, trusted: Sequence[Network]) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in trusted)


def _hops(header: str, values: list[str]) -> list[str]:
    """The addresses a forwarding header lists, left (client) to right (nearest)."""
    if header == "forwarded":
        hops = []
        for value in values:
            for element in value.split(","):
                m = _FOR_RE.search(element)
                hops.append((m.group(2) if m.group(2) is not None else m.group(1)) if m else "")
        return hops
    return [h.strip() for value in values for h in value.split(",")]


def client_address(peer: str | None, headers, trusted: Sequence[Network] = (),
                   header: str = "x-forwarded-for") -> str | None:
    """The client address of a request that came from ``peer`` with ``headers`` (a
    Starlette ``Headers`` or any mapping with ``getlist``), believing ``header`` only
    from ``trusted`` proxies."""
    peer_ip = _ip(peer)
    if not trusted or not _trusted(peer_ip, trusted):
        return peer
    values = headers.getlist(header) if hasattr(headers, "getlist") else \
        [v for k, v in headers.items() if k.lower() == header]
    client = str(peer_ip)
    for hop in reversed(_hops(header, values)):
        ip = _ip(hop)
        if ip is None:
            break                    # garbage: the last proxy is all we know
        client = str(ip)
        if not _trusted(ip, trusted):
            break
    return client


def has_forwarding(headers) -> bool:
    """Whether the request claims to be forwarded for someone else."""
    return any(h in headers for h in HEADERS)


def peer_of(request) -> str | None:
    """The client address of a Starlette request, under the application's settings
    (``app.state.trusted_proxies`` and ``app.state.proxy_header``; none by default)."""
    peer = request.client.host if request.client else None
    state = getattr(request.app, "state", None) if "app" in request.scope else None
    trusted = getattr(state, "trusted_proxies", ()) if state is not None else ()
    header = getattr(state, "proxy_header", "x-forwarded-for") if state is not None else \
        "x-forwarded-for"
    return client_address(peer, request.headers, trusted, header)

"""Fetching an image URL a client sent, without letting the URL reach what it should not.

A URL is fetched only under a prefix of the server's allow-list (``--allow-url``). Its host is
resolved once; every address in the answer must be public (not private, loopback, link-local,
multicast, reserved, unspecified or otherwise not globally routable, IPv4 embedded in IPv6
included), unless the server allows private addresses (``--allow-private-urls``). The request is
then sent to that checked address itself (the URL's host rewritten to it, with the ``Host``
header and the TLS server name kept), so a DNS answer that changes after the check is never
used. Redirects are followed by hand, at most ``MAX_REDIRECTS``, each hop checked the same way
(prefix, then addresses). The whole fetch has one deadline and a size limit; proxies from the
environment are ignored (a proxy would resolve the host itself). Every refusal is a
``RequestError`` naming the URL and the problem.
"""

from __future__ import annotations

import asyncio
import ipaddress
import posixpath
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

from modalforge.errors import RequestError

FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})
NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def allowed(url: str, prefix: str) -> bool:
    """``url`` is under ``prefix``: the same scheme and host (port included) and, once ``.``
    and ``..`` segments are resolved, a path under the prefix's -- so ``http://host.evil/`` is
    not under ``http://host``, nor ``/ok/../secret`` under ``/ok/``. A URL that cannot be parsed
    (``http://[::1/``) is under no prefix."""
    try:
        u, p = urlsplit(url), urlsplit(prefix)
    except ValueError:
        return False
    if (u.scheme, u.netloc.lower()) != (p.scheme, p.netloc.lower()) or u.scheme not in (
        "http",
        "https",
    ):
        return False
    path = posixpath.normpath(u.path or "/") + ("/" if u.path.endswith("/") else "")
    base = p.path or "/"
    return path.startswith(base if base.endswith("/") else base + "/") or path == base


def _embedded(ip: Address) -> Iterator[Address]:
    """Any IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64), then ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            yield ip.ipv4_mapped
        if ip.sixtofour is not None:
            yield ip.sixtofour
        if ip.teredo is not None:
            yield from ip.teredo
        if ip in NAT64:
            yield ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    yield ip


def address_problem(ip: Address) -> str | None:
    """Why a fetch may not connect to ``ip`` (``"loopback"``, ``"private"`` ...), or ``None``."""
    for a in _embedded(ip):
        for name in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
            if getattr(a, f"is_{name}"):
                return name.replace("_", "-")
        if not a.is_global:
            return "not globally routable"
    return None


async def resolve(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to (one lookup; an IP literal is itself)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[Address] = []
    for family, *_, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # no IPv6 zone
        if ip not in found:
            found.append(ip)
    return found


async def _pin(url: Any, shown: str, where: str, allow_private: bool) -> Address:
    """The one checked address ``url`` (an ``httpx.URL``) is fetched from."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = await resolve(host, port)
    except (OSError, UnicodeError, ValueError) as err:
        raise RequestError(f"{where}: cannot resolve the host of {shown}: {err}",
                           param=where) from None  # fmt: skip
    if not addresses:
        raise RequestError(f"{where}: the host of {shown} has no IP address", param=where)
    if not allow_private:
        for ip in addresses:
            problem = address_problem(ip)
            if problem is not None:
                carried = [str(a) for a in _embedded(ip) if a != ip]
                named = f"{ip} ({', '.join(carried)})" if carried else str(ip)
                raise RequestError(f"{where}: {shown} resolves to {named}, a {problem} address: "
                                   "refused (the server fetches only from public addresses)",
                                   param=where)  # fmt: skip
    return addresses[0]


def _parse(url: str, shown: str, where: str, allow: tuple[str, ...]) -> Any:
    """``url`` as the ``httpx.URL`` that will be requested, once it is under an allowed prefix
    and both URL parsers (the allow-list's and httpx's) agree on its host and port."""
    import httpx

    if not any(allowed(url, prefix) for prefix in allow):
        raise RequestError(f"{where}: {shown} is not under an allowed URL prefix "
                           f"({list(allow)})", param=where)  # fmt: skip
    try:
        parsed, split = httpx.URL(url), urlsplit(url)
        default = 443 if split.scheme == "https" else 80
        same_host = (split.hostname or "") in (parsed.host, parsed.raw_host.decode("ascii"))
        same_port = (split.port or default) == (parsed.port or default)
    except (httpx.InvalidURL, UnicodeError, ValueError) as err:
        raise RequestError(f"{where}: {shown} is not a valid URL: {err}", param=where) from None
    if not (same_host and same_port and parsed.host):
        raise RequestError(f"{where}: {shown} is ambiguous (its host is read two ways)",
                           param=where)  # fmt: skip
    return parsed


async def fetch_url(
    url: str,
    where: str,
    allow: tuple[str, ...],
    max_bytes: int,
    *,
    allow_private: bool = False,
    timeout_s: float = FETCH_TIMEOUT_S,
    transport: Any = None,
) -> bytes:
    """The body of ``url`` (a ``200`` after at most ``MAX_REDIRECTS`` redirects), at most
    ``max_bytes`` long, within ``timeout_s`` in all. ``transport``: an ``httpx`` transport
    (tests); default: a real connection, to the checked address."""
    import httpx

    first = url
    try:
        async with (
            asyncio.timeout(timeout_s),
            httpx.AsyncClient(transport=transport, timeout=timeout_s, follow_redirects=False,
                              trust_env=False) as client,
        ):  # fmt: skip
            for hop in range(MAX_REDIRECTS + 1):
                shown = url if hop == 0 else f"{url} (redirected from {first})"
                parsed = _parse(url, shown, where, allow)
                ip = await _pin(parsed, shown, where, allow_private)
                target = parsed.copy_with(host=str(ip))
                headers = {"Host": parsed.netloc.decode("ascii"), "Accept-Encoding": "identity"}
                extensions = {"sni_hostname": parsed.raw_host.decode("ascii")}
                async with client.stream("GET", target, headers=headers,
                                         extensions=extensions) as response:  # fmt: skip
                    if response.status_code in REDIRECTS:
                        location = response.headers.get("location")
                        if not location:
                            raise RequestError(f"{where}: {shown} redirects nowhere "
                                               f"(HTTP {response.status_code} without Location)",
                                               param=where)  # fmt: skip
                        try:
                            url = urljoin(url, location)
                        except ValueError:
                            raise RequestError(f"{where}: {shown} redirects to an invalid URL "
                                               f"{location!r}", param=where) from None  # fmt: skip
                        continue
                    return await _body(response, shown, where, max_bytes)
    except TimeoutError:
        raise RequestError(f"{where}: fetching {first} took longer than {timeout_s:g} s",
                           param=where) from None  # fmt: skip
    except httpx.HTTPError as err:
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise RequestError(f"{where}: fetching {first} failed: {detail}",
                           param=where) from None  # fmt: skip
    raise RequestError(f"{where}: {first} redirects more than {MAX_REDIRECTS} times",
                       param=where)  # fmt: skip


async def _body(response: Any, shown: str, where: str, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise RequestError(f"{where}: fetching {shown} gave HTTP {response.status_code}",
                           param=where)  # fmt: skip
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestError(f"{where}: {shown} came {encoding}-encoded; only plain bodies are "
                           "fetched", param=where)  # fmt: skip
    declared = response.headers.get("content-length", "")
    too_big = RequestError(f"{where}: {shown} is larger than {max_bytes:,} bytes", status=413,
                           param=where)  # fmt: skip
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    data = bytearray()
    async for chunk in response.aiter_bytes():  # not decoded: identity only, checked above
        data += chunk
        if len(data) > max_bytes:
            raise too_big
    return bytes(data)

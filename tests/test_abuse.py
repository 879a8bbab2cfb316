"""Abuse limits (issue 18, item 6): per-client rate limit and in-flight cap (429 +
``Retry-After``), image URLs fetched only from public addresses (DNS pinned, redirects checked
hop by hop), and manifest paths that stay under their root."""

import asyncio
import concurrent.futures
import http.server
import ipaddress
import os
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from modalforge.errors import RequestError
from modalforge.serve import Engine, ServeConfig, create_app
from modalforge.serve.fetch import address_problem, fetch_url
from modalforge.serve.limits import ClientLimits, client_id
from modalforge.serve.routes.generate import image_bytes

from .conftest import COLORS, png_bytes
from .serving import train_toy_bundle

IMAGE = png_bytes((30, 30), COLORS["g"])


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    """A tiny text-only classifier: any POST /v1/* route to limit."""
    bundle = train_toy_bundle(tmp_path_factory.mktemp("abuse"), inputs=("text",))
    return Engine.from_bundle(bundle, cache_dir=bundle.parent / "cache")


# -- per-client limits --------------------------------------------------------------------------
class Peers:
    """The app, with each request's peer address taken from its ``x-peer`` header (one
    TestClient, one event loop, many clients)."""

    def __init__(self, app) -> None:
        self.app = app

    @property
    def state(self):
        return self.app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            peer = dict(scope["headers"]).get(b"x-peer")
            if peer is not None:
                scope = {**scope, "client": (peer.decode(), 4000)}
        await self.app(scope, receive, send)


OTHER = {"x-peer": "198.51.100.7"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_token_bucket_refills_at_its_rate_and_caps_requests_in_flight():
    clock = Clock()
    limits = ClientLimits(rate=2, burst=3, max_concurrency=None, clock=clock)
    assert [limits.acquire("a") for _ in range(3)] == [None] * 3  # the burst
    refused = limits.acquire("a")
    assert refused.reason == "rate" and refused.retry_after == pytest.approx(0.5)
    assert "2 requests/s" in refused.message and "bursts of 3" in refused.message
    assert limits.acquire("b") is None  # another client has its own bucket
    clock.now += 0.5
    assert limits.acquire("a") is None and limits.acquire("a").reason == "rate"
    clock.now += 60  # refills up to the burst, never beyond
    assert [limits.acquire("a") for _ in range(4)][-1].reason == "rate"

    cap = ClientLimits(rate=None, max_concurrency=2, clock=clock)
    assert cap.acquire("a") is None and cap.acquire("a") is None
    refused = cap.acquire("a")
    assert (
        refused.reason == "concurrency"
        and refused.retry_after >= 1
        and "at most 2" in refused.message
    )
    cap.release("a")
    assert cap.acquire("a") is None
    for bad in [{"rate": 0}, {"rate": float("nan")}, {"burst": 0}, {"max_concurrency": 0}]:
        with pytest.raises(ValueError):
            ClientLimits(**bad)


def test_client_entries_are_evicted_so_memory_stays_bounded_under_many_addresses():
    clock = Clock()
    limits = ClientLimits(rate=10, burst=5, max_concurrency=4, max_clients=1000, clock=clock)
    busy = "ip:192.0.2.1"
    assert limits.acquire(busy) is None  # in flight throughout: never evicted
    for i in range(50_000):  # each address drains part of its bucket, none refills meanwhile
        assert limits.acquire(f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}") is None
        limits.release(f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(limits.entries) <= 1000 and busy in limits.entries
    clock.now += 1  # every bucket has refilled (5 tokens at 10/s): idle entries say nothing
    assert limits.acquire("ip:203.0.113.9") is None
    assert set(limits.entries) == {busy, "ip:203.0.113.9"}
    limits.release(busy)
    assert limits.entries[busy].in_flight == 0
    limits.release("ip:198.51.100.1")  # unknown (evicted) client: nothing to release, no error


def test_a_client_is_its_checked_api_key_else_its_address_an_ipv6_one_by_its_64():
    assert client_id({"client": ("203.0.113.5", 1)}, None) == "ip:203.0.113.5"
    a = client_id({"client": ("2001:db8:1:2:aaaa::1", 1)}, None)
    assert a == client_id({"client": ("2001:db8:1:2:ffff::9", 2)}, None) == "ip:2001:db8:1:2::/64"
    assert a != client_id({"client": ("2001:db8:1:3::1", 1)}, None)
    assert client_id({"client": ("::ffff:203.0.113.5", 1)}, None) == "ip:203.0.113.5"
    key = client_id({"client": ("203.0.113.5", 1)}, b"s3cret")
    assert key.startswith("key:") and "s3cret" not in key
    assert key == client_id({"client": ("198.51.100.7", 1)}, b"s3cret")
    assert client_id({}, None) == "unknown"


def test_over_the_rate_limit_is_429_with_retry_after_per_client(engine):
    config = ServeConfig(rate_limit=20, rate_burst=2)
    app = create_app(engine, config)
    with TestClient(Peers(app)) as c:
        assert [c.post("/v1/predict", json={"text": "x"}).status_code for _ in range(2)] == [
            200
        ] * 2
        r = c.post("/v1/predict", json={"text": "x"})
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == 429
        assert "20 requests/s" in error["message"]
        assert r.headers["Retry-After"] == "1"  # 0.05 s, rounded up to a whole second
        # a made-up API key (this server checks none) does not buy a fresh bucket
        assert c.post("/v1/predict", json={"text": "x"},
                      headers={"X-API-Key": "new-every-time"}).status_code == 429  # fmt: skip
        assert c.post("/v1/predict", json={"text": "x"}, headers=OTHER).status_code == 200
        assert c.get("/v1/models").status_code == 200  # reads are not limited
        time.sleep(0.06)  # one token back at 20/s
        assert c.post("/v1/predict", json={"text": "x"}).status_code == 200
        text = c.get("/metrics").text
        assert 'modalforge_rate_limited_total{reason="rate"} 2.0' in text
        assert 'modalforge_rate_limited_total{reason="concurrency"} 0.0' in text
        assert 'modalforge_requests_total{route="/v1/predict",status="429"} 2.0' in text


def test_with_an_api_key_the_key_is_the_client_and_401_comes_first(engine):
    app = create_app(engine, ServeConfig(api_key="k", rate_limit=0.5, rate_burst=1))
    key = {"Authorization": "Bearer k"}
    with TestClient(Peers(app)) as c:
        assert c.post("/v1/predict", json={"text": "x"}).status_code == 401  # no token taken
        assert c.post("/v1/predict", json={"text": "x"}, headers=key).status_code == 200
        r = c.post("/v1/predict", json={"text": "x"}, headers={**key, **OTHER})  # another host
        assert r.status_code == 429 and r.headers["Retry-After"] == "2"


def test_too_many_requests_in_flight_from_one_client_is_429(engine):
    release = threading.Event()

    def held(requests):  # the model answers only once the test says so
        release.wait(10)
        return engine.handle(requests)

    app = create_app(engine, ServeConfig(max_client_concurrency=2))
    with TestClient(Peers(app)) as c, concurrent.futures.ThreadPoolExecutor(6) as pool:
        c.app.state.batcher.fn = held
        mine = [pool.submit(c.post, "/v1/predict", json={"text": "x"}) for _ in range(5)]
        deadline = time.monotonic() + 10
        while sum(f.done() for f in mine) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        done = [f.result() for f in mine if f.done()]
        assert [r.status_code for r in done] == [429] * 3, [r.text for r in done]
        assert app.client_limits.entries["ip:testclient"].in_flight == 2
        theirs = pool.submit(c.post, "/v1/predict", json={"text": "x"}, headers=OTHER)
        while app.client_limits.entries.get("ip:198.51.100.7") is None:  # admitted meanwhile
            time.sleep(0.01)
        release.set()
        assert sorted(f.result().status_code for f in mine) == [200, 200, 429, 429, 429]
        assert theirs.result().status_code == 200  # another client is not held up
        error = done[0].json()["error"]
        assert error["type"] == "rate_limit_error" and "at most 2 at once" in error["message"]
        assert done[0].headers["Retry-After"] == "1"
        assert all(e.in_flight == 0 for e in app.client_limits.entries.values())  # released
        assert c.post("/v1/predict", json={"text": "x"}).status_code == 200
        assert 'modalforge_rate_limited_total{reason="concurrency"} 3.0' in c.get("/metrics").text


def test_the_serve_command_documents_the_limits():
    from typer.testing import CliRunner

    from modalforge.cli import app as cli

    shown = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0
    for flag in ("--rate-limit", "--rate-burst", "--max-client-concurrency", "--allow-url",
                 "--allow-private-urls"):  # fmt: skip
        assert flag in shown.output, flag
    bad = CliRunner().invoke(cli, ["serve", "nowhere", "--rate-limit", "0"])
    assert bad.exit_code == 1 and "--rate-limit must be a positive" in bad.output


# -- URL fetching -------------------------------------------------------------------------------
def fetch(url, allow, **kw):
    return asyncio.run(fetch_url(url, "messages[0].content[0].image_url.url", allow, 10_000, **kw))


class Resolver:
    """``socket.getaddrinfo`` for made-up names: ``answers[host]`` is a list of answers, one per
    lookup (the last repeats); IP literals go to the real resolver. ``asked`` counts lookups."""

    def __init__(self, monkeypatch, answers: dict[str, list[list[str]]]) -> None:
        self.answers, self.asked, self.real = answers, {}, socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        if host not in self.answers:
            return self.real(host, port, family, type, proto, flags)
        n = self.asked[host] = self.asked.get(host, 0) + 1
        answer = self.answers[host][min(n, len(self.answers[host])) - 1]
        out = []
        for a in answer:
            v6 = ipaddress.ip_address(a).version == 6
            sockaddr = (a, port, 0, 0) if v6 else (a, port)
            out.append((socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                        sockaddr))  # fmt: skip
        return out


class Web:
    """An ``httpx.MockTransport`` standing in for the internet: ``pages[(ip, path)]`` is a
    response; every request it gets is kept in ``seen``."""

    def __init__(self, pages: dict[tuple[str, str], httpx.Response]) -> None:
        self.pages, self.seen = pages, []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return self.pages.get((request.url.host, request.url.path), httpx.Response(404))


@pytest.fixture
def local_server():
    """A real HTTP server on 127.0.0.1: /a.png is an image, /r redirects to it; -> (port, the
    Host header of each request it got)."""
    hosts = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hosts.append(self.headers["Host"])
            if self.path == "/r":
                self.send_response(302)
                self.send_header("Location", "/a.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], hosts
    finally:
        server.shutdown()
        server.server_close()


def test_urls_are_not_fetched_unless_allowed():
    for allow in [(), ("https://images.example/ok/",)]:
        with pytest.raises(RequestError, match="not fetched") as err:
            asyncio.run(image_bytes("https://images.example/secret.png", "w", allow, 1000))
        assert err.value.param == "w" and 400 <= err.value.status < 500
    for url in ("file:///etc/passwd", "ftp://images.example/ok/a.png", "http://[::1/ok/a.png"):
        with pytest.raises(RequestError, match="not fetched"):
            asyncio.run(image_bytes(url, "w", ("https://images.example/ok/",), 1000))


def test_a_server_on_loopback_is_refused_in_every_spelling(local_server):
    port, hosts = local_server
    for url in [
        f"http://127.0.0.1:{port}/a.png",
        f"http://localhost:{port}/a.png",
        f"http://2130706433:{port}/a.png",  # 127.0.0.1 as one decimal number
        f"http://0x7f.1:{port}/a.png",
        f"http://[::ffff:127.0.0.1]:{port}/a.png",
        f"http://[::1]:{port}/a.png",
        f"http://0.0.0.0:{port}/a.png",
    ]:
        prefix = url.rsplit("/", 1)[0] + "/"
        with pytest.raises(RequestError, match="refused") as err:
            fetch(url, (prefix,))
        assert url in err.value.message and err.value.status == 422, err.value.message
        assert any(w in err.value.message for w in ("loopback", "unspecified")), err.value.message
    assert hosts == []  # nothing reached the server
    # the operator may allow private addresses: then the same server is fetched, redirect too
    assert fetch(f"http://127.0.0.1:{port}/r", (f"http://127.0.0.1:{port}/",),
                 allow_private=True) == IMAGE  # fmt: skip
    assert hosts == [f"127.0.0.1:{port}"] * 2


def test_the_checked_address_is_the_one_connected_to(monkeypatch, local_server):
    port, hosts = local_server
    resolver = Resolver(monkeypatch, {"images.test": [["127.0.0.1"], ["192.0.2.55"]]})
    url = f"http://images.test:{port}/a.png"
    assert fetch(url, (f"http://images.test:{port}/",), allow_private=True) == IMAGE
    # resolved once; the connection went to that answer with the URL's own Host header (a second
    # lookup would have got an address where nothing listens)
    assert resolver.asked == {"images.test": 1} and hosts == [f"images.test:{port}"]


@pytest.mark.parametrize(
    "address",
    ["10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.2", "169.254.169.254", "0.0.0.0",
     "224.0.0.1", "240.0.0.1", "255.255.255.255", "100.64.0.1", "192.0.2.1", "::1", "::",
     "fe80::1", "fc00::1", "ff02::1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
     "2002:a00:1::1", "64:ff9b::a9fe:a9fe", "2001:db8::1"],
)  # fmt: skip
def test_every_non_public_address_is_refused(monkeypatch, address):
    assert address_problem(ipaddress.ip_address(address)) is not None
    # one bad address among good ones is enough: a client cannot count on which one is used
    Resolver(monkeypatch, {"images.test": [["93.184.216.34", address, "2606:4700::1111"]]})
    web = Web({("93.184.216.34", "/a.png"): httpx.Response(200, content=IMAGE)})
    with pytest.raises(RequestError, match=f"resolves to {ipaddress.ip_address(address)}"):
        fetch("http://images.test/a.png", ("http://images.test/",), transport=web.transport)
    assert web.seen == []


def test_public_addresses_pass_and_the_request_goes_to_the_pinned_one(monkeypatch):
    for public in ("93.184.216.34", "8.8.8.8", "2606:4700::1111", "2a00:1450::1"):
        assert address_problem(ipaddress.ip_address(public)) is None, public
    # the DNS answer changes after the check: the fetch still goes to the checked address
    resolver = Resolver(monkeypatch, {"img.test": [["93.184.216.34"], ["127.0.0.1"]]})
    web = Web({("93.184.216.34", "/a.png"): httpx.Response(200, content=IMAGE)})
    assert fetch("https://img.test/a.png", ("https://img.test/",), transport=web.transport) == IMAGE
    (request,) = web.seen
    assert request.url.host == "93.184.216.34" and request.url.scheme == "https"
    assert request.headers["host"] == "img.test"
    assert request.extensions["sni_hostname"] == "img.test"  # TLS checks the name's certificate
    assert resolver.asked == {"img.test": 1}


def test_redirects_are_followed_by_hand_and_each_hop_is_checked_again(monkeypatch):
    Resolver(monkeypatch, {
        "img.test": [["93.184.216.34"]],
        "internal.test": [["10.0.0.7"]],
        "rebind.test": [["93.184.216.35"], ["127.0.0.1"]],
    })  # fmt: skip
    to = lambda where: httpx.Response(302, headers={"Location": where})  # noqa: E731
    pub, reb = "93.184.216.34", "93.184.216.35"
    web = Web({
        (pub, "/a"): to("/b"), (pub, "/b"): to("b2"), (pub, "/b2"): httpx.Response(200, content=IMAGE),
        (pub, "/internal"): to("http://internal.test/x.png"),
        (pub, "/metadata"): to("http://169.254.169.254/latest/meta-data/"),
        (pub, "/away"): to("http://elsewhere.test/x.png"),
        (pub, "/loop"): to("/loop"), (pub, "/nowhere"): httpx.Response(302),
        (pub, "/bad"): to("http://[::1/x"),
        (reb, "/r"): to("/again"),
    })  # fmt: skip
    allow = ("http://img.test/", "http://internal.test/", "http://169.254.169.254/",
             "http://rebind.test/")  # fmt: skip
    assert fetch("http://img.test/a", allow, transport=web.transport) == IMAGE
    assert [r.url.path for r in web.seen] == ["/a", "/b", "/b2"]
    for path, needle in [
        ("/internal", "http://internal.test/x.png (redirected from http://img.test/internal) "
                      "resolves to 10.0.0.7, a private address"),
        ("/metadata", "resolves to 169.254.169.254, a link-local address"),
        ("/away", "http://elsewhere.test/x.png (redirected from http://img.test/away) is not "
                  "under an allowed URL prefix"),
        ("/loop", "redirects more than 3 times"),
        ("/nowhere", "redirects nowhere"),
        ("/bad", "fetching http://img.test/bad failed: RemoteProtocolError: Invalid URL"),
    ]:  # fmt: skip
        web.seen.clear()
        with pytest.raises(RequestError) as err:
            fetch(f"http://img.test{path}", allow, transport=web.transport)
        assert needle in err.value.message, err.value.message
        assert all(r.url.host == pub for r in web.seen)  # no request left the public host
    # DNS rebinding between hops: the second lookup's answer is checked like the first
    web.seen.clear()
    with pytest.raises(RequestError, match=r"resolves to 127\.0\.0\.1, a loopback address"):
        fetch("http://rebind.test/r", allow, transport=web.transport)
    assert [(r.url.host, r.url.path) for r in web.seen] == [(reb, "/r")]


def test_a_fetch_has_a_size_limit_a_deadline_and_names_the_url(monkeypatch):
    Resolver(monkeypatch, {"img.test": [["93.184.216.34"]]})

    async def trickle():
        for _ in range(100):
            yield b"x" * 1000

    async def slow(request):
        await asyncio.sleep(5)
        return httpx.Response(200, content=IMAGE)

    pub = "93.184.216.34"
    web = Web({
        (pub, "/big"): httpx.Response(200, headers={"Content-Length": "99999999"}, content=b"x"),
        (pub, "/stream"): httpx.Response(200, content=trickle()),
        (pub, "/gone"): httpx.Response(404),
        (pub, "/gz"): httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"x"),
    })  # fmt: skip
    allow = ("http://img.test/",)
    for path, status, needle in [
        ("/big", 413, "is larger than 10,000 bytes"),
        ("/stream", 413, "is larger than 10,000 bytes"),
        ("/gone", 422, "gave HTTP 404"),
        ("/gz", 422, "gzip-encoded"),
    ]:
        with pytest.raises(RequestError) as err:
            fetch(f"http://img.test{path}", allow, transport=web.transport)
        assert err.value.status == status and needle in err.value.message, err.value.message
        assert f"http://img.test{path}" in err.value.message
    started = time.monotonic()
    with pytest.raises(RequestError, match=r"took longer than 0\.2 s"):
        fetch("http://img.test/slow", allow, transport=httpx.MockTransport(slow), timeout_s=0.2)
    assert time.monotonic() - started < 2
    Resolver(monkeypatch, {"nowhere.test": [[]]})
    with pytest.raises(RequestError, match="no IP address"):
        fetch("http://nowhere.test/a.png", ("http://nowhere.test/",))


# -- manifest paths -----------------------------------------------------------------------------
def test_manifest_paths_that_leave_the_root_are_row_errors_naming_row_and_column(tmp_path):
    import json

    from typer.testing import CliRunner

    from modalforge.cli import app as cli
    from modalforge.data.manifest import read_manifest
    from modalforge.data.validate import validate_manifest
    from modalforge.schema import Schema

    root, outside = tmp_path / "data", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    for folder in (root / "img", outside):  # a decodable image: only the path may refuse it
        (folder / "x.png").write_bytes(IMAGE)
    os.symlink(outside / "x.png", root / "img" / "link.png")  # a file link out of the root
    os.symlink(outside, root / "img" / "linkdir")  # a folder link out of the root
    os.symlink(root / "img" / "x.png", root / "img" / "inside.png")  # a link within: fine
    rows = [
        "img/x.png",
        "../outside/x.png",
        str(outside / "x.png"),
        "img/link.png",
        "img/linkdir/x.png",
        "img/../../outside/x.png",
        str(root / "img" / "x.png"),
        "img/inside.png",
        "file://" + str(outside / "x.png"),
    ]
    manifest = root / "m.csv"
    manifest.write_text("image,label\n" + "".join(f"{r},a\n" for r in rows))
    report = validate_manifest(
        read_manifest(manifest), Schema.from_specs(["image=image", "label=label"])
    )
    refused = {p.row: p for p in report.problems}
    assert sorted(refused) == [1, 2, 3, 4, 5, 8], report.lines()
    assert {p.kind for p in refused.values()} == {"outside_root"}
    assert {p.column for p in refused.values()} == {"image"}
    lines = report.lines()
    assert lines[0].startswith("row 1 (line 3), column image: outside_root: '../outside/x.png'")
    assert any(line.startswith("row 3 (line 5), column image: outside_root: 'img/link.png' "
                               "resolves outside") for line in lines)  # fmt: skip

    out = CliRunner().invoke(cli, ["data", "validate", str(manifest), "-c", "image=image",
                                   "--label", "label", "--report", str(tmp_path / "r.json")])  # fmt: skip
    assert out.exit_code == 1, out.output
    assert "row 4 (line 6), column image: outside_root" in " ".join(out.output.split())
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["counts"] == {"outside_root": 6}
    assert [p["where"] for p in saved["problems"]][:2] == ["row 1 (line 3)", "row 2 (line 4)"]

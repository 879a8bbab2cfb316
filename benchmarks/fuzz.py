"""Fuzz every kind of served bundle: schemathesis against its OpenAPI schema plus modalforge's own
hostile media (``hostile_media.py``), one request at a time, against a real ``modalforge serve``.

    .venv/bin/python benchmarks/fuzz.py                       # every kind, 10,000 requests each
    .venv/bin/python benchmarks/fuzz.py --kinds classifier --requests 300 --out /tmp/fuzz.json

Per kind (classifier, contrastive + index, caption, VQA, transcription, chat LLM): a tiny bundle
is built (``tests/bundles.py``, the serving tests' recipes), served in a subprocess on
127.0.0.1 with its log in a file, warmed up, then sent ``--requests`` requests: ``--schema-share``
of them drawn by schemathesis from ``/openapi.json`` (positive and negative cases of every
operation), the rest hostile requests drawn by ``hostile_media.requests(kind)``. Requests go one
at a time, so whatever the server logs while one is in flight (a traceback) belongs to it.

Recorded per kind: a status histogram (overall, per route, per source); every response >= 500
with the request that caused it (a curl line for schemathesis cases; method, url, headers and the
start of the body for hostile ones) and the server's traceback; hostile requests that must be
refused but got a 2xx; transport failures (timeouts, the server gone); the server's RSS (process
and children) before, after and every ``--rss-every`` requests. Writes JSON and a plot (status
histogram per kind, RSS over requests), each to a temporary name renamed into place.

Targets (issue 18; reported, not asserted here): 0 responses >= 500, RSS growth <= 5 %.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from tests.serving import free_port, stop_server  # noqa: E402

from _machine import cpu_name  # noqa: E402
from hostile_media import KINDS, Hostile, requests  # noqa: E402
from modalforge.files import atomic_path, atomic_write_json  # noqa: E402

#: most 5xx responses / accepted hostile requests kept in full per kind (all are counted)
KEEP = 200


# -- a served bundle ------------------------------------------------------------------------------
class Server:
    """``modalforge serve BUNDLE ARGS`` (this checkout's ``src``) on a free port, its output in
    ``log``; ``url``, ``pid``, ``rss_kb()``, ``log_since(offset)``."""

    def __init__(
        self,
        bundle: Path,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log: Path | None = None,
        timeout: float = 180,
    ) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(tempfile.mkstemp(prefix="modalforge-serve-", suffix=".log")[1])
        child_env = {
            **os.environ,
            "MODALFORGE_CACHE": str(bundle.parent / "mfcache"),
            **(env or {}),
        }
        child_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        child_env.pop("MODALFORGE_API_KEY", None)
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modalforge.cli",
                "serve",
                str(bundle),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *args,
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=child_env,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server exited:\n{self.log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server was not ready within {timeout:g} s")
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def log_size(self) -> int:
        self._out.flush()
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read(200_000).decode("utf-8", "replace")

    def stop(self) -> None:
        stop_server(self.proc)
        self._out.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its children, kB (psutil, else /proc/PID/status)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs) // 1024
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for process {pid}") from None


def traceback_of(log: str) -> dict[str, Any] | None:
    """The last traceback in a stretch of server log: its exception line, the innermost frame
    in modalforge's code and the whole text (capped)."""
    start = log.rfind("Traceback (most recent call last)")
    if start < 0:
        return None
    lines = log[start:].splitlines()
    frames = [ln.strip() for ln in lines if ln.strip().startswith('File "')]
    ours = [f for f in frames if "modalforge" in f and "site-packages" not in f]
    exception = next((ln for ln in lines[1:] if ln and not ln.startswith(" ")), lines[-1])
    return {
        "exception": exception.strip(),
        "frame": (ours or frames or [""])[-1],
        "text": "\n".join(lines[:60]),
    }


# -- describing a request -------------------------------------------------------------------------
def describe(request: dict[str, Any]) -> dict[str, Any]:
    """A hostile request as JSON: method, url, headers, body length, sha256, the first 600
    bytes (base64) -- enough to see what it was and to rebuild it from ``hostile_media``."""
    body = request.get("content")
    if body is None and "json" in request:
        body = json.dumps(request["json"]).encode()
    body = body or b""
    out = {
        "method": request.get("method", "POST"),
        "url": request["url"],
        "headers": request.get("headers", {}),
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest()[:16],
        "body_head_b64": base64.b64encode(body[:600]).decode(),
    }
    if "files" in request:
        out["files"] = {k: [v[0], len(v[1]), v[2]] for k, v in request["files"].items()}
    return out


# -- one kind -------------------------------------------------------------------------------------
class Tally:
    """What a kind's run saw."""

    def __init__(self) -> None:
        self.status: Counter[str] = Counter()
        self.by_route: dict[str, Counter[str]] = {}
        self.by_source: dict[str, Counter[str]] = {}
        self.server_errors: list[dict[str, Any]] = []
        self.distinct: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.accepted: dict[str, dict[str, Any]] = {}
        self.accepted_count = 0
        self.transport: Counter[str] = Counter()
        self.transport_examples: list[dict[str, Any]] = []
        self.n = 0

    def add(self, source: str, route: str, status: str) -> None:
        self.n += 1
        self.status[status] += 1
        self.by_route.setdefault(route, Counter())[status] += 1
        self.by_source.setdefault(source, Counter())[status] += 1

    def server_error(
        self,
        route: str,
        status: int,
        source: str,
        name: str,
        request: Any,
        response: str,
        tb: dict[str, Any] | None,
    ) -> None:
        exception = (tb or {}).get("exception", response[:160])
        # one entry per route, exception and place: numbers in the message do not split it
        key = (route, re.sub(r"\d+", "N", exception), (tb or {}).get("frame", ""))
        entry = self.distinct.setdefault(
            key,
            {
                "route": route,
                "status": status,
                "exception": exception,
                "frame": key[2],
                "count": 0,
                "example": name,
                "request": request,
                "traceback": (tb or {}).get("text"),
            },
        )
        entry["count"] += 1
        if len(self.server_errors) < KEEP:
            self.server_errors.append(
                {
                    "route": route,
                    "status": status,
                    "source": source,
                    "name": name,
                    "request": request,
                    "response": response[:500],
                    "exception": exception,
                    "frame": key[2],
                }
            )


def fuzz_kind(
    kind: str,
    server: Server,
    n: int,
    schema_share: float,
    seed: int,
    rss_every: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``n`` requests against ``server`` (a ``kind`` bundle) -> that kind's results."""
    import httpx
    import requests as requests_lib
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema_cases = st.one_of(
        schema.as_strategy(generation_mode=m) for m in schemathesis.GenerationMode
    )
    hostile = requests(kind)
    tally = Tally()
    session = requests_lib.Session()
    client = httpx.Client(base_url=server.url, timeout=60)
    rss = [(0, server.rss_kb())]
    started = time.monotonic()
    state = {"gone": False}

    def one(
        source: str, send: Callable[[], Any], route: str, name: str, request: Any, refuse: bool
    ) -> None:
        if state["gone"] or tally.n >= n:
            return
        offset = server.log_size()
        try:
            r = send()
        except (httpx.HTTPError, requests_lib.RequestException) as err:
            # uvicorn closes a connection whose request raised (even once a 500 went out):
            # the next request on it fails -- counted apart, it is that 500's doing
            after = state.get(source) == "5xx"
            what = type(err).__name__ + (" after a 5xx on the connection" if after else "")
            tally.transport[what] += 1
            tally.add(source, route, "transport")
            if len(tally.transport_examples) < KEEP:
                tally.transport_examples.append(
                    {"error": what, "detail": str(err)[:300], "name": name, "request": request}
                )
            state[source] = "transport"
            if not server.alive():
                state["gone"] = True
            return
        code = r.status_code
        state[source] = "5xx" if code >= 500 else "ok"
        tally.add(source, route, str(code))
        if code >= 500:
            tb = None
            for _ in range(10):  # the traceback may land just after the response
                tb = traceback_of(server.log_since(offset))
                if tb:
                    break
                time.sleep(0.05)
            tally.server_error(route, code, source, name, request, r.text, tb)
        elif refuse and code < 400:
            tally.accepted_count += 1
            if name not in tally.accepted and len(tally.accepted) < KEEP:
                tally.accepted[name] = {
                    "name": name,
                    "status": code,
                    "request": request,
                    "response": r.text[:300],
                }
        if tally.n % rss_every == 0:
            rss.append((tally.n, server.rss_kb()))
        if progress:
            progress(1)

    def schema_one(case) -> None:
        route = f"{case.method.upper()} {case.operation.path}"
        one(
            "schemathesis",
            lambda: case.call(base_url=server.url, session=session, timeout=60),
            route,
            f"schemathesis {route}",
            {"curl": case.as_curl_command()[:4000]},
            False,
        )

    def hostile_one(h: Hostile) -> None:
        request = dict(h.request)
        route = f"{request.get('method', 'POST')} {request['url']}"
        one(
            "hostile", lambda: client.request(**request), route, h.name, describe(request), h.refuse
        )

    rng = random.Random(seed)
    stalled = 0
    generation_errors: Counter[str] = Counter()
    while tally.n < n and not state["gone"]:
        left = n - tally.n
        take_schema = round(min(left, 250) * schema_share)
        take_hostile = min(left, 250) - take_schema
        for strategy, fn, count in (
            (schema_cases, schema_one, take_schema),
            (hostile, hostile_one, take_hostile),
        ):
            if count <= 0:
                continue
            before = tally.n

            config = settings(
                max_examples=count,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            try:
                hypothesis_seed(rng.randrange(2**32))(config(given(strategy)(fn)))()
            except Exception as err:  # a strategy that cannot draw (not the server's fault)
                generation_errors[f"{type(err).__name__}: {str(err)[:200]}"] += 1
            if tally.n == before:  # the strategy yields nothing new: do not spin
                stalled += 1
        if stalled > 3:
            break
    rss.append((tally.n, server.rss_kb() if server.alive() else 0))
    client.close()
    seconds = time.monotonic() - started
    before, after = rss[0][1], rss[-1][1]
    return {
        "kind": kind,
        "requests": tally.n,
        "seconds": round(seconds, 1),
        "requests_per_s": round(tally.n / max(seconds, 1e-9), 1),
        "status": dict(sorted(tally.status.items())),
        "status_by_source": {k: dict(sorted(v.items())) for k, v in tally.by_source.items()},
        "status_by_route": {k: dict(sorted(v.items())) for k, v in sorted(tally.by_route.items())},
        "responses_5xx": sum(v for k, v in tally.status.items() if k.isdigit() and int(k) >= 500),
        "distinct_5xx": sorted(tally.distinct.values(), key=lambda d: -d["count"]),
        "server_errors": tally.server_errors,
        "hostile_accepted": tally.accepted_count,
        "hostile_accepted_examples": list(tally.accepted.values()),
        "transport_errors": dict(tally.transport),
        "transport_examples": tally.transport_examples,
        "generation_errors": dict(generation_errors),
        "server_alive": server.alive(),
        "rss_kb": {
            "before": before,
            "after": after,
            "growth": round((after - before) / max(before, 1), 4),
            "samples": rss,
        },
    }


# -- results --------------------------------------------------------------------------------------
def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary path)`` beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    return atomic_write_json(path, payload)


def plot(payload: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = payload["kinds"]
    fig, (bars, mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(kinds)
    groups = {"2xx": "tab:green", "4xx": "tab:blue", "5xx": "tab:red", "other": "tab:gray"}
    bottom = [0] * len(names)
    for group, colour in groups.items():
        counts = []
        for k in names:
            total = 0
            for code, c in kinds[k]["status"].items():
                g = f"{code[0]}xx" if code.isdigit() and code[0] in "245" else "other"
                total += c if g == group else 0
            counts.append(total)
        bars.bar(names, counts, bottom=bottom, color=colour, label=group)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    for i, k in enumerate(names):
        bars.text(i, bottom[i], f"5xx: {kinds[k]['responses_5xx']}", ha="center", va="bottom")
    bars.set_ylabel("responses")
    bars.set_title("status per bundle kind", pad=16)
    bars.legend()
    for k in names:
        samples = kinds[k]["rss_kb"]["samples"]
        mem.plot([s[0] for s in samples], [s[1] / 1024 for s in samples], marker=".", label=k)
    mem.set_xlabel("requests")
    mem.set_ylabel("server RSS (MiB)")
    mem.set_title("server memory")
    mem.legend()
    fig.suptitle(
        f"modalforge fuzz: schemathesis + hostile media ({payload['requests_per_kind']} "
        "requests per kind)"
    )
    fig.tight_layout()
    write_atomic(png, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def bundle_of(kind: str, folder: Path):
    """The ``kind`` bundle built under ``folder`` (``tests/bundles.py``), or the one built there
    by an earlier run (its ``served.json``) -> a ``tests.bundles.Served``."""
    from tests.bundles import Served, build

    record = folder / "served.json"
    if record.exists():
        d = json.loads(record.read_text())
        return Served(d["kind"], Path(d["path"]), tuple(d["args"]), d["env"])
    shutil.rmtree(folder, ignore_errors=True)  # a build cut short: start clean
    served = build(kind, folder)
    write_json(
        record,
        {"kind": kind, "path": str(served.path), "args": list(served.args), "env": served.env},
    )
    return served


def build_and_fuzz(
    kinds: list[str],
    n: int,
    work: Path,
    schema_share: float,
    seed: int,
    rss_every: int,
    out: Path | None,
    show: bool = True,
) -> dict[str, Any]:
    """Build, serve and fuzz each kind; write ``out`` (+ .png) after each kind."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    payload: dict[str, Any] = {
        "benchmark": "fuzz",
        "command": " ".join(sys.argv),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "requests_per_kind": n,
        "schema_share": schema_share,
        "seed": seed,
        "kinds": {},
    }
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show) as bar:
        for kind in kinds:
            task = bar.add_task(f"{kind}: building", total=n)
            t0 = time.monotonic()
            served = bundle_of(kind, work / kind)
            built_s = time.monotonic() - t0
            bar.update(task, description=f"{kind}: fuzzing")
            with Server(served.path, served.args, served.env, log=work / f"{kind}-server.log") as s:
                result = fuzz_kind(
                    kind, s, n, schema_share, seed, rss_every, lambda k, t=task: bar.advance(t, k)
                )
            result["build_seconds"] = round(built_s, 1)
            result["server_log"] = str(work / f"{kind}-server.log")
            payload["kinds"][kind] = result
            bar.update(task, description=f"{kind}: {result['responses_5xx']} 5xx")
            if out is not None:
                write_json(out, payload)
                plot(payload, out.with_suffix(".png"))
    return payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {KINDS}")
    ap.add_argument("--requests", type=int, default=10_000, help="requests per kind")
    ap.add_argument(
        "--schema-share",
        type=float,
        default=0.5,
        help="the share drawn by schemathesis (the rest: hostile media)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-every", type=int, default=250, help="sample RSS every N requests")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where bundles and logs go (default: a temporary folder, removed after)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        ap.error(f"--kinds: unknown {unknown}; the kinds are {list(KINDS)}")
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-")))
        payload = build_and_fuzz(
            kinds, args.requests, work, args.schema_share, args.seed, args.rss_every, args.out
        )
    print(f"{args.out}:")
    for kind, r in payload["kinds"].items():
        print(
            f"  {kind:14s} {r['requests']:6d} requests  5xx {r['responses_5xx']:4d} "
            f"(distinct {len(r['distinct_5xx'])})  hostile accepted {r['hostile_accepted']:4d}  "
            f"RSS {r['rss_kb']['before'] // 1024} -> {r['rss_kb']['after'] // 1024} MiB  "
            f"{r['status']}"
        )
    return (
        1
        if any(r["responses_5xx"] or not r["server_alive"] for r in payload["kinds"].values())
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "Server",
    "build_and_fuzz",
    "fuzz_kind",
    "rss_kb",
    "traceback_of",
    "write_atomic",
    "write_json",
]

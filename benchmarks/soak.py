"""Soak a served bundle: many concurrent clients for minutes, a share of them hostile, and every
good answer checked against the answer the same request gets alone.

    .venv/bin/python benchmarks/soak.py                     # classifier, 64 clients, 10 min, 10 %
    .venv/bin/python benchmarks/soak.py --kind chat --clients 16 --minutes 1 --out /tmp/soak.json

A tiny bundle of ``--kind`` (``tests/bundles.py``) is served by ``modalforge serve`` in a
subprocess. A fixed pool of good requests (``good_pool(kind)``: every route and input mix of the
kind) is sent once each, one at a time: those are the alone answers. Then ``--clients`` asyncio
clients (httpx, one pool of as many connections) send requests back to back for ``--minutes``:
each one hostile with probability ``--hostile`` (drawn from ``hostile_media.corpus(kind)``), else a
good one from the pool. A good request must get 200 and its alone answer (floats to 1e-5, the
serving tests' ``same_answer``; ids, timestamps and usage left out, search hits as their scores
and sets of tied ids); anything else -- another status, a timeout, a different answer -- is an
error on a good request. A hostile request must not get a 5xx, and one that must be refused must
get a 4xx.

Recorded: latency p50 / p99 of good requests (overall and per minute), throughput per minute
(good, hostile), statuses, every error on a good request (the first ``KEEP`` in full), hostile
5xx and hostile requests accepted, the server's RSS every ``--rss-every`` seconds. The RSS
growth is measured from the end of a warm-up (``--warmup-s`` of the same load: first-use
allocations of full batches are not a leak) to the end. Writes JSON and a plot (throughput,
latency and RSS over time), each atomically.

Targets (issue 18; reported here, asserted by tests/test_soak.py's short run): 0 errors on good
requests, RSS growth <= 5 % (10 min @ 64 clients, 10 % hostile).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from tests.conftest import COLORS, PITCH, WORDS, png_bytes, sine, wav_bytes  # noqa: E402
from tests.serving import same_answer  # noqa: E402

from _machine import cpu_name  # noqa: E402
from fuzz import Server, bundle_of, describe, write_atomic, write_json  # noqa: E402
from hostile_media import KINDS, Hostile, corpus, data_url, image_bytes  # noqa: E402

KEEP = 100
#: fields of an answer that differ between two calls of the same request
VOLATILE = ("id", "created", "usage", "system_fingerprint")


# -- the good requests ----------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def good_pool(kind: str) -> list[dict[str, Any]]:
    """Good requests (httpx kwargs) for ``kind``: every route it serves and every input mix,
    JSON and multipart, each with a deterministic answer (greedy decoding where there is a
    choice)."""
    colours = ["r", "g", "b"]
    out: list[dict[str, Any]] = []
    if kind == "classifier":
        for i in range(24):
            c = colours[i % 3]
            image, words = png_bytes((30, 30), COLORS[c]), f"a {WORDS[c]} {i}"
            tone = wav_bytes(sine(PITCH[c], 0.25 + 0.01 * i))
            shape = i % 6
            if shape == 0:
                out.append({"url": "/v1/predict", "json": {"image": b64(image), "text": words}})
            elif shape == 1:
                out.append(
                    {
                        "url": "/v1/predict",
                        "files": {"image": ("x.png", image, "image/png")},
                        "data": {"text": words},
                    }
                )
            elif shape == 2:
                out.append({"url": "/v1/predict", "json": {"audio": b64(tone), "text": words}})
            elif shape == 3:
                out.append(
                    {
                        "url": "/v1/predict",
                        "files": {
                            "audio": ("x.wav", tone, "audio/wav"),
                            "image": ("x.png", image, "image/png"),
                        },
                    }
                )
            elif shape == 4:
                out.append({"url": "/v1/predict", "json": {"image": data_url("image/png", image)}})
            else:
                out.append(
                    {
                        "url": "/v1/predict/batch",
                        "json": {
                            "inputs": [{"text": words}, {"image": b64(image), "audio": b64(tone)}]
                        },
                    }
                )
    elif kind == "contrastive":
        for i in range(24):
            c = colours[i % 3]
            image, tone = png_bytes((30, 30), COLORS[c]), wav_bytes(sine(PITCH[c], 0.25))
            if i % 4 == 0:
                out.append({"url": "/v1/embeddings", "json": {"input": [WORDS[c], f"{c} {i}"]}})
            elif i % 4 == 1:
                out.append(
                    {
                        "url": "/v1/embeddings",
                        "json": {
                            "input": [data_url("image/png", image), data_url("audio/wav", tone)]
                        },
                    }
                )
            elif i % 4 == 2:
                out.append({"url": "/v1/search", "json": {"query": WORDS[c], "k": 3 + i % 5}})
            else:
                out.append(
                    {"url": "/v1/search", "json": {"query": data_url("image/png", image), "k": 5}}
                )
    elif kind == "caption":
        for i in range(12):
            image = png_bytes((30, 30), COLORS[colours[i % 3]])
            if i % 3 == 0:
                out.append({"url": "/v1/caption", "json": {"image": b64(image)}})
            elif i % 3 == 1:
                out.append(
                    {"url": "/v1/caption", "files": {"image": ("x.png", image, "image/png")}}
                )
            else:
                out.append(
                    {
                        "url": "/v1/chat/completions",
                        "json": chat_image(
                            data_url("image/png", image), "what is this?", temperature=0
                        ),
                    }
                )
    elif kind == "vqa":
        for i in range(12):
            c = colours[i % 3]
            image = png_bytes((30, 30), COLORS[c])
            question = (
                "what colour is this?" if i % 2 else f"is this {['red', 'green', 'blue'][i % 3]}?"
            )
            if i % 3 == 0:
                out.append(
                    {"url": "/v1/predict", "json": {"image": b64(image), "question": question}}
                )
            else:
                out.append(
                    {
                        "url": "/v1/chat/completions",
                        "json": chat_image(data_url("image/png", image), question),
                    }
                )
    elif kind == "transcription":
        import numpy as np

        for i in range(6):
            wave = (0.1 * np.random.default_rng(i).standard_normal(8000 + 1600 * i)).astype("f4")
            fmt = "FLAC" if i % 2 else "WAV"
            out.append(
                {
                    "url": "/v1/audio/transcriptions",
                    "data": {"model": "asr"},
                    "files": {
                        "file": (
                            f"x.{fmt.lower()}",
                            wav_bytes(wave, fmt=fmt),
                            f"audio/{fmt.lower()}",
                        )
                    },
                }
            )
    elif kind == "chat":
        for i in range(8):
            c = colours[i % 2]
            image = image_bytes("PNG", (32, 32), COLORS[c])
            if i % 4 == 0:
                out.append(
                    {
                        "url": "/v1/chat/completions",
                        "json": {
                            "model": "bundle",
                            "messages": [{"role": "user", "content": f"say {WORDS[c]}"}],
                            "temperature": 0,
                            "max_tokens": 4,
                        },
                    }
                )
            elif i % 4 == 1:
                out.append(
                    {
                        "url": "/v1/chat/completions",
                        "json": {
                            "model": "bundle",
                            **chat_image(
                                data_url("image/png", image), "what?", temperature=0, max_tokens=4
                            ),
                        },
                    }
                )
            elif i % 4 == 2:
                tone = wav_bytes(sine(PITCH[c], 0.25))
                out.append(
                    {
                        "url": "/v1/chat/completions",
                        "json": {
                            "model": "bundle",
                            "temperature": 0,
                            "max_tokens": 4,
                            "messages": [
                                {
                                    "role": "user",
                                    "content": [
                                        {"type": "text", "text": "said?"},
                                        {
                                            "type": "input_audio",
                                            "input_audio": {"data": b64(tone), "format": "wav"},
                                        },
                                    ],
                                }
                            ],
                        },
                    }
                )
            else:
                out.append(
                    {
                        "url": "/v1/completions",
                        "json": {
                            "model": "bundle",
                            "prompt": f"the cat {i}",
                            "max_tokens": 3,
                            "temperature": 0,
                        },
                    }
                )
    else:
        raise ValueError(f"kind {kind!r}: expected one of {list(KINDS)}")
    return [{"method": "POST", **r} for r in out]


def chat_image(url: str, text: str, **options) -> dict[str, Any]:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        **options,
    }


def answer_of(response) -> Any:
    """What must not change between two calls of one good request: the JSON body less
    ``VOLATILE`` fields (top level), or the text. Search hits become ``search_answer``'s."""
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if isinstance(body, dict):
            for key in VOLATILE:
                body.pop(key, None)
            data = body.get("data")
            if data and isinstance(data, list) and data[0].get("object") == "search_result":
                body["data"] = search_answer(data)
        return body
    return response.text


def search_answer(hits: list[dict[str, Any]], tie: float = 1e-5) -> dict[str, Any]:
    """The hits of a search as what must not change: the scores in rank order, and the ids of
    each run of tied scores (within ``tie``) as a set -- the index holds identical vectors (rows
    of the same colour and shade), whose order among themselves is arbitrary, and a batched
    query embedding differs from the lone one in the last bits. Of the last run only its size
    counts: which of several tied entries make the cut at ``k`` is arbitrary too."""
    groups: list[list[dict[str, Any]]] = []
    for hit in hits:
        if groups and abs(groups[-1][0]["score"] - hit["score"]) <= tie:
            groups[-1].append(hit)
        else:
            groups.append([hit])
    return {
        "scores": [h["score"] for h in hits],
        "tied_ids": [sorted(h["id"] for h in g) for g in groups[:-1]],
        "last_run": len(groups[-1]) if groups else 0,
    }


# -- the load -------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _load(
    url: str,
    good: list[dict],
    alone: list[Any],
    hostile: list[Hostile],
    clients: int,
    seconds: float,
    warmup_s: float,
    share: float,
    seed: int,
    rss: Any,
    rss_every: float,
    timeout: float,
) -> dict[str, Any]:
    import httpx

    rng = random.Random(seed)
    t0 = time.monotonic()
    end = t0 + warmup_s + seconds
    events: list[tuple[float, str, float, str]] = []  # (time since t0, good|hostile, s, status)
    errors: list[dict[str, Any]] = []
    error_count = Counter()
    hostile_5xx: list[dict[str, Any]] = []
    accepted: dict[str, dict[str, Any]] = {}
    counts = Counter()
    rss_samples: list[tuple[float, int]] = [(0.0, rss())]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def sample_rss() -> None:
        while time.monotonic() < end:
            await asyncio.sleep(rss_every)
            rss_samples.append((round(time.monotonic() - t0, 1), rss()))

    async def client(h: httpx.AsyncClient, me: int) -> None:
        mine = random.Random(rng.randrange(2**32))
        while time.monotonic() < end:
            bad = mine.random() < share
            if bad:
                item = mine.choice(hostile)
                request, i = item.request, -1
            else:
                i = mine.randrange(len(good))
                request = good[i]
            start = time.monotonic()
            try:
                r = await h.request(**request)
                status = str(r.status_code)
            except httpx.HTTPError as err:
                r, status = None, f"transport {type(err).__name__}"
            took = time.monotonic() - start
            events.append((start - t0, "hostile" if bad else "good", took, status))
            counts[("hostile" if bad else "good", status)] += 1
            if bad:
                code = r.status_code if r is not None else 599
                if code >= 500 and len(hostile_5xx) < KEEP:
                    hostile_5xx.append(
                        {
                            "name": item.name,
                            "status": status,
                            "request": describe(request),
                            "response": r.text[:300] if r is not None else None,
                        }
                    )
                elif item.refuse and code < 400 and item.name not in accepted:
                    accepted[item.name] = {
                        "name": item.name,
                        "status": status,
                        "response": r.text[:300],
                    }
                continue
            problem = None
            if r is None or r.status_code != 200:
                problem = f"status {status}"
            else:
                try:
                    same_answer(answer_of(r), alone[i])
                except AssertionError as err:
                    problem = f"answer differs from alone: {str(err)[:300]}"
            if problem:
                error_count[problem.split(":")[0]] += 1
                if len(errors) < KEEP:
                    errors.append(
                        {
                            "good": i,
                            "at_s": round(start - t0, 2),
                            "problem": problem,
                            "response": r.text[:300] if r is not None else None,
                        }
                    )

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as h:
        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(client(h, k) for k in range(clients)))
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    rss_samples.append((round(time.monotonic() - t0, 1), rss()))
    return {
        "events": events,
        "errors": errors,
        "error_count": dict(error_count),
        "hostile_5xx": hostile_5xx,
        "accepted": list(accepted.values()),
        "counts": counts,
        "rss": rss_samples,
        "seconds": time.monotonic() - t0,
    }


def summarize(raw: dict[str, Any], warmup_s: float) -> dict[str, Any]:
    """Per-minute throughput and latency, RSS growth after the warm-up, statuses."""
    events = raw["events"]
    measured = [e for e in events if e[0] >= warmup_s]
    good = [e[2] for e in measured if e[1] == "good"]
    minutes: dict[int, dict[str, Any]] = {}
    for t, what, took, _status in measured:
        m = minutes.setdefault(int((t - warmup_s) // 60), {"good": 0, "hostile": 0, "lat": []})
        m[what] += 1
        if what == "good":
            m["lat"].append(took)
    per_minute = []
    for m, v in sorted(minutes.items()):
        per_minute.append(
            {
                "minute": m,
                "good": v["good"],
                "hostile": v["hostile"],
                "p50_ms": _ms(percentile(v["lat"], 50)),
                "p99_ms": _ms(percentile(v["lat"], 99)),
            }
        )
    rss = raw["rss"]
    after_warmup = [kb for t, kb in rss if t >= warmup_s]
    base = after_warmup[0] if after_warmup else rss[0][1]
    end = rss[-1][1]
    status: dict[str, dict[str, int]] = {"good": {}, "hostile": {}}
    for (what, code), n in sorted(raw["counts"].items()):
        status[what][code] = n
    hostile_5xx = sum(
        n
        for (what, code), n in raw["counts"].items()
        if what == "hostile" and (not code.isdigit() or int(code) >= 500)
    )
    measured_s = max(raw["seconds"] - warmup_s, 1e-9)
    return {
        "requests": len(events),
        "measured_requests": len(measured),
        "good_requests": sum(1 for e in events if e[1] == "good"),
        "hostile_requests": sum(1 for e in events if e[1] == "hostile"),
        "errors_on_good": sum(raw["error_count"].values()),
        "errors_on_good_by_kind": raw["error_count"],
        "error_examples": raw["errors"],
        "hostile_5xx": hostile_5xx,
        "hostile_5xx_examples": raw["hostile_5xx"],
        "hostile_accepted_examples": raw["accepted"],
        "status": status,
        "latency_ms": {
            "p50": _ms(percentile(good, 50)),
            "p99": _ms(percentile(good, 99)),
            "max": _ms(max(good) if good else None),
        },
        "throughput_per_s": round(len(measured) / measured_s, 1),
        "per_minute": per_minute,
        "rss_kb": {
            "start": rss[0][1],
            "after_warmup": base,
            "end": end,
            "peak": max(k for _, k in rss),
            "growth_after_warmup": round((end - base) / max(base, 1), 4),
            "samples": rss,
        },
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def soak(
    server: Server,
    kind: str,
    clients: int,
    seconds: float,
    share: float,
    warmup_s: float,
    seed: int = 0,
    rss_every: float = 10.0,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """The alone answers, then the load -> the summary (``summarize``) with the alone phase."""
    import httpx

    good = good_pool(kind)
    alone = []
    t = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=timeout) as h:
        for request in good:
            r = h.request(**request)
            if r.status_code != 200:
                raise RuntimeError(
                    f"good request {request['url']} got {r.status_code} alone: {r.text[:300]}"
                )
            alone.append(answer_of(r))
    alone_s = time.monotonic() - t
    hostile = corpus(kind)
    raw = asyncio.run(
        _load(
            server.url,
            good,
            alone,
            hostile,
            clients,
            seconds,
            warmup_s,
            share,
            seed,
            server.rss_kb,
            rss_every,
            timeout,
        )
    )
    out = summarize(raw, warmup_s)
    out.update(
        {
            "kind": kind,
            "clients": clients,
            "seconds": seconds,
            "warmup_s": warmup_s,
            "hostile_share": share,
            "good_pool": len(good),
            "hostile_corpus": len(hostile),
            "alone_seconds": round(alone_s, 2),
            "server_alive": server.alive(),
        }
    )
    return out


# -- results --------------------------------------------------------------------------------------
def plot(payload: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = payload["result"]
    fig, (thr, lat, mem) = plt.subplots(1, 3, figsize=(15, 4.2))
    mins = [m["minute"] for m in r["per_minute"]]
    thr.bar([m - 0.2 for m in mins], [m["good"] for m in r["per_minute"]], 0.4, label="good")
    thr.bar([m + 0.2 for m in mins], [m["hostile"] for m in r["per_minute"]], 0.4, label="hostile")
    thr.set_xlabel("minute")
    thr.set_ylabel("requests")
    thr.set_title("throughput per minute")
    thr.legend()
    lat.plot(mins, [m["p50_ms"] for m in r["per_minute"]], marker="o", label="p50")
    lat.plot(mins, [m["p99_ms"] for m in r["per_minute"]], marker="o", label="p99")
    lat.set_xlabel("minute")
    lat.set_ylabel("ms (good requests)")
    lat.set_title("latency")
    lat.legend()
    samples = r["rss_kb"]["samples"]
    mem.plot([s[0] for s in samples], [s[1] / 1024 for s in samples], marker=".")
    mem.axvline(r["warmup_s"], color="gray", linestyle=":", label="end of warm-up")
    mem.set_xlabel("s")
    mem.set_ylabel("server RSS (MiB)")
    mem.set_title(f"RSS (growth after warm-up {100 * r['rss_kb']['growth_after_warmup']:.1f} %)")
    mem.legend()
    fig.suptitle(
        f"modalforge soak: {r['kind']}, {r['clients']} clients, {r['seconds'] / 60:g} min, "
        f"{100 * r['hostile_share']:g} % hostile: {r['errors_on_good']} errors on "
        f"{r['good_requests']} good requests"
    )
    fig.tight_layout()
    write_atomic(png, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="classifier", choices=KINDS)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--hostile", type=float, default=0.1, help="share of hostile requests")
    ap.add_argument(
        "--warmup-s",
        type=float,
        default=30.0,
        help="seconds of the same load before the measured window",
    )
    ap.add_argument("--rss-every", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where the bundle and the server log go (default: a temporary folder, removed after)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        served = bundle_of(args.kind, work / args.kind)
        with Server(served.path, served.args, served.env, log=work / "server.log") as server:
            result = soak(
                server,
                args.kind,
                args.clients,
                60 * args.minutes,
                args.hostile,
                args.warmup_s,
                args.seed,
                args.rss_every,
            )
    payload = {
        "benchmark": "soak",
        "command": " ".join(sys.argv),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "result": result,
    }
    write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))
    r = result
    print(
        f"{args.out}: {r['requests']} requests ({r['throughput_per_s']}/s), "
        f"{r['errors_on_good']} errors on {r['good_requests']} good, hostile 5xx "
        f"{r['hostile_5xx']}, p50 {r['latency_ms']['p50']} ms p99 {r['latency_ms']['p99']} ms, "
        f"RSS {r['rss_kb']['after_warmup'] // 1024} -> {r['rss_kb']['end'] // 1024} MiB "
        f"({100 * r['rss_kb']['growth_after_warmup']:+.1f} %)"
    )
    return 1 if r["errors_on_good"] or r["hostile_5xx"] or not r["server_alive"] else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["answer_of", "good_pool", "soak", "summarize"]

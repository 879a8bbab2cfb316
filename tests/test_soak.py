"""The short version of ``benchmarks/soak.py``: 60 s of 16 concurrent clients against a real
``modalforge serve`` of the tiny classifier, 10 % of the requests hostile (the fixed corpus).
Every good request must get 200 and exactly the answer it gets alone (floats to 1e-5), no hostile
one a 5xx and each certain client mistake a 4xx; memory stays bounded: after a 10-s warm-up of
the same load the server's RSS ends within 10 % of where it was and never goes above 1.5x."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz
import soak


def test_sixty_seconds_of_sixteen_clients_with_hostile_requests(classifier_bundle, tmp_path):
    with fuzz.Server(classifier_bundle, log=tmp_path / "server.log") as server:
        r = soak.soak(server, "classifier", clients=16, seconds=50, share=0.1, warmup_s=10,
                      rss_every=5)  # fmt: skip
        assert server.alive()
    assert r["good_requests"] > 100 and r["hostile_requests"] > 5, r["status"]
    assert r["errors_on_good"] == 0, (r["errors_on_good_by_kind"], r["error_examples"][:5])
    assert r["hostile_5xx"] == 0, [(e["name"], e["status"]) for e in r["hostile_5xx_examples"]]
    assert not r["hostile_accepted_examples"], [e["name"] for e in r["hostile_accepted_examples"]]
    rss = r["rss_kb"]
    base = rss["after_warmup"]
    assert rss["end"] <= 1.10 * base, rss["samples"]
    assert max(kb for t, kb in rss["samples"] if t >= r["warmup_s"]) <= 1.5 * base, rss["samples"]

"""Ray Serve (``modalforge.serve.ray_serve``): the merged metrics and the board on their own,
the ``serve run`` config's builder, and a real deployment of 2 replicas on the local Ray."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest

from modalforge.serve.app import ServeConfig
from modalforge.serve.ray_serve import Board, RayOptions, merge_metrics

from .conftest import COLORS, png_bytes

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ray-serve.yaml"


def _exposition(requests: int) -> bytes:
    from modalforge.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    for _ in range(requests):
        metrics.observe_request("/v1/predict", 200, 0.01)
    metrics.observe_batch(requests, 0.02, 0.001)
    return metrics.render()


def test_merged_metrics_label_every_replica_once():
    from prometheus_client.parser import text_string_to_metric_families

    text = merge_metrics({"b": _exposition(2), "a": _exposition(3)}).decode()
    assert text.count("# HELP modalforge_requests_total ") == 1
    assert text.count("# TYPE modalforge_request_seconds histogram") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}  # it parses back
    counts = {s.labels["replica"]: s.value for s in families["modalforge_requests"].samples
              if s.name == "modalforge_requests_total"}  # fmt: skip
    assert counts == {"a": 3.0, "b": 2.0}
    buckets = [s for s in families["modalforge_request_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]  # fmt: skip
    assert sorted((s.labels["replica"], s.value) for s in buckets) == [("a", 3.0), ("b", 2.0)]


def test_board_hands_out_one_tuning_and_forgets_silent_replicas(monkeypatch):
    from modalforge.serve import ray_serve

    board = Board()
    assert board.claim_tuning("r1") == ("tune", None)
    assert board.claim_tuning("r2") == ("wait", None)  # r1 is tuning
    kept = board.publish_tuning("r1", {"image": {"chunk_size": 4}})
    assert board.publish_tuning("r2", {"image": {"chunk_size": 8}}) == kept  # the first stays
    assert board.claim_tuning("r2") == ("apply", {"image": {"chunk_size": 4}})
    board.report("r1", {"status": "ready"})
    board.report("r2", {"status": "ready"})
    board.reports["r2"]["seen"] -= ray_serve.STALE_AFTER_S + 1
    view = board.view()
    assert list(view["replicas"]) == ["r1"] and view["tuned_by"] == "r1"
    board.leave("r1")
    assert board.view()["replicas"] == {}
    # a claim that published nothing in time passes to the next replica that asks
    fresh = Board()
    fresh.claim_tuning("r1")
    monkeypatch.setattr(ray_serve, "TUNING_LEASE_S", -1.0)
    assert fresh.claim_tuning("r2") == ("tune", None)


def test_ray_options_derive_the_deployment():
    config = ServeConfig(max_batch=16, max_queue=100)
    fixed = RayOptions(replicas=3, replica_cpus=2).deployment_options(config)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2}
    assert fixed["max_ongoing_requests"] == 32 and fixed["max_queued_requests"] == 100
    scaled = RayOptions(min_replicas=1, max_replicas=4).deployment_options(config)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                            "initial_replicas": 1,
                                            "target_ongoing_requests": 16.0}  # fmt: skip
    for bad in (RayOptions(replicas=0), RayOptions(min_replicas=2),
                RayOptions(min_replicas=3, max_replicas=2), RayOptions(replica_cpus=0)):  # fmt: skip
        with pytest.raises(ValueError):
            bad.deployment_options(config)


def test_serve_run_config_builds_the_application(local_ray, tmp_path):
    import yaml
    from ray.serve import Application
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(raw)  # what `serve run` / `serve deploy` check first
    (spec,) = raw["applications"]
    builder = import_attr(spec["import_path"])
    built = builder({**spec["args"], "bundle": str(tmp_path)})  # building reads no bundle
    assert isinstance(built, Application)
    deployment = built._bound_deployment
    assert deployment.num_replicas == 2
    assert deployment.ray_actor_options["num_cpus"] == 1
    assert deployment.max_ongoing_requests == 2 * spec["args"]["max_batch"]
    assert deployment.init_args[0] == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="unknown args"):
        builder({"bundle": str(tmp_path), "replica": 2})


@pytest.fixture(scope="module")
def clip_bundle(tmp_path_factory) -> Path:
    """A contrastive bundle trained for 1 epoch: random-ish, but it embeds (text and image)."""
    from .bundles import contrastive_manifest, contrastive_predictor

    root = tmp_path_factory.mktemp("rayclip")
    manifest = contrastive_manifest(root)
    p = contrastive_predictor(manifest, epochs=1)
    p.fit(manifest, out_dir=root / "run", progress=False)
    return p.save(root / "clip").path


def _replica_counts(url: str, route: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    helps = [line for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps)) and "# HELP modalforge_requests_total" in text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "modalforge_requests_total" and s.labels["route"] == route:
                replica = s.labels["replica"]
                counts[replica] = counts.get(replica, 0.0) + s.value
    return counts


def _until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


@pytest.mark.slow
def test_two_replicas_serve_the_same_app(local_ray, clip_bundle):
    import base64

    import openai
    from ray import serve

    from modalforge.serve.ray_serve import DEPLOYMENT, application

    from .serving import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        built = application(clip_bundle, ServeConfig(max_batch=8),
                            RayOptions(replicas=2, replica_cpus=1))  # fmt: skip
        serve.run(built, name=DEPLOYMENT, route_prefix="/")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        assert name == "clip"
        words = ["red apple", "green leaf", "blue sea"] * 16
        with concurrent.futures.ThreadPoolExecutor(16) as pool:  # enough to reach both
            got = list(pool.map(lambda w: client.embeddings.create(model=name, input=w,
                                                                   encoding_format="float"),
                                words))  # fmt: skip
        first = {w: g.data[0].embedding for w, g in zip(words, got, strict=True)}
        assert len(first["red apple"]) == 32
        for w, g in zip(words, got, strict=True):  # same weights everywhere: same answers
            assert g.data[0].embedding == pytest.approx(first[w], abs=1e-5)
        # plain HTTP: an image as a data URL, and malformed requests are 4xx, not 500
        image = "data:image/png;base64," + base64.b64encode(png_bytes((30, 30),
                                                                      COLORS["r"])).decode()  # fmt: skip
        r = httpx.post(f"{url}/v1/embeddings", json={"input": [image, "red"]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
        for bad in ({"input": []}, {"input": "red", "extra": 1}):
            r = httpx.post(f"{url}/v1/embeddings", json=bad, timeout=30)
            assert r.status_code == 422 and r.json()["error"]["message"], r.text
        r = httpx.post(f"{url}/v1/embeddings", content=b"{not json",
                       headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
        assert 400 <= r.status_code < 500, r.text
        # every replica answered, and /metrics shows each one's labelled counters
        counts = _until(lambda: (c := _replica_counts(url, "/v1/embeddings")) and len(c) == 2
                        and c)  # fmt: skip
        assert counts and len(counts) == 2 and all(v > 0 for v in counts.values()), counts
        assert sum(counts.values()) >= len(words)
        # /readyz: ready, with both replicas, tuned alike (one measured, the other applied it)
        ready = _until(lambda: (b := httpx.get(f"{url}/readyz", timeout=10).json())
                       .get("ready_replicas") == 2 and b)  # fmt: skip
        assert ready and ready["status"] == "ready" and set(ready["replicas"]) == set(counts)
        tunings = [v["tuning"] for v in ready["replicas"].values()]
        assert tunings[0] == tunings[1] and tunings[0]["image"]["chunk_size"] >= 1, tunings
        assert ready["tuned_by"] in counts
        card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        assert card["serving"]["tuning"] == tunings[0]
    finally:
        serve.shutdown()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)

    def serve_actors() -> list[str]:
        from ray.util import list_named_actors

        return [a["name"] for a in list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_")]  # fmt: skip

    _until(lambda: not serve_actors(), 15)
    assert not serve_actors(), serve_actors()  # the controller, the proxy, the board: gone


def test_ray_flags_need_ray(tmp_path):
    from typer.testing import CliRunner

    from modalforge.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", str(tmp_path), "--replicas", "2"])
    assert result.exit_code != 0 and "need --ray" in result.output, result.output


def test_apply_tuning_takes_another_engines_choices(clip_bundle):
    from modalforge.runtime.engine import Engine

    engine = Engine.from_bundle(clip_bundle, device="cpu")
    tuned = Engine.from_bundle(clip_bundle, device="cpu")
    tuning = tuned.tune(max_batch=4)
    assert engine.apply_tuning(tuning) == tuning and engine.tuning is not tuning
    assert engine.chunk_size == tuned.chunk_size and engine.chunk_size["image"] >= 1
    engine.apply_tuning({"image": {"chunk_size": 3}})
    assert engine.chunk_size["image"] == 3
    with pytest.raises(ValueError, match="nope"):
        engine.apply_tuning({"nope": {"chunk_size": 2}})

"""`modalforge serve`: a bundle over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modalforge.cli._common import console, err_console, fail


def serve(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder (RUN/bundle).")],
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(help="Inference threads (the CPU's torch threads are split between them)."),
    ] = 1,
    max_batch: Annotated[int, typer.Option(help="Most samples per model call.")] = 32,
    batch_timeout_ms: Annotated[
        float,
        typer.Option(
            help="Longest a batch waits for requests that are still being decoded (a lone "
            "request never waits)."
        ),
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option(help="Requests admitted at once; more are answered 429 + Retry-After.")
    ] = 256,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MODALFORGE_API_KEY",
            help="Require 'Authorization: Bearer KEY' (or X-API-Key) on /v1/*.",
        ),
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (413 above).")] = 20.0,
    request_timeout_s: Annotated[
        float, typer.Option(help="A request's deadline (504 after).")
    ] = 30.0,
    name: Annotated[
        str | None,
        typer.Option(help="The model id in /v1/models (default: the bundle's folder name)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
    variant: Annotated[
        str,
        typer.Option(
            help="pytorch (the trained weights) or a variant added by `modalforge "
            "export` (run with ONNX Runtime)."
        ),
    ] = "pytorch",
    index: Annotated[
        Path | None,
        typer.Option(
            help="An index built with this (contrastive) bundle (`modalforge index build`), "
            "searched by POST /v1/search."
        ),
    ] = None,
    allow_url: Annotated[
        list[str] | None,
        typer.Option(
            help="A URL prefix whose images /v1/chat/completions may fetch (default: data: "
            "URLs only). Repeatable. Only public addresses are fetched from (the host is "
            "resolved once, checked, and that address connected to); at most 3 redirects, "
            "each checked again."
        ),
    ] = None,
    allow_private_urls: Annotated[
        bool,
        typer.Option(
            "--allow-private-urls",
            help="Let --allow-url fetch from private, loopback and link-local addresses too "
            "(an image server on this machine or its network).",
        ),
    ] = False,
    rate_limit: Annotated[
        float | None,
        typer.Option(
            help="Requests per second each client may send to POST /v1/* (a client: its API "
            "key with --api-key, else its IP address, an IPv6 one by its /64); more are "
            "answered 429 + Retry-After. Default: no rate limit."
        ),
    ] = None,
    rate_burst: Annotated[
        int,
        typer.Option(min=1, help="Requests a client may send at once before --rate-limit applies."),
    ] = 20,
    max_client_concurrency: Annotated[
        int,
        typer.Option(
            min=0,
            help="Requests one client may have in flight at once on POST /v1/*; more are "
            "answered 429 + Retry-After (0: no cap).",
        ),
    ] = 64,
    keep_alive_s: Annotated[
        float,
        typer.Option(
            min=1,
            help="How long an idle keep-alive connection stays open. Longer than clients' own "
            "pool expiry (httpx: 5 s), so that the server never closes a connection just as a "
            "client reuses it (uvicorn's default 5 s races httpx's: a ReadError on the client).",
        ),
    ] = 75.0,
    max_image_pixels: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Largest image a request may send, in pixels, read from its header before "
            "decoding (422 above). Default: the bundle's, 40,000,000.",
        ),
    ] = None,
    max_audio_seconds: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Longest audio a request may send, read from its header before decoding (422 "
            "above). Default: 120 s.",
        ),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Serve with Ray Serve: --replicas copies of this server (each loads the "
            "bundle, with its own batcher) behind Ray's HTTP proxy on --host/--port; "
            "/metrics merges every replica's (labelled replica=...), /readyz lists them. "
            "Starts a local Ray unless --ray-address (or RAY_ADDRESS) names a cluster.",
            rich_help_panel="Ray Serve",
        ),
    ] = False,
    replicas: Annotated[
        int,
        typer.Option(
            min=1,
            help="Replicas (with --min/--max-replicas: how many to start with).",
            rich_help_panel="Ray Serve",
        ),
    ] = 1,
    replica_cpus: Annotated[
        float,
        typer.Option(
            min=0.01,
            help="Ray CPUs per replica; its torch threads are this many (at least 1).",
            rich_help_panel="Ray Serve",
        ),
    ] = 1.0,
    max_ongoing_requests: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Requests Ray's proxy sends one replica at once (default: 2 x --max-batch, so "
            "its batcher can fill a batch while another runs; Ray's own default, 5, caps "
            "every batch at 5).",
            rich_help_panel="Ray Serve",
        ),
    ] = None,
    min_replicas: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Autoscale: fewest replicas (give --max-replicas too).",
            rich_help_panel="Ray Serve",
        ),
    ] = None,
    max_replicas: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Autoscale: most replicas (give --min-replicas too).",
            rich_help_panel="Ray Serve",
        ),
    ] = None,
    target_ongoing_requests: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            help="Autoscale: requests in flight per replica Serve aims at (default: --max-batch).",
            rich_help_panel="Ray Serve",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="A running Ray cluster to deploy on ('auto', or ray://HOST:10001); the bundle "
            "must be at the same path on its nodes, and Ctrl-C deletes only this application. "
            "Default: a new local Ray of this machine's CPUs, shut down on exit.",
            rich_help_panel="Ray Serve",
        ),
    ] = None,
) -> None:
    """Serve a bundle over HTTP: /v1/predict (JSON or multipart), /v1/predict/batch, /v1/models,
    /healthz, /readyz, /metrics, OpenAPI at /docs, and a browser playground at /. Contrastive
    bundles answer /v1/embeddings (OpenAI's format) and, with --index, /v1/search; captioning
    bundles /v1/caption and /v1/chat/completions; speech-to-text bundles
    /v1/audio/transcriptions.

    Requests from concurrent clients are batched (up to --max-batch samples) while the model runs
    in its own thread; SIGTERM / Ctrl-C stops taking requests and finishes those in flight.
    Each client may have --max-client-concurrency requests in flight (64) and, with
    --rate-limit, send that many per second (bursts of --rate-burst); over either: 429.

    With --ray the same server runs as a Ray Serve deployment of --replicas replicas (the limits
    above apply per replica); for `serve run` on an existing cluster see configs/ray-serve.yaml.
    """
    import uvicorn

    from modalforge.bundle import BundleError
    from modalforge.serve import Engine, ServeConfig, create_app

    config = ServeConfig(max_batch=max_batch, batch_timeout_ms=batch_timeout_ms,
                         max_queue=max_queue, workers=workers, max_body_mb=max_body_mb,
                         request_timeout_s=request_timeout_s, api_key=api_key or None,
                         allow_urls=tuple(allow_url or ()), allow_private_urls=allow_private_urls,
                         rate_limit=rate_limit, rate_burst=rate_burst,
                         max_client_concurrency=max_client_concurrency or None,
                         max_image_pixels=max_image_pixels,
                         max_audio_seconds=max_audio_seconds)  # fmt: skip
    if rate_limit is not None and not (0 < rate_limit < float("inf")):
        fail(f"--rate-limit must be a positive number of requests per second, not {rate_limit}")
    from modalforge.serve.ray_serve import RayOptions

    options = RayOptions(replicas=replicas, replica_cpus=replica_cpus,
                         max_ongoing_requests=max_ongoing_requests, min_replicas=min_replicas,
                         max_replicas=max_replicas,
                         target_ongoing_requests=target_ongoing_requests)  # fmt: skip
    if ray:
        try:
            options.check()
        except ValueError as err:
            fail(str(err))
        _serve_on_ray(bundle, config, options, host, port, keep_alive_s, name, variant, index,
                      ray_address)  # fmt: skip
        return
    if options != RayOptions() or ray_address is not None:
        fail("--replicas, --replica-cpus, --max-ongoing-requests, --min/--max-replicas, "
             "--target-ongoing-requests and --ray-address need --ray")  # fmt: skip
    import torch

    # Only the inference thread should run parallel torch work. Each thread that does gets its
    # own OpenMP team; with two teams on a 2-core machine libgomp stops spinning between ops
    # and a forward pass uses ~1.2 cores instead of 2 (measured: 23 vs 38 samples/s). So the
    # main thread loads single-threaded, and the inference thread sets its own thread count.
    torch.set_num_threads(1)
    try:
        with console.status(f"loading {bundle} ..."):
            engine = Engine.from_bundle(bundle, name=name, variant=variant)
    except (BundleError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    from modalforge.index import EmbeddingIndex

    try:  # create_app checks that the index was built by these weights
        found = EmbeddingIndex.load(index) if index is not None else None
        web = create_app(engine, config, index=found)
    except (ValueError, FileNotFoundError) as err:
        fail(f"--index {index}: {err}")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    inputs = ", ".join(c.name for c in engine.inputs)
    console.print(f"serving [bold]{engine.name}[/] ({engine.task}, inputs {inputs}) on "
                  f"http://{host}:{port}")  # fmt: skip
    console.print(f"  playground  http://{shown}:{port}/")
    console.print(f"  API docs    http://{shown}:{port}/docs")
    if config.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print("[yellow]warning:[/] listening beyond this machine without --api-key")
    uvicorn.run(web, host=host, port=port, log_level=log_level, timeout_keep_alive=keep_alive_s,
                timeout_graceful_shutdown=int(config.drain_timeout_s))  # fmt: skip


def _serve_on_ray(bundle: Path, config, options, host: str, port: int, keep_alive_s: float,
                  name: str | None, variant: str, index: Path | None,
                  address: str | None) -> None:  # fmt: skip
    """``modalforge serve --ray``: deploy, wait for Ctrl-C / SIGTERM, then delete the application
    (and shut down the Ray this command started)."""
    import os
    import signal
    import threading

    from modalforge.bundle import BundleError, load_bundle

    try:  # refuse a wrong path here, not in every replica
        load_bundle(bundle, verify=False)
    except (BundleError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    if index is not None and not index.exists():
        fail(f"--index {index}: no such folder")
    import ray
    from ray import serve

    from modalforge.serve.ray_serve import DEPLOYMENT, application

    local = address is None and not os.environ.get("RAY_ADDRESS")
    wanted = options.replicas if options.min_replicas is None else max(options.min_replicas, 1)
    cores = os.cpu_count() or 1
    if local and wanted * options.replica_cpus > cores:
        need = f"{wanted} replica(s) x {options.replica_cpus:g} CPUs"
        fail(f"{need} do not fit this machine's {cores} CPUs: lower --replicas or "
             "--replica-cpus, or give --ray-address")  # fmt: skip
    ray.init(address=address, log_to_driver=False)
    stop, deploying = threading.Event(), [True]

    def on_signal(*_) -> None:
        stop.set()
        if deploying[0]:  # a deployment that never comes up (no CPUs free) can be given up
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port,
                                  "keep_alive_timeout_s": max(1, round(keep_alive_s))})  # fmt: skip
        built = application(bundle, config, options, name=name, variant=variant, index=index)
        with console.status(f"deploying {bundle} on Ray Serve ({options.replicas} replica(s)) ..."):
            serve.run(built, name=DEPLOYMENT, route_prefix="/")
        deploying[0] = False
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        console.print(f"serving [bold]{bundle}[/] on Ray Serve: {options.replicas} replica(s) x "
                      f"{options.replica_cpus:g} CPUs at http://{host}:{port} (if Serve was "
                      "already running on the cluster, its own host and port)")  # fmt: skip
        console.print(f"  playground  http://{shown}:{port}/")
        console.print(f"  replicas    http://{shown}:{port}/readyz")
        if config.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            err_console.print("[yellow]warning:[/] listening beyond this machine without --api-key")
        while not stop.wait(1.0):
            pass
        console.print("stopping: the replicas finish the requests in flight ...")
    except KeyboardInterrupt:
        console.print("interrupted while deploying")
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(DEPLOYMENT)
        ray.shutdown()

"""Batch predict on Ray Data: the manifest's rows cut into blocks, scored by a pool of actors
that each load the bundle's ``Engine`` once, the results streamed back to the caller in order.

Two ways Ray Data goes wrong on a small machine, and what this module does about them:

* **the silent hang**: ``map_batches`` with a callable class asks 1 CPU per actor by default; a
  pool that claims every CPU leaves none for the tasks that read or split the data, and the
  pipeline waits forever without an error (measured on a 2-CPU local Ray: ``read_parquet`` +
  2 actors x 1 CPU, no result after 45 s). ``plan_pool`` claims the free CPUs less one whole
  CPU (half of them below 2 CPUs), so any 1-CPU task Ray Data schedules still fits; the rows
  are read by the caller (the same reader as in-process, so CSV's missing-value rules and row
  numbers are the same) and handed over as in-memory blocks, so there is no read task at all;
* **one actor doing all the work**: one Parquet file is one block, and a block goes to one
  actor (the same pipeline at 0.5 CPU per actor: done in 10 s, all 1,000 rows on one). The
  rows are cut into at least two blocks per actor (``batch_score.blocks_for``), each at most
  ``batch_size`` rows, and ``map_batches`` is asked for whole blocks (``batch_size=None``) so
  Ray does not bundle them back together.

The results come back to the driver (``iter_batches``), which writes the shards: the output
folder is a local path of the caller's machine, which a remote cluster's workers cannot write.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from modalforge.runtime.batch_score import ROW, BatchSummary, Scorer, blocks_for

#: the column an actor adds to its results (its process id), counted and dropped by the driver
WORKER = "__worker__"
#: longest the pool may take to start every actor (load and warm its engine) before Ray raises
ACTOR_START_TIMEOUT_S = 600


@dataclass(frozen=True)
class Pool:
    """How many engines to run and what each asks of Ray."""

    actors: int
    cpus_per_actor: float
    torch_threads: int
    free_cpus: float


def plan_pool(free_cpus: float, actors: int | None = None) -> Pool:
    """Size the actor pool from the cluster's free CPUs: they claim ``free_cpus - 1`` together
    (``free_cpus / 2`` below 2), so a whole CPU stays free for Ray Data's own tasks. ``actors``
    None: one per claimable CPU; given, the claim is shared among them (fractions of a CPU).
    Each actor runs ``floor(share)`` torch threads, at least 1."""
    if free_cpus <= 0:
        raise ValueError("the Ray cluster has no free CPU for batch predict")
    if actors is not None and actors < 1:
        raise ValueError(f"--actors must be at least 1, got {actors}")
    usable = free_cpus - 1.0 if free_cpus >= 2 else free_cpus / 2
    n = actors if actors is not None else max(1, math.floor(usable))
    share = math.floor(100 * usable / n) / 100  # Ray takes fractional CPUs; round down
    if share <= 0:
        raise ValueError(f"--actors {n}: more actors than {usable:g} claimable CPUs can share")
    return Pool(n, share, max(1, math.floor(share)), free_cpus)


class RayScorer:
    """One actor of the pool: loads the bundle's engine once, scores one block per call."""

    def __init__(self, bundle: str, root: str, columns, id_column, threads: int,
                 tuning=None) -> None:  # fmt: skip
        import os

        import torch

        from modalforge.runtime.engine import Engine

        torch.set_num_threads(threads)  # the actor's CPU share, not the machine's cores
        engine = Engine.from_bundle(bundle)
        engine.warmup(tune=False)
        if tuning:  # the driver's: every actor chunks and pads as the in-process path does
            engine.apply_tuning(tuning)
        self.scorer = Scorer(engine, root, columns, id_column)
        self.pid = os.getpid()

    def __call__(self, frame: pd.DataFrame):
        import pyarrow as pa

        table = self.scorer(frame)
        return table.append_column(WORKER, pa.array([self.pid] * table.num_rows, pa.int64()))


def connect(address: str | None = None):
    """The ``ray`` module, connected: the running Ray if this process has one, else the cluster
    at ``address``, else a new local Ray with the machine's CPUs. -> (ray, started_here)."""
    import ray

    if ray.is_initialized():
        return ray, False
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="warning")  # fmt: skip
    return ray, True


def ray_tables(bundle: Path, root: Path, frames: Iterator[pd.DataFrame], summary: BatchSummary,
               *, columns=None, id_column: str | None = None, actors: int | None = None,
               address: str | None = None, tuning=None) -> Iterator:  # fmt: skip
    """The results of every frame's rows, scored on Ray Data, in the manifest's order; fills
    in ``summary``'s pool fields. ``tuning``: an ``Engine.tune`` result every actor applies."""
    import numpy as np

    ray, started = connect(address)
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars,
             context.wait_for_min_actors_s)  # fmt: skip
    try:
        pool = plan_pool(ray.available_resources().get("CPU", 0.0), actors)
        parts = list(frames)
        data = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({ROW: []})
        n = len(data)
        blocks = blocks_for(n, pool.actors, summary.batch_size) if n else 0
        summary.actors, summary.cpus_per_actor = pool.actors, pool.cpus_per_actor
        summary.torch_threads, summary.blocks = pool.torch_threads, blocks
        if not n:
            return
        # the same results in the same order as in-process (blocks are scored apart)
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # the caller shows one bar
        # every actor loaded (and warmed) before the first block goes out: by default the
        # first actor to be ready takes the queued blocks while the others still load their
        # engines (seen: all 5 blocks of a 35-row run on one of 2 actors); and a pool that
        # cannot be placed fails with Ray's timeout instead of waiting without a word
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        cuts = np.array_split(np.arange(n), blocks)
        dataset = ray.data.from_pandas([data.iloc[c].reset_index(drop=True) for c in cuts])
        scored = dataset.map_batches(
            RayScorer,
            fn_constructor_kwargs={"bundle": str(bundle), "root": str(root), "columns": columns,
                                   "id_column": id_column, "threads": pool.torch_threads,
                                   "tuning": tuning},
            compute=ray.data.ActorPoolStrategy(size=pool.actors), num_cpus=pool.cpus_per_actor,
            batch_size=None,
            batch_format="pandas",
        )  # fmt: skip
        per_actor: collections.Counter = collections.Counter()
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            per_actor.update(table[WORKER].to_pylist())
            summary.rows_per_actor = sorted(per_actor.values(), reverse=True)
            yield table.drop_columns([WORKER])
    finally:
        (context.execution_options.preserve_order, context.enable_progress_bars,
         context.wait_for_min_actors_s) = saved  # fmt: skip
        if started:
            ray.shutdown()


__all__ = ["Pool", "RayScorer", "connect", "plan_pool", "ray_tables"]

"""Graph preprocessing: an edge-list JSON file -> node features and edges.

Format (``*.graph.json``)::

    {"x": [[f0, f1, ...], ...],          # node features, N x F (or "num_nodes": N for none)
     "edges": [[src, dst], ...],          # E pairs, 0-based node indices
     "edge_attr": [[...], ...],           # optional, E x D
     "directed": false}                   # optional; undirected edges are added both ways

``to_pyg`` turns the result into a torch_geometric ``Data`` (the optional ``graph`` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from modalforge.data.errors import DecodeError

MAX_GRAPH_BYTES = 50_000_000


@dataclass
class Graph:
    x: torch.Tensor  # (N, F) float32
    edge_index: torch.Tensor  # (2, E) int64
    edge_attr: torch.Tensor | None = None  # (E, D) float32

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])


def _tensor(value, dtype: torch.dtype, what: str) -> torch.Tensor:
    try:
        return torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DecodeError(f"graph {what} is not a rectangular numeric array: {err}") from None


def parse_graph(data: dict) -> Graph:
    """Validate a decoded graph JSON object and build tensors. Raises DecodeError."""
    if not isinstance(data, dict) or "edges" not in data:
        raise DecodeError("a graph needs an 'edges' list")
    if "x" in data:
        x = _tensor(data["x"], torch.float32, "'x'")
        if x.ndim == 1:
            x = x[:, None]
    elif isinstance(data.get("num_nodes"), int) and data["num_nodes"] > 0:
        x = torch.ones((data["num_nodes"], 1))
    else:
        raise DecodeError("a graph needs node features 'x' or a positive 'num_nodes'")
    if x.ndim != 2 or x.shape[0] == 0:
        raise DecodeError(f"graph 'x' must be N x F with N > 0, got shape {tuple(x.shape)}")
    edges = _tensor(data["edges"], torch.long, "'edges'")
    if edges.numel() == 0:
        edges = edges.reshape(0, 2)
    if edges.ndim != 2 or edges.shape[1] != 2:
        raise DecodeError(
            f"graph 'edges' must be a list of [src, dst] pairs, got {tuple(edges.shape)}"
        )
    if edges.numel() and (edges.min() < 0 or edges.max() >= x.shape[0]):
        raise DecodeError(f"graph edge refers to a node outside 0..{x.shape[0] - 1}")
    edge_attr = None
    if data.get("edge_attr") is not None:
        edge_attr = _tensor(data["edge_attr"], torch.float32, "'edge_attr'")
        if edge_attr.ndim == 1:
            edge_attr = edge_attr[:, None]
        if edge_attr.shape[0] != edges.shape[0]:
            raise DecodeError("graph 'edge_attr' must have one row per edge")
    edge_index = edges.t().contiguous()
    if not data.get("directed", False) and edge_index.numel():
        edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
        if edge_attr is not None:
            edge_attr = torch.cat([edge_attr, edge_attr], dim=0)
    if not torch.isfinite(x).all():
        raise DecodeError("graph 'x' contains NaN or infinite values")
    return Graph(x=x, edge_index=edge_index, edge_attr=edge_attr)


def load_graph(source: bytes | str | Path) -> Graph:
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        raise DecodeError(f"cannot open graph: {err.strerror or err}") from None
    if len(raw) > MAX_GRAPH_BYTES:
        raise DecodeError(
            f"graph file is {len(raw):,} bytes, over the limit of {MAX_GRAPH_BYTES:,}"
        )
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DecodeError(f"graph is not valid JSON: {err}") from None
    return parse_graph(data)


def to_pyg(graph: Graph):
    """-> ``torch_geometric.data.Data`` (needs the optional ``graph`` extra)."""
    try:
        from torch_geometric.data import Data
    except ImportError:
        raise ImportError(
            "graph models need torch_geometric: pip install 'modalforge[graph]'"
        ) from None
    return Data(x=graph.x, edge_index=graph.edge_index, edge_attr=graph.edge_attr)


def collate_graphs(graphs: list[Graph]) -> dict[str, torch.Tensor]:
    """Stack graphs into one mini-batch: ``x (sum N, F)``, ``edge_index (2, sum E)`` with node
    indices offset per graph, ``batch (sum N,)`` = each node's graph, ``num_graphs``."""
    if not graphs:
        raise ValueError("collate_graphs needs at least one graph")
    widths = {g.x.shape[1] for g in graphs}
    if len(widths) != 1:
        raise ValueError(f"graphs have different node feature widths: {sorted(widths)}")
    offsets = torch.cumsum(torch.tensor([0] + [g.num_nodes for g in graphs[:-1]]), 0)
    return {
        "x": torch.cat([g.x for g in graphs]),
        "edge_index": torch.cat(
            [g.edge_index + o for g, o in zip(graphs, offsets, strict=True)], 1
        ),
        "batch": torch.cat([torch.full((g.num_nodes,), i) for i, g in enumerate(graphs)]),
        "num_graphs": torch.tensor(len(graphs)),
    }

"""Graph encoders (the optional ``graph`` extra, torch_geometric): GCN and GAT with mean pooling.

Batches are ``{"x": (N, F) float32, "edge_index": (2, E) int64, "batch": (N,) int64}``: the
nodes of all graphs of a mini-batch stacked, ``batch`` giving each node's graph
(``modalforge.data.graph.collate_graphs`` makes them).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from modalforge.encoders.base import Encoder, EncoderOutput
from modalforge.encoders.registry import register_encoder
from modalforge.schema import Modality


def _pyg():
    try:
        import torch_geometric.nn as pyg_nn
    except ImportError:
        raise ImportError(
            "graph encoders need torch_geometric: pip install 'modalforge[graph]'"
        ) from None
    return pyg_nn


class GNNEncoder(Encoder):
    """Stacked GCN / GAT layers with ReLU and dropout, then global mean pooling -> (B, hidden)."""

    modality = Modality.GRAPH

    def __init__(
        self,
        in_features: int,
        hidden: int = 64,
        layers: int = 2,
        conv: Literal["gcn", "gat"] = "gcn",
        heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        pyg_nn = _pyg()
        self.convs = nn.ModuleList()
        width = in_features
        for _ in range(layers):
            if conv == "gcn":
                self.convs.append(pyg_nn.GCNConv(width, hidden))
            else:  # heads concatenated back to `hidden`
                self.convs.append(pyg_nn.GATConv(width, hidden // heads, heads=heads))
            width = hidden if conv == "gcn" else (hidden // heads) * heads
        self.dropout = nn.Dropout(dropout)
        self.output_dim = width
        self.preprocessing = {"in_features": in_features, "format": "edge-list json"}
        self._pool = pyg_nn.global_mean_pool

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        h, edge_index, graph = batch["x"], batch["edge_index"], batch["batch"]
        for conv in self.convs:
            h = self.dropout(torch.relu(conv(h, edge_index)))
        size = int(batch["num_graphs"]) if "num_graphs" in batch else int(graph.max()) + 1
        return EncoderOutput(pooled=self._pool(h, graph, size=size))


@register_encoder(
    "gcn",
    Modality.GRAPH,
    "graph convolution network + mean pooling (torch_geometric)",
    tiny={"in_features": 3, "hidden": 16},
    reference={"in_features": 16},
)
def gcn(in_features: int, **kwargs) -> GNNEncoder:
    return GNNEncoder(in_features, conv="gcn", **kwargs)


@register_encoder(
    "gat",
    Modality.GRAPH,
    "graph attention network + mean pooling (torch_geometric)",
    tiny={"in_features": 3, "hidden": 16, "heads": 2},
    reference={"in_features": 16},
)
def gat(in_features: int, **kwargs) -> GNNEncoder:
    return GNNEncoder(in_features, conv="gat", **kwargs)

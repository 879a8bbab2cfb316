import json

import numpy as np
import pytest
import torch

from modalforge.data.errors import DecodeError
from modalforge.data.graph import load_graph, parse_graph, to_pyg
from modalforge.data.tabular import Standardizer, to_float


def test_graph_from_edge_list(tmp_path):
    path = tmp_path / "g.graph.json"
    path.write_text(json.dumps({"x": [[1, 0], [0, 1], [1, 1]], "edges": [[0, 1], [1, 2]]}))
    g = load_graph(path)
    assert g.x.shape == (3, 2) and g.x.dtype == torch.float32
    assert g.edge_index.tolist() == [[0, 1, 1, 2], [1, 2, 0, 1]]  # undirected: both ways
    directed = parse_graph({"num_nodes": 2, "edges": [[0, 1]], "directed": True})
    assert directed.edge_index.tolist() == [[0], [1]] and directed.x.shape == (2, 1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": [[1]]}, "edges"),
        ({"edges": [[0, 1]]}, "num_nodes"),
        ({"x": [[1], [2]], "edges": [[0, 5]]}, "outside"),
        ({"x": [[1], [2, 3]], "edges": []}, "rectangular"),
        ({"x": [[1], [2]], "edges": [[0, 1, 2]]}, "pairs"),
    ],
)
def test_bad_graphs(data, message):
    with pytest.raises(DecodeError, match=message):
        parse_graph(data)
    with pytest.raises(DecodeError, match="JSON"):
        load_graph(b"{not json")


def test_collate_graphs_offsets_edges():
    from modalforge.data.graph import collate_graphs

    a = parse_graph({"x": [[1.0], [2.0]], "edges": [[0, 1]], "directed": True})
    b = parse_graph({"x": [[3.0], [4.0], [5.0]], "edges": [[2, 0]], "directed": True})
    batch = collate_graphs([a, b])
    assert batch["x"].shape == (5, 1) and int(batch["num_graphs"]) == 2
    assert batch["edge_index"].tolist() == [[0, 4], [1, 2]]
    assert batch["batch"].tolist() == [0, 0, 1, 1, 1]


def test_to_pyg_needs_the_extra_or_works():
    g = parse_graph({"x": [[1.0], [2.0]], "edges": [[0, 1]]})
    try:
        import torch_geometric  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"modalforge\[graph\]"):
            to_pyg(g)
    else:
        assert to_pyg(g).num_nodes == 2


def test_tabular():
    assert to_float(" 2.5 ") == 2.5 and to_float(True) == 1.0
    for bad in ["x", float("nan"), "inf", None]:
        with pytest.raises(DecodeError):
            to_float(bad)
    st = Standardizer.fit([[1.0, 5.0], [3.0, 5.0]])
    assert st.mean == (2.0, 5.0) and st.std == (1.0, 1.0)  # constant column: std 1, not 0
    assert np.allclose(st(np.array([[3.0, 6.0]])), [[1.0, 1.0]])
    assert Standardizer.from_dict(st.to_dict()) == st

import os

import pytest
import torch
import torch._dynamo

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def capture_graph(model, kwargs):
    """The torch-level FX graph dynamo hands a backend for ``model(**kwargs)``."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    compiled = torch.compile(model, backend=capture, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(**kwargs)
    assert len(graphs) == 1
    return graphs[0]


@pytest.fixture
def capture():
    return capture_graph

import os

import pytest
import torch
import torch._dynamo

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))

# Under pytest-xdist (the default: ``-n auto`` in pyproject.toml) each worker is one process.  One
# intra-op thread each keeps the workers from oversubscribing the cores: the tiny test models gain
# nothing from a second thread, while dynamo tracing and Inductor's Python are single-threaded, so
# the workers are what runs in parallel.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

HEAVY_MARKS = ("slow", "inductor")


def pytest_collection_modifyitems(config, items):
    """The longest tests first (marked ``slow``, then ``inductor``; the order is otherwise kept):
    xdist hands tests to whichever worker is free, so a long test started last would leave the
    other workers idle at the end of the run."""
    def weight(item):
        return tuple(item.get_closest_marker(mark) is None for mark in HEAVY_MARKS)

    items.sort(key=weight)


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

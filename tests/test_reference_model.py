"""Fast checks of the reference model package (data, model wrapper, loader, classifier, FD, sampler)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from specdiff_fx.reference import (
    NUM_CLASSES,
    ClassConditionalMMDiT,
    classify,
    features,
    frechet_distance,
    load_classifier,
    load_reference_model,
    make_dataset,
    sample,
    timestep_schedule,
)
from specdiff_fx.reference.model import CONFIG_FILE, WEIGHTS_DIR, WEIGHTS_FILE


@pytest.fixture(scope="module")
def model():
    return load_reference_model("cpu")


def test_data_deterministic_shapes_and_classes():
    x1, y1 = make_dataset(24, seed=3)
    x2, y2 = make_dataset(24, seed=3)
    x3, _ = make_dataset(24, seed=4)
    assert x1.shape == (24, 3, 32, 32) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.min() >= -1 and x1.max() <= 1
    assert set(y1.tolist()) == set(range(NUM_CLASSES))
    xr, yr = make_dataset(50, seed=5, balanced=False)
    assert yr.min() >= 0 and yr.max() < NUM_CLASSES


def test_loader_offline_and_config(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with open(os.path.join(WEIGHTS_DIR, CONFIG_FILE)) as f:
        cfg = json.load(f)
    assert os.path.getsize(os.path.join(WEIGHTS_DIR, WEIGHTS_FILE)) <= 20 * 2**20
    m = load_reference_model("cpu")
    assert isinstance(m, ClassConditionalMMDiT) and not m.training
    tc = m.transformer.config
    for k, v in cfg["transformer"].items():
        assert tc[k] == v
    assert m.num_classes == cfg["num_classes"] == NUM_CLASSES
    # >= 256 image tokens per sample
    assert (tc["sample_size"] // tc["patch_size"]) ** 2 >= 256
    assert tc["in_channels"] == tc["out_channels"] == 3
    assert m.class_tokens.num_embeddings == NUM_CLASSES + 1
    # the loaded weights are the committed ones (not a fresh init)
    from safetensors.torch import load_file

    sd = load_file(os.path.join(WEIGHTS_DIR, WEIGHTS_FILE))
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_wrapper_forward_shape(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        v = model(x, torch.tensor([100.0, 500.0, 900.0]), torch.tensor([0, 5, NUM_CLASSES]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    ehs, pooled = model.class_condition(torch.tensor([0, NUM_CLASSES]))
    assert ehs.shape == (2, model.num_text_tokens, model.transformer.config.joint_attention_dim)
    assert pooled.shape == (2, model.transformer.config.pooled_projection_dim)


def test_classifier_accuracy_on_fresh_real_data():
    clf = load_classifier()
    x, y = make_dataset(300, seed=4242, balanced=False)
    acc = (classify(x, clf) == y).float().mean().item()
    assert acc >= 0.95, acc
    f = features(x, clf)
    assert f.shape == (300, 128)


def test_frechet_distance():
    x, _ = make_dataset(300, seed=99)
    f = features(x)
    assert frechet_distance(f, f) < 1e-6 * max(1.0, float(f.var(0).sum()))
    d1 = frechet_distance(f, f + 0.05)
    d2 = frechet_distance(f, f + 0.5)
    assert 0 < d1 < d2
    g = torch.randn(2000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # shift of the mean by 1 in every dimension -> distance ~ 8
    assert abs(frechet_distance(g, g + 1.0) - 8.0) < 1e-6


def test_sampler_deterministic_and_one_call_per_step(model):
    calls = []

    def counting(**kw):
        calls.append(kw["hidden_states"].shape[0])
        return model.transformer(**kw)

    a = sample(model, [0, 3], num_steps=4, guidance_scale=3.0, seed=7, transformer=counting)
    b = sample(model, [0, 3], num_steps=4, guidance_scale=3.0, seed=7)
    c = sample(model, [0, 3], num_steps=4, guidance_scale=3.0, seed=8)
    assert calls == [4, 4, 4, 4]  # one batched cond+uncond call per step
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    d = sample(model, [0, 3], num_steps=4, guidance_scale=3.0, seed=7, batch_cfg=False)
    assert torch.allclose(a, d, atol=1e-4)
    # the plain-callable form gives the same result
    e = sample(_Callable(model), [0, 3], num_steps=4, guidance_scale=3.0, seed=7)
    assert torch.allclose(a, e, atol=1e-4)
    ts = timestep_schedule(28)
    assert ts[0] == 1 and ts[-1] == 0 and ts.shape == (29,)
    assert (timestep_schedule(28, shift=3.0)[1:-1] > ts[1:-1]).all()


class _Callable:
    def __init__(self, m):
        self.m = m
        self.num_classes = m.num_classes

    def __call__(self, x, t, labels):
        return self.m(x, t, labels)


@pytest.mark.slow
def test_samples_are_recognisable(model):
    labels = torch.arange(NUM_CLASSES).repeat_interleave(3)
    x = sample(model, labels, num_steps=28, guidance_scale=3.0, seed=0)
    acc = (classify(x) == labels).float().mean().item()
    assert acc >= 0.85, acc

"""Every torchvision classifier prunes into a model that runs (issue 14), or the library refuses it.

Per model (tests/vision_sweep.py): find_groups, prune at ratio 0.5, an eval forward and a train-mode
SGD step after pruning, fewer parameters, and apply == zero_ where every group is exact.

Budget: the default set is one or two models per family at small inputs (about 80 CPU-seconds on
one thread, measured with bench/vision_sweep.py). The other variants of each family (deeper / wider copies of the same blocks, and the
100M+ parameter models whose weight init alone takes seconds) carry the `vision_full` marker and
run only with TRITONPRUNE_VISION_FULL=1; `bench/vision_sweep.py torchvision` runs all of them and
writes bench/results/vision_sweep_torchvision.json. `test_the_sweep_lists_every_model` keeps the table complete.
"""

from __future__ import annotations

import os

import pytest
import tv
from vision_sweep import sweep_one

FULL = os.environ.get("TRITONPRUNE_VISION_FULL") == "1"
full = pytest.mark.vision_full

# name -> (input size, constructor kwargs); sizes are the smallest the model runs at (with headroom for
# the stride-32 stages), except where noted
DEFAULT = {
    "alexnet": (63, {}),
    "convnext_tiny": (32, {}),
    "densenet121": (32, {}),
    "efficientnet_b0": (32, {}),
    "efficientnet_v2_s": (32, {}),
    "googlenet": (64, {"aux_logits": True, "init_weights": False}),  # aux classifiers: train mode only
    "maxvit_t": (224, {}),  # fixed 7x7 partitions at every stage: 224 is the smallest
    "mnasnet0_5": (32, {}),
    "mobilenet_v2": (32, {}),
    "mobilenet_v3_small": (32, {}),
    "regnet_x_400mf": (32, {}),
    "regnet_y_400mf": (32, {}),
    "resnet18": (32, {}),
    "resnet50": (32, {}),
    "resnext50_32x4d": (32, {}),
    "shufflenet_v2_x0_5": (32, {}),
    "squeezenet1_1": (64, {}),
    "swin_t": (64, {}),
    "swin_v2_t": (64, {}),
    "vgg11_bn": (32, {}),
    "vit_b_32": (32, {"image_size": 32}),
    # second members of the families whose variants differ in structure, not only in size
    "inception_v3": (299, {"aux_logits": True, "init_weights": False}),  # aux classifier: a 17x17 map needs 299 px
    "mobilenet_v3_large": (32, {}),
    "wide_resnet50_2": (32, {}),
    "vit_b_16": (32, {"image_size": 32}),
    "efficientnet_b1": (32, {}),
    "mnasnet1_0": (32, {}),
    "shufflenet_v2_x1_0": (32, {}),
    "squeezenet1_0": (64, {}),
    "vgg11": (32, {}),
    "convnext_small": (32, {}),
}

# the rest: same families, more or wider blocks; opt-in (see the module docstring)
OTHERS = {
    "convnext_base": (32, {}), "convnext_large": (32, {}),
    "densenet161": (32, {}), "densenet169": (32, {}), "densenet201": (32, {}),
    **{f"efficientnet_b{i}": (32, {}) for i in range(2, 8)},
    "efficientnet_v2_m": (32, {}), "efficientnet_v2_l": (32, {}),
    "mnasnet0_75": (32, {}), "mnasnet1_3": (32, {}),
    **{f"regnet_x_{s}": (32, {}) for s in ("800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")},
    **{f"regnet_y_{s}": (32, {}) for s in ("800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")},
    "resnet34": (32, {}), "resnet101": (32, {}), "resnet152": (32, {}),
    "resnext101_32x8d": (32, {}), "resnext101_64x4d": (32, {}),
    "wide_resnet101_2": (32, {}),
    "shufflenet_v2_x1_5": (32, {}), "shufflenet_v2_x2_0": (32, {}),
    "swin_s": (64, {}), "swin_b": (64, {}), "swin_v2_s": (64, {}), "swin_v2_b": (64, {}),
    **{n: (32, {}) for n in ("vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")},
    "vit_l_16": (32, {"image_size": 32}),
    "vit_l_32": (32, {"image_size": 32}), "vit_h_14": (28, {"image_size": 28}),
}

# models whose rules alone would give a pruned model that fails to run, with the reason: prune's run
# check (tritonprune.runcheck) leaves the groups that break them out, with a warning, and prunes the rest.
# Swin v1 left here before issue 22 (its window attention reshapes with C // num_heads, C read from the
# input): the run check now ties its heads to the residual width, and torch.roll / new_zeros have rules
NEEDS_DROPPED_GROUPS: dict[str, str] = {}
NOTHING_LEFT_OUT = {"swin_t"}  # every group found is pruned (no "left these groups out" warning)
# window attention whose heads go whole (q @ k^T and einsum per head, graph/matmul.py): pruned deep
DEEP = {"swin_t", "maxvit_t"}


def build(name: str):
    models = tv.torchvision().models
    size, kwargs = {**DEFAULT, **OTHERS}[name]
    return models.get_model(name, weights=None, num_classes=10, **kwargs), size


def _params():
    out = [pytest.param(n, id=n) for n in DEFAULT]
    out += [pytest.param(n, id=n, marks=full) for n in OTHERS]
    return out


@pytest.mark.parametrize("name", _params())
def test_prunes_into_a_model_that_runs(name, request):
    if request.node.get_closest_marker("vision_full") and not FULL:
        pytest.skip("a further variant of a family in the default set; TRITONPRUNE_VISION_FULL=1 runs it")
    model, size = build(name)
    r = sweep_one(name, model, size)
    if r.refused is not None:
        # refusing is allowed only with an error that says what and where
        assert len(r.refused) > 40 and ("module" in r.refused or "." in r.refused), r.refused
        return
    assert r.groups > 0, f"{name}: no groups found"
    assert r.runs and r.trains
    assert r.param_ratio < 1, f"{name}: pruning removed no parameter"
    if name in DEEP:
        assert r.param_ratio <= 0.4, (name, r.param_ratio)
    if name in NEEDS_DROPPED_GROUPS:
        assert any("breaks" in w for w in r.warnings), (name, r.warnings)
    if name in NOTHING_LEFT_OUT:
        assert not any("left these groups out" in w for w in r.warnings), (name, r.warnings)
    if r.apply_vs_zero is not None:
        assert r.apply_vs_zero < 1e-4, f"{name}: apply and zero_ differ by {r.apply_vs_zero}"


def test_the_sweep_lists_every_model():
    models = tv.torchvision().models
    listed = set(models.list_models(module=models))
    assert listed == set(DEFAULT) | set(OTHERS), listed ^ (set(DEFAULT) | set(OTHERS))

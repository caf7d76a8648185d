"""find_groups on a ResNet-50-size model (25.6M params, Hugging Face config, no download).

Run: .venv/bin/python -m pytest bench/bench_find_groups.py --benchmark-only
Target (issue 2): under 3 s per call on the 2-core CPU. Torch-Pruning's DependencyGraph build on the same
model is measured in the same run as the baseline.
"""

import pytest
import torch

import tritonprune as tpr

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def resnet50():
    cfg = transformers.ResNetConfig(num_labels=1000)
    model = transformers.ResNetForImageClassification(cfg).eval()
    return model, torch.randn(1, 3, 224, 224)


def test_find_groups_resnet50(benchmark, resnet50):
    model, x = resnet50
    groups = benchmark.pedantic(tpr.find_groups, args=(model, x), rounds=3, warmup_rounds=1)
    assert len(groups) > 30
    benchmark.extra_info["groups"] = len(groups)
    benchmark.extra_info["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def test_torch_pruning_dependency_graph_resnet50(benchmark, resnet50):
    tp = pytest.importorskip("torch_pruning")
    model, x = resnet50

    def build():
        return list(tp.DependencyGraph().build_dependency(model, example_inputs=x).get_all_groups())

    groups = benchmark.pedantic(build, rounds=3, warmup_rounds=1)
    benchmark.extra_info["groups"] = len(groups)

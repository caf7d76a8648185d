"""torch.compile of a training step that uses the wrapper: same numbers, graph breaks only around the
regularization (the engine is excluded from Dynamo with torch.compiler.disable)."""

import copy

import torch
import torch._dynamo as dynamo
from torch import nn

import tritonprune as tpr


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 3))
    x = torch.randn(4, 3, 8, 8)
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, x,
                                   regularizer=tpr.GroupNorm(reg=1e-2))
    return model, opt, x


def train_step(model, opt, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def test_compiled_step_matches_eager_and_breaks_only_around_the_engine():
    model, opt, x = make()
    ref_model, ref_opt = copy.deepcopy((model, opt))
    y = torch.randint(0, 3, (4,))
    compiled = torch.compile(train_step, backend="eager")
    for _ in range(3):
        compiled(model, opt, x, y)
        train_step(ref_model, ref_opt, x, y)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)
    dynamo.reset()
    reasons = dynamo.explain(train_step)(model, opt, x, y).break_reasons
    inside = [r for r in reasons for f in r.user_stack if "tritonprune" in f.filename]
    assert not inside, [r.reason.splitlines()[0] for r in inside]

"""Distributed training: two gloo processes on CPU.

- DDP: one RegularizedOptimizer step on a DDP model (each rank half the batch) equals the single-process
  step on the whole batch (1e-6), and prune_distributed gives both ranks the same plan even where
  their own choice would differ (random importance, seeded per rank);
- FSDP2: one step on a fully_shard model whose row counts are not divisible by 2 (grouped conv cut
  inside a conv group, a depthwise multiplier channel cut by the shard boundary, a rank with no rows)
  equals the single-process step (1e-6), for four regularizer settings, with the same gamma and one
  all-reduce of the flat channel-sum buffer per step; the gather/prune/re-shard recipe;
- the row-splitting of a Slot, without processes.
"""

from __future__ import annotations

import copy
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import tritonprune as tpr
from tritonprune import distributed as tpd
from tritonprune.graph.group import CONV, OUT, Slot
from tritonprune.regularizing.sharded import _rows_slots

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


# ------------------------------------------------------------------------------------ harness


def _entry(rank: int, fn, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.save(fn(rank), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(fn, tmp_path, timeout: float = 150.0) -> list:
    """Run fn(rank) on WORLD gloo processes; their results (a worker's exception re-raised with its trace).

    A deadlock (unpaired collectives) fails the test after `timeout` seconds instead of hanging CI."""
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    ctx = mp.start_processes(_entry, args=(fn, store, out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise AssertionError(f"distributed workers did not finish within {timeout} s (deadlock?)")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


def _guarded(part, rank: int) -> dict:
    """Run one part of the worker; a failure is returned (and reported by its test), not raised."""
    try:
        return part(rank)
    except Exception:
        return {"error": traceback.format_exc()}


def _worker(rank: int) -> dict:
    return {"ddp": _guarded(_ddp_part, rank), "fsdp": _guarded(_fsdp_part, rank)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One pair of processes for the DDP and FSDP2 tests: each process pays torch.export's warm-up once."""
    return _spawn(_worker, tmp_path_factory.mktemp("dist"))


def _part(results, name: str) -> tuple[dict, dict]:
    for rank, r in enumerate(results):
        if "error" in r[name]:
            pytest.fail(f"rank {rank}, {name}:\n{r[name]['error']}")
    return results[0][name], results[1][name]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda s: f"{what}: {s}")


# ---------------------------------------------------------------------------------------- DDP


class DDPNet(nn.Module):
    """No BatchNorm: with half a batch per rank, DDP's averaged gradient is the whole batch's."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 16, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _ddp_part(rank: int) -> dict:
    torch.manual_seed(0)
    base = DDPNet()
    x = torch.randn(8, 3, 4, 4)
    reg = tpr.GroupNorm(reg=0.1)

    # single process, whole batch
    ref = copy.deepcopy(base)
    ref_groups = tpr.find_groups(base, x)
    ref_opt = tpr.RegularizedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), ref, groups=ref_groups,
                                       regularizer=reg)
    ref(x).square().mean().backward()
    ref_opt.step()

    model = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, x, regularizer=reg)
    assert opt.groups == ref_groups  # traced through the wrapper: the inner module's names
    half = x[rank * 4 : (rank + 1) * 4]
    model(half).square().mean().backward()
    opt.step()
    names = {s.name for g in opt.groups for s in g.slots}
    assert names and not any(n.startswith("module.") for n in names), names
    for (n, p), q in zip(model.module.named_parameters(), ref.parameters()):
        _close(p.detach(), q.detach(), n)
    # the term is in there: an unregularized step lands elsewhere
    plain = copy.deepcopy(base)
    plain(x).square().mean().backward()
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    assert not torch.allclose(plain.conv1.weight, ref.conv1.weight, atol=1e-4)

    # pruning: rank 0 plans, both apply; random importance seeded per rank would differ without the broadcast
    torch.manual_seed(100 + rank)
    plan = tpd.prune_distributed(model, x, optimizer=opt, ratio=0.5, importance="random", src=0)
    model = nn.parallel.DistributedDataParallel(model.module)  # DDP must be rebuilt after slicing
    model(half).square().mean().backward()
    opt.step()
    opt.zero_grad()
    own = tpr.prune(copy.deepcopy(ref), x, ratio=0.5, importance="random", dry_run=True, groups=ref_groups)
    return {
        "plan": plan.to_dict(),
        "own": own.to_dict()["groups"],
        "shapes": {n: tuple(p.shape) for n, p in model.module.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.module.named_parameters()},
        "groups": [g.size for g in opt.groups],
    }


def test_ddp_step_equals_single_process_and_plan_broadcast(results):
    r0, r1 = _part(results, "ddp")
    assert r0["plan"] == r1["plan"]
    assert r0["own"] != r1["own"]  # each rank's own choice differs: the broadcast is what aligns them
    assert r0["shapes"] == r1["shapes"] and r0["shapes"]["conv1.weight"] == (3, 3, 3, 3)
    assert r0["groups"] == r1["groups"] == [3, 2]
    for n in r0["params"]:  # the step after re-wrapping stays in sync
        _close(r0["params"][n], r1["params"][n], n)


# --------------------------------------------------------------------------------------- FSDP2


class ShardNet(nn.Module):
    """Row counts 9, 9 (3 conv groups of 3: the shard boundary at row 5 cuts group 1), 5, 10 (a depthwise
    multiplier of 2: channel 2 owns rows 4..5, cut by the boundary) and 1 (rank 1 holds no row)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 9, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(9)
        self.conv2 = nn.Conv2d(9, 9, 3, padding=1, groups=3)
        self.conv3 = nn.Conv2d(9, 5, 1)
        self.dw = nn.Conv2d(5, 10, 3, padding=1, groups=5)
        self.bn2 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 16, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(x.flatten(1))


SETTINGS = [
    ("group_norm", lambda: tpr.GroupNorm(reg=0.1), "sgd"),
    ("group_norm_bias_decoupled", lambda: tpr.GroupNorm(reg=0.1, bias=True, decoupled=True), "adam"),
    ("group_lasso", lambda: tpr.GroupLasso(reg=0.1), "sgd"),
    ("bn_scale", lambda: tpr.BNScale(reg=0.1), "sgd"),
]


def _make_opt(kind, params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.Adam(params, lr=0.01)


def _fsdp_part(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    base = ShardNet()
    x = torch.randn(4, 3, 4, 4)
    ref_groups = tpr.find_groups(base, x)
    out: dict = {}
    for name, make_reg, kind in SETTINGS:
        ref = copy.deepcopy(base)
        ref_opt = tpr.RegularizedOptimizer(_make_opt(kind, ref.parameters()), ref, groups=ref_groups,
                                           regularizer=make_reg())
        ref(x).square().mean().backward()
        ref_opt.step()

        model = copy.deepcopy(base)
        fully_shard(model.conv2, mesh=mesh)  # nested, as with per-block wrapping
        fully_shard(model, mesh=mesh)
        if name == SETTINGS[0][0]:  # traced through the meta skeleton once; the same groups after
            assert tpd.find_groups(model, x) == ref_groups
        groups = ref_groups
        opt = tpr.RegularizedOptimizer(_make_opt(kind, model.parameters()), model, groups=groups,
                                       regularizer=make_reg())
        model(x).square().mean().backward()  # same batch on both ranks: the averaged grad is the batch's

        calls: list[int] = []
        real = dist.all_reduce

        def counting(t, *a, calls=calls, real=real, **k):
            calls.append(t.numel())
            return real(t, *a, **k)

        dist.all_reduce = counting
        try:
            opt.step()
        finally:
            dist.all_reduce = real
        engine = opt._engine
        assert engine.sharded is not None
        n_channels = sum(g.size for g in groups)
        assert calls == ([] if name == "bn_scale" else [n_channels]), (name, calls)
        if engine._coef is not None:  # fp32 partial sums add up in another order; exp2 amplifies by ~alpha
            torch.testing.assert_close(engine._coef, ref_opt._engine._coef, atol=1e-6, rtol=1e-5)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            _close(p.full_tensor(), q.detach(), f"{name}: {n}")
        out[name] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}

    # recipe: gather, prune (rank 0 plans), re-shard, train on
    full = tpd.unsharded_copy(model)
    assert type(full) is ShardNet and not tpd.is_sharded(full)
    for (n, p), q in zip(full.named_parameters(), ref.parameters()):
        _close(p.detach(), q.detach(), f"unsharded_copy: {n}")
    torch.manual_seed(100 + rank)
    plan = tpd.prune_distributed(full, x, ratio=0.4, importance="random", groups=ref_groups)
    fully_shard(full, mesh=mesh)
    opt = tpr.RegularizedOptimizer(torch.optim.SGD(full.parameters(), lr=0.1), full,
                                   groups=plan.remap(ref_groups), regularizer=tpr.GroupNorm(reg=0.1))
    full(x).square().mean().backward()
    opt.step()
    out["plan"] = plan.to_dict()
    out["after"] = {n: p.full_tensor() for n, p in full.named_parameters()}
    return out


def test_fsdp2_step_equals_single_process(results):
    r0, r1 = _part(results, "fsdp")
    # uneven shards really happened: 9 rows -> 5 + 4, 1 row -> 1 + 0
    assert r0["group_norm"]["conv2.weight"][0] == 5 and r1["group_norm"]["conv2.weight"][0] == 4
    assert r1["group_norm"]["fc.weight"][0] == 0
    assert r0["plan"] == r1["plan"]
    for n in r0["after"]:
        _close(r0["after"][n], r1["after"][n], n)


# ----------------------------------------------------------------------------- no processes


def test_row_split_covers_every_row_once():
    """A dim-0 slot with repeat 3 cut into row pieces: every (channel, row) appears exactly once."""
    slot = Slot("w", "", CONV, OUT, 0, offset=2, length=4, start=1, repeat=3)  # rows 1..12
    want = {(2 + i, 1 + i * 3 + r) for i in range(4) for r in range(3)}
    for cuts in ([0, 13], [0, 5, 13], [0, 2, 3, 7, 11, 13], [0, 1, 4, 13]):
        got = []
        for lo, hi in zip(cuts, cuts[1:]):
            for s in _rows_slots(slot, "w", lo, hi):
                got += [(s.offset + i, lo + s.start + i * s.repeat + r) for i in range(s.length) for r in range(s.repeat)]
        assert sorted(got) == sorted(want), cuts


def test_plain_and_ddp_models_take_the_local_path():
    from tritonprune.regularizing.engine import Regularization

    m = DDPNet()
    groups = tpr.find_groups(m, torch.randn(2, 3, 4, 4))
    assert not tpd.is_sharded(m)
    assert Regularization(m, groups, "group_norm").sharded is None


def test_params_filter_restricts_the_update_not_the_importance():
    """Regularization(params=...) updates only those parameters; gamma still counts every slot."""
    from tritonprune.regularizing.engine import Regularization

    torch.manual_seed(0)
    m = DDPNet()
    x = torch.randn(2, 3, 4, 4)
    groups = tpr.find_groups(m, x)
    m(x).sum().backward()
    before = {n: p.grad.clone() for n, p in m.named_parameters()}
    full, part = copy.deepcopy(m), copy.deepcopy(m)
    for a, b in zip(m.parameters(), full.parameters()):
        b.grad = a.grad.clone()
    for a, b in zip(m.parameters(), part.parameters()):
        b.grad = a.grad.clone()
    Regularization(full, groups, tpr.GroupNorm(0.1)).apply_to_grads()
    eng = Regularization(part, groups, tpr.GroupNorm(0.1), params=lambda: [part.conv1.weight])
    eng.apply_to_grads()
    _close(part.conv1.weight.grad, full.conv1.weight.grad, "conv1.weight")  # same gamma
    assert not torch.equal(full.conv1.weight.grad, before["conv1.weight"])
    for n in ("conv2.weight", "fc.weight"):
        assert not torch.equal(full.get_parameter(n).grad, before[n])
        assert torch.equal(part.get_parameter(n).grad, before[n]), n
    # after pruning replaced the parameters, a callable filter follows the new ones
    plan = tpr.prune(part, x, ratio=0.5, groups=groups)
    eng.set_groups(plan.remap(groups))
    part.conv1.weight.grad = torch.ones_like(part.conv1.weight)
    part.conv2.weight.grad = torch.ones_like(part.conv2.weight)
    eng.apply_to_grads()
    assert not torch.equal(part.conv1.weight.grad, torch.ones_like(part.conv1.weight))
    assert torch.equal(part.conv2.weight.grad, torch.ones_like(part.conv2.weight))

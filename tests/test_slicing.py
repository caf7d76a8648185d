"""Slicing: per-tensor cuts, module attributes, optimizer state, group remapping, refusal of bad plans.

Groups are built by hand here (the graph code has its own tests), for small models that cover a
grouped conv, a depthwise conv with multiplier 2 (repeat), a Linear after flatten (repeat = H*W), a
`cat` consumer read by two groups, a residual addition, ConvTranspose, Embedding, PReLU, a bare
parameter, GroupNorm and LayerNorm.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tritonprune.graph.group import (
    AFFINE,
    BATCHNORM,
    CONV,
    CONV_T,
    EMBEDDING,
    GROUPNORM,
    IN,
    LAYERNORM,
    LINEAR,
    OUT,
    PARAM,
    PRELU,
    STAT,
    Group,
    Slot,
)
from tritonprune.pruning.plan import PrunePlan, _class_name
from tritonprune.pruning.slicing import (
    apply_cuts,
    build_cuts,
    model_tensors,
    remap_groups,
    slice_tensor,
    zero_channels,
)

# --------------------------------------------------------------------------------- slot builders


def out_slots(
    mod: str, n: int, offset: int = 0, start: int = 0, bias: bool = True, kind: str = CONV, dim: int = 0
):
    s = [Slot(f"{mod}.weight", mod, kind, OUT, dim, offset, n, start)]
    if bias:
        s.append(Slot(f"{mod}.bias", mod, kind, OUT, 0, offset, n, start, is_bias=True))
    return s


def in_slot(
    mod: str,
    n: int,
    offset: int = 0,
    start: int = 0,
    repeat: int = 1,
    blocks: int = 1,
    kind: str = CONV,
    dim: int = 1,
):
    return [Slot(f"{mod}.weight", mod, kind, IN, dim, offset, n, start, repeat, blocks)]


def bn_slots(mod: str, n: int, offset: int = 0, repeat: int = 1, stats: bool = True):
    s = [
        Slot(f"{mod}.weight", mod, BATCHNORM, AFFINE, 0, offset, n, 0, repeat),
        Slot(f"{mod}.bias", mod, BATCHNORM, AFFINE, 0, offset, n, 0, repeat, is_bias=True),
    ]
    if stats:
        s += [
            Slot(f"{mod}.running_mean", mod, BATCHNORM, STAT, 0, offset, n, 0, repeat, is_buffer=True),
            Slot(f"{mod}.running_var", mod, BATCHNORM, STAT, 0, offset, n, 0, repeat, is_buffer=True),
        ]
    return s


def group(size: int, *slot_lists, blocks: int = 1, origin: str = "") -> Group:
    slots = tuple(s for lst in slot_lists for s in lst)
    return Group(size=size, slots=slots, blocks=blocks, origin=origin or slots[0].module)


def randomize_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so a stat sliced wrong shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


# --------------------------------------------------------------------------------------- models


class Net(nn.Module):
    """conv-bn + cat branch (residual) -> grouped conv -> depthwise x2 -> conv -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 8, 1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False)  # 2 in, 3 out per conv group
        self.bn2 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 24, 3, padding=1, groups=12, bias=False)  # depthwise, multiplier 2
        self.bn3 = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 5, 1)
        self.bn4 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)) + self.c(F.relu(torch.cat([self.a(x), self.b(x)], 1))))
        h = F.relu(self.bn2(self.conv2(h)))
        h = F.relu(self.bn3(self.dw(h)))
        h = F.relu(self.bn4(self.conv3(h)))
        h = F.avg_pool2d(h, 2).flatten(1)
        return self.head(F.relu(self.fc(h)))


def net_groups() -> list[Group]:
    return [
        group(
            8,
            out_slots("conv1", 8),
            bn_slots("bn1", 8),
            out_slots("c", 8),
            in_slot("conv2", 8, blocks=4),
            blocks=4,
        ),
        group(4, out_slots("a", 4), in_slot("c", 4, start=0)),
        group(6, out_slots("b", 6), in_slot("c", 6, start=4)),
        group(
            12,
            out_slots("conv2", 12, bias=False),
            bn_slots("bn2", 12),
            [Slot("dw.weight", "dw", CONV, OUT, 0, 0, 12, 0, 2)],
            bn_slots("bn3", 12, repeat=2),
            in_slot("conv3", 12, repeat=2),
            blocks=4,
        ),
        group(5, out_slots("conv3", 5), bn_slots("bn4", 5), in_slot("fc", 5, repeat=16, kind=LINEAR)),
        group(7, out_slots("fc", 7, kind=LINEAR), in_slot("head", 7, kind=LINEAR)),
    ]


def make_net(seed: int = 0):
    torch.manual_seed(seed)
    return randomize_norms_(Net(), seed).eval(), torch.randn(2, 3, 8, 8)


class Extras(nn.Module):
    """Embedding * bare parameter -> Linear -> PReLU -> BatchNorm1d -> Linear; ConvTranspose branch."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 10)
        self.scale = nn.Parameter(torch.rand(10) + 0.5)
        self.fc1 = nn.Linear(10, 12)
        self.act = nn.PReLU(12)
        self.bn = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 4)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 5, 2, stride=2)
        self.bnu = nn.BatchNorm2d(5)
        self.out = nn.Conv2d(5, 4, 1)

    def forward(self, idx, img):
        e = (self.emb(idx) * self.scale).mean(1)
        y = self.fc2(self.bn(self.act(self.fc1(e))))
        u = self.out(F.relu(self.bnu(self.up(F.relu(self.conv(img))))))
        return y + u.mean((2, 3))


def extras_groups() -> list[Group]:
    with_prelu = [Slot("act.weight", "act", PRELU, AFFINE, 0, 0, 12)]
    return [
        group(
            10,
            [
                Slot("emb.weight", "emb", EMBEDDING, AFFINE, 1, 0, 10),
                Slot("scale", "", PARAM, AFFINE, 0, 0, 10),
            ],
            in_slot("fc1", 10, kind=LINEAR),
        ),
        group(
            12,
            out_slots("fc1", 12, kind=LINEAR),
            with_prelu,
            bn_slots("bn", 12),
            in_slot("fc2", 12, kind=LINEAR),
        ),
        group(6, out_slots("conv", 6), in_slot("up", 6, kind=CONV_T, dim=0)),
        group(
            5,
            [
                Slot("up.weight", "up", CONV_T, OUT, 1, 0, 5),
                Slot("up.bias", "up", CONV_T, OUT, 0, 0, 5, is_bias=True),
            ],
            bn_slots("bnu", 5),
            in_slot("out", 5),
        ),
    ]


def make_extras(seed: int = 0):
    torch.manual_seed(seed)
    m = randomize_norms_(Extras(), seed).eval()
    with torch.no_grad():
        m.act.weight.uniform_(0.05, 0.5)
    return m, (torch.randint(0, 20, (2, 5)), torch.randn(2, 3, 4, 4))


def removals(groups, frac=0.5, seed=0):
    """Remove about `frac` of each group's channels at random, the same count per block."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for grp in groups:
        cb = grp.size // grp.blocks
        n = min(cb - 1, max(1, int(cb * frac)))
        rem = []
        for j in range(grp.blocks):
            rem += (torch.randperm(cb, generator=g)[:n] + j * cb).tolist()
        out.append((grp, sorted(rem)))
    return out


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def soft_and_hard(make, groups, frac=0.5, seed=0):
    model, x = make()
    rem = removals(groups, frac, seed)
    soft, hard = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(soft, rem)
    apply_cuts(hard, build_cuts(rem, model_tensors(hard)))
    return model, soft, hard, x, rem


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("frac", [0.3, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_apply_equals_zero_on_net(frac, seed):
    model, soft, hard, x, _ = soft_and_hard(make_net, net_groups(), frac, seed)
    ys, yh = run(soft, x), run(hard, x)
    assert not torch.allclose(ys, run(model, x))  # something was removed
    torch.testing.assert_close(yh, ys, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in hard.parameters()) < sum(p.numel() for p in model.parameters())


def test_module_attributes_follow_shapes():
    _, _, hard, x, rem = soft_and_hard(make_net, net_groups(), 0.5, 0)
    kept = {g.origin: g.size - len(r) for g, r in rem}
    assert hard.conv1.out_channels == kept["conv1"] and hard.bn1.num_features == kept["conv1"]
    assert hard.conv2.in_channels == kept["conv1"] and hard.conv2.groups == 4
    assert hard.conv2.out_channels == kept["conv2"] and hard.conv2.weight.shape[1] == kept["conv1"] // 4
    # the depthwise conv stays depthwise, multiplier 2
    assert (
        hard.dw.groups == hard.dw.in_channels == kept["conv2"] and hard.dw.out_channels == 2 * kept["conv2"]
    )
    assert hard.c.in_channels == kept["a"] + kept["b"]
    assert hard.fc.in_features == 16 * kept["conv3"] and hard.fc.out_features == kept["fc"]
    assert hard.head.in_features == kept["fc"]
    assert f"in_features={kept['fc']}" in repr(hard.head)
    for name, t in hard.state_dict().items():  # state_dict agrees with the tensors
        assert t.shape == model_tensors(hard)[name].shape


def test_extras_apply_equals_zero_and_attributes():
    model, soft, hard, x, rem = soft_and_hard(make_extras, extras_groups(), 0.5, 0)
    torch.testing.assert_close(run(hard, x), run(soft, x), atol=1e-5, rtol=1e-4)
    kept = [g.size - len(r) for g, r in rem]
    assert (
        hard.emb.embedding_dim == kept[0]
        and hard.scale.shape == (kept[0],)
        and hard.fc1.in_features == kept[0]
    )
    assert hard.act.num_parameters == kept[1] and hard.bn.num_features == kept[1]
    assert (
        hard.up.in_channels == kept[2] and hard.up.out_channels == kept[3] and hard.out.in_channels == kept[3]
    )
    assert hard.up.weight.shape[:2] == (kept[2], kept[3])


def test_pruned_model_trains_and_exports():
    _, _, hard, x, _ = soft_and_hard(make_net, net_groups(), 0.5, 0)
    hard.train()
    opt = torch.optim.SGD(hard.parameters(), lr=0.1)
    before = hard.conv1.weight.detach().clone()
    hard(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, hard.conv1.weight)
    hard.eval()
    ep = torch.export.export(hard, (x,))
    torch.testing.assert_close(ep.module()(x), run(hard, x))


def test_groupnorm_and_layernorm_attributes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gn = nn.GroupNorm(2, 8)
            self.conv2 = nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(4, 6)
            self.ln = nn.LayerNorm(6)
            self.fc2 = nn.Linear(6, 2)

        def forward(self, x):
            h = self.conv2(F.relu(self.gn(self.conv(x)))).mean((2, 3))
            return self.fc2(self.ln(self.fc(h)))

    m = M()
    gs = [
        group(
            8,
            out_slots("conv", 8),
            [
                Slot("gn.weight", "gn", GROUPNORM, AFFINE, 0, 0, 8),
                Slot("gn.bias", "gn", GROUPNORM, AFFINE, 0, 0, 8, is_bias=True),
            ],
            in_slot("conv2", 8),
            blocks=2,
        ),
        group(
            6,
            out_slots("fc", 6, kind=LINEAR),
            [
                Slot("ln.weight", "ln", LAYERNORM, AFFINE, 0, 0, 6),
                Slot("ln.bias", "ln", LAYERNORM, AFFINE, 0, 0, 6, is_bias=True),
            ],
            in_slot("fc2", 6, kind=LINEAR),
        ),
    ]
    apply_cuts(m, build_cuts([(gs[0], [0, 5]), (gs[1], [1, 2, 3])], model_tensors(m)))
    assert m.gn.num_channels == 6 and m.gn.num_groups == 2 and m.conv2.in_channels == 6
    assert m.ln.normalized_shape == (3,) and m.fc2.in_features == 3
    assert m(torch.randn(2, 3, 5, 5)).shape == (2, 2)


def test_blocked_slice_keeps_a_column_set_per_conv_group():
    w = torch.arange(4 * 3 * 1.0).view(4, 3, 1, 1)  # 2 conv groups of 2 rows, 3 columns each
    g = group(6, in_slot("w", 6, blocks=2))
    cuts = build_cuts([(g, [0, 5])], {"w.weight": w})  # column 0 of conv group 0, column 2 of conv group 1
    out = slice_tensor(w, {1: cuts[("w.weight", 1)]})
    assert out.shape == (4, 2, 1, 1)
    assert out[:2, :, 0, 0].tolist() == w[:2, 1:, 0, 0].tolist()
    assert out[2:, :, 0, 0].tolist() == w[2:, :2, 0, 0].tolist()


def test_unequal_blocks_and_everything_removed_are_refused():
    g = net_groups()[0]  # blocks=4, 2 per block
    t = model_tensors(make_net()[0])
    with pytest.raises(ValueError, match="same count"):
        build_cuts([(g, [0])], t)
    with pytest.raises(ValueError, match="every channel"):
        build_cuts([(net_groups()[1], [0, 1, 2, 3])], t)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        build_cuts([(g, [8])], t)


def test_bad_cut_leaves_the_model_untouched():
    model, x = make_net()
    ref = copy.deepcopy(model.state_dict())
    gs = net_groups()
    bad = Group(3, (Slot("nope.weight", "nope", CONV, OUT, 0, 0, 3),))
    with pytest.raises(ValueError, match="nope.weight"):
        apply_cuts(model, build_cuts([(gs[1], [0]), (bad, [0])], model_tensors(model)))
    # a grouped conv whose rows would be removed unevenly is refused by the module check
    cuts = build_cuts([(gs[1], [0])], model_tensors(model))
    cuts[("conv2.weight", 0)] = build_cuts(
        [(group(12, out_slots("conv2", 12, bias=False)), [0])], model_tensors(model)
    )[("conv2.weight", 0)]
    with pytest.raises(ValueError, match="conv2"):
        apply_cuts(model, cuts)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert model.c.in_channels == 10


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    ],
)
def test_optimizer_state_follows_and_training_continues(make_opt):
    """Prune mid-training, keep training with the same optimizer; equals training the sliced copy with sliced state."""
    model, x = make_net()
    model.train()
    opt = make_opt(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    rem = removals(net_groups(), 0.5, 3)
    twin = copy.deepcopy(model)  # reference: sliced alone, then a fresh optimizer loads the sliced state
    apply_cuts(model, build_cuts(rem, model_tensors(model)), optimizer=opt)
    params = list(model.parameters())
    assert [p for g in opt.param_groups for p in g["params"]] == params  # the new parameters, same order
    assert all(p in opt.state for p in params)
    cuts = build_cuts(rem, model_tensors(twin))
    apply_cuts(twin, cuts)
    twin_opt2 = make_opt(twin.parameters())
    twin_opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: load_state_dict shares tensors
    for st in opt.state.values():  # sliced state has the parameter's shape, scalar state kept
        assert all(v.shape == st[k].shape for k, v in st.items())
    for p in params:
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert v.shape == p.shape, k
    for _ in range(2):
        for m_, o_ in ((model, opt), (twin, twin_opt2)):
            o_.zero_grad()
            m_(x).square().mean().backward()
            o_.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_optimizer_state_values_are_sliced_not_reset():
    model, x = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    buf = opt.state[model.fc.weight]["momentum_buffer"].clone()
    rem = [(g, r) for g, r in removals(net_groups(), 0.5, 0) if g.origin in ("conv3", "fc")]
    apply_cuts(model, build_cuts(rem, model_tensors(model)), optimizer=opt)
    kept_rows = sorted(set(range(7)) - set(rem[1][1]))
    cols = [c * 16 + k for c in sorted(set(range(5)) - set(rem[0][1])) for k in range(16)]
    torch.testing.assert_close(opt.state[model.fc.weight]["momentum_buffer"], buf[kept_rows][:, cols])
    assert model.fc.weight.grad is not None and model.fc.weight.grad.shape == model.fc.weight.shape


def test_shared_parameter_is_replaced_everywhere():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.back = nn.Linear(6, 4)
            self.back2 = nn.Linear(6, 4)
            self.back2.weight = self.back.weight

        def forward(self, x):
            h = self.fc(x)
            return self.back(h) + self.back2(h)

    m = Tied()
    g = group(6, out_slots("fc", 6, kind=LINEAR), in_slot("back", 6, kind=LINEAR))
    apply_cuts(m, build_cuts([(g, [1, 4])], model_tensors(m)))
    assert m.back2.weight is m.back.weight and m.back2.weight.shape == (4, 4)
    assert m(torch.randn(2, 4)).shape == (2, 4)


def test_remap_groups_gives_the_groups_of_the_pruned_model():
    model, x = make_net()
    gs = net_groups()
    rem = removals(gs, 0.5, 0)
    cuts = build_cuts(rem, model_tensors(model))
    new = remap_groups(gs, cuts)
    apply_cuts(model, cuts)
    assert [g.size for g in new] == [g.size - len(r) for g, r in rem]
    b = next(g for g in new if g.origin == "b")
    c_in = next(s for s in b.slots if s.name == "c.weight")
    assert c_in.start == 4 - len(rem[1][1])  # the cat part moved left by a's removed channels
    # the remapped groups fit the pruned model: a second round of pruning works and is exact
    rem2 = removals(new, 0.3, 1)
    soft = copy.deepcopy(model)
    zero_channels(soft, rem2)
    apply_cuts(model, build_cuts(rem2, model_tensors(model)))
    torch.testing.assert_close(run(model, x), run(soft, x), atol=1e-5, rtol=1e-4)


def test_regularized_optimizer_gets_remapped_groups():
    class FakeRegularized(torch.optim.SGD):
        def __init__(self, params, groups):
            super().__init__(params, lr=0.1)
            self.groups = groups
            self.received = None

        def reset_groups(self, groups):
            self.received = list(groups)

    model, x = make_net()
    gs = net_groups()
    opt = FakeRegularized(model.parameters(), gs)
    rem = removals(gs, 0.5, 0)
    apply_cuts(model, build_cuts(rem, model_tensors(model)), optimizer=opt)
    assert [g.size for g in opt.received] == [g.size - len(r) for g, r in rem]
    for g in opt.received:  # every slot fits the pruned tensors
        build_cuts([(g, [])], model_tensors(model))


def test_plan_check_refuses_shape_mismatch_and_other_models():
    model, x = make_net()
    rem = removals(net_groups(), 0.5, 0)
    tensors = model_tensors(model)
    shapes = {s.name: list(tensors[s.name].shape) for g, _ in rem for s in g.slots}
    plan = PrunePlan(_class_name(model), [g for g, _ in rem], [r for _, r in rem], shapes)
    other = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="made for"):
        plan.apply(other)
    plan.apply(model)
    with pytest.raises(ValueError, match="expects shape"):
        plan.apply(model)  # already pruned
    with pytest.raises(TypeError):
        plan.apply("not a model")


def test_dtype_memory_format_and_requires_grad_are_kept():
    model, x = make_net()
    model = model.to(torch.bfloat16).to(memory_format=torch.channels_last)
    model.conv3.weight.requires_grad_(False)
    soft, hard = copy.deepcopy(model), copy.deepcopy(model)
    rem = removals(net_groups(), 0.5, 0)
    zero_channels(soft, rem)
    apply_cuts(hard, build_cuts(rem, model_tensors(hard)))
    assert all(p.dtype == torch.bfloat16 for p in hard.parameters())
    assert hard.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not hard.conv3.weight.requires_grad and hard.conv1.weight.requires_grad
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(run(hard, xb), run(soft, xb), atol=2e-2, rtol=2e-2)

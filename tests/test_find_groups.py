"""find_groups: coupling rules, exclusions, bad input and agreement with Torch-Pruning's groups."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tp_oracle import tp_group_sizes
from zoo import ZOO, ZOO_TP_COMPATIBLE, randomize_bn_

import tritonprune.graph as G
from tritonprune.graph import group as gk


def groups_of(model, x, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = G.find_groups(model, x, **kw)
    return groups, [str(w.message) for w in caught if "tritonprune" in str(w.message)]


def slot(group, name, dim=None):
    found = [s for s in group.slots if s.name == name and (dim is None or s.dim == dim)]
    assert len(found) == 1, (name, group)
    return found[0]


def group_with(groups, name, dim):
    found = [g for g in groups if any(s.name == name and s.dim == dim for s in g.slots)]
    assert len(found) == 1, f"{name}:{dim} in {len(found)} groups"
    return found[0]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_groups_found(name):
    model, x = ZOO[name]()
    groups, _ = groups_of(model, x)
    assert groups, name
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for g in groups:
        assert g.size >= 1 and g.size % g.blocks == 0
        assert any(s.role == gk.OUT or s.kind in (gk.PARAM, gk.EMBEDDING) for s in g.slots)
        for s in g.slots:
            t = params[s.name]
            assert s.start + (s.length // s.blocks) * s.repeat <= t.shape[s.dim], s


@pytest.mark.parametrize("name", sorted(ZOO_TP_COMPATIBLE - {"split_chunk"}))
def test_group_sizes_agree_with_torch_pruning(name):
    model, x = ZOO[name]()
    ours = sorted(g.size for g in groups_of(model, x)[0])
    model, x = ZOO[name]()
    assert ours == tp_group_sizes(model, x)


def test_split_with_fixed_sizes_is_excluded_and_named():
    # Torch-Pruning prunes through split([4, 14]) although the sizes in forward() stay hard-coded
    model, x = ZOO["split_chunk"]()
    groups, warns = groups_of(model, x)
    assert not any(s.name.startswith("mix.") and s.role == gk.OUT for g in groups for s in g.slots)
    assert any("split" in w and "aten.split_with_sizes" in w for w in warns)
    # chunk(2) parts feed different convs: one group, two blocks, the stem weight at two offsets
    stem = [g for g in groups if g.origin == "stem.0"]
    assert len(stem) == 1 and stem[0].size == 12 and stem[0].blocks == 2
    rows = [s for s in stem[0].slots if s.name == "stem.0.weight"]
    assert [(s.offset, s.start, s.length) for s in rows] == [(0, 0, 6), (6, 6, 6)]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, groups=4, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, groups=8, padding=1)
        self.pw = nn.Conv2d(16, 8, 1)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x))) * self.scale
        y = self.pw(self.dw(self.c2(y))) + y
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        return self.fc(F.adaptive_avg_pool2d(y, 4).flatten(1))


def test_slots_of_each_rule():
    groups, warns = groups_of(Net(), torch.randn(2, 3, 8, 8))
    assert not warns
    main = group_with(groups, "c1.weight", 0)
    assert main.size == 8 and main.blocks == 4  # c2's 4 conv groups read these channels
    assert slot(main, "c2.weight").blocks == 4 and slot(main, "c2.weight").role == gk.IN
    assert slot(main, "scale").kind == gk.PARAM
    assert slot(main, "bn.running_var").is_buffer
    assert slot(main, "pw.weight", 0).role == gk.OUT  # residual add couples pw's rows with c1's
    fc = slot(main, "fc.weight")
    assert (fc.dim, fc.repeat) == (1, 16)  # flatten of 8 x 4 x 4
    inner = group_with(groups, "c2.weight", 0)
    assert inner.blocks == 4
    dw = slot(inner, "dw.weight", 0)
    assert dw.repeat == 2  # depthwise with channel multiplier 2
    assert slot(inner, "pw.weight", 1).repeat == 2
    # the classifier's outputs reach the model output: never a group
    assert not any(s.name == "fc.weight" and s.dim == 0 for g in groups for s in g.slots)


def test_ignored_layers_keep_their_outputs_but_not_their_inputs():
    model = Net()
    full, _ = groups_of(model, torch.randn(2, 3, 8, 8))
    ignored, _ = groups_of(model, torch.randn(2, 3, 8, 8), ignored_layers=[model.c2])
    assert any(s.name == "c2.weight" and s.dim == 0 for g in full for s in g.slots)
    assert not any(s.name == "c2.weight" and s.dim == 0 for g in ignored for s in g.slots)
    assert any(s.name == "c2.weight" and s.dim == 1 for g in ignored for s in g.slots)
    by_name, _ = groups_of(model, torch.randn(2, 3, 8, 8), ignored_layers=["c2"])
    assert [g.size for g in by_name] == [g.size for g in ignored]


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.b = nn.Conv2d(6, 6, 3)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = torch.fft.fft2(y).real  # no rule: channels through it must stay
        return self.c(self.b(y)).sum()


def test_unknown_op_excludes_its_channels_with_one_warning():
    groups, warns = groups_of(UnknownOp(), torch.randn(1, 3, 10, 10))
    assert not any(s.name == "a.weight" and s.dim == 0 for g in groups for s in g.slots)
    assert any(s.name == "b.weight" and s.dim == 0 for g in groups for s in g.slots)
    named = [w for w in warns if "fft" in w]
    assert len(named) == 1 and "no coupling rule" in named[0]


class Slicing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.b = nn.Conv2d(3, 6, 3)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.c(self.a(x)[:, :4]) + self.b(x)[:, 2:].sum() + x[:, :1].mean()


def test_hard_coded_channel_positions_are_excluded():
    groups, warns = groups_of(Slicing(), torch.randn(1, 3, 6, 6))
    names = {s.name for g in groups for s in g.slots}
    assert "a.weight" not in names and "b.weight" not in names
    assert any("slicing" in w for w in warns)


def test_channel_shuffle_gives_piecewise_slots_and_equal_blocks():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
            return self.b(y).flatten(1)

    groups, warns = groups_of(Shuffle(), torch.randn(1, 3, 4, 4))
    assert not warns
    g = group_with(groups, "a.weight", 0)
    assert g.blocks == 2  # the view into 2 shuffle groups must stay valid
    cols = sorted((s.offset, s.start) for s in g.slots if s.name == "b.weight")
    # channel k*... of shuffle group j lands at column 2*k + j
    assert cols == [(c, 2 * (c % 4) + c // 4) for c in range(8)]


def test_groups_apply_to_a_copy_by_name():
    model, x = ZOO["resnet_basic"]()
    copy_groups, _ = groups_of(copy.deepcopy(model), x)
    groups, _ = groups_of(model, x)
    assert [g.slots for g in groups] == [g.slots for g in copy_groups]
    names = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(s.name in names for g in groups for s in g.slots)


def test_tracing_leaves_the_model_as_it_was():
    model, x = ZOO["resnet_basic"]()
    randomize_bn_(model)
    model.train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # mixed flags survive
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    groups_of(model, x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
    assert model._forward_hooks and handle.id in model._forward_hooks
    handle.remove()


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    import torch.distributed as dist

    model, x = ZOO["mlp"]()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert [g.size for g in groups_of(ddp, x)[0]] == [g.size for g in groups_of(model, x)[0]]
    finally:
        dist.destroy_process_group()


def test_bad_input_gets_clear_errors():
    model, x = ZOO["resnet_basic"]()
    with pytest.raises(TypeError, match="nn.Module"):
        G.find_groups(lambda t: t, x)
    with pytest.raises(G.TraceError, match=r"failed to run on the given example_inputs in module .stem.0. \(op aten.convolution"):
        G.find_groups(model, torch.randn(2, 5, 16, 16))  # wrong channel count
    with pytest.raises(ValueError, match="'nope' is not a module"):
        G.find_groups(model, x, ignored_layers=["nope"])
    with pytest.raises(ValueError, match="not part of"):
        G.find_groups(model, x, ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="example_inputs"):
        G.find_groups(model, 3)


def test_rotary_attention_needs_whole_heads():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=40, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 50, (2, 6))
    heads, _ = groups_of(model, x)
    attn = [g for g in heads if g.unit > 1]
    assert len(attn) == 1 and attn[0].exact
    # 2 key/value heads of 8 dims, rotary pairs fold 2 dims into one channel: units of 4 channels
    assert attn[0].size == 8 and attn[0].unit == 4
    assert {s.name.rsplit(".", 2)[-2] for s in attn[0].slots} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    dims, warns = groups_of(model, x, head_pruning="dims")
    assert not [g for g in dims if any("q_proj" in s.name and s.dim == 0 for s in g.slots)]
    assert any("head_pruning='heads'" in w for w in warns)


def test_multihead_attention_heads_and_packed_projection():
    layer = nn.TransformerEncoderLayer(24, 4, 40, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.Linear(5, 24), nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
                          nn.Linear(24, 3)).eval()
    groups, _ = groups_of(model, torch.randn(2, 7, 5))
    attn = [g for g in groups if g.unit > 1]
    assert len(attn) == 1 and attn[0].size == 24 and attn[0].unit == 6
    packed = sorted(s.start for s in attn[0].slots if s.name.endswith("in_proj_weight"))
    assert packed == [0, 24, 48]  # q, k and v rows of the packed projection
    stream = group_with(groups, "0.weight", 0)
    assert not stream.exact  # LayerNorm over the residual stream

"""timm families prune into models that run (issue 14): one small model per family whose pattern the
library must handle. ViT/DeiT attention (`self.num_heads`, `self.head_dim`, `self.attn_dim`, the
last equal to the residual width, resolved by a fake-tensor forward), MetaFormer / PoolFormer
(`self.shape` of the layer scale), ConvNeXt (LayerNorm over channels-last, layer scale), EfficientNet
(depthwise convs, squeeze-excite) and Swin (window attention). The wider measured list is in
bench/vision_sweep.py and bench/results/vision_sweep_timm.json.
"""

from __future__ import annotations

import pytest
import tv
from vision_sweep import sweep_one

FAMILIES = {
    "deit_tiny_patch16_224": 32,  # attention heads and the residual stream pruned apart
    "poolformerv2_s12": 32,
    "convnext_atto": 32,
    "efficientnet_b0": 32,
    "swin_tiny_patch4_window7_224": 56,
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_family_prunes_into_a_model_that_runs(name):
    timm = tv.timm()
    size = FAMILIES[name]
    kwargs = {"img_size": size} if any(k in name for k in ("deit", "swin")) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    r = sweep_one(name, model, size)
    assert r.refused is None, r.refused
    assert r.groups > 0 and r.runs and r.trains
    assert r.param_ratio < 0.8, f"{name}: only {1 - r.param_ratio:.0%} of the parameters went"
    if r.apply_vs_zero is not None:
        assert r.apply_vs_zero < 1e-4
    assert not [w for w in r.warnings if "left unchanged" in w], r.warnings
    if name.startswith("deit"):
        for blk in model.blocks:
            a = blk.attn
            assert a.num_heads * a.head_dim == a.attn_dim == a.qkv.out_features // 3 == a.proj.in_features
            assert a.num_heads < 3 and a.head_dim == 64  # whole heads went, the head dim stayed
        assert model.blocks[0].norm1.normalized_shape[0] < 192  # and the residual stream was pruned too


# issue 22: attention reading a width from its input (spatial reduction `sr(x).reshape(B, C, -1)`,
# `reshape(B, N, C)`, `C // num_heads`): the run check ties those groups at equal counts; CaiT: q/k/v taken
# by position into different groups (talking heads), joined on a second walk
DEEP = {"pvt_v2_b0": (64, False), "twins_pcpvt_small": (64, True), "crossvit_tiny_240": (240, True),
        "cait_xxs24_224": (32, True)}


@pytest.mark.parametrize("name", list(DEEP))
def test_tied_widths_prune_deep(name):
    timm = tv.timm()
    size, img = DEEP[name]
    model = timm.create_model(name, pretrained=False, num_classes=10, **({"img_size": size} if img else {}))
    before = _heads(model)
    r = sweep_one(name, model, size)
    assert r.refused is None and r.runs and r.trains
    assert r.param_ratio <= 0.40, (name, r.param_ratio)
    after = _heads(model)
    for m, (h, rows) in after.items():  # whole heads went: the count followed, the head dim stayed
        assert rows == h * (before[m][1] // before[m][0]), (m, before[m], (h, rows))
    assert any(after[m][0] < before[m][0] for m in after), "no attention module lost a head"


def _heads(model) -> dict[str, tuple[int, int]]:
    """(num_heads, query rows) of every attention module with a q / wq / qkv projection."""
    out = {}
    for name, m in model.named_modules():
        for proj, parts in (("q", 1), ("wq", 1), ("qkv", 3)):
            lin = getattr(m, proj, None)
            if isinstance(getattr(m, "num_heads", None), int) and hasattr(lin, "out_features"):
                out[name] = (m.num_heads, lin.out_features // parts)
                break
    return out

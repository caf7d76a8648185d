"""Models beyond classifiers, built from their packages' configs (no weights, no downloads), small.

`build(name)` returns a `Case`: the model (eval mode), example inputs, the `free_outputs` to prune with,
and `loss(model, inputs)`, a scalar to backpropagate in train mode. `available(name)` says whether the
package is importable (ultralytics, segment_anything and open_clip live in .venv/tests-only; diffusers is
installed normally). Ultralytics writes its settings file under YOLO_CONFIG_DIR, set here to a temporary
folder so that nothing lands in $HOME.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import tv
from torch import nn

tv.install()
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="tritonprune-yolo-"))


@dataclass
class Case:
    model: nn.Module
    inputs: Any
    loss: Callable[[nn.Module, Any], torch.Tensor]
    free_outputs: tuple = ()
    notes: dict = field(default_factory=dict)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _sum_tensors(out: Any) -> torch.Tensor:
    """A loss-like scalar: the mean square of every float tensor in the output."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().pow(2).mean() for t in leaves)


def _loss(model: nn.Module, inputs: Any) -> torch.Tensor:
    return _sum_tensors(_call(model, inputs))


PACKAGE = {"yolov8n": "ultralytics", "yolo11n": "ultralytics", "yolov8n_seg": "ultralytics",
           "yolov8n_pose": "ultralytics", "unet2d": "diffusers", "sam_vit": "segment_anything",
           "clip_vit": "open_clip", "clip_rn": "open_clip"}
NAMES = tuple(PACKAGE)


def available(name: str) -> bool:
    return importlib.util.find_spec(PACKAGE[name]) is not None


def build(name: str) -> Case:
    torch.manual_seed(0)
    return BUILDERS[name]()


def _yolo(yaml: str) -> Callable[[], Case]:
    def make() -> Case:
        from ultralytics.nn.tasks import DetectionModel, PoseModel, SegmentationModel

        cls = SegmentationModel if "seg" in yaml else PoseModel if "pose" in yaml else DetectionModel
        model = cls(yaml, verbose=False).eval()
        # eval output: (decoded predictions, {"boxes", "scores", "feats", ...}); feats may change width
        return Case(model, torch.randn(1, 3, 64, 64), _detection_loss if cls is DetectionModel else _loss,
                    free_outputs=("feats",))

    return make


def _detection_loss(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Ultralytics' own detection loss (box, class, DFL) on two made-up boxes."""
    from ultralytics.cfg import get_cfg

    if not hasattr(model, "args") or isinstance(model.args, dict):
        model.args = get_cfg()  # the loss's hyperparameters (box, cls, dfl gains)
    n = inputs.shape[0]
    batch = {"img": inputs, "batch_idx": torch.arange(n, dtype=torch.float), "cls": torch.ones(n, 1),
             "bboxes": torch.tensor([[0.5, 0.5, 0.25, 0.25]]).repeat(n, 1)}
    return model.loss(batch)[0].sum()


def _unet() -> Case:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    inputs = dict(sample=torch.randn(1, 4, 16, 16), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 5, 32), return_dict=False)
    return Case(model, inputs, _loss)


def _sam() -> Case:
    from segment_anything.modeling import ImageEncoderViT

    # 8 x 8 patches, windows of 3 (padded to 9 x 9) in blocks 0 and 2, global attention in 1 and 3
    model = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=64, depth=4, num_heads=4, out_chans=32,
                            use_rel_pos=True, window_size=3, global_attn_indexes=(1, 3)).eval()
    return Case(model, torch.randn(1, 3, 128, 128), _loss)


def _clip(vision: str) -> Callable[[], Case]:
    def make() -> Case:
        from open_clip.model import CLIP

        text = dict(context_length=12, vocab_size=100, width=48, heads=3, layers=2)
        if vision == "vit":
            cfg, size = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16), 32
        else:  # ModifiedResNet: attention pooling by F.multi_head_attention_forward
            cfg, size = dict(image_size=64, layers=(1, 1, 1, 1), width=16, head_width=16), 64
        model = CLIP(32, cfg, text).eval()
        # token ids: the text tower pools at each sequence's highest id (x[arange, text.argmax(-1)])
        return Case(model, (torch.randn(2, 3, size, size), torch.randint(1, 100, (2, 12))), _loss)

    return make


BUILDERS: dict[str, Callable[[], Case]] = {
    "yolov8n": _yolo("yolov8n.yaml"), "yolo11n": _yolo("yolo11n.yaml"), "yolov8n_seg": _yolo("yolov8n-seg.yaml"),
    "yolov8n_pose": _yolo("yolov8n-pose.yaml"), "unet2d": _unet, "sam_vit": _sam,
    "clip_vit": _clip("vit"), "clip_rn": _clip("rn"),
}

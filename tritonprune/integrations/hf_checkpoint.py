"""Save and reload a pruned Hugging Face model: the HF checkpoint plus the plans that made it.

    tpr.save_pretrained(model, "out")                       # after tpr.prune(model, ...) or plan.apply(model)
    model = tpr.from_pretrained(AutoModelForCausalLM, "out")  # same outputs as the pruned model

A pruned model's layers often differ from each other (each group pruned by its own importance), and
its attention may keep the softmax scale of the unpruned head dim (head_pruning="dims"): one HF config
cannot say that. So `save_pretrained` writes the weights with `model.save_pretrained`, and next to them
`tritonprune.json`: the original config and the plans, in the order they were applied. `from_pretrained`
builds the original architecture with its parameters on the meta device (buffers are real: rotary
tables, position ids), applies the plans (shapes and attributes only, nothing is computed), and loads
the saved weights in place.

Plain `AutoModel....from_pretrained("out")` reads `config.json`. It is the pruned config when that
config rebuilds exactly this model (same tensor names and shapes, same module attributes such as the
attention scale, same non-persistent buffers); then the plain load is correct. Otherwise `config.json`
is the original config, so the plain load fails on the first pruned tensor's shape instead of silently
computing something else; `tritonprune.json` says why under "plain_load".

`prune` and `PrunePlan.apply` record what they do on the model (`record_plan`); transformers is only
imported when saving or loading.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from .._files import read_json, require_object, to_json, write_json, write_text
from ..pruning.history import ORIGINAL_CONFIG, applied_plans, config_snapshot
from ..pruning.kept_heads import hooks_of

FILE = "tritonprune.json"
FORMAT = "tritonprune.hf_checkpoint"
VERSION = 1


# ------------------------------------------------------------------------------ building without weights


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real (they are cheap
    and often not saved: rotary frequencies, position ids, embedding scales)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _build(cls: Any, config: Any) -> nn.Module:
    with params_on_meta():
        return cls(config) if isinstance(cls, type) and issubclass(cls, nn.Module) else cls.from_config(config)


def _scalars(m: nn.Module) -> dict[str, Any]:
    out = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, (bool, int, float)) or (isinstance(v, tuple) and all(isinstance(x, (int, float)) for x in v)):
            out[k] = v
    return out


def plain_load_problem(model: nn.Module) -> str | None:
    """Why `type(model)(model.config)` would not be this model (None if it would, exactly)."""
    for name, hooks in hooks_of(model).items():
        return (f"{name} narrows its argument {hooks[0].arg!r} to the heads it kept ({hooks[0]}), a forward pre-hook "
                "that a plain from_pretrained does not install")
    try:
        fresh = _build(type(model), copy.deepcopy(model.config))
    except Exception as e:  # the config rejects itself (hidden size not a multiple of the heads, ...)
        return f"the pruned config does not build: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    mine, theirs = model.state_dict(), fresh.state_dict()
    if set(mine) != set(theirs):
        return f"tensor names differ: {sorted(set(mine) ^ set(theirs))[:3]}"
    for name, t in mine.items():
        if tuple(t.shape) != tuple(theirs[name].shape):
            return f"{name}: the pruned config gives shape {tuple(theirs[name].shape)}, the model has {tuple(t.shape)}"
    modules = dict(fresh.named_modules())
    for name, m in model.named_modules():
        f = modules.get(name)
        if f is None or type(f) is not type(m):
            return f"{name or type(model).__name__}: not built the same from the pruned config"
        for k, v in _scalars(m).items():
            if getattr(f, k, None) != v:
                return f"{name}.{k} is {v!r} in the model but {getattr(f, k, None)!r} from the pruned config"
        for b, t in m.named_buffers(recurse=False):
            ft = getattr(f, b, None)
            if b in m._non_persistent_buffers_set and (
                not isinstance(ft, torch.Tensor) or ft.shape != t.shape
                or not torch.allclose(ft.detach().float().cpu(), t.detach().float().cpu())
            ):
                return f"{name}.{b} (not saved) differs when built from the pruned config"
    return None


# ------------------------------------------------------------------------------ save / load


def _set_config_field(file: str, key: str, value: Any) -> None:
    """One field of a saved config.json, rewritten atomically (tritonprune._files)."""
    data = require_object(read_json(file), file)
    data[key] = value
    write_json(file, data)


def save_pretrained(model: nn.Module, path: str | os.PathLike, plan: Any = None, **kwargs: Any) -> None:
    """Write the HF checkpoint of a pruned model plus `tritonprune.json` (original config and plans).

    `plan`: the PrunePlan (or list of plans, in order) that made `model` from the original; by default
    the plans `prune` / `PrunePlan.apply` recorded on the model. kwargs go to `model.save_pretrained`.
    """
    from ..graph.trace import unwrap

    model = unwrap(model)
    if not hasattr(model, "save_pretrained") or config_snapshot(model) is None:
        raise TypeError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel (no save_pretrained/config)")
    plans = applied_plans(model) if plan is None else (list(plan) if isinstance(plan, (list, tuple)) else [plan])
    # the class's own method: PruneCallback may have set an instance one that calls back here
    save_with_plans(model, path, plans, functools.partial(type(model).save_pretrained, model), **kwargs)


def save_with_plans(model: nn.Module, path: str | os.PathLike, plans: list, save: Any, **kwargs: Any) -> None:
    """`save(path, **kwargs)` (a PreTrainedModel's save_pretrained) with the config that rebuilds `model`
    (the pruned one where it does, else the original), then `tritonprune.json` next to it."""
    if not plans:
        raise ValueError(
            f"{type(model).__name__}: no pruning plan to save; prune with tritonprune.prune or PrunePlan.apply "
            "(they record the plan on the model), or pass plan="
        )
    original = model.__dict__.get(ORIGINAL_CONFIG)
    if original is None:
        raise ValueError(
            f"{type(model).__name__}: the original config was not recorded (the model was not pruned through "
            "PrunePlan.apply); prune it with tritonprune.prune or PrunePlan.apply"
        )
    from ..pruning.plan import _class_name

    if plans[0].model_class != _class_name(model):
        raise ValueError(f"the plan was made for a {plans[0].model_class}, not a {_class_name(model)}")
    problem = plain_load_problem(model)
    meta = plan_file_content(plans, original_config=original,
                             plain_load="ok: config.json describes the pruned model" if problem is None
                             else f"refused: config.json is the original config ({problem})")
    text = to_json(meta, os.path.join(os.fspath(path), FILE))  # before anything is written
    os.makedirs(path, exist_ok=True)
    kwargs.setdefault("save_original_format", False)  # the tensor names the plans use
    pruned_config = model.config
    if problem is not None:
        # the pruned config would build another model: save the original, whose shapes make a plain
        # from_pretrained fail loudly instead
        model.config = type(pruned_config).from_dict(original)
    if not kwargs.get("is_main_process", True):
        try:  # the Trainer's other ranks: HF decides what they write; the main process writes the plan
            save(path, **kwargs)
        finally:
            model.config = pruned_config
        return
    # HF writes into a fresh private folder inside `path`; its files then replace the old ones one by
    # one (each atomically, links replaced rather than followed), tritonprune.json last. A save that
    # fails leaves the previous checkpoint as it was.
    staging = tempfile.mkdtemp(prefix=".tmp-save-", dir=path)
    try:
        try:
            save(staging, **kwargs)
        finally:
            model.config = pruned_config
        if problem is None and getattr(pruned_config, "_experts_implementation", None) == "eager":
            # pruning chose the eager experts (rows no longer aligned for grouped matmul): say so in
            # config.json, which transformers reads back as `experts_implementation`, so a plain load
            # does not pick another
            _set_config_field(os.path.join(staging, "config.json"), "experts_implementation", "eager")
        written = sorted(os.listdir(staging))
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(path, name))
        _drop_stale_weights(os.fspath(path), set(written))
        write_text(os.path.join(path, FILE), text)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def plan_file_content(plans: list, original_config: dict | None = None, plain_load: str | None = None) -> dict:
    """What `tritonprune.json` holds: the plans in the order they were applied, and the original HF
    config (None for a model without one)."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": plans[0].model_class,
        "original_config": original_config,
        "plans": [p.to_dict() for p in plans],
    }
    if plain_load is not None:
        meta["plain_load"] = plain_load
    return meta


def write_plan_file(folder: str | os.PathLike, plans: list, original_config: dict | None = None,
                    plain_load: str | None = None) -> str:
    """Write `folder/tritonprune.json` atomically (validated first, temp file in the folder, fsync, rename)."""
    path = os.path.join(os.fspath(folder), FILE)
    write_text(path, to_json(plan_file_content(plans, original_config, plain_load), path))
    return path


def read_plan_file(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The content of `folder/tritonprune.json` (format checked, plans as PrunePlans), or None if absent.
    Every flaw is a ValueError naming the file."""
    from ..pruning.plan import PrunePlan

    meta_file = os.path.join(os.fspath(folder), FILE)
    if not os.path.lexists(meta_file):
        return None
    meta = require_object(read_json(meta_file), meta_file, ["format", "version"])
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                         f"supported (expected {FORMAT} version {VERSION})")
    require_object(meta, meta_file, ["model_class", "original_config", "plans"])
    if meta["original_config"] is not None:  # None: a plain torch module (PruneCallback on a non-HF model)
        require_object(meta["original_config"], f"{meta_file}: original_config")
    if not isinstance(meta["plans"], list) or not meta["plans"]:
        raise ValueError(f"{meta_file}: plans must be a non-empty list of plans")
    plans = []
    for i, p in enumerate(meta["plans"]):
        try:
            plans.append(PrunePlan.from_dict(p))
        except ValueError as e:
            raise ValueError(f"{meta_file}: plans[{i}]: {e}") from None
    meta["plans"] = plans
    return meta


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _drop_stale_weights(path: str, written: set[str]) -> None:
    """Remove weight files of an earlier save in the other layout (single file vs shards): the loader
    would otherwise pick the stale ones."""
    for name in os.listdir(path):
        if name in written:
            continue
        if name in _WEIGHT_FILES or (name.startswith("model-") and name.endswith(".safetensors")):
            full = os.path.join(path, name)
            if not os.path.islink(full) and os.path.isfile(full):
                os.unlink(full)


def _inside(folder: str, name: object, index: str) -> str:
    """The path of checkpoint file `name` in `folder`, refusing a name that leads anywhere else (absolute,
    `..`). Names are checked as written: links placed in the folder are its owner's choice (the Hugging
    Face hub cache links every file to a blob outside the snapshot folder)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"{index}: shard file name {name!r} is not a file name")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == os.curdir or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise ValueError(f"{index}: shard {name!r} lies outside the checkpoint folder {folder}; refused")
    return os.path.join(folder, norm)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        data = require_object(read_json(index), index, ["weight_map"])
        weight_map = require_object(data["weight_map"], f"{index}: weight_map")
        files = [_inside(path, name, index) for name in dict.fromkeys(weight_map.values())]  # all checked first
        out: dict[str, torch.Tensor] = {}
        for full in files:
            out.update(load_file(full))
        return out
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def from_pretrained(cls: Any, path: str | os.PathLike, dtype: Any = None, device: Any = None,
                    **config_overrides: Any) -> nn.Module:
    """Rebuild a model saved by `save_pretrained`: the original architecture (parameters on the meta
    device), the recorded plans applied, then the saved weights loaded in place. Returns it in eval mode.

    `cls`: a model class (LlamaForCausalLM) or an auto class (AutoModelForCausalLM). `dtype`, `device`:
    where the weights go (default: as saved, on CPU). Other keyword arguments override config fields.
    """
    import transformers

    if "torch_dtype" in config_overrides:  # the older name HF still accepts
        dtype = config_overrides.pop("torch_dtype") if dtype is None else dtype
    path = os.fspath(path)
    meta = read_plan_file(path)
    if meta is None:
        raise FileNotFoundError(
            f"{path}: no {FILE}; this is not a checkpoint written by tritonprune.save_pretrained, by "
            "trainer.save_model() or as a Trainer checkpoint after PruneCallback pruned "
            "(load it with the model class's own from_pretrained)"
        )
    meta_file = os.path.join(path, FILE)
    original = meta.get("original_config")
    if original is None:
        raise ValueError(f"{meta_file}: the model has no Hugging Face config (a plain torch module): apply its "
                         "plans with tritonprune.integrations.hf.apply_checkpoint_plan")
    original = dict(require_object(original, f"{meta_file}: original_config"))
    if "model_type" not in original:
        raise ValueError(f"{meta_file}: original_config has no model_type")
    original.update(config_overrides)
    config = transformers.AutoConfig.for_model(original.pop("model_type"), **original)
    model = _build(cls, config)
    from ..pruning.plan import _class_name

    if _class_name(model) != meta["model_class"]:
        raise ValueError(f"{path} holds a pruned {meta['model_class']}; {getattr(cls, '__name__', cls)} built a "
                         f"{_class_name(model)}")
    for plan in meta["plans"]:
        plan.apply(model)
    state = _load_state_dict(path)
    expected = model.state_dict()
    for name, t in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(t.shape):
            raise ValueError(f"{name}: saved shape {tuple(t.shape)}, the pruned architecture has {tuple(expected[name].shape)}")
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{path}: tensors the pruned model does not have: {result.unexpected_keys[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied copies (lm_head = embeddings) are saved once
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise ValueError(f"{path}: no saved weights for {left[:5]}")
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen) and hasattr(model, "generation_config"):
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()

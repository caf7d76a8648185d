"""Prune models beyond classifiers (detectors, a diffusion UNet, SAM's encoder, CLIP); write
bench/results/beyond_classifiers.json.

    OMP_NUM_THREADS=1 python bench/beyond_classifiers.py [names...]

Models from tests/beyond_zoo.py (built from their packages' configs, small, no weights). Per model:
groups found, the warnings of find_groups (ops and modules left out), groups left out by the run check
(with the error), parameters after / before at ratio 0.3, whether the pruned model runs (eval forward)
and trains (a loss-like backward in train mode, finite gradients), apply vs zero_ on the exact groups
(max abs difference of the outputs), and Torch-Pruning 1.6.1's parameter ratio with MagnitudePruner at
the same ratio where it runs (the output layers ignored). A run over some names only prints.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import pathlib
import platform
import sys
import time
import traceback
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import beyond_zoo as zoo  # noqa: E402
import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import tritonprune as tpr  # noqa: E402

RATIO = 0.3
# modules whose outputs are the model's outputs, for Torch-Pruning's ignored_layers (we find these ourselves)
TP_IGNORED = {"yolov8n": ["model.22"], "yolo11n": ["model.23"], "yolov8n_seg": ["model.22"],
              "yolov8n_pose": ["model.22"], "unet2d": ["conv_out"], "sam_vit": ["neck.2"],
              "clip_vit": [], "clip_rn": []}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _floats(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _runs(case: zoo.Case, model: torch.nn.Module) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(t).all()) for t in _floats(zoo._call(model.eval(), case.inputs)))


def _trains(case: zoo.Case, model: torch.nn.Module) -> bool:
    model.train()
    try:
        model.zero_grad()
        case.loss(model, case.inputs).backward()
        return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    finally:
        model.eval()


def _exact_diff(case: zoo.Case, groups) -> float | None:
    """max |apply - zero_| over the outputs, pruning only the groups whose removal is exact."""
    exact = [g for g in groups if g.exact]
    if not exact:
        return None
    base = copy.deepcopy(case.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = tpr.prune(copy.deepcopy(base), case.inputs, ratio=RATIO, groups=exact, dry_run=True,
                         free_outputs=case.free_outputs)
    zeroed, pruned = copy.deepcopy(base), copy.deepcopy(base)
    plan.zero_(zeroed)
    plan.apply(pruned)
    with torch.no_grad():
        a, b = _floats(zoo._call(pruned, case.inputs)), _floats(zoo._call(zeroed, case.inputs))
    # free outputs change width: compare the leaves whose shapes agree (the predictions)
    return max(float((x - y).abs().max()) for x, y in zip(a, b) if x.shape == y.shape)


def _torch_pruning(name: str, case: zoo.Case, timeout_s: float = 60.0) -> dict:
    """Torch-Pruning in a child process: on some models its graph search does not finish (YOLO11n's
    C2PSA grew past 3.5 GB in a trial), so it gets `timeout_s` of wall time."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(_torch_pruning_here(name, case)))
    child.start()
    child.join(timeout_s)
    if child.is_alive():
        child.kill()
        child.join()
        return {"error": f"did not finish in {timeout_s:.0f} s"}
    return queue.get() if not queue.empty() else {"error": f"exit code {child.exitcode}"}


def _torch_pruning_here(name: str, case: zoo.Case) -> dict:
    try:
        import torch_pruning as tp
    except ImportError:
        return {"error": "torch_pruning not installed"}
    model = copy.deepcopy(case.model)
    before = n_params(model)
    mods = dict(model.named_modules())
    ignored = [mods[n] for n in TP_IGNORED.get(name, [])]
    inputs = list(case.inputs) if isinstance(case.inputs, tuple) else case.inputs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                               pruning_ratio=RATIO, ignored_layers=ignored)
            pruner.step()
        ok = _runs(case, model)
        return {"param_ratio": round(n_params(model) / before, 4), "runs": ok}
    except Exception as e:  # noqa: BLE001 - recorded, the bench goes on
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def measure(name: str) -> dict:
    t0 = time.process_time()
    case = zoo.build(name)
    row: dict = {"model": name, "package": zoo.PACKAGE[name], "free_outputs": list(case.free_outputs)}
    before = n_params(case.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = tpr.find_groups(case.model, case.inputs, free_outputs=case.free_outputs)
    row["groups"] = len(groups)
    row["find_groups_warnings"] = sorted({str(w.message) for w in caught})
    row["exact_apply_vs_zero"] = _exact_diff(case, groups)
    model = copy.deepcopy(case.model)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        plan = tpr.prune(model, case.inputs, ratio=RATIO, groups=groups, free_outputs=case.free_outputs)
    row["dropped_by_run_check"] = [{"origin": d.get("origin"), "module": d.get("module"), "error": d.get("error")}
                                   for d in plan.info.get("dropped") or []]
    row["params_before"], row["params_after"] = before, n_params(model)
    row["param_ratio"] = round(n_params(model) / before, 4)
    row["runs"] = _runs(case, model)
    row["trains"] = _trains(case, model)
    row["torch_pruning"] = _torch_pruning(name, case)
    row["cpu_s"] = round(time.process_time() - t0, 1)
    return row


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    names = argv or [n for n in zoo.NAMES if zoo.available(n)]
    rows = []
    for name in names:
        try:
            row = measure(name)
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            row = {"model": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "find_groups_warnings"}), flush=True)
    if not argv:
        out = {"ratio": RATIO, "torch": torch.__version__, "python": platform.python_version(), "models": rows}
        path = ROOT / "bench" / "results" / "beyond_classifiers.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1:])

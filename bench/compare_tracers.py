"""Group signatures of the two tracers (record, the default, and the torch.export fallback) side by side.

    python bench/compare_tracers.py            # test zoo + Hugging Face families + torchvision sweep models
    python bench/compare_tracers.py zoo hf     # any of: zoo, hf, tv

Prints one line per model (OK or DIFF with the groups only one tracer finds) and the number that differ;
exits 1 if any does. The default test suite compares the zoo and eight HF families
(tests/test_record_trace.py); this covers the rest (about 15 CPU minutes for everything).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from group_signatures import both_tracers, difference  # noqa: E402


def models(which: list[str]):
    if "zoo" in which:
        from zoo import ZOO

        yield from ((n, lambda n=n: ZOO[n]()) for n in ZOO)
    if "hf" in which:
        import hf_zoo

        yield from ((n, lambda n=n: hf_zoo.build(n)[:2]) for n in hf_zoo.NAMES)
    if "tv" in which:
        import tv
        from test_torchvision_sweep import DEFAULT

        tvm = tv.torchvision().models

        def build(name):
            size, kw = DEFAULT[name]
            torch.manual_seed(0)
            return tvm.get_model(name, weights=None, **kw).eval(), torch.randn(2, 3, size, size)

        yield from ((n, lambda n=n: build(n)) for n in DEFAULT)


def main() -> int:
    torch.set_num_threads(1)
    which = sys.argv[1:] or ["zoo", "hf", "tv"]
    bad = 0
    for name, build in models(which):
        model, x = build()
        try:
            old, new = both_tracers(model, x)
        except Exception as e:  # noqa: BLE001 - reported per model
            print(f"{name}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
            bad += 1
            continue
        d = difference(old, new)
        print(f"{name}: {'DIFF' if d else 'OK'} ({len(old)} groups)" + (f"\n{d}" if d else ""), flush=True)
        bad += bool(d)
    print(f"{bad} models differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

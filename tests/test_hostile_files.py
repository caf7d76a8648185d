"""Issue 21 (security, files, fork): files and caches no other user can plant, every write atomic and
validated first, JSON that names the file it came from, and a fork during the accelerator's build.

Each refused call is checked to have modified nothing (the previous file, the planted link's target)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from test_slicing import make_net, net_groups  # noqa: I001

from tritonprune import _files
from tritonprune.kernels import cpu_native
from tritonprune.pruning.plan import PrunePlan
from tritonprune.pruning.plan_schema import PlanError
from tritonprune.pruning.pruner import prune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def small_plan() -> PrunePlan:
    model, x = make_net()
    return prune(model, x, ratio=0.5, groups=net_groups(), dry_run=True)


# ------------------------------------------------------------------------------ the atomic writer


def test_write_goes_around_a_planted_link_never_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "plan.json")
    small_plan().save(tmp_path / "plan.json")
    assert victim.read_text() == "precious"
    assert not os.path.islink(tmp_path / "plan.json")
    assert PrunePlan.load(tmp_path / "plan.json").num_removed > 0


@pytest.mark.parametrize("bad", [object(), float("nan"), torch.ones(2), {1, 2}], ids=["object", "nan", "tensor", "set"])
def test_a_save_that_cannot_encode_leaves_the_previous_file(tmp_path, bad):
    path = tmp_path / "plan.json"
    good = small_plan()
    good.save(path)
    before = path.read_bytes()
    broken = small_plan()
    broken.info["extra"] = bad
    with pytest.raises(ValueError, match="cannot be written as JSON.*nothing was written"):
        broken.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]  # no temporary file left behind


def test_a_write_failing_half_way_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    _files.write_json(path, {"v": 1})
    monkeypatch.setattr(_files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        _files.write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


# ------------------------------------------------------------------------------ JSON that is read back


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "data, match",
    [
        (b'{"format": "tritonprune.PrunePlan", "vers', "not valid JSON.*truncated"),
        (b"\xff\xfe{}", "not UTF-8"),
        (DEEP.encode(), "nested too deeply"),
        (b"[1, 2]", "a plan must be a JSON object"),
        (b'{"format": "tritonprune.PrunePlan", "version": 1}', "missing key"),
    ],
    ids=["truncated", "not_utf8", "deep", "not_object", "missing_key"],
)
def test_plan_files_that_are_not_plans_name_the_file(tmp_path, data, match):
    path = tmp_path / "p.json"
    path.write_bytes(data)
    with pytest.raises(PlanError, match=match) as e:
        PrunePlan.load(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------ Hugging Face checkpoints


def test_an_index_naming_a_file_outside_the_checkpoint_is_refused(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from tritonprune.integrations.hf_checkpoint import _load_state_dict

    (tmp_path / "elsewhere").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "elsewhere" / "x.safetensors"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"a": torch.ones(1)}, str(ckpt / "model-1.safetensors"))
    for name in ("../elsewhere/x.safetensors", str(tmp_path / "elsewhere" / "x.safetensors"), "a/../../x"):
        (ckpt / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "model-1.safetensors", "w": name}}))
        with pytest.raises(ValueError, match="outside the checkpoint folder"):
            _load_state_dict(str(ckpt))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    assert set(_load_state_dict(str(ckpt))) == {"a"}


@pytest.mark.parametrize(
    "data, match",
    [
        (b"[]", "expected a JSON object"),
        (b'{"format": "tritonprune.hf_checkpoint", "version": 1}', r"missing key\(s\) \['model_class'"),
        (b'{"format": "tritonprune.hf_checkpoint", "vers', "not valid JSON"),
        (b"\xc3\x28", "not UTF-8"),
        (DEEP.encode(), "nested too deeply"),
        (b'{"format": "tritonprune.hf_checkpoint", "version": 1, "model_class": "x", "original_config": [],'
         b' "plans": []}', "original_config: expected a JSON object"),
    ],
    ids=["not_object", "missing_key", "truncated", "not_utf8", "deep", "config_not_object"],
)
def test_bad_tritonprune_json_names_the_file(tmp_path, data, match):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import tritonprune as tpr

    (tmp_path / "tritonprune.json").write_bytes(data)
    with pytest.raises(ValueError, match=match) as e:
        tpr.from_pretrained(AutoModelForCausalLM, tmp_path)
    assert "tritonprune.json" in str(e.value)


def _pruned_llama():
    pytest.importorskip("transformers")
    import hf_zoo

    import tritonprune as tpr

    m, x, _ = hf_zoo.build("llama")
    hf_zoo.quiet(tpr.prune)(m, x, ratio=0.25)
    return m


def _tree(path):
    return {p: open(os.path.join(path, p), "rb").read() for p in sorted(os.listdir(path))}


def test_save_pretrained_failing_half_way_or_unencodable_leaves_the_old_checkpoint(tmp_path):
    import tritonprune as tpr
    from tritonprune.pruning.history import applied_plans

    m = _pruned_llama()
    tpr.save_pretrained(m, tmp_path)
    before = _tree(tmp_path)
    assert "tritonprune.json" in before and "model.safetensors" in before

    real = type(m).save_pretrained

    def half(self, path, **kw):  # writes part of the weights, then fails
        open(os.path.join(path, "model.safetensors"), "wb").write(b"garbage")
        raise OSError("disk full")

    type(m).save_pretrained = half
    try:
        with pytest.raises(OSError, match="disk full"):
            tpr.save_pretrained(m, tmp_path)
    finally:
        type(m).save_pretrained = real
    assert _tree(tmp_path) == before

    applied_plans(m)[0].info["bad"] = object()
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        tpr.save_pretrained(m, tmp_path)
    assert _tree(tmp_path) == before
    del applied_plans(m)[0].info["bad"]

    victim = tmp_path.parent / "victim"
    victim.write_text("precious")
    os.unlink(tmp_path / "tritonprune.json")
    os.symlink(victim, tmp_path / "tritonprune.json")  # planted link: replaced, not written through
    tpr.save_pretrained(m, tmp_path)
    assert victim.read_text() == "precious" and not os.path.islink(tmp_path / "tritonprune.json")
    back = tpr.from_pretrained(type(m), tmp_path)
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------ the C accelerator's cache


def test_a_cache_below_a_world_writable_directory_is_refused(tmp_path):
    team = tmp_path / "team"
    team.mkdir()
    team.chmod(0o777)  # anyone may rename `cache` away and put their own directory there
    why = cpu_native.private_dir(team / "cache")
    assert why is not None and "team" in why and "writable by other users" in why
    team.chmod(0o1777)  # sticky, like /tmp: only the entry's owner may rename it
    assert cpu_native.private_dir(team / "cache") is None
    team.chmod(0o700)


def test_a_cache_below_another_users_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "theirs").mkdir()
    real_stat = os.stat

    def stat_(p, *a, **k):  # as if `theirs` belonged to uid 4242
        st = real_stat(p, *a, **k)
        if os.fspath(p) == str(tmp_path / "theirs"):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, 4242, *tuple(st)[5:]))
        return st

    monkeypatch.setattr(cpu_native.os, "stat", stat_)
    why = cpu_native.private_dir(tmp_path / "theirs" / "cache")
    assert why is not None and "owned by uid 4242" in why


@needs_cc
def test_the_verified_bytes_are_loaded_not_the_path_again(tmp_path, monkeypatch):
    """A cached object swapped for another right after its check: what runs is what was checked."""
    monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(tmp_path))
    cpu_native.reset()
    try:
        assert cpu_native.library() is not None, cpu_native.why_unavailable()
        (so,) = tmp_path.glob("cpu_native-*.so")
        (src := tmp_path / "evil.c").write_text("int tp_evil(void) { return 666; }\n")
        evil = tmp_path / "evil.so"
        subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", str(src), "-o", str(evil)], check=True)
        real = cpu_native._read_verified
        swapped = []

        def read_then_swap(path):
            data = real(path)
            os.replace(evil, path)  # the attacker wins the race
            swapped.append(path)
            return data

        monkeypatch.setattr(cpu_native, "_read_verified", read_then_swap)
        cpu_native.reset()
        lib = cpu_native.library()
        assert swapped and lib is not None and hasattr(lib, "tp_run_f32") and not hasattr(lib, "tp_evil")
    finally:
        cpu_native.reset()


@needs_cc
def test_a_cached_object_replaced_by_a_link_is_not_followed(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    cpu_native.reset()
    try:
        assert cpu_native.library() is not None
        (so,) = (tmp_path / "cache").glob("cpu_native-*.so")
        elsewhere = tmp_path / "elsewhere.so"
        shutil.copy(so, elsewhere)  # same bytes: the sidecar matches, only the link is wrong
        os.unlink(so)
        os.symlink(elsewhere, so)
        assert cpu_native._read_verified(so) is None
        cpu_native.reset()
        assert cpu_native.library() is not None
        assert not os.path.islink(so)  # rebuilt in place of the link
    finally:
        cpu_native.reset()


def test_fork_while_another_thread_builds_does_not_hang_the_child(tmp_path):
    """The build thread holds the lock at fork(): the child must get a fresh lock, not wait forever."""
    code = textwrap.dedent("""
        import os, sys, threading, time, warnings
        warnings.simplefilter("ignore")
        from tritonprune.kernels import cpu_native
        t = threading.Thread(target=cpu_native.library)
        t.start()
        for _ in range(500):
            if cpu_native._lock.locked():
                break
            time.sleep(0.01)
        assert cpu_native._lock.locked(), "the build thread never took the lock"
        pid = os.fork()
        if pid == 0:
            cpu_native.library()  # the child builds (fails: the slow compiler) on its own lock
            os._exit(0)
        deadline = time.time() + 30
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("CHILD", os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            print("CHILD HUNG")
        t.join()
    """)
    env = {**os.environ, "TRITONPRUNE_CACHE_DIR": str(tmp_path), "CC": "sh -c 'sleep 0.3; exit 1'",
           "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "CHILD 0" in r.stdout, (r.stdout, r.stderr)


def test_fresh_cache_dir_and_sidecar_are_private(tmp_path):
    assert cpu_native.private_dir(tmp_path / "c") is None
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o700

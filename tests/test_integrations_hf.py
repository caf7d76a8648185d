"""A tiny Hugging Face Trainer on CPU (a 2-layer Llama with GQA): sparse training, pruning at a step,
and a resume after pruning that ends bitwise where the uninterrupted run ended."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tv import torchvision

import tritonprune as tpr
from tritonprune.integrations.hf_checkpoint import write_plan_file
from tritonprune.wrappers import optimizer_chain, resolve_optimizer

torchvision()  # the Trainer imports torchvision; on the CPU torch build it needs the stand-in of tests/tv.py
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
hf = pytest.importorskip("tritonprune.integrations.hf")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x, labels=None):
        logits = self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


EXAMPLE = {"x": torch.randn(2, 6)}


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


LLAMA_EXAMPLE = {"input_ids": torch.randint(0, 64, (1, 12))}


def _token_data(n=16):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, 64, (12,), generator=g)), "labels": ids.clone()} for _ in range(n)]


def _trainer(out, model, callbacks):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, save_strategy="steps", save_steps=3, report_to=[], logging_strategy="no",
        dataloader_num_workers=0, use_cpu=True, seed=0, disable_tqdm=True,
    )
    cls = hf.sparse_trainer(transformers.Trainer)
    return cls(model=model, args=args, train_dataset=_token_data(), callbacks=callbacks,
               example_inputs=LLAMA_EXAMPLE, regularizer=tpr.GroupNorm(reg=1e-3, decoupled=True),
               sparse_kwargs={"backend": "torch"})


def _model():
    torch.manual_seed(0)
    return Net()


def test_trainer_sparse_training_prune_and_bitwise_resume(tmp_path):
    model = _llama()
    cb = hf.PruneCallback(LLAMA_EXAMPLE, ratio=0.5, at_step=2)
    trainer = _trainer(tmp_path, model, [cb])
    seen = []
    trainer.add_callback(type("Chain", (transformers.TrainerCallback,), {
        "on_train_begin": lambda self, *a, optimizer=None, **k: seen.append(optimizer_chain(optimizer)),
    })())
    calls = []
    orig = tpr.RegularizedOptimizer._shrink_decoupled
    tpr.RegularizedOptimizer._shrink_decoupled = lambda self: (calls.append(1), orig(self))[1]
    try:
        trainer.train()
    finally:
        tpr.RegularizedOptimizer._shrink_decoupled = orig
    assert any(isinstance(o, tpr.RegularizedOptimizer) for o in seen[0])
    assert len(calls) == 6  # 6 optimizer steps of 2 accumulated batches: the term once per real step
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj.out_features == 32 and layer.self_attn.q_proj.out_features == 16  # pruned, trained on
    reg = resolve_optimizer(trainer.optimizer)
    assert reg.groups == cb.plan.remap(cb.plan.groups)
    assert os.path.isfile(tmp_path / "checkpoint-3" / hf.PLAN_FILE)
    assert os.path.isfile(tmp_path / "checkpoint-6" / hf.PLAN_FILE)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    # a fresh process builds the unpruned model again: the callback re-prunes it before the weights load,
    # and hands the optimizer the groups of the uninterrupted run (a fresh trace of the pruned Llama
    # groups its channels differently)
    model2 = _llama()
    cb2 = hf.PruneCallback(LLAMA_EXAMPLE, ratio=0.5, at_step=2)
    trainer2 = _trainer(tmp_path, model2, [cb2])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert cb2.plan is not None and cb2.plan.removed == cb.plan.removed
    assert resolve_optimizer(trainer2.optimizer).groups == reg.groups
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_trainer_checkpoints_and_save_model_reload_through_from_pretrained(tmp_path):
    # globally pruned: the pruned config cannot describe the model (hidden size no longer a multiple of
    # the heads), so only the plans in tritonprune.json rebuild it
    model = _llama()
    cb = hf.PruneCallback(LLAMA_EXAMPLE, ratio=0.4, at_step=2, global_pruning=True)
    trainer = _trainer(tmp_path, model, [cb])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    with torch.no_grad():
        want = model(**LLAMA_EXAMPLE).logits
    for folder in ("checkpoint-6", "final"):
        assert os.path.isfile(tmp_path / folder / "tritonprune.json")
        assert not os.path.exists(tmp_path / folder / "tritonprune_plan.json")  # one name for every plan file
        again = tpr.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / folder)
        with torch.no_grad():
            got = again(**LLAMA_EXAMPLE).logits
        torch.testing.assert_close(got, want)  # checkpoint-6 is the end of training too
    assert os.path.isfile(tmp_path / "checkpoint-3" / "tritonprune.json")  # saved after pruning at step 2
    with open(tmp_path / "final" / "tritonprune.json") as f:
        assert json.load(f)["plain_load"].startswith("refused")
    # tpr.save_pretrained writes the same file
    tpr.save_pretrained(model, tmp_path / "tpr")
    with open(tmp_path / "tpr" / "tritonprune.json") as f, open(tmp_path / "final" / "tritonprune.json") as g:
        assert f.read() == g.read()
    with pytest.raises((RuntimeError, ValueError), match="(?i)size|shape"):  # plain HF load refuses loudly
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")


def test_plain_trainer_prune_callback_slices_adamw_state(tmp_path):
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, save_strategy="no", report_to=[],
        logging_strategy="no", dataloader_num_workers=0, use_cpu=True, seed=0, disable_tqdm=True,
    )
    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(6, generator=g), "labels": torch.tensor(i % 3)} for i in range(16)]
    cb = hf.PruneCallback(EXAMPLE, ratio=0.5, at_step=2, importance="l1")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert model.fc1.out_features == 8 and cb.plan.info["importance"] == "l1"
    inner = resolve_optimizer(trainer.optimizer)
    assert type(inner).__name__ == "AdamW" and cb.plan.info["regularized_groups"] is False
    assert inner.state[model.fc1.weight]["exp_avg"].shape == (8, 6)  # sliced along, then stepped twice more


def test_apply_checkpoint_plan_and_errors(tmp_path):
    model = _model()
    plan = tpr.prune(model, EXAMPLE, ratio=0.5)
    (tmp_path / "ckpt").mkdir()
    write_plan_file(tmp_path / "ckpt", [plan])
    fresh = _model()
    assert hf.apply_checkpoint_plan(fresh, str(tmp_path / "ckpt")).removed == plan.removed
    assert fresh.fc1.weight.shape == model.fc1.weight.shape
    assert hf.apply_checkpoint_plan(fresh, str(tmp_path / "ckpt")) is None  # already pruned: nothing to do
    assert hf.apply_checkpoint_plan(_model(), str(tmp_path)) is None  # no plan there

    # weights with fewer channels and no plan to explain them: say what to do, not "size mismatch"
    cb = hf.PruneCallback(EXAMPLE, ratio=0.5, at_step=1)
    cb._output_dir = str(tmp_path / "nothing")
    other = _model()
    other.register_load_state_dict_pre_hook(cb._before_load)
    with pytest.raises(ValueError, match="apply_checkpoint_plan"):
        other.load_state_dict(model.state_dict())

    with pytest.raises(ValueError, match="at_step"):
        hf.PruneCallback(EXAMPLE, ratio=0.5)
    with pytest.raises(TypeError, match="example_inputs"):
        hf.sparse_trainer()(model=_model(), args=transformers.TrainingArguments(
            output_dir=str(tmp_path), report_to=[], use_cpu=True))

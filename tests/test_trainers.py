"""fusedopt as a drop-in inside the trainers people use: Hugging Face Trainer, PyTorch Lightning and accelerate.

Tiny models built from configs (nothing downloaded), a few steps each. Each run is compared with the same run on
torch.optim.AdamW. Loss curves are compared against the spread of torch's own two implementations (foreach and
fused, which round differently) in the same setting, with a floor of a few fp32 ulps of the loss.
"""
from __future__ import annotations

import fusedopt
import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers, pytorch-lightning and accelerate (.[trainers])")
pytest.importorskip("pytorch_lightning", reason="needs transformers, pytorch-lightning and accelerate (.[trainers])")
pytest.importorskip("accelerate", reason="needs transformers, pytorch-lightning and accelerate (.[trainers])")

kSteps = 8
kVocab, kContext = 64, 16
LR, WD = 3e-3, 0.01
kFp32Eps = torch.finfo(torch.float32).eps


def _optimizers() -> dict[str, type]:
    """torch's two AdamW implementations (their disagreement is the allowed spread) and fusedopt's."""
    return {
        "torch-foreach": lambda ps, **kw: torch.optim.AdamW(ps, foreach=True, **kw),
        "torch-fused": lambda ps, **kw: torch.optim.AdamW(ps, fused=True, **kw),
        "fusedopt": fusedopt.AdamW,
    }


def assert_same_curve(curves: dict[str, list[float]]) -> None:
    """fusedopt's losses within 4x the spread torch's own implementations show (at least 4 fp32 eps of the loss)."""
    base, other, ours = curves["torch-foreach"], curves["torch-fused"], curves["fusedopt"]
    assert len(base) == len(other) == len(ours) > 0
    for step, (b, o, f) in enumerate(zip(base, other, ours)):
        allowed = max(4 * abs(b - o), 4 * kFp32Eps * abs(b))
        assert abs(f - b) <= allowed, f"step {step}: fusedopt {f!r}, torch {b!r} (fused {o!r}, allowed {allowed:.3g})"


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=kVocab, n_positions=kContext, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _token_dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, kVocab, (n, kContext), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


# ------------------------------------------------------------------------------------------ Hugging Face Trainer

def _hf_args(out, **overrides):
    from transformers import TrainingArguments

    kw = dict(output_dir=str(out), max_steps=kSteps, per_device_train_batch_size=8, learning_rate=LR,
              weight_decay=WD, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, logging_steps=1,
              save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
              dataloader_num_workers=0)
    kw.update(overrides)
    return TrainingArguments(**kw)


def _hf_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_hf_trainer_with_optimizers_argument(tmp_path):
    """`Trainer(optimizers=(opt, None))`: the Trainer's max_grad_norm clipping and cosine schedule drive our AdamW."""
    from transformers import Trainer

    curves = {}
    for name, make in _optimizers().items():
        model = _tiny_gpt2()
        opt = make(model.parameters(), lr=LR, weight_decay=WD)
        trainer = Trainer(model=model, args=_hf_args(tmp_path / name), train_dataset=_token_dataset(),
                          optimizers=(opt, None))
        trainer.train()
        curves[name] = _hf_losses(trainer)
        assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt  # accelerate wraps it
        assert max(e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e) > 1.0  # clipping acts
    assert len(curves["fusedopt"]) == kSteps
    assert_same_curve(curves)


def test_hf_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    from transformers import Trainer

    curves = {}
    for name, cls in (("torch-foreach", torch.optim.AdamW), ("fusedopt", fusedopt.AdamW)):
        trainer = Trainer(model=_tiny_gpt2(), args=_hf_args(tmp_path / name), train_dataset=_token_dataset(),
                          optimizer_cls_and_kwargs=(cls, {"lr": LR, "weight_decay": WD, "foreach": True}))
        trainer.train()
        assert type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)) is cls
        curves[name] = _hf_losses(trainer)
    curves["torch-fused"] = curves["torch-foreach"]  # the spread is checked by the test above; floor only here
    assert_same_curve(curves)


def test_hf_trainer_resume_from_checkpoint_continues_the_curve(tmp_path):
    """Save at step 4, resume in a new Trainer: steps 5-8 give the uninterrupted run's losses."""
    from transformers import Trainer

    def run(out, resume=None, max_steps=kSteps):
        model = _tiny_gpt2()
        opt = fusedopt.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        args = _hf_args(out, save_strategy="steps", save_steps=4, max_steps=max_steps)
        trainer = Trainer(model=model, args=args, train_dataset=_token_dataset(), optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = _hf_losses(run(tmp_path / "full"))
    run(tmp_path / "cut")  # saves checkpoint-4 (and checkpoint-8)
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-4"))
    after = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 4]
    assert len(after) == kSteps - 4
    assert after == pytest.approx(full[4:], rel=4 * kFp32Eps)
    state = resumed.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {kSteps}


# ------------------------------------------------------------------------------------------- PyTorch Lightning

def test_lightning_configure_optimizers_with_gradient_clip_val():
    import pytorch_lightning as pl

    data = _token_dataset()

    class Module(pl.LightningModule):
        def __init__(self, make):
            super().__init__()
            self.model, self.make, self.losses = _tiny_gpt2(), make, []

        def training_step(self, batch, _):
            loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return self.make(self.parameters(), lr=LR, weight_decay=WD)

    curves = {}
    for name, make in _optimizers().items():
        module = Module(make)
        trainer = pl.Trainer(max_steps=kSteps, gradient_clip_val=1.0, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        curves[name] = module.losses
    assert len(curves["fusedopt"]) == kSteps
    assert_same_curve(curves)


# ------------------------------------------------------------------------------------------------- accelerate

def test_accelerate_prepare_backward_and_clip():
    from accelerate import Accelerator

    curves = {}
    for name, make in _optimizers().items():
        accelerator = Accelerator(cpu=True)
        model = _tiny_gpt2()
        opt = make(model.parameters(), lr=LR, weight_decay=WD)
        loader = torch.utils.data.DataLoader(_token_dataset(), batch_size=8)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        losses, norms = [], []
        for step, batch in enumerate(loader):
            if step == kSteps:
                break
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            accelerator.backward(loss)
            norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 1.0)))
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[name] = losses
        assert max(norms) > 1.0  # clipping acts
    assert len(curves["fusedopt"]) == kSteps
    assert_same_curve(curves)

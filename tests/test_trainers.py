"""MetaOptimizer inside the trainers people use: Lightning and the Hugging Face Trainer.

The reference for Lightning is the same training written by hand (same seed, same batches, same
scheduler): Lightning's automatic optimization must give the same parameters, coefficients and
optimizer state bit for bit, with and without gradient accumulation, and a run resumed from a
Lightning checkpoint must continue as the uninterrupted run does. For the Hugging Face Trainer
(a tiny GPT-2 built from a local config, random weights, no download) the reference is an
uninterrupted run: ``resume_from_checkpoint`` in a fresh model, optimizer and Trainer must end
where it ends. Both libraries are test dependencies (the ``dev`` extra): these tests run in CI.
"""

from __future__ import annotations

import os

# before transformers / huggingface_hub are imported: nothing may be fetched from the hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import lightning.pytorch as pl
import pytest
import torch
from _util import assert_identical
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA

LEARNED = ("beta3", "c", "rho")
#: a start inside every learned coefficient's box, so that each of them can move either way
INTERIOR = {"beta3": 0.3, "c": 0.6, "rho": 0.5}


# -- helpers -----------------------------------------------------------------------------------
def assert_same_training(params_a, opt_a, params_b, opt_b):
    """Parameters, coefficients and the whole optimizer state (per-parameter state, param groups,
    the hyper-optimizer's record) equal to the bit."""
    assert_identical([p.detach() for p in params_a], [p.detach() for p in params_b], "params")
    assert_identical(opt_a.coefficients, opt_b.coefficients, "coefficients")
    assert_identical(opt_a.state_dict(), opt_b.state_dict(), "state_dict")


def assert_learned_moved(opt, names=LEARNED):
    """These learned coefficients left their start: the equalities above are about learned values."""
    now = opt.coefficients
    for name in names:
        assert not torch.equal(now[name], torch.tensor(INTERIOR[name], dtype=now[name].dtype)), name


@pytest.fixture(autouse=True)
def _global_torch_flags():
    """Lightning's ``deterministic=True`` switches torch's deterministic algorithms on for the
    whole process; put the flags back so that the rest of the suite runs as it would alone."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


# == Lightning ====================================================================================
BATCHES_PER_EPOCH = 8


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def make_dataset():
    gen = torch.Generator().manual_seed(1)
    n = 8 * BATCHES_PER_EPOCH
    return TensorDataset(torch.randn(n, 6, generator=gen), torch.randn(n, 1, generator=gen))


def make_loader():
    return DataLoader(make_dataset(), batch_size=8, shuffle=False)


def make_optimizer(params, cls=MetaOptimizer):
    """What ``configure_optimizers`` returns and the hand-written loop uses: MADA from an
    interior point, a hyper-lr large enough to move the coefficients visibly in a few steps,
    and a per-step exponential learning-rate decay."""
    opt = cls(params, MADA(), hypergrad=OneStep(lr=0.05), lr=1e-2)
    opt.set_coefficients(**INTERIOR)
    return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)


def mse(net, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(net(x), y)


class RecordingMetaOptimizer(MetaOptimizer):
    """MetaOptimizer that writes down how it is driven (numerics untouched)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def zero_grad(self, set_to_none: bool = True):
        self.calls.append(f"zero_grad(set_to_none={set_to_none})")
        super().zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        self.calls.append("step(closure)" if closure is not None else "step()")
        loss = super().step(closure)
        self.calls.append("step done")
        return loss


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()
        self.seen: list[tuple[int, int, float]] = []  # (global step, batch index, first input)

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, batch_idx, batch[0][0, 0].item()))
        opt = self.trainer.optimizers[0]
        if isinstance(opt, RecordingMetaOptimizer):
            opt.calls.append("training_step")
        return mse(self.net, batch)

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.parameters(), RecordingMetaOptimizer)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lightning_trainer(**kwargs):
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, **kwargs,
    )


def by_hand(batches, accumulate=1):
    """The reference: the loop a user writes without Lightning."""
    net = make_net()
    opt, sched = make_optimizer(net.parameters())
    for i, batch in enumerate(batches):
        if i % accumulate == 0:
            opt.zero_grad()
        (mse(net, batch) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            sched.step()
    return net, opt, sched


def test_lightning_equals_the_loop_written_by_hand():
    module = Regression()
    trainer = lightning_trainer(max_epochs=2)
    trainer.fit(module, make_loader())
    opt = trainer.optimizers[0]
    assert isinstance(opt, RecordingMetaOptimizer) and trainer.global_step == 2 * BATCHES_PER_EPOCH

    net, ref, ref_sched = by_hand(list(make_loader()) * 2)
    assert_same_training(module.parameters(), opt, net.parameters(), ref)
    assert_identical(trainer.lr_scheduler_configs[0].scheduler.state_dict(), ref_sched.state_dict())
    assert_learned_moved(opt)
    # how Lightning drives the optimizer: step(closure), and the closure runs training_step,
    # then zero_grad (set_to_none), then backward, all inside step()
    one = ["step(closure)", "training_step", "zero_grad(set_to_none=True)", "step done"]
    assert opt.calls == one * (2 * BATCHES_PER_EPOCH)


def test_lightning_gradient_accumulation_equals_accumulation_by_hand():
    module = Regression()
    trainer = lightning_trainer(max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(module, make_loader())
    opt = trainer.optimizers[0]
    assert trainer.global_step == BATCHES_PER_EPOCH // 2

    net, ref, ref_sched = by_hand(list(make_loader()), accumulate=2)
    assert_same_training(module.parameters(), opt, net.parameters(), ref)
    assert_identical(trainer.lr_scheduler_configs[0].scheduler.state_dict(), ref_sched.state_dict())
    assert_learned_moved(opt)
    # the first batch of a window is a bare closure call (training_step, zero_grad, backward)
    # outside step(); the last one's closure runs inside step(closure), without zero_grad
    window = ["training_step", "zero_grad(set_to_none=True)", "step(closure)", "training_step", "step done"]
    assert opt.calls == window * (BATCHES_PER_EPOCH // 2)


class ResumableBatches:
    """Fixed batches in a fixed order that Lightning can resume mid-epoch: it has
    ``state_dict``/``load_state_dict`` (Lightning's test for a resumable loader), the state being
    how many of this epoch's batches were handed out."""

    def __init__(self, batches):
        self.batches, self.handed_out, self.start = batches, 0, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        start, self.start = self.start, 0
        self.handed_out = start
        for batch in self.batches[start:]:
            self.handed_out += 1
            yield batch
        self.handed_out = 0

    def state_dict(self):
        return {"handed_out": self.handed_out}

    def load_state_dict(self, state):
        self.start = state["handed_out"]


@pytest.mark.parametrize("where", ["end_of_epoch", "mid_epoch"])
def test_lightning_resume_from_checkpoint_continues_identically(tmp_path, where):
    """Save at step N with Lightning's ModelCheckpoint, then a fresh module and Trainer run
    ``fit(ckpt_path=...)`` to 2N: parameters, coefficients, optimizer and scheduler state and the
    batches seen equal those of one uninterrupted run to 2N. At an epoch's end a plain DataLoader
    does; mid-epoch the loader must be resumable (with a plain DataLoader Lightning warns and
    starts the epoch's data over, so any optimizer would then see other batches)."""
    n = BATCHES_PER_EPOCH if where == "end_of_epoch" else 5
    if where == "end_of_epoch":
        loader = make_loader
    else:
        def loader():
            return ResumableBatches(list(make_loader()))

    whole = Regression()
    whole_trainer = lightning_trainer(max_steps=2 * n)
    whole_trainer.fit(whole, loader())

    first = Regression()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=n, save_top_k=-1)
    first_trainer = lightning_trainer(max_steps=n, callbacks=[ckpt], enable_checkpointing=True)
    first_trainer.fit(first, loader())
    (path,) = list(tmp_path.glob(f"*step={n}.ckpt"))

    torch.manual_seed(123)  # nothing of the fresh start may survive the restore
    resumed = Regression()
    resumed_trainer = lightning_trainer(max_steps=2 * n)
    resumed_trainer.fit(resumed, loader(), ckpt_path=str(path))

    assert resumed_trainer.global_step == whole_trainer.global_step == 2 * n
    assert resumed.seen == whole.seen[n:]  # the same batches, from step N on
    assert_same_training(resumed.parameters(), resumed_trainer.optimizers[0],
                         whole.parameters(), whole_trainer.optimizers[0])
    assert_identical(resumed_trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                     whole_trainer.lr_scheduler_configs[0].scheduler.state_dict())
    assert_learned_moved(resumed_trainer.optimizers[0])


# == Hugging Face Trainer =========================================================================
VOCAB, LENGTH, SEQUENCES, BATCH = 64, 16, 48, 8  # 6 optimizer steps per epoch


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, made here; the model learns their unigram statistics."""

    def __init__(self, n=SEQUENCES, seed=3):
        gen = torch.Generator().manual_seed(seed)
        # a skewed distribution, so that there is something to learn
        probs = torch.softmax(torch.randn(VOCAB, generator=gen) * 2, 0)
        self.ids = torch.multinomial(probs, n * LENGTH, replacement=True, generator=gen).view(n, LENGTH)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed=0):
    """GPT-2 from a local config, random weights (dropout 0.1, GPT-2's default: the RNG matters)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def hf_optimizer(model, cls=MetaOptimizer):
    opt = cls(model.parameters(), MADA(), hypergrad=OneStep(lr=0.05), lr=3e-3)
    opt.set_coefficients(**INTERIOR)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))


def hf_args(out, **kwargs):
    base = dict(
        output_dir=str(out), use_cpu=True, report_to=[], seed=7, dataloader_num_workers=0,
        per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        logging_strategy="no", save_strategy="no", disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kwargs})


@torch.no_grad()
def mean_loss(model, data):
    model.eval()
    batch = torch.stack([data[i]["input_ids"] for i in range(len(data))])
    loss = model(input_ids=batch, labels=batch).loss.item()
    model.train()
    return loss


def test_hf_trainer_trains_and_learns_coefficients(tmp_path):
    data = Tokens()
    model = tiny_gpt2()
    opt, sched = hf_optimizer(model)
    before_loss, before = mean_loss(model, data), opt.coefficients
    trainer = Trainer(model=model, args=hf_args(tmp_path, max_steps=12), train_dataset=data,
                      optimizers=(opt, sched))
    trainer.train()
    assert trainer.state.global_step == 12
    assert trainer.optimizer.optimizer is opt  # accelerate's wrapper around ours
    assert mean_loss(model, data) < before_loss - 0.1
    after, h = opt.coefficients, opt.last_hypergrad
    for name in LEARNED:  # every learned coefficient gets a hyper-gradient and moves
        assert torch.isfinite(h[name]) and h[name] != 0, (name, h[name])
        assert after[name] != before[name], name
    # β3 visibly; c by ~1e-6 a step; ρ by a few ulps (its hyper-gradient is ~1e-7 on this model)
    assert abs(after["beta3"] - before["beta3"]) > 1e-4
    for name in ("beta1", "beta2"):  # not learned by default
        assert torch.equal(after[name], before[name]), name
    assert sched.get_last_lr()[0] == pytest.approx(3e-3 / (1 + 0.1 * 12))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_hf_resume_from_checkpoint_continues_identically(tmp_path, accumulation):
    """Uninterrupted to 2N; separately to N with a checkpoint, then a fresh model, optimizer and
    Trainer resume from it to 2N. N falls mid-epoch and 2N in the next epoch, so HF's data skip,
    its RNG restore (dropout) and the next epoch's shuffle all take part."""
    n = 4 if accumulation == 1 else 2  # optimizer steps: 4 of the epoch's 6 batches, then 8
    data = Tokens()

    model = tiny_gpt2()
    opt, sched = hf_optimizer(model)
    Trainer(model=model, args=hf_args(tmp_path / "whole", max_steps=2 * n, gradient_accumulation_steps=accumulation),
            train_dataset=data, optimizers=(opt, sched)).train()

    first = tiny_gpt2()
    first_opt, first_sched = hf_optimizer(first)
    Trainer(model=first, args=hf_args(tmp_path / "first", max_steps=n, save_strategy="steps", save_steps=n,
                                      gradient_accumulation_steps=accumulation),
            train_dataset=data, optimizers=(first_opt, first_sched)).train()
    checkpoint = tmp_path / "first" / f"checkpoint-{n}"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed = tiny_gpt2(seed=123)  # other weights: the checkpoint must replace them
    resumed_opt, resumed_sched = hf_optimizer(resumed)
    trainer = Trainer(model=resumed, args=hf_args(tmp_path / "resumed", max_steps=2 * n,
                                                  gradient_accumulation_steps=accumulation),
                      train_dataset=data, optimizers=(resumed_opt, resumed_sched))
    trainer.train(resume_from_checkpoint=str(checkpoint))

    assert trainer.state.global_step == 2 * n
    assert_same_training(resumed.parameters(), resumed_opt, model.parameters(), opt)
    assert_identical(resumed_sched.state_dict(), sched.state_dict())
    assert_learned_moved(resumed_opt, ("beta3", "c"))  # ρ's hyper-gradient here is ~1e-7: ulps


class ScheduleFreeStyle(MetaOptimizer):
    """A MetaOptimizer with ``train()``/``eval()``, as schedule-free optimizers have; they only
    record that they were called."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def train(self):
        self.calls.append("train")

    def eval(self):
        self.calls.append("eval")

    def step(self, closure=None):
        self.calls.append("step")
        return super().step(closure)


def test_hf_optimizer_train_eval_hooks(tmp_path):
    """HF calls ``optimizer.train()`` before every training step and ``optimizer.eval()`` before
    every evaluation, where the optimizer has them (accelerate's wrapper forwards them only
    then). MetaOptimizer has neither, so for it they are no-ops; a subclass that defines them is
    called; training is the same either way."""
    assert not hasattr(MetaOptimizer, "train") and not hasattr(MetaOptimizer, "eval")
    data, held_out = Tokens(), Tokens(n=16, seed=4)
    runs = {}
    for cls in (MetaOptimizer, ScheduleFreeStyle):
        model = tiny_gpt2()
        opt, sched = hf_optimizer(model, cls)
        trainer = Trainer(model=model, args=hf_args(tmp_path / cls.__name__, max_steps=4, eval_strategy="steps",
                                                    eval_steps=2),
                          train_dataset=data, eval_dataset=held_out, optimizers=(opt, sched))
        trainer.train()
        losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
        runs[cls] = (model, opt, losses)
    (plain, plain_opt, plain_losses), (hooked, hooked_opt, hooked_losses) = runs.values()
    assert len(plain_losses) == 2 and plain_losses == hooked_losses
    assert_same_training(plain.parameters(), plain_opt, hooked.parameters(), hooked_opt)
    assert hooked_opt.calls == ["train", "step", "train", "step", "eval", "train", "step", "train", "step", "eval"]

"""A method added from outside the framework's files: a toy plugin registered here exercises every hook of
``methods.base.Method`` through ``run.py`` (the guide in docs/architecture.md walks through the same plugin).

Nothing in train.py, run.py or another method's file knows it; the assertions check that each hook is called, in the
documented order, and that what it returns takes effect (model family, data, labels, parameters, losses,
predictions, checkpoint state and resume)."""
from __future__ import annotations

import argparse
import os
import re

import pytest
import torch
from torch.utils.data import Dataset

from conftest import interrupt_at_epoch, smoke_args
from methods import METHODS, LossTerm, Method, register_method
from methods.base import Capabilities
from modules.registry import CLASSIFIERS
from utils.errors import UserError

pytestmark = pytest.mark.slow

CALLS: list[tuple] = []


class ToyTerm(LossTerm):
    """``loss_toy = weight * mean(logits**2)``; records the labels it sees (after ``compose_batch``)."""

    name = "toy"

    def __init__(self, weight: float):
        self.weight = weight
        self.labels_seen: set[int] = set()
        self.aux_seen = False

    def __call__(self, batch):
        self.labels_seen.update(torch.unique(batch.labels).tolist())
        self.aux_seen = self.aux_seen or "toy" in batch.aux
        return {"loss_toy": self.weight * batch.logits.pow(2).mean()}


class ToyAux(Dataset):
    """Adds an aux tensor to every training item."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        return image, label, {"toy": torch.ones(1)}


def toy_classifier(channels: int, n_classes: int) -> torch.nn.Module:
    """The Toy method's own model part: a 1x1 bottleneck to 8 channels, ReLU, then the 1x1 classifier (the last layer
    stays a 1x1 conv with bias, which is what weight transfer reads). Registered by the ``toy`` fixture with one
    line, ``CLASSIFIERS.add("toy_head", toy_classifier)``, as a method's file registers its parts."""
    return torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 1, bias=False), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, n_classes, 1, bias=True))


class Toy(Method):
    """Every hook does something visible and records that it ran."""

    name = "Toy"
    preset = {"loss_kd": 0.0}
    # its own classifier kind and new-classifier initialisation; it picks its parameter groups (--freeze* refused)
    capabilities = Capabilities(classifier_init="own", classifier="toy_head", default_param_groups=False)

    @staticmethod
    def add_args(group: argparse._ActionsContainer) -> None:
        group.add_argument("--toy_weight", type=float, default=0.5, help="weight of the toy loss")

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.toy_weight < 0:
            raise UserError(f"--toy_weight {cfg.toy_weight} must be >= 0")

    instances: list["Toy"] = []

    def __init__(self, cfg):
        super().__init__(cfg)
        self.term = ToyTerm(cfg.toy_weight)
        self.iterations = 0
        Toy.instances.append(self)

    def model_spec(self, spec, step):
        CALLS.append(("model_spec", step))
        return spec.replace(classifier="toy_head")

    def wrap_dataset(self, split, dataset, step):
        CALLS.append(("wrap_dataset", split, step))
        return ToyAux(dataset) if split == "train" else dataset

    def prepare_model(self, ctx):
        CALLS.append(("prepare_model", ctx.step))

    def init_new_classifier(self, ctx):
        CALLS.append(("init_new_classifier", ctx.step))
        with torch.no_grad():
            ctx.model.cls[-1][-1].bias.fill_(-3.0)
        return True

    def param_groups(self, model, lr, step):
        CALLS.append(("param_groups", step))
        if step > 0:  # train the new classifier only, at twice the step's lr
            for p in model.parameters():
                p.requires_grad_(False)
            params = list(model.cls[-1].parameters())
            for p in params:
                p.requires_grad_(True)
            return [{"params": params, "lr": 2 * lr, "weight_decay": 0.0}]
        return super().param_groups(model, lr, step)

    def terms(self, ctx):
        CALLS.append(("terms", ctx.step))
        return [self.term]

    def before_step(self, ctx):
        CALLS.append(("before_step", ctx.step))

    def begin_epoch(self, epoch, epochs):
        CALLS.append(("begin_epoch", epoch, epochs))

    def compose_batch(self, inputs):
        self.iterations += 1
        inputs.labels = torch.where(inputs.labels == 255, inputs.labels, torch.zeros_like(inputs.labels))
        return inputs

    def after_step(self, ctx):
        CALLS.append(("after_step", ctx.step))

    def predict(self, logits):
        CALLS.append(("predict",))
        return logits

    def state_dict(self):
        return {"iterations": torch.tensor(self.iterations)}

    def load_state_dict(self, state):
        CALLS.append(("load_state_dict",))
        self.iterations = int(state["iterations"])


@pytest.fixture
def toy():
    register_method(Toy)
    CLASSIFIERS.add("toy_head", toy_classifier)
    CALLS.clear()
    Toy.instances.clear()
    try:
        yield Toy
    finally:
        METHODS.pop("Toy")
        CLASSIFIERS.pop("toy_head")


def _ckpt(out, step, suffix=""):
    return torch.load(os.path.join(str(out), "ckpt", f"15-5-voc_Toy_{step}{suffix}.pth"), map_location="cpu",
                      weights_only=True)


def test_a_plugin_from_outside_runs_every_hook_in_order(synthetic_voc, tmp_path, toy, capsys):
    import run

    args = smoke_args(synthetic_voc, tmp_path, steps=(0, 1), extra=["--method", "toy", "--name", "Toy", "--lr",
                                                                    "0.01", "0.001", "--epochs", "2", "--overlap",
                                                                    "--print_interval", "1"])
    assert run.main(args) == 0
    log = capsys.readouterr().out
    step1 = CALLS[CALLS.index(("wrap_dataset", "train", 1)):]
    assert step1[:11] == [("wrap_dataset", "train", 1), ("wrap_dataset", "val", 1), ("wrap_dataset", "test", 1),
                          ("model_spec", 1), ("model_spec", 0), ("prepare_model", 1),
                          ("init_new_classifier", 1), ("param_groups", 1), ("terms", 1), ("before_step", 1),
                          ("begin_epoch", 0, 2)]
    names = [c[0] for c in step1]
    assert ("begin_epoch", 1, 2) in step1 and names.count("begin_epoch") == 2
    last = len(names) - 1 - names[::-1].index("after_step")
    assert names[last + 1:] and set(names[last + 1:]) == {"predict"}  # the test set after the step's end
    assert "predict" in names[:last]  # validation goes through predict too
    assert [c[0] for c in CALLS].count("init_new_classifier") == 1 and ("load_state_dict",) not in CALLS

    ckpt0, ckpt1 = _ckpt(tmp_path, 0), _ckpt(tmp_path, 1)
    state = ckpt1["model_state"]  # model_spec: the Toy's own classifiers, 1x1 to 8 channels then 1x1
    assert state["cls.0.0.weight"].shape == (8, 256, 1, 1) and state["cls.1.2.bias"].shape == (5,)
    for key, value in ckpt0["model_state"].items():  # param_groups froze all but the new classifier
        if not key.startswith("cls.1.") and value.is_floating_point() and "running" not in key:
            assert torch.equal(ckpt1["model_state"][key], value), key
    bias = ckpt1["model_state"]["cls.1.2.bias"]  # init_new_classifier set -3, then a little training moved it
    assert not torch.equal(bias, torch.full((5,), -3.0)) and torch.allclose(bias, torch.full((5,), -3.0), atol=0.5)
    assert "step 1 epoch 1/2 iter 1/" in log
    assert re.search(r"step 1 epoch 1/2 iter 1/\d+ lr 0\.002000 ", log)  # param_groups: twice the step's lr
    assert "optimizer_state" not in ckpt1  # the final checkpoint keeps what the next step needs only
    iterations = int(ckpt1["trainer_state"]["methods"]["Toy"]["iterations"])
    assert iterations > 0  # state_dict in the checkpoint


def test_the_plugin_flags_data_and_composed_batches_reach_its_term(synthetic_voc, tmp_path, toy):
    import run
    from experiment.config import parse_config
    from methods import build_method

    cfg = parse_config(smoke_args(synthetic_voc, tmp_path, extra=["--method", "Toy", "--toy_weight", "2"]))
    stack = build_method(cfg)
    assert stack.names == ["Toy"] and stack.method.term.weight == 2.0 and cfg.loss_kd == 0.0  # flag and preset
    Toy.instances.clear()
    assert run.main(smoke_args(synthetic_voc, tmp_path, extra=["--method", "Toy", "--name", "Toy"])) == 0
    term = Toy.instances[-1].term
    assert term.labels_seen and term.labels_seen <= {0, 255}  # compose_batch relabelled every class to background
    assert term.aux_seen  # the aux tensor of wrap_dataset's items reached the batch


def test_check_refuses_with_one_line(synthetic_voc, tmp_path, toy, capsys):
    import run

    assert run.main(smoke_args(synthetic_voc, tmp_path, extra=["--method", "Toy", "--toy_weight", "-1"])) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --toy_weight -1.0 must be >= 0"


def test_plugin_state_is_restored_on_resume(synthetic_voc, tmp_path, toy, monkeypatch):
    import run
    import train

    args = smoke_args(synthetic_voc, tmp_path, extra=["--method", "Toy", "--name", "Toy", "--epochs", "2",
                                                      "--lr", "0.01"])
    original = interrupt_at_epoch(monkeypatch, 1)
    assert run.main(args) == 130
    saved = int(_ckpt(tmp_path, 0, ".partial")["trainer_state"]["methods"]["Toy"]["iterations"])
    monkeypatch.setattr(train, "train_one_epoch", original)
    CALLS.clear()
    assert run.main(args) == 0
    assert ("load_state_dict",) in CALLS
    final = int(_ckpt(tmp_path, 0)["trainer_state"]["methods"]["Toy"]["iterations"])
    assert saved > 0 and final == 2 * saved  # the second epoch continued the restored count


def test_compose_batch_forward_kwargs_reach_the_model():
    """``TrainInputs.forward_kwargs`` are passed to the new model's forward (e.g. the class DropClass drops)."""
    import train
    from methods import Criterion

    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x, ret_intermediate=False, **kwargs):
            seen.append(kwargs)
            return self.conv(x), {}

    class Hooks:
        def compose_batch(self, inputs):
            inputs.forward_kwargs["drop"] = 1
            return inputs

    class CE(LossTerm):
        name = "ce"

        def __call__(self, batch):
            return {"loss_ce": torch.nn.functional.cross_entropy(batch.logits, batch.labels)}

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    setup = train.EpochSetup(criterion=Criterion([CE()]), optimizer=opt,
                             scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
                             scaler=torch.amp.GradScaler("cpu", enabled=False), precision=train.Precision("cpu", None),
                             n_old=0, n_new=2, hooks=Hooks())
    loader = [(torch.randn(2, 3, 4, 4), torch.randint(0, 2, (2, 4, 4))) for _ in range(3)]
    train.train_one_epoch(model, None, loader, setup, step=0, epoch=0, device=torch.device("cpu"))
    assert seen == [{"drop": 1}] * 3

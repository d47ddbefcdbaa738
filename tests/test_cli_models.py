"""``fastres verify --model`` and ``fastres inspect --model``: a user's own model (MODULE:CALLABLE)
against its own PyTorch eval forward, and its plan's launches beside the unfused forward's."""
import json
import os

import pytest
import torch
from torch import nn

import fastres
from fastres.cli import main
from fastres.plan_report import inspect_model

ZOO = os.path.join(os.path.dirname(__file__), "residual_zoo.py")


@pytest.fixture(autouse=True)
def torch_backend():
    with fastres.use_backend("torch"):
        yield


def test_verify_own_model_ok(capsys):
    assert main(["verify", "--model", f"{ZOO}:cifar_resnet20", "--input", "3x32x32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "plan: 20 fused step(s), 0 PyTorch step(s)" in out and out.strip().endswith("ok")
    err = float(out.split("max |error| / max |output|: ")[1].split()[0])
    assert err <= 1e-5


def test_verify_lists_pytorch_steps_and_non_square_input(capsys):
    assert main(["verify", "--model", f"{ZOO}:OddResNet", "--input", "3x20x24", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "plan: 3 fused step(s), 11 PyTorch step(s)" in out and "block.bn2: GroupNorm runs as PyTorch" in out


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:              # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x)
        return -self.conv(x)


def make_untraceable():
    return Untraceable()


def test_verify_reports_a_model_the_plan_cannot_run(capsys):
    assert main(["verify", "--model", f"{__file__}:make_untraceable", "--input", "3x16x16", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "the plan did not run" in out and "torch.fx cannot trace" in out and "FAIL" in out


@pytest.mark.parametrize("spec,match", [("nocolon", "MODULE:CALLABLE"), (f"{ZOO}:nothing_here", "nothing_here"),
                                        ("torch:float32", "not an nn.Module")])
def test_verify_bad_model_spec(spec, match, capsys):
    assert main(["verify", "--model", spec, "--device", "cpu"]) == 2
    assert match in capsys.readouterr().err


def test_inspect_own_models_totals(capsys):
    """The README figures: CIFAR ResNet-56 (option A) and pre-activation ResNet-18, fp16, 32x32,
    batch 256."""
    assert main(["inspect", "--model", f"{ZOO}:cifar_resnet56", "--input", "3x32x32", "--batch", "256",
                 "--json"]) == 0
    cifar = json.loads(capsys.readouterr().out)
    assert main(["inspect", "--model", f"{ZOO}:preact_resnet18", "--input", "3x32x32", "--batch", "256",
                 "--json"]) == 0
    preact = json.loads(capsys.readouterr().out)
    # 55 convs (2 reading the option-A shortcut in their epilogue) + head; unfused: conv, BN, ReLU,
    # add, pad per layer, the pool, view, linear
    assert (cifar["totals"]["launches"], cifar["reference"]["launches"]) == (56, 196)
    assert cifar["pytorch_steps"] == []
    # 17 convs (9 writing BN -> ReLU of their sum as a second output) + head; unfused 64
    assert (preact["totals"]["launches"], preact["reference"]["launches"]) == (18, 64)
    for report in (cifar, preact):
        assert report["totals"]["flops_per_image"] == pytest.approx(report["reference"]["flops_per_image"], rel=0.02)
        assert report["totals"]["bytes_per_image"] < report["reference"]["bytes_per_image"] / 2.5


def test_inspect_an_optimized_backbone():
    model = fastres.resnet18().eval()
    fast = fastres.optimize(model, return_nodes={"layer2": "c3", "layer4": "c5"})
    report = inspect_model(fast, (2, 3, 64, 64))
    assert report["totals"]["launches"] == 18            # stem + pool + 16 convs, no head
    # stem conv, BN, ReLU, pool; 8 blocks x (conv, BN, ReLU, conv, BN, add, ReLU); 3 projections x (conv, BN)
    assert report["reference"]["launches"] == 4 + 8 * 7 + 3 * 2

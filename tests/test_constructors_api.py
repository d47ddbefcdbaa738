"""The constructors against torchvision's API: pretrained=, get_model_weights, weights= values, and
clear errors for checkpoint files that are empty, truncated, mislabelled or do not fit."""
import pathlib
import pickle
import warnings

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models import get_model_weights
from torchvision.models._api import WeightsEnum

import fastres
from fastres.models import CheckpointError

ARCHS = list(fastres.ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_get_model_weights_matches_torchvision(arch):
    assert get_model_weights(getattr(fastres, arch)) is get_model_weights(getattr(torchvision.models, arch))


@pytest.fixture
def fake_download(monkeypatch):
    """WeightsEnum.get_state_dict without the network: a fixed random state_dict per weights value
    (the torchvision model of that architecture, seeded), recording which weights were asked for."""
    asked = []

    def get_state_dict(self, *args, **kwargs):
        asked.append(self)
        arch = next(a for a in ARCHS if get_model_weights(getattr(torchvision.models, a)) is type(self))
        torch.manual_seed(len(self.name))
        return getattr(torchvision.models, arch)(num_classes=len(self.meta["categories"])).state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)
    return asked


def _call_recording(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fn(*args, **kwargs)
    return model, [str(w.message) for w in caught]


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
@pytest.mark.parametrize("args, kwargs", [((), {"pretrained": True}), ((True,), {}),
                                          ((), {"pretrained": False}), ((False,), {})])
def test_legacy_pretrained_as_torchvision(fake_download, arch, args, kwargs):
    expected, expected_warnings = _call_recording(getattr(torchvision.models, arch), *args, **kwargs)
    asked_by_torchvision = list(fake_download)
    fake_download.clear()
    model, got_warnings = _call_recording(getattr(fastres, arch), *args, **kwargs)
    assert isinstance(model, fastres.ResNet)
    assert got_warnings == expected_warnings and got_warnings   # torchvision's deprecation messages
    assert fake_download == asked_by_torchvision
    if expected_warnings and ("pretrained" in kwargs and kwargs["pretrained"] or args == (True,)):
        enum = get_model_weights(getattr(torchvision.models, arch))
        assert fake_download == [enum.IMAGENET1K_V1]
        assert model.meta["weights"] == str(enum.IMAGENET1K_V1)
        for (k, a), b in zip(expected.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), k
    else:
        assert fake_download == []


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2",
                                     torchvision.models.ResNet50_Weights.IMAGENET1K_V1])
def test_weights_enum_and_names(fake_download, weights):
    model = fastres.resnet50(weights=weights)
    enum = torchvision.models.ResNet50_Weights
    assert fake_download == [enum.verify(weights)]
    assert model.meta["weights"] == str(enum.verify(weights))
    assert model.fc.out_features == 1000


def test_weights_errors():
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9K'.*ResNet18_Weights.*DEFAULT"):
        fastres.resnet18(weights="IMAGENET9K")
    with pytest.raises(TypeError, match="expected ResNet18_Weights but received ResNet50_Weights"):   # torchvision's error
        fastres.resnet18(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        fastres.resnet18(weights=pathlib.Path("/nonexistent/r18.pth"))


@pytest.fixture(scope="module")
def r18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).state_dict()


@pytest.mark.parametrize("as_path", [False, True])
@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "nested"])
def test_checkpoint_paths_and_wrappers(tmp_path, r18_state, as_path, wrap):
    payload = {"state_dict": r18_state, "epoch": 3, "args": {"lr": 0.1}} if wrap == "state_dict" else (
        {"model": r18_state, "optimizer": {}} if wrap == "model" else (
            {"checkpoint": 1, "ema": {"state_dict": r18_state}} if wrap == "nested" else r18_state))
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    model = fastres.resnet18(weights=path if as_path else str(path))
    assert model.fc.out_features == 5
    for k, v in r18_state.items():
        assert torch.equal(model.state_dict()[k], v), k


def _write_bad(kind, path, state):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "plain_pickle_object":
        torch.save({"conv1.weight": pathlib.PurePosixPath("/x")}, path)   # pickles a class
    elif kind == "raw_pickle":
        with open(path, "wb") as f:
            pickle.dump({"conv1.weight": 1.0}, f)
    elif kind == "non_tensor_values":
        torch.save({"conv1.weight": [1, 2, 3], "epoch": 7}, path)
    elif kind == "list":
        torch.save([state["conv1.weight"]], path)
    elif kind == "empty_dict":
        torch.save({}, path)
    elif kind == "wrong_keys":
        torch.save({"features.0.weight": state["conv1.weight"]}, path)
    elif kind == "wrong_shapes":
        torch.save(dict(state, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}), path)
    elif kind == "int_weights":
        torch.save(dict(state, **{"conv1.weight": state["conv1.weight"].to(torch.int32)}), path)
    elif kind == "dataparallel":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif kind == "nested_metadata":
        torch.save({"meta": {"arch": "resnet18", "deep": {"deeper": [1, {"x": 2}]}}, "epoch": 1}, path)
    elif kind == "fake_safetensors":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    elif kind == "pth_named_safetensors":
        torch.save(state, path)
    elif kind == "safetensors_wrong_keys":
        save_file({"head.weight": torch.zeros(2, 2)}, str(path))


@pytest.mark.parametrize("kind, suffix, match", [
    ("empty", ".pth", "is empty"),
    ("empty", ".safetensors", "is empty"),
    ("truncated", ".pth", "not a readable PyTorch checkpoint"),
    ("text", ".pt", "not a readable PyTorch checkpoint"),
    ("plain_pickle_object", ".pth", "cannot be read safely.*Unsupported global"),
    ("raw_pickle", ".pth", "not a readable PyTorch checkpoint"),
    ("non_tensor_values", ".pth", "not a state_dict.*'conv1.weight': list"),
    ("list", ".pth", "holds a list"),
    ("empty_dict", ".pth", "empty dict"),
    ("wrong_keys", ".pth", "does not fit resnet18.*missing: conv1.weight.*unexpected: features.0.weight"),
    ("wrong_shapes", ".pth", r"wrong shape: layer1.0.conv1.weight \[64, 64, 1, 1\] \(expected \[64, 64, 3, 3\]\)"),
    ("int_weights", ".pth", r"not floating point: conv1.weight \(torch.int32\)"),
    ("dataparallel", ".pth", "start with 'module.'"),
    ("nested_metadata", ".pth", "not a state_dict.*'meta': dict"),
    ("fake_safetensors", ".safetensors", "not a readable safetensors file"),
    ("pth_named_safetensors", ".safetensors", "not a readable safetensors file"),
    ("safetensors_wrong_keys", ".safetensors", "does not fit resnet18.*unexpected: head.weight"),
])
def test_bad_checkpoint_files_name_file_and_problem(tmp_path, r18_state, kind, suffix, match):
    path = tmp_path / f"bad_{kind}{suffix}"
    _write_bad(kind, path, r18_state)
    with pytest.raises(CheckpointError, match=match) as info:
        fastres.resnet18(weights=str(path))
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        fastres.resnet18(weights=str(tmp_path))

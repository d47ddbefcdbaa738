"""fastres.load on forged export files: every claim of the metadata is checked against bounds and
against the tensors in the file, quickly, before any module is built; errors name the problem."""
import json
import time

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file

import fastres
from fastres.checkpoint import ExportFormatError
from fastres.files import digest


@pytest.fixture(scope="module")
def export_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "r18.safetensors"
    fastres.export(torchvision.models.resnet18(num_classes=5), path, dtype=torch.float32,
                   categories=list("abcde"))
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def constructions(monkeypatch):
    """How many ResNet modules are constructed (a forged file must be refused before any)."""
    calls = []
    original = fastres.models.ResNet.__init__

    def counting_init(self, *args, **kwargs):
        calls.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(fastres.models.ResNet, "__init__", counting_init)
    return calls


def forge(tmp_path, export_file, config_changes=None, *, raw_config=None, tensors=None, **meta_changes):
    metadata, original = export_file
    metadata = dict(metadata)
    tensors = dict(original if tensors is None else tensors)
    if raw_config is not None:
        metadata["config"] = raw_config
    elif config_changes is not None:
        metadata["config"] = json.dumps(dict(json.loads(metadata["config"]), **config_changes))
    for key, value in meta_changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    metadata["sha256"] = digest(tensors)
    path = tmp_path / "forged.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_genuine_file_loads(tmp_path, export_file, constructions):
    model = fastres.load(forge(tmp_path, export_file, {}))
    assert model.config["layers"] == [2, 2, 2, 2] and len(constructions) == 1


@pytest.mark.parametrize("changes, match", [
    ({"layers": [10 ** 9] * 4}, r"layers \[1000000000, .*out of range"),
    ({"layers": [2, 2, 2, 3]}, r"layers \[2, 2, 2, 3\] but the file holds \[2, 2, 2, 2\]"),
    ({"layers": [2, 2, 2]}, "layers must be a list of 4 ints"),
    ({"layers": "2222"}, "layers must be a list of 4 ints"),
    ({"layers": [2.0, 2, 2, 2]}, "layers must be a list of 4 ints"),
    ({"layers": [True, 2, 2, 2]}, "layers must be a list of 4 ints"),
    ({"layers": [[2], 2, 2, 2]}, "layers must be a list of 4 ints"),
    ({"layers": [0, 2, 2, 2]}, "out of range"),
    ({"width_per_group": 10 ** 9}, r"width_per_group must be an int in \[1, 65536\]"),
    ({"width_per_group": 32}, "BasicBlock takes groups=1 and width_per_group=64"),
    ({"groups": 0}, r"groups must be an int in \[1, 65536\], got 0"),
    ({"groups": -4}, "groups must be an int"),
    ({"groups": "1"}, "groups must be an int"),
    ({"groups": 32}, "BasicBlock takes groups=1"),
    ({"num_classes": 10 ** 12}, "num_classes must be an int"),
    ({"num_classes": 6}, r"num_classes=6 but fc.weight has shape \[5, 512\]"),
    ({"num_classes": None}, "num_classes must be an int"),
    ({"block": "Evil"}, "block must be 'BasicBlock' or 'Bottleneck'"),
    ({"block": {"nested": {"deeper": ["BasicBlock"]}}}, "block must be"),
    ({"block": "Bottleneck"}, "block 'Bottleneck' but the tensors are those of a BasicBlock network"),
    ({"norm_layer": "os.system"}, r"unknown keys \['norm_layer'\]"),
    ({"replace_stride_with_dilation": [0, 0, 0]}, "list of 3 bools"),
    ({"replace_stride_with_dilation": "no"}, "list of 3 bools"),
])
def test_forged_config_refused_fast_before_building(tmp_path, export_file, constructions, changes, match):
    path = forge(tmp_path, export_file, changes)
    start = time.perf_counter()
    with pytest.raises(ExportFormatError, match=match) as info:
        fastres.load(path)
    assert time.perf_counter() - start < 1.0
    assert constructions == []
    assert str(path) in str(info.value)


def test_missing_block_key(tmp_path, export_file, constructions):
    metadata, _ = export_file
    config = json.loads(metadata["config"])
    del config["layers"]
    with pytest.raises(ExportFormatError, match="missing 'layers'"):
        fastres.load(forge(tmp_path, export_file, raw_config=json.dumps(config)))
    assert constructions == []


@pytest.mark.parametrize("raw, match", [
    ("[2, 2, 2, 2]", "config' must be a JSON object, got list"),
    ('"resnet18"', "config' must be a JSON object, got str"),
    ("{not json", "unreadable 'config' metadata"),
    ("[" * 200_000 + "]" * 200_000, "unreadable 'config' metadata: nested too deeply"),
])
def test_odd_config_json(tmp_path, export_file, constructions, raw, match):
    path = forge(tmp_path, export_file, raw_config=raw)
    start = time.perf_counter()
    with pytest.raises(ExportFormatError, match=match):
        fastres.load(path)
    assert time.perf_counter() - start < 1.0 and constructions == []


@pytest.mark.parametrize("meta, match", [
    ({"config": None}, "'config' is missing"),
    ({"categories": json.dumps({"a": 1})}, "'categories' must be a JSON list of strings"),
    ({"categories": json.dumps([["a"], "b", "c", "d", "e"])}, "'categories' must be a JSON list of strings"),
    ({"preprocess": json.dumps([1, 2])}, r"'preprocess' must be a JSON object"),
    ({"preprocess": json.dumps({"crop": {"nested": 1}})}, "crop must be null or an int"),
    ({"preprocess": json.dumps({"crop": 10 ** 9})}, "crop must be null or an int"),
    ({"preprocess": json.dumps({"mean": [0.5, 0.5]})}, "mean must be null or a list of 3 finite numbers"),
    ({"preprocess": json.dumps({"std": [0.0, 1.0, 1.0]})}, "std must be positive"),
    ({"preprocess": json.dumps({"script": "x"})}, r"unknown keys \['script'\]"),
    ({"dtype": "float64"}, "'dtype' is 'float64'; expected one of"),
    ({"dtype": None}, "'dtype' is None"),
])
def test_odd_metadata(tmp_path, export_file, constructions, meta, match):
    with pytest.raises(ExportFormatError, match=match):
        fastres.load(forge(tmp_path, export_file, **meta))
    assert constructions == []


def test_tensors_that_lie_about_dtype_or_type(tmp_path, export_file, constructions):
    _, tensors = export_file
    as_int = dict(tensors, **{"conv1.weight": tensors["conv1.weight"].to(torch.int32)})
    with pytest.raises(ExportFormatError, match=r"non-float tensors \['conv1.weight'\]"):
        fastres.load(forge(tmp_path, export_file, tensors=as_int))
    as_half = dict(tensors, **{"layer1.0.conv1.weight": tensors["layer1.0.conv1.weight"].half()})
    with pytest.raises(ExportFormatError, match="says dtype float32 but.*layer1.0.conv1.weight"):
        fastres.load(forge(tmp_path, export_file, tensors=as_half))
    no_fc = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
    with pytest.raises(ExportFormatError, match="no 'fc.weight' tensor"):
        fastres.load(forge(tmp_path, export_file, tensors=no_fc))
    assert constructions == []

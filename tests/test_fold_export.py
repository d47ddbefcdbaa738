"""BN folding (vs torch.nn.utils.fusion), export to safetensors and load back, bad files."""
import json
import struct

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import fastres
from fastres.checkpoint import ExportFormatError
from fastres.fold import conv_norm_pairs, fold_conv_bn
from fastres.verify import image_batch, randomize_norm_stats_

from digits import trained_digits_model


@pytest.fixture(autouse=True)
def torch_backend():
    with fastres.use_backend("torch"):
        yield


def reference(arch, **kwargs):
    torch.manual_seed(0)
    return randomize_norm_stats_(getattr(torchvision.models, arch)(**kwargs)).eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_fold_conv_bn_matches_pytorch_fusion(arch):
    model = reference(arch)
    for conv_name, norm_name in conv_norm_pairs(model):
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        fused = fuse_conv_bn_eval(conv, norm)
        weight, bias = fold_conv_bn(conv, norm)
        torch.testing.assert_close(weight, fused.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bias, fused.bias, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_fold_bn_module(arch):
    model = reference(arch)
    folded = fastres.fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(folded.get_submodule(c).bias is not None for c, _ in conv_norm_pairs(model))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())   # original untouched
    x = image_batch(2, 48)
    with torch.no_grad():
        expected = model(x)
        err = (folded(x) - expected).abs().max() / expected.abs().max()
    assert err <= 1e-5
    with pytest.raises(RuntimeError, match="inference-only"):
        folded.train()
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())


def test_fold_bn_keeps_dtype():
    model = fastres.from_torchvision(reference("resnet18")).half()
    folded = fastres.fold_bn(model)
    # one dtype for every parameter, so PyTorch's own forward runs the folded module
    assert {p.dtype for p in folded.parameters()} == {torch.float16}
    x = image_batch(1, 32).half()
    with torch.no_grad():
        torch.testing.assert_close(folded._forward_impl(x), folded(x), atol=2e-2, rtol=2e-2)


def test_fold_overflowing_fp16_is_reported():
    model = fastres.from_torchvision(reference("resnet18"))
    with torch.no_grad():
        model.layer2[0].bn1.running_var[3] = 1e-12
        model.layer2[0].bn1.eps = 1e-12
    model.half().eval()
    x = image_batch(1, 32).half()
    # the plan cannot hold that weight: the forward is PyTorch's own fp16 forward, and says why
    with torch.no_grad(), pytest.warns(fastres.FallbackWarning, match="layer2.0.conv1.*float16"):
        got = model(x)
    with torch.no_grad():
        assert torch.equal(got, model._forward_impl(x))
    with pytest.raises(ValueError, match="layer2.0.conv1.*float16"):
        fastres.Engine(model, batch_sizes=(1,), image_size=32, dtype=torch.float16, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_export_round_trip_is_exact(tmp_path, dtype):
    model = reference("resnet50", num_classes=17)
    path = tmp_path / "model.safetensors"
    fastres.export(model, path, dtype=dtype)
    folded = fastres.fold_bn(model, dtype=dtype)
    loaded = fastres.load(path)
    assert isinstance(loaded, fastres.ResNet) and not loaded.training
    assert loaded.config["num_classes"] == 17 and loaded.arch == "resnet50"
    expected_sd = folded.state_dict()
    got_sd = loaded.state_dict()
    assert list(got_sd) == list(expected_sd)
    for k in expected_sd:
        want = expected_sd[k]
        assert got_sd[k].dtype == want.dtype == dtype and torch.equal(got_sd[k], want), k
    x = image_batch(2, 32).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))
        if dtype == torch.float32:
            expected = model(x)
            assert (loaded(x) - expected).abs().max() / expected.abs().max() <= 1e-5


def test_export_metadata_and_pickle_free(tmp_path):
    path = tmp_path / "m.safetensors"
    fastres.export(reference("resnet18", num_classes=3), path, categories=["a", "b", "c"],
                   preprocess={"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.2] * 3})
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    meta = header["__metadata__"]
    assert meta["format"] == "fastres-folded-resnet" and meta["format_version"] == "1"
    assert meta["arch"] == "resnet18" and meta["dtype"] == "float16"
    assert json.loads(meta["config"])["layers"] == [2, 2, 2, 2]
    assert meta["fastres_version"] == fastres.__version__
    assert b"\x80\x04" not in raw[:16]   # no pickle protocol header
    loaded = fastres.load(path)
    assert loaded.meta["categories"] == ["a", "b", "c"] and loaded.meta["preprocess"]["crop"] == 32
    with pytest.raises(ValueError, match="4 categories"):
        fastres.export(reference("resnet18", num_classes=3), path, categories=list("abcd"))


def test_load_to_device_and_arch_check(tmp_path):
    path = tmp_path / "m.safetensors"
    fastres.export(reference("resnet18"), path, dtype=torch.float32)
    assert fastres.load(path, device="cpu", arch="resnet18").conv1.weight.device.type == "cpu"
    with pytest.raises(ValueError, match="holds a resnet18 model, not resnet50"):
        fastres.load(path, arch="resnet50")


@pytest.fixture
def exported(tmp_path):
    path = tmp_path / "m.safetensors"
    fastres.export(reference("resnet18", num_classes=5), path, dtype=torch.float32)
    return path


def test_truncated_file(exported):
    raw = exported.read_bytes()
    exported.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ExportFormatError, match="truncated or corrupt"):
        fastres.load(exported)
    exported.write_bytes(raw[:5])
    with pytest.raises(ExportFormatError, match="truncated or corrupt"):
        fastres.load(exported)


def test_corrupt_header_and_data(exported):
    raw = bytearray(exported.read_bytes())
    bad = bytearray(raw)
    bad[10:20] = b"\xff" * 10
    exported.write_bytes(bytes(bad))
    with pytest.raises(ExportFormatError, match="truncated or corrupt"):
        fastres.load(exported)
    bad = bytearray(raw)
    bad[-100] ^= 0x40     # one flipped bit in a tensor
    exported.write_bytes(bytes(bad))
    with pytest.raises(ExportFormatError, match="sha256"):
        fastres.load(exported)


def _rewrite(path, tensors=None, **meta_changes):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        old = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    tensors = tensors if tensors is not None else old
    if "sha256" not in meta_changes:
        from fastres.files import digest
        meta["sha256"] = digest(tensors)
    save_file(tensors, str(path), metadata=meta)
    return old


def test_unknown_format_version(exported):
    _rewrite(exported, format_version="99")
    with pytest.raises(ExportFormatError, match="format version '99'"):
        fastres.load(exported)


def test_other_format_and_other_architecture(exported, tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(plain))
    with pytest.raises(ExportFormatError, match="not a fastres export"):
        fastres.load(plain)
    # a fastres header on the tensors of another architecture
    other = tmp_path / "other.safetensors"
    fastres.export(reference("resnet34", num_classes=5), other, dtype=torch.float32)
    from safetensors.torch import load_file
    _rewrite(exported, tensors=load_file(str(other)))
    with pytest.raises(ExportFormatError, match=r"layers \[2, 2, 2, 2\] but the file holds \[3, 4, 6, 3\]"):
        fastres.load(exported)


def test_pickle_file_is_not_executed(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ExportFormatError):
        fastres.load(path)
    with pytest.raises(FileNotFoundError):
        fastres.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="fastres.load"):
        exported = tmp_path / "folded.safetensors"
        fastres.export(reference("resnet18"), exported)
        fastres.resnet18(weights=str(exported))


def test_export_rejects_custom_head(tmp_path):
    model = reference("resnet18")
    model.fc = nn.Sequential(nn.Linear(512, 10), nn.ReLU())
    with pytest.raises(ValueError, match="nn.Linear fc head"):
        fastres.export(model, tmp_path / "m.safetensors")


def test_trained_model_fold_export_reload(tmp_path):
    """Real weights and BN statistics: trained on sklearn digits for a few hundred steps."""
    model, x_test, y_test, _ = trained_digits_model()
    with torch.no_grad():
        ref_pred = model._forward_impl(x_test).argmax(1)   # torchvision's unfused eval forward
        assert torch.equal(model(x_test).argmax(1), ref_pred)
    accuracy = (ref_pred == y_test).float().mean().item()
    assert accuracy > 0.85, f"the digits model did not train (accuracy {accuracy:.3f})"
    folded = fastres.fold_bn(model)
    path32, path16 = tmp_path / "d32.safetensors", tmp_path / "d16.safetensors"
    fastres.export(model, path32, dtype=torch.float32)
    fastres.export(model, path16, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(folded(x_test).argmax(1), ref_pred)
        assert torch.equal(fastres.load(path32)(x_test).argmax(1), ref_pred)
        pred16 = fastres.load(path16)(x_test.half()).argmax(1)
    assert (pred16 == ref_pred).float().mean() >= 0.99
    assert abs((pred16 == y_test).float().mean().item() - accuracy) <= 0.01


def test_public_names_survive_submodule_imports():
    """Lazy top-level names must not be shadowed by submodules of the same package."""
    import importlib
    for name in ("checkpoint", "fold", "models", "capture", "ir", "optimized", "engine", "classify", "ops", "cli"):
        importlib.import_module(f"fastres.{name}")
    assert callable(fastres.export) and callable(fastres.load) and callable(fastres.fold_bn)
    assert callable(fastres.optimize) and not isinstance(fastres.optimize, type(importlib))
    assert isinstance(fastres.Engine, type) and isinstance(fastres.ResNet, type)

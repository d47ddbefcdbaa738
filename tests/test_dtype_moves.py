"""Dtype and device moves of BN-folded modules (fastres.fold_bn, fastres.load): every parameter keeps
one dtype, the module stays inference-only, and outputs match torchvision's unfolded model (and
torch.nn.utils.fusion's folding) in each dtype."""
import pytest
import torch
import torchvision
from torch.nn.utils.fusion import fuse_conv_bn_eval

import fastres
from fastres.fold import conv_norm_pairs
from fastres.verify import image_batch, randomize_norm_stats_

# dtype -> (atol relative to the logit scale, how many times torchvision's own error in that dtype)
TOLERANCE = {torch.float64: (1e-10, 0), torch.float32: (1e-5, 0),
             torch.float16: (1e-3, 2), torch.bfloat16: (1e-2, 2)}
MOVES = {
    "float": (lambda m: m.float(), torch.float32),
    "double": (lambda m: m.double(), torch.float64),
    "half": (lambda m: m.half(), torch.float16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "to_float64": (lambda m: m.to(torch.float64), torch.float64),
    "to_cpu_float32": (lambda m: m.to("cpu", torch.float32), torch.float32),
}


@pytest.fixture(autouse=True)
def torch_backend():
    with fastres.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return randomize_norm_stats_(torchvision.models.resnet18(num_classes=7)).eval()


@pytest.fixture(scope="module")
def export_fp16(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("moves") / "r18.safetensors"
    fastres.export(reference, path, dtype=torch.float16)
    return path


def _sources(reference, export_fp16):
    return {
        "fold_bn": lambda: fastres.fold_bn(reference),
        "fold_bn_fp16": lambda: fastres.fold_bn(reference, dtype=torch.float16),
        "fold_bn_of_half_model": lambda: fastres.fold_bn(fastres.from_torchvision(reference).half()),
        "load_fp16": lambda: fastres.load(export_fp16),
    }


def _rel(got, expected):
    return float((got.double() - expected).abs().max() / expected.abs().max())


def _check_state(model, dtype):
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.inference_only and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="inference-only"):
        model.train()


@pytest.mark.parametrize("source", ["fold_bn", "fold_bn_fp16", "fold_bn_of_half_model", "load_fp16"])
@pytest.mark.parametrize("move", list(MOVES))
def test_moves_keep_a_consistent_module_and_match_torchvision(reference, export_fp16, source, move):
    apply, dtype = MOVES[move]
    model = _sources(reference, export_fp16)[source]()
    moved = apply(model)
    _check_state(moved, dtype)
    x = image_batch(2, 32, seed=3)
    with torch.no_grad():
        expected = reference.double()(x.double())
        reference.float()
        twin = torchvision.models.resnet18(num_classes=7).eval()
        twin.load_state_dict(reference.state_dict())
        torch_err = _rel(twin.to(dtype)(x.to(dtype)), expected)
        # the source's own rounding (fp16 weights of an fp16 export/fold) bounds what a later
        # float()/double() can recover: measure it by the fp16 twin
        twin16 = torchvision.models.resnet18(num_classes=7).eval()
        twin16.load_state_dict(reference.state_dict())
        fp16_err = _rel(twin16.half()(x.half()), expected)
        outputs = {"forward": moved(x.to(dtype)), "pytorch_forward": moved._forward_impl(x.to(dtype))}
    atol, factor = TOLERANCE[dtype]
    if source != "fold_bn" and dtype in (torch.float32, torch.float64):
        atol, factor = max(atol, 1e-3), 2       # fp16 weights moved up: fp16's rounding stays
        torch_err = fp16_err
    elif dtype == torch.float64:
        atol = TOLERANCE[torch.float32][0]      # folded in fp32, then moved up: fp32's rounding stays
    for name, y in outputs.items():
        assert y.dtype == dtype and y.shape == (2, 7), name
        assert _rel(y, expected) <= factor * torch_err + atol, (name, _rel(y, expected), torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_folded_weights_equal_pytorch_fusion_in_dtype(reference, dtype):
    folded = fastres.fold_bn(reference).to(dtype)
    for conv_name, norm_name in conv_norm_pairs(reference):
        fused = fuse_conv_bn_eval(reference.get_submodule(conv_name), reference.get_submodule(norm_name))
        conv = folded.get_submodule(conv_name)
        torch.testing.assert_close(conv.weight, fused.weight.to(dtype), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(conv.bias, fused.bias.to(dtype), rtol=1e-6, atol=1e-7)


def test_export_keeps_fp32_biases_and_load_rounds_once(reference, export_fp16):
    from safetensors import safe_open
    with safe_open(str(export_fp16), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["conv1.bias"].dtype == stored["fc.bias"].dtype == torch.float32
    assert stored["conv1.weight"].dtype == stored["fc.weight"].dtype == torch.float16
    fused = fuse_conv_bn_eval(reference.conv1, reference.bn1)
    torch.testing.assert_close(stored["conv1.bias"], fused.bias, rtol=1e-6, atol=1e-7)
    loaded = fastres.load(export_fp16)
    assert torch.equal(loaded.conv1.bias, stored["conv1.bias"].half())
    assert torch.equal(loaded.float().conv1.bias, stored["conv1.bias"].half().float())


def test_move_then_plan_rebuilds_in_new_dtype(reference):
    """A folded module has no buffers, and Module._apply swaps its parameters' ``.data`` in place
    (same Parameter objects, same version counters): the plan's guard must still see the move."""
    folded = fastres.fold_bn(reference)
    x = image_batch(1, 32, seed=4)
    with torch.no_grad():
        first = folded(x)
        assert folded.plan().dtype == torch.float32
        folded.double()           # float64: no kernel dtype, so PyTorch's forward, and it says so
        with pytest.warns(fastres.FallbackWarning, match="float64"):
            second = folded(x.double())
        with pytest.raises(fastres.capture.Unsupported, match="float64"):
            folded.plan()
        folded.float()
        third = folded(x)
    assert second.dtype == torch.float64 and folded.plan().dtype == torch.float32
    torch.testing.assert_close(second.float(), first, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(third, first, rtol=1e-5, atol=1e-6)


def test_float64_on_triton_backend_computes_right_answer(reference):
    """float64 is not a kernel dtype: the eval forward must fall back to PyTorch's forward on the
    (consistent) float64 module rather than fail inside the Triton path."""
    folded = fastres.fold_bn(reference).double()
    x = image_batch(1, 16, seed=5).double()
    with torch.no_grad():
        expected = reference.double()(x)
        reference.float()
        with fastres.use_backend("triton"):
            got = folded(x)
    assert got.dtype == torch.float64
    assert _rel(got, expected) <= 1e-5

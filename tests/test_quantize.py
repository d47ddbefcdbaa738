"""fastres.quantize: calibration, scales, the quantized plan, its report, and accuracy on real data.

Accuracy: models trained here on scikit-learn's digits (tests/digits.py) — the one-block-per-stage
ResNet (BasicBlock, ImageNet stem: ROW_K stem, max pool, concat-K projections) and a CIFAR-style
ResNet-8 (3x3 stem, option-A shortcuts read at stride 2 into a channel offset, a width-pooled float
head) — quantized with the training images as calibration data, measured on the 397 held-out ones:
top-1 within 0.5 points of fp32 and logits cosine >= 0.99, for int8 (every method) and fp8.

Exactness: the quantized plan through the Triton kernels (under the interpreter, or on a GPU) writes
the same 8-bit values, bit for bit, as through the integer reference (the CPU path).
"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from digits import digits_images, normalise, train_on_digits, trained_digits_model
from kernel_testing import ON_CUDA
from residual_zoo import CifarResNet, SEResNet, randomize_

import fastres
from fastres.quantize import (Histogram, QuantizationError, QuantizedModel, _run_recording,
                              choose_scale, quantize, quantize_conv_weight)

INT8, E4M3 = torch.int8, torch.float8_e4m3fn


@functools.lru_cache(maxsize=1)
def _calibration():
    return normalise(digits_images()[0][:512])      # training images (the first 1400 train the models)


@functools.lru_cache(maxsize=1)
def _cifar_model():
    torch.manual_seed(0)
    return train_on_digits(CifarResNet(8, "A"), 150, seed=0)


def _accuracy(logits, labels):
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def _check_accuracy(model, x_test, y_test, dtype, method="percentile"):
    qmodel = quantize(model, _calibration(), dtype=dtype, method=method, progress=False)
    with torch.no_grad():
        ref, out = model(x_test), qmodel(x_test)
    acc_fp32, acc_q = _accuracy(ref, y_test), _accuracy(out, y_test)
    cosine = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert acc_q >= acc_fp32 - 0.5, f"{dtype} {method}: top-1 {acc_q:.2f}% vs fp32 {acc_fp32:.2f}%\n{qmodel.report}"
    assert cosine >= 0.99, f"{dtype} {method}: logits cosine {cosine:.4f}\n{qmodel.report}"
    assert acc_fp32 > 80       # the model learnt something
    return qmodel


@pytest.mark.parametrize("dtype,method", [("int8", "percentile"), ("int8", "minmax"), ("int8", "mse"),
                                          ("fp8", "percentile"), ("fp8", "minmax")])
def test_digits_resnet_accuracy(dtype, method):
    model, x_test, y_test, _ = trained_digits_model()
    qmodel = _check_accuracy(model, x_test, y_test, dtype, method)
    kinds = [s.kind for s in qmodel.plan.steps]
    assert kinds == ["quantize", "qconv", "max_pool"] + ["qconv"] * 8 + ["qhead"], kinds
    assert qmodel.plan.steps[1].attrs["row_k"]           # the stem reads the bordered 4-channel input


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_cifar_resnet_accuracy(dtype):
    model, x_test, y_test = _cifar_model()
    qmodel = _check_accuracy(model, x_test, y_test, dtype)
    steps = qmodel.plan.steps
    assert [s.kind for s in steps][-1] == "head" and steps[-2].attrs["out_dtype"] == torch.float32   # float head
    assert any("residual_stride" in s.attrs for s in steps if s.kind == "qconv")    # option A in the epilogue


# ------------------------------------------------------------------------------------------------
# The Triton kernels and the integer reference write the same 8-bit values


def _values(qmodel, x, backend):
    with fastres.use_backend(backend):
        return _run_recording(qmodel.plan, x, fastres.backend.get_backend(backend))


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_triton_path_matches_integer_reference(dtype):
    if not ON_CUDA and not fastres.backend.interpreter_enabled():
        pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1")
    if ON_CUDA and dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 tl.dot needs sm_89+")
    model, x_test, _, _ = trained_digits_model()
    qmodel = quantize(model, _calibration(), dtype=dtype, progress=False, num_batches=2)
    x = x_test[:6]
    if ON_CUDA:
        qmodel, x = qmodel.cuda(), x.cuda()
    got, ref = _values(qmodel, x, "triton"), _values(qmodel, x, "torch")
    eight_bit = [n for n, v in ref.items() if v.dtype in (INT8, E4M3)]
    assert len(eight_bit) >= 11
    for name in eight_bit:
        g, r = got[name].cpu(), ref[name].cpu()
        if dtype == "int8":
            assert torch.equal(g, r), f"{name}: {(g != r).sum().item()} int8 values differ"
        else:    # fp32 accumulation of e4m3 products (rounded) vs exact: within one e4m3 step, almost all equal
            close = (g.float() - r.float()).abs() <= 2.0 ** -3 * r.float().abs() + 2.0 ** -9
            assert close.all() and (g.view(torch.uint8) == r.view(torch.uint8)).float().mean() > 0.98, name
    logits_g, logits_r = got[qmodel.plan.output.name], ref[qmodel.plan.output.name]
    assert (logits_g.cpu() - logits_r.cpu()).abs().max() <= 1e-4 * logits_r.abs().max()


# ------------------------------------------------------------------------------------------------
# Report and min_cosine


def test_report_names_every_step_and_min_cosine_raises():
    model, x_test, _, _ = trained_digits_model()
    qmodel = quantize(model, _calibration(), progress=False)
    report = qmodel.report
    names = [s.step for s in report.steps]
    assert names[0] == "conv1" and names[-1] == "fc" and "layer2.0.conv2" in names
    assert all(0.95 < s.cosine <= 1.0 + 1e-9 and s.rel_err < 0.3 for s in report.steps)
    assert all(s.local_cosine is not None for s in report.steps if s.kind == "qconv")
    assert report.top1_agreement > 0.95 and report.images == 64
    text = str(report)
    assert "layer4.0.conv2" in text and "alone cos" in text and "int8" in text
    with pytest.raises(QuantizationError, match=r"worst steps: \S+ \(alone") as err:
        quantize(model, _calibration(), progress=False, num_batches=1, min_cosine=0.9999999)
    assert err.value.report.steps
    quantize(model, _calibration(), progress=False, num_batches=1, min_cosine=0.99)


# ------------------------------------------------------------------------------------------------
# Plans the 8-bit kinds do not cover end to end


@functools.lru_cache(maxsize=1)
def _bottleneck_model():
    torch.manual_seed(0)
    return randomize_(fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16))


def test_bottleneck_projection_and_fused_pairs(tmp_path):
    """A Bottleneck ResNet: its 3x3 -> 1x1 pairs with 32..128 mid channels run as ``qconv_pair``
    (the fused kernel; layer1's 16-channel mid is below an 8-bit dot's K: two qconvs), projections
    as concat-K; the pairs survive export / load."""
    model = _bottleneck_model()
    x = torch.randn(8, 3, 32, 32)
    qmodel = quantize(model, [x], progress=False)
    kinds = [s.kind for s in qmodel.plan.steps]
    assert "conv_pair" not in kinds and kinds.count("qconv") == 3 * 4 + 1 - 2 * 3
    assert [s.name for s in qmodel.plan.steps if s.kind == "qconv_pair"] == [
        f"layer{i}.0.conv2+conv3" for i in (2, 3, 4)]
    assert sum("shortcut" in s.inputs for s in qmodel.plan.steps) == 4
    assert all(s.local_cosine > 0.99 for s in qmodel.report.steps if s.kind == "qconv_pair")
    with torch.no_grad():
        cosine = F.cosine_similarity(qmodel(x).flatten(), model(x).flatten(), dim=0).item()
    assert cosine > 0.98, qmodel.report
    loaded = fastres.load(fastres.export(qmodel, tmp_path / "q.safetensors"))
    assert [s.kind for s in loaded.plan.steps] == kinds
    with torch.no_grad():
        assert torch.equal(loaded(x[:2]), qmodel(x[:2]))


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_fused_pairs_triton_path_matches_integer_reference(dtype):
    """The qconv_pair steps through the fused Triton kernel write the 8-bit values the reference
    (two qconv references in sequence) writes: int8 bit for bit, e4m3 too here."""
    if not ON_CUDA and not fastres.backend.interpreter_enabled():
        pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1")
    if ON_CUDA and dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 tl.dot needs sm_89+")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qmodel = quantize(_bottleneck_model(), [x], dtype=dtype, progress=False)
    x = x[:2]
    if ON_CUDA:
        qmodel, x = qmodel.cuda(), x.cuda()
    got, ref = _values(qmodel, x, "triton"), _values(qmodel, x, "torch")
    pairs = [s.output for s in qmodel.plan.steps if s.kind == "qconv_pair"]
    assert len(pairs) == 3
    for name in pairs:
        g, r = got[name].cpu(), ref[name].cpu()
        same = (g.view(torch.uint8) == r.view(torch.uint8)).float().mean().item()
        assert same == 1.0 if dtype == "int8" else same > 0.98, f"{name}: {same:.4f} of the 8-bit values equal"


def test_steps_without_an_8bit_kind_run_in_fp32_between_conversions():
    """SE gating (se_scale and PyTorch steps) runs in fp32: dequantize before, quantize after."""
    torch.manual_seed(0)
    model = randomize_(SEResNet((1, 1), width=16))
    x = torch.randn(4, 3, 16, 16)
    qmodel = quantize(model, [x], progress=False)
    kinds = [s.kind for s in qmodel.plan.steps]
    assert "dequantize" in kinds and kinds.count("quantize") >= 2 and "se_scale" in kinds
    with torch.no_grad():
        cosine = F.cosine_similarity(qmodel(x).flatten(), model(x).flatten(), dim=0).item()
    assert cosine > 0.98, qmodel.report


# ------------------------------------------------------------------------------------------------
# Pieces


def test_histogram_keeps_counts_when_its_range_doubles():
    h = Histogram(bins=64)
    h.add(torch.tensor([0.1, 0.2, 1.0]))
    h.add(torch.tensor([3.5, -0.05]))           # |x| up to 3.5: range 1 -> 4
    assert h.top == 4.0 and h.counts.sum() == 5 and h.amax == 3.5
    assert h.percentile(100) >= 3.5 and h.percentile(40) <= 0.2 + 4.0 / 64


def test_scales_by_method():
    gen = torch.Generator().manual_seed(0)
    h = Histogram()
    data = torch.cat([torch.randn(100000, generator=gen), torch.tensor([40.0])])     # one outlier
    h.add(data)
    minmax, pct, mse = (choose_scale(h, m, INT8) for m in ("minmax", "percentile", "mse"))
    assert minmax == pytest.approx(40.0 / 127, rel=1e-6)
    assert 3.5 / 127 < pct < 4.5 / 127            # the 99.99th percentile of |N(0, 1)|: 3.9

    def error(scale):
        return ((data / scale).round().clamp(-128, 127) * scale - data).pow(2).sum().item()
    assert error(mse) < error(minmax) and error(mse) < error(pct)     # least squared error, as named
    assert choose_scale(h, "minmax", E4M3) == pytest.approx(40.0 / 448, rel=1e-6)
    with pytest.raises(ValueError, match="method must be one of"):
        choose_scale(h, "entropy", INT8)


def test_concat_k_weights_share_the_accumulator_scale():
    gen = torch.Generator().manual_seed(0)
    w, w_sc = torch.randn(8, 16, 3, 3, generator=gen), 5 * torch.randn(8, 4, 1, 1, generator=gen)
    s_x, s_sc = 0.02, 0.05
    wq, scq, acc = quantize_conv_weight(w, s_x, INT8, w_sc, s_sc)
    assert wq.dtype == scq.dtype == INT8 and acc.dtype == torch.float32
    peak = torch.maximum(wq.abs().amax(dim=(1, 2, 3)), scq.abs().amax(dim=(1, 2, 3)))
    assert (peak == 127).all()                  # the larger branch uses the full range, per channel
    deq = wq.double() * acc.double().view(-1, 1, 1, 1) / s_x
    assert (deq - w.double()).abs().max() <= acc.double().max() / s_x / 2 + 1e-9


def test_bad_arguments_are_refused():
    model, _, _, _ = trained_digits_model()
    with pytest.raises(ValueError, match="dtype must be one of int8, fp8"):
        quantize(model, _calibration(), dtype="int4", progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize(model, _calibration(), method="kl", progress=False)
    with pytest.raises(TypeError, match="uint8 pixels"):
        quantize(model, [torch.zeros(2, 3, 16, 16, dtype=torch.uint8)], progress=False)
    with pytest.raises(ValueError, match="holds no batch"):
        quantize(model, [], progress=False)
    with pytest.raises(TypeError, match=r"batch 0 must be a \[N, C, H, W\] tensor"):
        quantize(model, [torch.zeros(3, 16, 16)], progress=False)
    model.train()
    try:
        with pytest.raises(ValueError, match="call model.eval"):
            quantize(model, _calibration(), progress=False)
    finally:
        model.eval()


def test_module_moves_but_keeps_its_dtypes():
    model, x_test, _, _ = trained_digits_model()
    qmodel = fastres.quantize(model, _calibration(), progress=False, num_batches=1)   # the module is callable too
    assert isinstance(qmodel, QuantizedModel) and "dtype=int8" in repr(qmodel)
    assert qmodel.to("cpu") is qmodel
    with pytest.raises(TypeError, match="keeps its dtypes"):
        qmodel.half()
    with pytest.raises(TypeError, match="float"):
        qmodel(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 input channels"):
        qmodel(torch.zeros(1, 4, 16, 16))
    assert math.isfinite(qmodel(x_test[:2]).sum().item())


# ------------------------------------------------------------------------------------------------
# Files: fastres.export / fastres.load of a quantized model


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_export_load_round_trip(tmp_path, dtype):
    model, x_test, _, _ = trained_digits_model()
    qmodel = quantize(model, _calibration(), dtype=dtype, progress=False, num_batches=1)
    path = fastres.export(qmodel, tmp_path / "q.safetensors")
    loaded = fastres.load(path)
    assert isinstance(loaded, QuantizedModel) and loaded.dtype == dtype and loaded.scales == qmodel.scales
    assert "layer4.0.conv2" in loaded.report_text
    with torch.no_grad():
        assert torch.equal(loaded(x_test[:8]), qmodel(x_test[:8]))
    for a, b in zip(qmodel.plan.steps, loaded.plan.steps):
        assert (a.kind, a.name, a.inputs, a.output) == (b.kind, b.name, b.inputs, b.output)
        assert a.attrs == b.attrs and a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k].view(torch.uint8), b.tensors[k].view(torch.uint8)) for k in a.tensors)
    with pytest.raises(ValueError, match="records no arch"):
        fastres.load(path, arch="resnet18")


def _forge(tmp_path, path, edit):
    """A copy of the export at ``path`` with its plan JSON edited by ``edit`` (checksum kept valid)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    plan = json.loads(meta["plan"])
    tensors = edit(plan, tensors) or tensors
    meta["plan"] = json.dumps(plan)
    from fastres.files import digest
    meta["sha256"] = digest(tensors)
    out = tmp_path / "forged.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


def test_forged_or_corrupt_files_are_refused(tmp_path):
    from fastres.files import ExportFormatError

    model, _, _, _ = trained_digits_model()
    path = fastres.export(quantize(model, _calibration(), progress=False, num_batches=1), tmp_path / "q.safetensors")

    def set_in(step, key, value):
        def edit(plan, tensors):
            plan["steps"][step][key] = value
        return edit

    def retype(plan, tensors):
        name = plan["steps"][1]["tensors"]["weight"]
        return dict(tensors, **{name: tensors[name].float()})

    cases = [(set_in(1, "kind", "torch"), "has kind 'torch'"),
             (set_in(2, "inputs", {"x": "nowhere"}), "reads 'nowhere'"),
             (set_in(1, "attrs", {"call": "os.system"}), "unknown attributes"),
             (retype, "weight must be a 4-D int8"),
             (set_in(1, "tensors", {"weight": "missing"}), "needs tensor 'missing'")]
    for edit, message in cases:
        with pytest.raises(ExportFormatError, match=message):
            fastres.load(_forge(tmp_path, path, edit))
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF                         # flip bits in the last tensor's bytes
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ExportFormatError, match="sha256"):
        fastres.load(corrupt)


def test_export_refuses_a_plan_with_pytorch_steps(tmp_path):
    torch.manual_seed(0)
    model = randomize_(SEResNet((1,), width=16))
    qmodel = quantize(model, [torch.randn(2, 3, 16, 16)], progress=False)
    if not any(s.kind == "torch" for s in qmodel.plan.steps):
        pytest.skip("the SE block was fused completely")
    with pytest.raises(ValueError, match="runs PyTorch calls"):
        fastres.export(qmodel, tmp_path / "se.safetensors")

"""The CPU path of a quantized plan: oneDNN's int8 convolution, bit for bit the integer reference.

``CpuBackend``'s generated program runs every int8 ``qconv`` step it can as one
``onednn::qconv2d_pointwise`` call (``fastres.backend._Int8Conv``); the others, e4m3 plans, and a
PyTorch whose op fails the smoke test run ``conv2d_nhwc_8bit_ref``. Checked here against that
reference (float64 accumulation, the same fp32 epilogue roundings):

* one conv step on every torchvision ResNet conv shape and odd ones (H != W, 7 and 13, batch 1 and
  3, channels not multiples of 16, groups, dilation, 5x5, the 4-channel bordered stem), with and
  without residual and ReLU, signed and post-ReLU inputs, int8 / fp32 / fp16 outputs, the
  projection shortcut in the centre tap of a 1x1 and of a 3x3 conv: int8 outputs bit-exact;
* whole quantized models (the digits ResNet, a Bottleneck ResNet, the CIFAR option-A ResNet, fp8):
  every 8-bit value the program writes equal to the reference backend's, the logits equal, and the
  same with the int8 op switched off (the fallback).
"""
import math

import pytest
import torch
from kernel_testing import channels_last, resnet_conv_shapes

import fastres
from fastres import backend
from fastres.ir import Plan, Ref, Step
from fastres.ir_quant import fp32, qconv_reference
from fastres.kernels._common import conv_output_size
from fastres.quantize import _run_recording, quantize

INT8 = torch.int8

pytestmark = pytest.mark.skipif(not backend.onednn_int8_available(),
                                reason=f"oneDNN int8 convolution unusable: {backend.onednn_int8_unavailable_reason()}")


def _qconv_step(c_in, c_out, k, stride, padding, dilation, groups, *, relu, residual, out_dtype=INT8, shortcut=0,
                shortcut_stride=1, seed=0):
    """A qconv step with random int8 weights and the scales set so that the outputs spread over the
    int8 range (a few percent saturate)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (c_out, c_in // groups, k, k), generator=g, dtype=INT8)
    k_len = c_in // groups * k * k + shortcut
    acc_scale = ((0.5 + torch.rand(c_out, generator=g)) / (74.0 * 74.0 * math.sqrt(k_len))).float()
    tensors = {"weight": weight, "bias": torch.randn(c_out, generator=g), "acc_scale": acc_scale}
    attrs = {"stride": (stride, stride), "padding": (padding, padding), "dilation": (dilation, dilation),
             "groups": groups, "relu": relu, "out_dtype": out_dtype}
    inputs = {"x": "x"}
    if out_dtype == INT8:
        attrs["out_inv_scale"] = fp32(60.0)
    if residual:
        attrs["residual_scale"] = fp32(0.02)
        inputs["residual"] = "r"
    if shortcut:
        tensors["shortcut_weight"] = torch.randint(-127, 128, (c_out, shortcut, 1, 1), generator=g, dtype=INT8)
        attrs["shortcut_stride"] = shortcut_stride
        inputs["shortcut"] = "sc"
    return Step("qconv", "conv", inputs, "y", attrs, tensors)


def _int8(shape, nonneg, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return channels_last(torch.randint(0 if nonneg else -128, 128, shape, generator=g, dtype=INT8))


def _check(step, x, *, nonneg, residual=None, shortcut=None):
    """The step through ``_Int8Conv`` (as the program builds it) against its reference."""
    args = {"x": x, **({"residual": residual} if residual is not None else {}),
            **({"shortcut": shortcut} if shortcut is not None else {})}
    ref = qconv_reference(step, args, None, False)
    shapes = {step.name: {**{role: tuple(v.shape) for role, v in args.items()}, "out": tuple(ref.shape)}}
    assert backend.qconv_runs_int8(step, shapes) == ""
    conv = backend._Int8Conv.from_step(backend._OneDnnOps(), step, tuple(x.shape), nonneg)
    out = conv(x, shortcut, residual)
    what = f"{step.attrs} {tuple(x.shape)}"
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    if out.dtype == INT8:
        assert torch.equal(out, ref), (f"{what}: {(out != ref).sum().item()} of {out.numel()} int8 values differ, "
                                       f"by up to {(out.int() - ref.int()).abs().max().item()}")
        assert out.unique().numel() > 64, f"{what}: the outputs do not spread over the int8 range"
        assert (out == 127).any() or (out == -128).any(), f"{what}: nothing saturates"
    else:
        assert torch.equal(out, ref), f"{what}: float output differs by {(out - ref).abs().max().item()}"


RESNET_CONV_SHAPES = resnet_conv_shapes()


@pytest.mark.parametrize("shape", RESNET_CONV_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_resnet_conv_shapes(shape):
    c_in, c_out, k, stride, padding, dilation, groups = shape
    index = RESNET_CONV_SHAPES.index(shape)
    residual, relu = [(False, True), (True, True), (False, False), (True, False)][index % 4]
    residual = residual and stride == 1
    nonneg = c_in != 3 and index % 3 != 0       # post-ReLU input read as uint8, or signed (shifted by 128)
    h, w = (13, 11) if c_in == 3 else (5, 6)
    step = _qconv_step(c_in, c_out, k, stride, padding, dilation, groups, relu=relu, residual=residual, seed=index)
    x = _int8((2, c_in, h, w), nonneg, index)
    oh, ow = (conv_output_size(n, k, stride, padding, dilation) for n in (h, w))
    r = _int8((2, c_out, oh, ow), False, index + 7) if residual else None
    _check(step, x, nonneg=nonneg, residual=r)


@pytest.mark.parametrize("batch,h,w,c_in,c_out,k,stride,padding,dilation,groups,nonneg", [
    (1, 7, 7, 64, 64, 3, 1, 1, 1, 1, True),
    (3, 13, 13, 64, 128, 3, 2, 1, 1, 1, False),
    (3, 13, 7, 256, 512, 1, 1, 0, 1, 1, True),     # H != W
    (1, 7, 13, 128, 256, 1, 2, 0, 1, 1, False),    # 1x1 stride 2
    (1, 13, 7, 512, 512, 3, 2, 1, 1, 32, True),    # 16 channels per group
    (1, 7, 9, 48, 40, 3, 1, 1, 1, 1, False),       # channels not multiples of 16
    (2, 5, 6, 40, 24, 1, 1, 0, 1, 1, True),
    (1, 9, 9, 32, 32, 5, 2, 2, 1, 1, False),       # 5x5
    (1, 11, 9, 64, 64, 3, 1, 2, 2, 1, True),       # dilated
    (2, 23, 21, 4, 64, 7, 2, 0, 1, 1, False),      # the ROW_K stem: bordered 4-channel signed input
])
def test_odd_shapes(batch, h, w, c_in, c_out, k, stride, padding, dilation, groups, nonneg):
    step = _qconv_step(c_in, c_out, k, stride, padding, dilation, groups, relu=True, residual=stride == 1)
    x = _int8((batch, c_in, h, w), nonneg, 0)
    oh, ow = (conv_output_size(n, k, stride, padding, dilation) for n in (h, w))
    r = _int8((batch, c_out, oh, ow), False, 3) if stride == 1 else None
    _check(step, x, nonneg=nonneg, residual=r)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_float_output(out_dtype, residual):
    """The last step before a float consumer: the fp32 epilogue value (rounded once to fp16)."""
    step = _qconv_step(64, 64, 3, 1, 1, 1, 1, relu=True, residual=residual, out_dtype=out_dtype)
    r = _int8((2, 64, 7, 5), False, 5) if residual else None
    _check(step, _int8((2, 64, 7, 5), True, 0), nonneg=True, residual=r)


@pytest.mark.parametrize("k,stride,c_in,c_sc,nonneg", [(1, 1, 64, 256, True), (1, 2, 128, 64, True),
                                                       (3, 2, 64, 64, True), (3, 1, 48, 40, False)])
def test_concat_k_shortcut(k, stride, c_in, c_sc, nonneg):
    """The projection shortcut (one accumulator with the main conv) as extra input channels read by
    the centre tap: behind a 1x1 (Bottleneck) and behind a 3x3 (BasicBlock)."""
    step = _qconv_step(c_in, 128, k, 1, k // 2, 1, 1, relu=True, residual=False, shortcut=c_sc,
                       shortcut_stride=stride)
    x = _int8((2, c_in, 7, 6), nonneg, 0)
    sc = _int8((2, c_sc, 6 * stride + 1, 5 * stride + 1), nonneg, 1)
    _check(step, x, nonneg=nonneg, shortcut=sc)


def test_steps_it_cannot_run_say_why():
    step = _qconv_step(32, 32, 3, 2, 1, 1, 1, relu=True, residual=True)
    step.attrs.update(residual_stride=2, residual_channel_offset=8)
    assert "residual" in backend.qconv_runs_int8(step, {"conv": {}})
    e4m3 = _qconv_step(32, 32, 3, 1, 1, 1, 1, relu=True, residual=False)
    e4m3.tensors["weight"] = e4m3.tensors["weight"].float().to(torch.float8_e4m3fn)
    assert "float8" in backend.qconv_runs_int8(e4m3, {"conv": {}})
    shortcut = _qconv_step(32, 32, 3, 1, 0, 1, 1, relu=True, residual=False, shortcut=16, shortcut_stride=2)
    shapes = {"conv": {"x": (1, 32, 7, 7), "shortcut": (1, 16, 10, 10), "out": (1, 32, 5, 5)}}
    assert "centre tap" in backend.qconv_runs_int8(shortcut, shapes)


# ------------------------------------------------------------------------------------------------
# Whole quantized models: the program's every 8-bit value against the reference backend's


def _all_values(plan):
    """The plan with every value as an output (the program then returns them all)."""
    names = [n for s in plan.steps for n in s.outputs]
    return Plan(steps=plan.steps, output={n: Ref(n) for n in names}, dtype=plan.dtype, device=plan.device,
                input_name=plan.input_name, in_channels=plan.in_channels)


def _check_model(qmodel, x, *, int8_steps):
    plan = _all_values(qmodel.plan)
    cpu = backend.get_backend("torch")
    program = cpu.program(plan, x.shape)
    assert sorted(s for s in program.onednn_steps if s in {st.name for st in plan.steps if st.kind == "qconv"}) \
        == sorted(int8_steps), program.int8_fallbacks
    assert program.cpu_kernel_steps == []       # the 8-bit max pool runs its (exact) reference
    with torch.no_grad():
        got = cpu.execute(plan, x)
    ref = _run_recording(plan, x, backend.get_backend("reference"))
    eight_bit = [n for n, v in ref.items() if v.dtype == INT8]
    assert len(eight_bit) >= len(int8_steps)
    for name in eight_bit:
        assert torch.equal(got[name], ref[name]), f"{name}: {(got[name] != ref[name]).sum().item()} int8 values differ"
    out = qmodel.plan.output.name
    assert torch.equal(got[out], ref[out])
    with torch.no_grad():       # the module on CPU runs the program; use_backend("reference") the reference
        logits = qmodel(x)
        with fastres.use_backend("reference"):
            assert torch.equal(logits, qmodel(x))
    return got[out]


@pytest.fixture(scope="module")
def digits_int8():
    from digits import trained_digits_model
    from test_quantize import _calibration
    model, x_test, _, _ = trained_digits_model()
    return quantize(model, _calibration(), dtype="int8", progress=False, num_batches=2), x_test[:7]


def test_digits_resnet_int8_equals_the_reference(digits_int8):
    qmodel, x = digits_int8
    _check_model(qmodel, x, int8_steps=[s.name for s in qmodel.plan.steps if s.kind == "qconv"])


def test_without_the_int8_op_the_reference_runs(digits_int8, monkeypatch):
    """The fallback (a PyTorch whose int8 op is missing or fails the smoke test): every qconv runs
    its reference inside the same program, same answer."""
    qmodel, x = digits_int8
    with torch.no_grad():
        fast = backend.get_backend("torch").execute(_all_values(qmodel.plan), x)
    monkeypatch.setattr(backend, "_onednn_int8_state", False)
    monkeypatch.setattr(backend, "_onednn_int8_reason", "switched off by the test")
    plan = _all_values(qmodel.plan)
    program = backend.get_backend("torch").program(plan, x.shape)
    qconvs = [s.name for s in plan.steps if s.kind == "qconv"]
    assert program.int8_fallbacks == {n: "switched off by the test" for n in qconvs}
    with torch.no_grad():
        slow = program(x)
    assert all(torch.equal(fast[n], slow[n]) for n in fast)


def test_bottleneck_resnet_int8_equals_the_reference():
    from residual_zoo import randomize_
    torch.manual_seed(0)
    model = randomize_(fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16)).eval()
    x = torch.randn(3, 3, 32, 32)
    qmodel = quantize(model, [x], progress=False)
    _check_model(qmodel, x, int8_steps=[s.name for s in qmodel.plan.steps if s.kind == "qconv"])


def test_fused_pairs_run_as_two_int8_convs():
    """A quantized plan's qconv_pair (the GPU's fused 3x3 -> 1x1) runs on CPU as its two int8 convs
    (ir_quant.split_qconv_pair): every 8-bit value, the pairs' outputs included, the reference's."""
    from residual_zoo import randomize_

    from fastres.ir_quant import split_qconv_pair
    torch.manual_seed(0)
    model = randomize_(fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    qmodel = quantize(model, [x], progress=False)
    pairs = [s for s in qmodel.plan.steps if s.kind == "qconv_pair"]
    assert len(pairs) == 2        # layer1-2 (mid 64, 128); layer3-4's mid widths are not fused
    program = backend.get_backend("torch").program(_all_values(qmodel.plan), x.shape)
    halves = [s.name for p in pairs for s in split_qconv_pair(p)]
    assert halves == ["layer1.0.conv2", "layer1.0.conv3", "layer2.0.conv2", "layer2.0.conv3"]
    assert set(halves) <= set(program.onednn_steps), program.int8_fallbacks
    _check_model(qmodel, x, int8_steps=[s.name for s in qmodel.plan.steps if s.kind == "qconv"])


def test_cifar_option_a_runs_its_strided_residuals_as_the_reference():
    from residual_zoo import CifarResNet, randomize_
    torch.manual_seed(0)
    model = randomize_(CifarResNet(8, "A")).eval()
    x = torch.randn(2, 3, 16, 16)
    qmodel = quantize(model, [x], progress=False)
    strided = [s.name for s in qmodel.plan.steps if s.kind == "qconv" and "residual_stride" in s.attrs]
    assert strided
    _check_model(qmodel, x, int8_steps=[s.name for s in qmodel.plan.steps
                                        if s.kind == "qconv" and s.name not in strided])


def test_fp8_plans_run_the_exact_reference():
    """e4m3: oneDNN's fp8 convolution accumulates in fp32 (rounded); the CPU keeps the exact reference."""
    from residual_zoo import randomize_
    torch.manual_seed(0)
    model = randomize_(fastres.ResNet(fastres.BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    qmodel = quantize(model, [x], dtype="fp8", progress=False)
    program = backend.get_backend("torch").program(qmodel.plan, x.shape)
    assert program.int8_fallbacks and all("float8" in why for why in program.int8_fallbacks.values())
    with torch.no_grad():
        logits = qmodel(x)
        with fastres.use_backend("reference"):
            assert torch.equal(logits, qmodel(x))


def test_a_quantized_model_that_ran_on_cpu_can_be_copied(digits_int8):
    """Its plan caches oneDNN programs with prepacked int8 weights (opaque tensors): a deep copy
    (what fastres.Engine makes of the model) gets an empty cache, builds its own program from its
    own weights and gives the same logits."""
    import copy
    qmodel, x = digits_int8
    with torch.no_grad():
        expected = qmodel(x)
    assert len(qmodel.plan.__dict__["_onednn_programs"]) >= 1
    twin = copy.deepcopy(qmodel)
    assert len(twin.plan.__dict__["_onednn_programs"]) == 0
    with torch.no_grad():
        assert torch.equal(twin(x), expected)
    assert len(twin.plan.__dict__["_onednn_programs"]) == 1


def test_uint8_pixels_run_the_program_and_weight_edits_are_seen(digits_int8):
    """forward_uint8 on CPU runs the oneDNN program (only the pixel stem's border correction on
    its reference), bit for bit the reference; and a weight modified in place after a call is
    used by the next call (the packed / prepacked copies are rebuilt), as the reference sees it."""
    import copy
    qmodel, x = digits_int8
    qmodel = copy.deepcopy(qmodel)           # (its weights are edited below)
    assert qmodel.pixel_plan is not None
    pixels = torch.randint(0, 256, (3, *x.shape[2:], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cpu = backend.get_backend("torch")
    assert cpu.uses_onednn(qmodel.pixel_plan, pixels.permute(0, 3, 1, 2))
    with torch.no_grad():
        got = qmodel.forward_uint8(pixels)
        with fastres.use_backend("reference"):
            assert torch.equal(got, qmodel.forward_uint8(pixels))
        program = cpu.program(qmodel.pixel_plan, tuple(pixels.permute(0, 3, 1, 2).shape))
        assert list(program.int8_fallbacks.values()) == ["a pixel stem's border correction (input_offset)"]
        before = qmodel(x)
        step = next(s for s in qmodel.plan.steps[2:] if s.kind == "qconv")
        step.tensors["weight"].zero_()          # in place, after the programs were made
        after = qmodel(x)
        with fastres.use_backend("reference"):
            assert torch.equal(after, qmodel(x))
        assert not torch.equal(after, before)

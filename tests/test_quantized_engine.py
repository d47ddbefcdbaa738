"""``fastres.Engine`` over a ``fastres.quantize`` model (dtype="int8" / "fp8").

The engine runs the quantized model's own plan, so its logits equal the module's on the same
input, bit for bit (int8 and fp8 alike: the same steps on the same backend; the kernels compute
every row alone, so padding a batch into a bucket changes nothing), for batches on, between and
beyond the buckets,
on the CPU path and through the Triton kernels (interpreter or GPU), with the same input checks
as a float engine, from a module and from its export.
"""
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from digits import MEAN, STD, normalise, trained_digits_model
from test_engine import needs_triton, uint8_images

import fastres
from fastres.engine import Engine
from fastres.extension import preprocess
from fastres.kernels._launch import record_launches
from fastres.quantize import quantize, shape_only_plan

BUCKETS = (2, 4)
BATCHES = (1, 2, 3, 5)        # padded into 2, on a bucket, padded into 4, split into 4 + 1
EIGHT_BIT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


@functools.lru_cache(maxsize=2)
def quantized_digits(dtype):
    model, x_test, _, images_test = trained_digits_model()
    calibration = normalise(images_test[:64])
    return quantize(model, calibration, dtype=dtype, progress=False, num_batches=1)


def digit_pixels(n):
    """uint8 [n, 16, 16, 3] digits (the held-out images as pixels)."""
    _, _, _, images_test = trained_digits_model()
    return (images_test[:n] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def module_logits(qmodel, images, device="cpu"):
    """The quantized module's own output on uint8 images normalised as the engine normalises them."""
    x = preprocess(images, MEAN, STD, dtype=torch.float32, pad_channels_to=3)
    with torch.no_grad():
        return qmodel(x.to(device))


def _engine(qmodel, device="cpu", **kwargs):
    return Engine(qmodel, batch_sizes=BUCKETS, image_size=16, mean=MEAN, std=STD, device=device, **kwargs)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_cpu_engine_equals_the_module(dtype):
    qmodel = quantized_digits(dtype)
    with fastres.use_backend("torch"):
        engine = _engine(qmodel)
        assert engine.executor == "plan" and engine.dtype == EIGHT_BIT[dtype] and engine.quantized == dtype
        images = digit_pixels(5)
        for n in BATCHES:
            got = engine(images[:n])
            assert got.dtype == torch.float32 and got.shape == (n, 10)
            # the CPU path runs chunks of at most the largest bucket, unpadded (the head's fp32
            # GEMM may round differently for another number of rows)
            expected = torch.cat([module_logits(qmodel, chunk) for chunk in images[:n].split(BUCKETS[-1])])
            assert torch.equal(got, expected), f"{dtype} batch {n}"


@needs_triton
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_triton_engine_equals_the_module(dtype, device):
    if device == "cuda" and dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 tl.dot needs sm_89+")
    qmodel = quantized_digits(dtype)
    with fastres.use_backend("triton"):
        engine = _engine(qmodel, device, input="float_nchw")
        assert engine.executor == ("cuda-graphs" if device == "cuda" else "static-buffers")
        x = preprocess(digit_pixels(5), MEAN, STD, dtype=torch.float32, pad_channels_to=3)
        with torch.no_grad():
            expected = qmodel.to(device)(x.to(device))
        for n in BATCHES:
            assert torch.equal(engine(x[:n].to(device)), expected[:n]), f"{dtype} batch {n}"
    qmodel.to("cpu")


def test_buffers_take_each_value_dtype():
    """An 8-bit plan's buffers: int8 activations, fp32 logits, sharing byte slots."""
    plan = quantized_digits("int8").plan
    shape = (3, 3, 16, 16)
    buffers = plan.allocate(shape)
    dtypes = plan.value_dtypes()
    kernel_outputs = [s.output for s in plan.steps if s.kind in ("qconv", "max_pool", "qhead")]
    assert {str(buffers[n].dtype) for n in kernel_outputs} == {"torch.int8", "torch.float32"}
    for name in kernel_outputs:
        assert buffers[name].dtype == dtypes[name]
        assert tuple(buffers[name].shape) == plan.value_shapes(shape)[name]
    assert buffers[plan.output.name].dtype == torch.float32
    _, slots = plan.memory_layout(shape)
    assert len(slots) < len(kernel_outputs)       # shared


def test_export_load_engine_round_trip(tmp_path):
    qmodel = quantized_digits("int8")
    path = fastres.export(qmodel, tmp_path / "digits-int8.safetensors")
    with fastres.use_backend("torch"):
        engine = Engine(path, batch_sizes=BUCKETS, image_size=16, mean=MEAN, std=STD, device="cpu")
        assert engine.dtype == torch.int8
        images = digit_pixels(3)
        assert torch.equal(engine(images), module_logits(qmodel, images))


def test_engine_snapshots_the_quantized_model():
    qmodel = quantized_digits("int8")
    with fastres.use_backend("torch"):
        engine = _engine(qmodel)
        images = digit_pixels(2)
        before = engine(images)
        bias = qmodel.plan.steps[1].tensors["bias"]
        saved = bias.clone()
        bias += 1.0          # editing the module afterwards does not reach the engine
        try:
            assert torch.equal(engine(images), before)
        finally:
            bias.copy_(saved)


def test_bad_dtype_and_model_combinations():
    model, _, _, _ = trained_digits_model()
    with pytest.raises(TypeError, match=r"calibration images: qmodel = fastres.quantize\(model.eval\(\)"):
        Engine(model, dtype="int8", image_size=16)
    with pytest.raises(TypeError, match="calibration"):
        Engine(model, dtype=torch.float8_e4m3fn, image_size=16)
    qmodel = quantized_digits("int8")
    with pytest.raises(TypeError, match=r"quantized \(int8\): build the engine with dtype='int8'"):
        Engine(qmodel, dtype=torch.float16, image_size=16)
    with pytest.raises(TypeError, match="quantized"):
        Engine(qmodel, dtype="fp8", image_size=16)
    with pytest.raises(TypeError, match="dtype must be one of"):
        Engine(model, dtype="int4", image_size=16)


U8 = uint8_images(2, 16)


@pytest.mark.parametrize("images, error, match", [
    (U8.float(), TypeError, "uint8 RGB images.*float32.*input='float_nchw'"),
    (U8[0], ValueError, r"shape \(16, 16, 3\).*unsqueeze"),
    (U8.permute(0, 3, 1, 2).contiguous(), ValueError, r"looks like \[N, 3, H, W\]"),
    (uint8_images(2, 32), ValueError, "images are 32x32, this engine runs 16x16"),
    (torch.zeros(0, 16, 16, 3, dtype=torch.uint8), ValueError, "empty batch"),
    (uint8_images(2, 32)[:, ::2, ::2], ValueError, "must be contiguous"),
])
def test_bad_input_is_refused(images, error, match):
    with fastres.use_backend("torch"):
        engine = _engine(quantized_digits("int8"))
        expected = engine(U8)
        with pytest.raises(error, match=match):
            engine(images)
        assert torch.equal(engine(U8), expected)      # still usable


# ------------------------------------------------------------------------------------------------
# uint8 pixels straight into the stem (QuantizedModel.pixel_plan)
#
# The stem takes int8 p - 128 in its zero-bordered layout, the normalisation folded into its
# weights; the pixel value that normalises to zero (255 mean: 127.5 for the digits, 123.675, ...
# for ImageNet) is not an integer, so the border is corrected in the accumulator by a table per
# window class (``input_offset_table``). Checked against an exact float64 convolution of the
# normalised image with zero padding (the independent reference of the same quantized stem),
# against the fp32 model, and the Triton kernel against the integer reference bit for bit.

IMAGENET = (fastres.IMAGENET_MEAN, fastres.IMAGENET_STD)


@functools.lru_cache(maxsize=2)
def pixel_model(dtype):
    model, _, _, images_test = trained_digits_model()
    return quantize(model, normalise(images_test[:64]), dtype=dtype, progress=False, num_batches=1,
                    mean=MEAN, std=STD)


def _exact_stem(stem, pixels, mean, std):
    """float64: acc_scale * conv(W_q, (p - 255 mean), zero padding) + bias, from the step's own
    int8 weight; the normalised image's padding is its zero, whatever 255 mean is."""
    x = pixels.permute(0, 3, 1, 2).double() - 255 * torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    w = stem.tensors["weight"][:, :3].double()
    acc = F.conv2d(x, w, stride=stem.attrs["stride"], padding=stem.attrs["input_offset_padding"])
    return acc * stem.tensors["acc_scale"].double().view(1, -1, 1, 1) + stem.tensors["bias"].double().view(1, -1, 1, 1)


def _float_out(stem):
    """The stem step with an fp32 output (its value before ReLU and requantization)."""
    attrs = {k: v for k, v in stem.attrs.items() if k != "out_inv_scale"}
    return dataclasses.replace(stem, attrs=dict(attrs, out_dtype=torch.float32, relu=False), packed={})


def _run_step(step, x, backend):
    with fastres.use_backend(backend):
        be = fastres.backend.get_backend(backend)
        with torch.no_grad():
            return be.run(step, fastres.ir.OPS[step.kind], {"x": x}, None)


@pytest.mark.parametrize("size", [16, 15])      # even, and odd (masked last ROW_K run)
def test_pixel_stem_is_the_normalised_convolution_with_zero_padding(size):
    """ImageNet statistics on the digits stem: the stem's pre-ReLU fp32 value (reference and
    kernel) against float64 on the normalised image, border windows included; without the
    correction the border would be off by the offset's terms."""
    model, _, _, _ = trained_digits_model()
    fplan = fastres.quantize.float_plan(fastres.capture.capture(model))
    scales = {n: 0.05 for s in fplan.steps for n in s.outputs} | {fplan.input_name: 0.02}
    qplan, _ = fastres.quantize.build_quantized_plan(fplan, scales, torch.int8)
    plan = fastres.quantize.pixel_plan(fplan, qplan, *IMAGENET)
    entry, stem = plan.steps[0], _float_out(plan.steps[1])
    pixels = uint8_images(3, size, seed=1)
    pixels[0, :3] = 255          # saturated corners and edges: the border terms at their largest
    pixels[1, :, :2] = 0
    x = _run_step(entry, pixels.permute(0, 3, 1, 2), "torch")
    assert x.dtype == torch.int8 and tuple(x.shape) == (3, 4, size + 6, size + 6)
    assert torch.equal(x[:, :3, 3:-3, 3:-3].permute(0, 2, 3, 1), (pixels.int() - 128).to(torch.int8))
    assert not x[:, :, :3].any() and not x[:, 3].any()
    exact = _exact_stem(stem, pixels, *IMAGENET)
    got = _run_step(stem, x, "torch")
    assert (got.double() - exact).abs().max() <= 4e-6 * exact.abs().max()
    without = dict(stem.tensors, input_offset=torch.zeros_like(stem.tensors["input_offset"]))
    uncorrected = _run_step(dataclasses.replace(stem, tensors=without, packed={}), x, "torch").double()
    border_err = (uncorrected - exact - (uncorrected - exact)[:, :, 3:-3, 3:-3].mean()).abs()[:, :, 0].max()
    assert border_err > 100 * 4e-6 * exact.abs().max()      # the table is what makes the border right
    if fastres.backend.interpreter_enabled() or torch.cuda.is_available():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        on = dataclasses.replace(stem, tensors={k: v.to(device) for k, v in stem.tensors.items()}, packed={})
        assert torch.equal(_run_step(on, x.to(device), "triton").cpu(), got)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_pixel_plan_against_fp32_and_the_integer_reference(dtype):
    """forward_uint8 against the fp32 model on the normalised images (as close as the float-input
    path); its stem's 8-bit output equal to the requantized exact stem (float64) nearly everywhere
    (an fp32 rounding may move a value by one step); the Triton path equal to the reference."""
    qmodel = pixel_model(dtype)
    model, _, _, _ = trained_digits_model()
    pixels = digit_pixels(16)
    x = normalise(pixels.permute(0, 3, 1, 2).float() / 255)
    with torch.no_grad(), fastres.use_backend("torch"):
        ref, got, float_path = model(x), qmodel.forward_uint8(pixels), qmodel(x)
    cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    assert cos >= 0.99 and (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert cos >= F.cosine_similarity(float_path.flatten(), ref.flatten(), dim=0).item() - 1e-3
    plan = qmodel.pixel_plan
    entry, stem = plan.steps[0], plan.steps[1]
    assert stem.tensors["weight"].dtype == torch.int8 and stem.attrs["out_dtype"] == EIGHT_BIT[dtype]
    stem_out = _run_step(stem, _run_step(entry, pixels.permute(0, 3, 1, 2), "torch"), "torch")
    exact = _exact_stem(stem, pixels, MEAN, STD).relu() * stem.attrs["out_inv_scale"]
    if dtype == "int8":
        expected = exact.clamp(-128, 127).round()
        diff = (stem_out.double() - expected).abs()
        assert diff.max() <= 1 and (diff == 0).double().mean() >= 0.999
    else:
        expected = exact.clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
        close = (stem_out.double() - expected).abs() <= 2.0 ** -3 * expected.abs() + 2.0 ** -9
        assert close.all() and (stem_out.double() == expected).double().mean() >= 0.999
    if fastres.backend.interpreter_enabled():
        with fastres.use_backend("triton"):
            assert (qmodel.forward_uint8(pixels[:3]) - got[:3]).abs().max() <= 1e-4 * got.abs().max()


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_uint8_engine_runs_the_pixel_stem(dtype, tmp_path):
    """The engine's uint8 input is the module's forward_uint8 (bit for bit, CPU path and, under
    the interpreter, the Triton kernels with padding into buckets), also from an export; other
    statistics than the folded ones take the normalised float input instead."""
    qmodel = pixel_model(dtype)
    pixels = digit_pixels(5)
    with fastres.use_backend("torch"):
        engine = Engine(qmodel, batch_sizes=BUCKETS, image_size=16, device="cpu")    # mean/std: the model's
        assert engine.pixel_stem and engine.plan is not qmodel.pixel_plan
        for n in BATCHES:
            expected = torch.cat([qmodel.forward_uint8(c) for c in pixels[:n].split(BUCKETS[-1])])
            assert torch.equal(engine(pixels[:n]), expected), f"batch {n}"
        loaded = fastres.load(fastres.export(qmodel, tmp_path / "q.safetensors"))
        assert loaded.pixel_stats == qmodel.pixel_stats
        reloaded = Engine(loaded, batch_sizes=BUCKETS, image_size=16)
        assert torch.equal(reloaded(pixels[:3]), qmodel.forward_uint8(pixels[:3]))
        other = Engine(qmodel, batch_sizes=BUCKETS, image_size=16, mean=IMAGENET[0], std=IMAGENET[1])
        assert not other.pixel_stem
        x = preprocess(pixels[:2], IMAGENET[0], IMAGENET[1], dtype=torch.float32, pad_channels_to=3)
        assert torch.equal(other(pixels[:2]), qmodel(x))
    if fastres.backend.interpreter_enabled():
        with fastres.use_backend("triton"):
            engine = Engine(qmodel, batch_sizes=BUCKETS, image_size=16, device="cpu")
            assert engine.pixel_stem and engine.executor == "static-buffers"
            expected = qmodel.forward_uint8(pixels[:3])
            assert torch.equal(engine(pixels[:3]), expected)          # 3 padded into the bucket of 4


def test_uint8_calibration_batches_are_normalised_like_the_engine():
    model, _, _, images_test = trained_digits_model()
    pixels = (images_test[:32] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    from_pixels = quantize(model, [pixels], progress=False, mean=MEAN, std=STD)
    from_floats = quantize(model, [preprocess(pixels, MEAN, STD, dtype=torch.float32, pad_channels_to=3)],
                           progress=False, mean=MEAN, std=STD)
    assert from_pixels.scales == from_floats.scales


def test_inspect_counts_the_pixel_input():
    """resnet50 at 224, batch 256: the int8 plan an engine runs on uint8 images reads 3 bytes a
    pixel and writes the stem's 4-byte bordered pixels; the issue's goal, <= 25 MB per image."""
    with torch.device("meta"):
        model = fastres.resnet50().eval()
    plan = shape_only_plan(model, "int8")
    assert plan.input_dtype == torch.uint8 and plan.steps[0].attrs["pixels"]
    with record_launches() as calls, torch.no_grad():
        x = torch.empty(2, 3, 224, 224, dtype=torch.uint8, device="meta").contiguous(memory_format=torch.channels_last)
        plan.run(x, fastres.backend.TritonBackend())
    stem = calls[0]
    assert "+offset" in stem.name and stem.constexprs["HAS_INPUT_OFFSET"] and stem.constexprs["ROW_K"]
    report = fastres.plan_report.inspect_arch("resnet50", batch=256, size=224, dtype="int8")
    entry = next(r for r in report["kernels"] if r["name"] == "quantize pixels")
    assert entry["bytes"] == 256 * (224 * 224 * 3 + 230 * 230 * 4)
    assert report["totals"]["bytes_per_image"] <= 25e6, report["totals"]


def test_aot_pixel_stem_compiles_without_spills_and_uses_8bit_mma():
    """The stem with the border offset (int8 x int8, int8 out; an fp8 model's: e4m3 out) for
    sm_80 and sm_90 at batch 32: no spills, IMMA / IGMMA .S8 main loop."""
    from fastres import aot
    stems = {}
    for dtype in ("int8", "fp8"):
        with torch.device("meta"):
            model = fastres.resnet50().eval()
        plan = shape_only_plan(model, dtype)
        entry, stem = plan.steps[0], plan.steps[1]
        pixels = torch.empty(32, 3, 224, 224, dtype=torch.uint8, device="meta").contiguous(
            memory_format=torch.channels_last)
        with record_launches() as calls, torch.no_grad():
            x = fastres.ir.OPS["quantize"].reference(entry, {"x": pixels}, None, False)
            fastres.backend.TritonBackend().run(stem, fastres.ir.OPS["qconv"], {"x": x}, None)
        assert len(calls) == 1 and calls[0].constexprs["HAS_INPUT_OFFSET"]
        stems[dtype] = calls
    rows = aot.aot_report({"int8": stems["int8"]}, (80, 90)) + aot.aot_report({"fp8": stems["fp8"]}, (90,))
    assert len(rows) == 2 and not [p for row in rows for p in row.problems()]
    entries = aot.loop_report(rows, (80, 90))
    assert len(entries) == 3
    for entry in entries:
        main = max(entry["k_loops"], key=lambda lp: lp["mma_count"])
        assert main["mma"].startswith({80: "IMMA.16832.S8.S8", 90: "IGMMA."}[entry["sm"]]), entry


def test_forged_pixel_entries_are_refused(tmp_path):
    from test_quantize import _forge

    from fastres.files import ExportFormatError
    path = fastres.export(pixel_model("int8"), tmp_path / "q.safetensors")

    def pixel(edit):
        def apply(plan, tensors):
            edit(plan["pixel"])
        return apply

    def drop_offset(p):
        del p["steps"][1]["tensors"]["input_offset"]

    def rename_output(p):
        p["steps"][1]["output"] = "elsewhere"

    def read_replaced(plan, tensors):
        plan["steps"][2]["inputs"] = {"x": plan["steps"][0]["output"]}

    def shrink_offset(plan, tensors):
        name = plan["pixel"]["steps"][1]["tensors"]["input_offset"]
        return dict(tensors, **{name: tensors[name][:-1].clone()})

    cases = [(pixel(drop_offset), "input_offset_padding exactly with an input_offset"),
             (pixel(rename_output), "writing the plan stem's output"),
             (pixel(lambda p: p.update(std=[0.5, 0.0, 0.5])), "std must be nonzero"),
             (pixel(lambda p: p.update(mean=[0.5, 0.5])), "mean must be 3"),
             (read_replaced, "reads a value it replaces"),
             (shrink_offset, r"input_offset must be float32 \[256, 64\]")]
    for edit, message in cases:
        with pytest.raises(ExportFormatError, match=message):
            fastres.load(_forge(tmp_path, path, edit))

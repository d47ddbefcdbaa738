"""fastres.Engine against the eval module and torchvision: buckets, uint8 input, metadata, threads,
bad input, memory layout. CPU tests use the torch backend (oneDNN executor); the Triton path runs
under TRITON_INTERPRET=1 at 16x16 on the small digits ResNet (or on CUDA with graphs when present).
"""
import threading

import pytest
import torch
import torchvision

import fastres
from fastres.backend import interpreter_enabled
from fastres.engine import Engine
from fastres.capture import capture
from fastres.ir import Plan
from fastres.verify import image_batch, randomize_norm_stats_

from digits import MEAN, STD, trained_digits_model

# (dtype, atol, rtol); atol relative to the largest reference logit
TOLERANCE = {
    torch.float32: (torch.float32, 1e-5, 1e-5),
    torch.float16: (torch.float16, 2e-2, 2e-2),
    torch.bfloat16: (torch.bfloat16, 1e-1, 5e-2),
}
BUCKETS = (1, 2, 4)
BATCHES = (1, 2, 3, 4, 5, 9)    # on, between and beyond the buckets


def assert_logits_close(got, expected, dtype=torch.float32):
    _, atol, rtol = TOLERANCE[dtype]
    scale = float(expected.abs().max())
    torch.testing.assert_close(got.float(), expected.float(), atol=atol * scale, rtol=rtol)


def reference(arch, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_norm_stats_(getattr(torchvision.models, arch)(**kwargs), seed).eval()


def uint8_images(n, size, seed=0):
    """Smooth uint8 RGB images [n, size, size, 3] (image-like, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (img * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def normalise_then(model, images, mean, std):
    """torchvision's way: uint8 HWC -> float CHW in 0-1 -> Normalize -> torchvision's forward
    (unfused, also for a fastres model)."""
    x = images.permute(0, 3, 1, 2).float() / 255
    x = torchvision.transforms.functional.normalize(x, list(mean), list(std))
    with torch.no_grad():
        return torchvision.models.ResNet.forward(model, x)


@pytest.fixture
def torch_backend():
    with fastres.use_backend("torch"):
        yield


# -- CPU: the oneDNN executor ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_cpu_engine_matches_eval_module(torch_backend, arch):
    tv = reference(arch, num_classes=37)
    module = fastres.from_torchvision(tv).eval()
    engine = Engine(tv, batch_sizes=BUCKETS, image_size=32, input="float_nchw")
    assert engine.executor == "onednn" and engine.device.type == "cpu"
    x = image_batch(max(BATCHES), 32, seed=1)
    with torch.no_grad():
        expected, tv_out = module(x), tv(x)
    assert_logits_close(expected, tv_out)   # the eval module itself is torchvision's answer
    for n in BATCHES:
        got = engine(x[:n])
        assert got.shape == (n, 37) and got.dtype == torch.float32
        assert_logits_close(got, expected[:n])
    # channels_last and float64 input are taken too
    assert_logits_close(engine(x[:3].contiguous(memory_format=torch.channels_last)), expected[:3])
    assert_logits_close(engine(x[:3].double()), expected[:3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_engine_half_precision(torch_backend, dtype):
    tv = reference("resnet18", num_classes=10)
    engine = Engine(tv, batch_sizes=(4,), image_size=32, input="float_nchw", dtype=dtype)
    assert engine.executor == "plan" and engine.plan.dtype == dtype
    x = image_batch(5, 32, seed=2)
    with torch.no_grad():
        expected = tv(x)
    got = engine(x)
    assert got.dtype == dtype
    assert_logits_close(got, expected, dtype)
    assert (got.float().argmax(1) == expected.argmax(1)).float().mean() >= 0.8


@pytest.mark.parametrize("mean, std", [(None, None), ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
def test_uint8_input_equals_normalise_then_model(torch_backend, mean, std):
    tv = reference("resnet18", num_classes=20)
    engine = Engine(tv, batch_sizes=BUCKETS, image_size=40, mean=mean, std=std)
    assert engine.input == "uint8_nhwc"
    images = uint8_images(5, 40)
    expected = normalise_then(tv, images, mean or fastres.IMAGENET_MEAN, std or fastres.IMAGENET_STD)
    assert_logits_close(engine(images), expected)
    assert_logits_close(engine(images.numpy()), expected)


# -- the Triton path (interpreter on CPU, CUDA graphs on a GPU) ------------------------------------
needs_triton = pytest.mark.skipif(not (interpreter_enabled() or torch.cuda.is_available()),
                                  reason="the Triton path needs TRITON_INTERPRET=1 or a CUDA device")


@pytest.fixture(scope="module")
def digits():
    model, x_test, _, images_test = trained_digits_model()
    return model, x_test, images_test


def triton_engine(model, device, **kwargs):
    with fastres.use_backend("triton"):
        return Engine(model, batch_sizes=BUCKETS, image_size=16, device=device, dtype=torch.float32, **kwargs)


@needs_triton
def test_triton_engine_matches_eval_module(digits, device):
    model, x_test, _ = digits
    engine = triton_engine(model, device, input="float_nchw")
    assert engine.backend == "triton"
    assert engine.executor == ("cuda-graphs" if device == "cuda" else "static-buffers")
    x = x_test[:6]
    with torch.no_grad(), fastres.use_backend("torch"):
        expected = model(x)
    for n in (1, 2, 3, 4, 6):        # every bucket, between (3), beyond (6 = 4 + 2)
        got = engine(x[:n].to(device))
        assert got.shape == (n, 10) and got.device.type == device
        assert_logits_close(got.cpu(), expected[:n])


@needs_triton
def test_triton_engine_uint8_input(digits, device):
    model, _, images_test = digits
    engine = triton_engine(model, device, mean=MEAN, std=STD)
    images = (images_test[:3] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    expected = normalise_then(model, images, MEAN, STD)
    assert_logits_close(engine(images).cpu(), expected)


# -- threads ----------------------------------------------------------------------------------------
def run_threads(engine, batches):
    """engine(batch) from one thread per batch, all started together; outputs in order."""
    results, errors = [None] * len(batches), []
    barrier = threading.Barrier(len(batches))

    def work(i):
        try:
            barrier.wait()
            results[i] = engine(batches[i])
        except Exception as err:   # re-raised in the test thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_threads_cpu(torch_backend):
    tv = reference("resnet18", num_classes=10)
    engine = Engine(tv, batch_sizes=BUCKETS, image_size=32, input="float_nchw")
    batches = [image_batch(n, 32, seed=10 + n) for n in (1, 3, 4, 5, 2, 4)]
    single = [engine(b) for b in batches]
    for _ in range(2):   # oneDNN may split work differently under concurrency: fp32 rounding only
        for got, expected in zip(run_threads(engine, batches), single):
            assert_logits_close(got, expected)


@needs_triton
def test_threads_static_buffers(digits, device):
    """Threads share one bucket's static buffers: the lock must keep their calls apart."""
    model, x_test, _ = digits
    engine = triton_engine(model, device, input="float_nchw")
    batches = [x_test[0:3].to(device), x_test[10:14].to(device), x_test[20:24].to(device)]
    with torch.no_grad(), fastres.use_backend("torch"):
        single = [model(b.cpu()) for b in batches]     # what one thread gets (test above)
    for got, expected in zip(run_threads(engine, batches), single):
        assert_logits_close(got.cpu(), expected)


# -- what the engine serves --------------------------------------------------------------------------
def test_engine_snapshots_weights(torch_backend):
    model = fastres.from_torchvision(reference("resnet18", num_classes=10)).eval()
    engine = Engine(model, batch_sizes=(2,), image_size=32, input="float_nchw")
    x = image_batch(2, 32)
    before = engine(x)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
        model.layer1[0].bn1.running_mean.add_(0.5)
        changed = model(x)
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(engine(x), before, atol=0, rtol=0)


def test_engine_from_export_uses_metadata(tmp_path, torch_backend):
    model, _, _, images_test = trained_digits_model()
    categories = [f"digit {i}" for i in range(10)]
    path = tmp_path / "digits.safetensors"
    fastres.export(model, path, dtype=torch.float32, categories=categories,
                   preprocess={"resize": 16, "crop": 16, "mean": MEAN, "std": STD})
    engine = Engine(path, batch_sizes=(8,), device="cpu")
    assert engine.image_size == 16 and engine.mean == tuple(MEAN) and engine.std == tuple(STD)
    assert engine.categories == categories
    images = (images_test[:5] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    expected = normalise_then(model, images, MEAN, STD)
    assert_logits_close(engine(images), expected)
    top = engine.classify(images, topk=3)
    probs = expected.softmax(-1)
    assert top.indices.shape == top.probs.shape == (5, 3)
    assert torch.equal(top.indices[:, 0], probs.argmax(-1))
    torch.testing.assert_close(top.probs, probs.gather(1, top.indices), atol=1e-5, rtol=1e-4)
    assert top.labels == [[categories[i] for i in row] for row in top.indices.tolist()]
    assert engine.classify(images, topk=50).indices.shape == (5, 10)   # capped at the classes
    # explicit arguments override the metadata
    other = Engine(path, batch_sizes=(8,), device="cpu", mean=(0.4, 0.4, 0.4), image_size=16)
    assert other.mean == (0.4, 0.4, 0.4) and other.std == tuple(STD)


def test_engine_uses_torchvision_weights_meta(torch_backend):
    """fastres.<arch>(weights=...) records meta like this; the engine takes it from the model."""
    model = fastres.from_torchvision(reference("resnet18", num_classes=3)).eval()
    model.meta.update(categories=["a", "b", "c"],
                      preprocess={"resize": 40, "crop": 32, "mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1]})
    engine = Engine(model, batch_sizes=(2,))
    assert engine.image_size == 32 and engine.mean == (0.1, 0.2, 0.3) and engine.categories == ["a", "b", "c"]
    assert engine.classify(uint8_images(2, 32), topk=1).labels[0][0] in ("a", "b", "c")
    plain = Engine(fastres.resnet18(num_classes=3).eval(), batch_sizes=(2,))
    assert plain.image_size == 224 and plain.mean == fastres.IMAGENET_MEAN
    assert plain.std == fastres.IMAGENET_STD and plain.categories is None
    assert plain.classify(uint8_images(1, 224), topk=2).labels is None


# -- bad input ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uint8_engine():
    with fastres.use_backend("torch"):
        return Engine(reference("resnet18", num_classes=10), batch_sizes=BUCKETS, image_size=32)


@pytest.fixture(scope="module")
def float_engine():
    with fastres.use_backend("torch"):
        return Engine(reference("resnet18", num_classes=10), batch_sizes=BUCKETS, image_size=32,
                      input="float_nchw")


U8 = uint8_images(2, 32)


@pytest.mark.parametrize("images, error, match", [
    (U8.float(), TypeError, "uint8 RGB images.*float32.*input='float_nchw'"),
    (U8[0], ValueError, r"shape \(32, 32, 3\).*unsqueeze"),
    (U8.permute(0, 3, 1, 2).contiguous(), ValueError, r"looks like \[N, 3, H, W\]"),
    (torch.zeros(2, 32, 32, 4, dtype=torch.uint8), ValueError, "3 channels last"),
    (uint8_images(2, 48), ValueError, "images are 48x48, this engine runs 32x32"),
    (torch.zeros(0, 32, 32, 3, dtype=torch.uint8), ValueError, "empty batch"),
    (uint8_images(2, 64)[:, ::2, ::2], ValueError, "must be contiguous"),
    (torch.zeros(2, 32, 32, 3, dtype=torch.uint8, device="meta"), ValueError, "on meta"),
    ([[1, 2, 3]], TypeError, "torch.Tensor"),
])
def test_bad_uint8_input(uint8_engine, images, error, match):
    expected = uint8_engine(U8)
    with pytest.raises(error, match=match):
        uint8_engine(images)
    torch.testing.assert_close(uint8_engine(U8), expected, atol=0, rtol=0)   # still usable


X = image_batch(2, 32)


@pytest.mark.parametrize("images, error, match", [
    (U8.permute(0, 3, 1, 2).contiguous(), TypeError, "torch.uint8.*input='uint8_nhwc'"),
    (X[:, :2], ValueError, "with 3 channels"),
    (X[0], ValueError, "unsqueeze"),
    (X[None], ValueError, "got shape"),
    (image_batch(1, 30), ValueError, "30x30"),
    (X[:0], ValueError, "empty batch"),
    (X.permute(0, 1, 3, 2), ValueError, "contiguous NCHW or channels_last"),
])
def test_bad_float_input(float_engine, images, error, match):
    expected = float_engine(X)
    with pytest.raises(error, match=match):
        float_engine(images)
    torch.testing.assert_close(float_engine(X), expected, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch_sizes=()), ValueError, "positive ints"),
    (dict(batch_sizes=(0, 4)), ValueError, "positive ints"),
    (dict(batch_sizes=("x",)), TypeError, "sequence of ints"),
    (dict(input="bgr"), ValueError, "input must be one of"),
    (dict(dtype=torch.float64), TypeError, "dtype must be one of"),
    (dict(dtype=torch.int8), TypeError, r"calibration images: qmodel = fastres.quantize"),
    (dict(image_size=0), ValueError, "image_size"),
    (dict(mean=(0.5, 0.5)), ValueError, "mean must be 3"),
    (dict(std=(0.5, 0.0, 0.5)), ValueError, "std must be nonzero"),
])
def test_bad_arguments(torch_backend, kwargs, error, match):
    with pytest.raises(error, match=match):
        Engine(fastres.resnet18(num_classes=4).eval(), **kwargs)


def test_bad_model_and_path(tmp_path):
    with pytest.raises(TypeError, match="ResNet module or the path"):
        Engine(42)
    with pytest.raises(TypeError, match="torchvision ResNet"):
        Engine(torch.nn.Linear(3, 3))
    with pytest.raises(FileNotFoundError, match="no fastres export"):
        Engine(tmp_path / "missing.safetensors")


def test_out_of_memory_names_the_bucket(monkeypatch, digits):
    """A CUDA OOM while building (simulated: the second bucket's buffers) says which and how much."""
    model, _, _ = digits
    if not (interpreter_enabled() or torch.cuda.is_available()):
        pytest.skip("the static-buffer path needs TRITON_INTERPRET=1 or a CUDA device")
    allocate = Plan.allocate
    calls = []

    def failing(plan, shape, **kwargs):
        calls.append(shape[0])
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return allocate(plan, shape, **kwargs)

    monkeypatch.setattr(Plan, "allocate", failing)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with pytest.raises(torch.OutOfMemoryError, match=r"batch bucket 2 .* needs \d+\.\d MiB") as info:
        triton_engine(model, device)
    assert "Buckets built before it: 1" in str(info.value)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


# -- activation memory ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_activation_layout_never_overwrites_a_live_value(arch):
    with torch.device("meta"):
        model = getattr(fastres, arch)().eval()
    plan = capture(model)
    shape = (3, 3, 64, 48)
    layout, slots = plan.memory_layout(shape)
    shapes = plan.value_shapes(shape)
    last_read = {}
    for i, step in enumerate(plan.steps):
        for name in step.reads:
            last_read[name] = i
    written = {}
    for i, step in enumerate(plan.steps):
        slot, value_shape, dtype = layout[step.output]
        assert value_shape == shapes[step.output] and dtype == plan.dtype
        assert slots[slot] >= torch.Size(value_shape).numel() * dtype.itemsize
        for name, (other_slot, _, _) in layout.items():
            alive = name in written and last_read.get(name, len(plan.steps)) >= i
            assert not (alive and other_slot == slot), f"{step.output} overwrites {name} at step {i}"
        written[step.output] = i
    assert len(slots) <= 4   # ResNets need 3: block input, a middle value, the next one
    everything = sum(torch.Size(s).numel() * plan.dtype.itemsize for k, s in shapes.items() if k != plan.input_name)
    assert sum(slots) < everything / 2


# -- CUDA ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_engine_fp16_and_streams():
    tv = reference("resnet50", num_classes=100).cuda()
    engine = Engine(tv, batch_sizes=(1, 8, 32), image_size=64)
    assert engine.executor == "cuda-graphs" and engine.dtype == torch.float16
    images = uint8_images(40, 64).cuda()
    expected = normalise_then(tv, images, fastres.IMAGENET_MEAN, fastres.IMAGENET_STD)
    for n in (1, 5, 8, 32, 40):
        assert_logits_close(engine(images[:n]), expected[:n], torch.float16)
    assert_logits_close(engine(images[:5].cpu()), expected[:5], torch.float16)   # CPU images copied over
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):      # a caller on another stream sees its own answers
        got = engine(images[:8])
    torch.cuda.current_stream().wait_stream(side)
    assert_logits_close(got, expected[:8], torch.float16)
    batches = [images[i:i + 5] for i in range(0, 40, 5)]
    for got, ref in zip(run_threads(engine, batches), [expected[i:i + 5] for i in range(0, 40, 5)]):
        assert_logits_close(got, ref, torch.float16)


def test_cpu_engine_on_the_reference_backend():
    """FASTRES_BACKEND=reference / use_backend("reference"): the engine runs the step references
    (it used to pass the CPU backend's thread keyword to a backend without it and raise)."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with fastres.use_backend("reference"):
        engine = Engine(tv, batch_sizes=(2,), image_size=32, input="float_nchw")
        assert engine.backend == "reference" and engine.executor == "plan"
        got = engine(x)
    with torch.no_grad():
        expected = tv(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()

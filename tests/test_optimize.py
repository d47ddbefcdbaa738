"""fastres.optimize on modules fastres did not write: several outputs (return_nodes), torchvision
backbones (IntermediateLayerGetter, BackboneWithFPN, a detector's backbone). Each is compared with
the module's own PyTorch eval forward (fp32, 1e-5 relative), on CPU with the torch backend."""
import warnings

import pytest
import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.feature_extraction import create_feature_extractor

import fastres
from fastres.capture import FallbackWarning
from fastres.verify import image_batch, randomize_norm_stats_
from kernel_testing import rel_err

TOL = 1e-5
# resnet50 body: 53 convs, 4 projections folded as concat-K, 7 3x3+1x1 pairs -> 42 steps; FPN: 8 convs
FASTERRCNN_FUSED = 42 + 8
RETURN = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}



@pytest.fixture(autouse=True)
def torch_backend():
    with fastres.use_backend("torch"), torch.no_grad():
        yield


def resnet(arch="resnet18", seed=0):
    torch.manual_seed(seed)
    return randomize_norm_stats_(getattr(fastres, arch)(), seed).eval()


def no_fallback(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        return fn(*args)


def assert_same_maps(got: dict, expected: dict):
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape
        assert got[key].is_contiguous(memory_format=torch.channels_last), key
        assert rel_err(got[key], expected[key]) <= TOL, key


def test_return_nodes_matches_create_feature_extractor():
    model = resnet()
    x = image_batch(2, 64)
    fast = fastres.optimize(model, return_nodes=RETURN)
    got = no_fallback(fast, x)
    assert_same_maps(got, create_feature_extractor(model, RETURN)(x))
    plan = fast.plan()
    assert sorted(plan.output) == sorted(RETURN.values())
    # the head is cut away; every step is a fused kernel (stem conv + pool, 16 block convs)
    assert [s.kind for s in plan.steps].count("conv") == 17 and len(plan.steps) == 18
    # the plain module still returns logits
    assert model(x).shape == (2, 1000)


def test_return_nodes_inner_node_and_list():
    model = resnet("resnet50")
    x = image_batch(1, 32)
    nodes = ["layer1.0.relu_2", "layer3"]     # a node inside a block, and a stage
    got = no_fallback(fastres.optimize(model, return_nodes=nodes), x)
    assert_same_maps(got, create_feature_extractor(model, nodes)(x))


def test_return_nodes_unknown_node_is_an_error():
    with pytest.raises(ValueError, match="layer9"):
        fastres.optimize(resnet(), return_nodes={"layer9": "x"})


def test_return_nodes_fallback_returns_the_same_dict():
    model = resnet()
    x = image_batch(2, 32)
    fast = fastres.optimize(model, return_nodes=RETURN)
    expected = create_feature_extractor(model, RETURN)(x)
    model.layer2.register_forward_hook(lambda m, i, o: o * 2)   # the plan cannot run hooks
    with pytest.warns(FallbackWarning, match="hook"):
        got = fast(x)
    assert rel_err(got["c2"], expected["c2"]) <= TOL
    assert rel_err(got["c3"], 2 * expected["c3"]) <= TOL
    assert got["c5"].is_contiguous(memory_format=torch.channels_last)


def test_example_input_builds_the_plan_now():
    model = resnet()
    fast = fastres.optimize(model, example_input=image_batch(1, 32))
    assert fast._fastres.builds == 1
    x = image_batch(2, 32, seed=1)
    assert rel_err(no_fallback(fast, x), model(x)) <= TOL
    assert fast._fastres.builds == 1


def test_intermediate_layer_getter_on_a_fastres_resnet():
    body = IntermediateLayerGetter(resnet(), {"layer2": "0", "layer4": "1"}).eval()
    x = image_batch(2, 64)
    fast = fastres.optimize(body)
    assert_same_maps(no_fallback(fast, x), body(x))
    assert all(s.kind != "torch" for s in fast.plan().steps)


def test_backbone_with_fpn_on_a_fastres_resnet():
    torch.manual_seed(0)
    backbone = BackboneWithFPN(resnet(), {"layer2": "0", "layer3": "1", "layer4": "2"},
                               in_channels_list=[128, 256, 512], out_channels=32).eval()
    x = image_batch(2, 64)
    fast = fastres.optimize(backbone)
    assert fast.out_channels == 32            # what a detector reads off its backbone
    assert_same_maps(no_fallback(fast, x), backbone(x))
    kinds = [s.kind for s in fast.plan().steps]
    # body: 17 convs + pool; FPN: 3 lateral 1x1 + 3 output 3x3 convs are kernels too
    assert kinds.count("conv") == 17 + 6 and kinds.count("max_pool") == 1


def test_fasterrcnn_backbone():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    randomize_norm_stats_(detector.backbone)
    x = image_batch(1, 64)
    expected = detector.backbone(x)
    fast = fastres.optimize(detector.backbone)
    assert_same_maps(no_fallback(fast, x), expected)
    plan = fast.plan()
    fused = sum(s.kind in ("conv", "conv_pair") for s in plan.steps)
    assert fused == FASTERRCNN_FUSED, [s for s in plan.steps if s.kind == 'torch']
    # the detector runs with the optimized backbone in place
    detector.backbone = fast
    images = [torch.rand(3, 64, 64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        out = detector(images)
    assert isinstance(out, list) and set(out[0]) == {"boxes", "labels", "scores"}


def test_optimize_keeps_submodule_modes_and_rejects_non_modules():
    model = resnet()
    bn = model.layer1[0].bn1
    bn.train()
    bn.momentum = 0.0                 # batch statistics in the forward, running ones unchanged
    fast = fastres.optimize(model)
    assert bn.training and not fast.training
    x = image_batch(2, 32)
    assert rel_err(no_fallback(fast, x), model(x)) <= TOL
    assert any(n.startswith("layer1.0.bn1: BatchNorm2d") for n in fast.plan().notes)
    with pytest.raises(TypeError):
        fastres.optimize(lambda x: x)
    assert fastres.optimize(fast) is fast


def test_optimized_copies_and_pickles_with_its_return_nodes():
    import copy
    import io

    model = resnet()
    fast = fastres.optimize(model, return_nodes={"layer3": "c4"})
    x = image_batch(1, 32)
    expected = fast(x)["c4"]
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(fast), torch.load(buffer, weights_only=False)):
        assert other.return_nodes == {"layer3": "c4"} and other.module is not model
        assert torch.equal(no_fallback(other, x)["c4"], expected)

"""torchvision's own classification-model checks (its test/test_models.py: test_classification_model
and the helpers it calls, test_resnet_dilation) run against the ten fastres constructors.

Instead of torchvision's recorded .pkl outputs, every fastres model is compared with the torchvision
model of the same architecture holding the same weights (non-default BatchNorm statistics), in eval
mode. Inputs are small (1x3x32x32, 10 classes) to keep CPU time low.
The checks are written as torchvision's are meant: a drop-in model passes all of them.
"""
import copy
import io
import pickle

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fastres
from fastres.verify import randomize_norm_stats_

ARCHS = list(fastres.ARCHITECTURES)
NUM_CLASSES = 10
INPUT_SHAPE = (1, 3, 32, 32)   # layer4 at 1x1, as small as the network allows without padding


@pytest.fixture(autouse=True)
def torch_backend():
    with fastres.use_backend("torch"):
        yield


@pytest.fixture(scope="module", params=ARCHS)
def twins(request):
    """(arch, torchvision model, fastres model, x, torchvision's eval output): same weights, eval.
    Module-scoped and parametrized, so pytest keeps one architecture's pair alive at a time."""
    arch = request.param
    torch.manual_seed(0)
    reference = randomize_norm_stats_(getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)).eval()
    with torch.device("meta"):
        model = getattr(fastres, arch)(num_classes=NUM_CLASSES)
    model.load_state_dict({k: v.clone() for k, v in reference.state_dict().items()}, assign=True)
    model.eval()
    x = torch.rand(INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
    return arch, reference, model, x, expected


def _close(got, expected, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(got, expected, atol=atol * float(expected.abs().max()), rtol=rtol)


# -- test_classification_model: output ------------------------------------------------------------
def test_output_shape_and_values(twins):
    arch, reference, model, x, expected = twins
    assert isinstance(model, torchvision.models.ResNet)
    out = model(x)                      # torchvision calls the eval model without no_grad
    assert out.shape == (1, NUM_CLASSES)
    _close(out.detach(), expected, atol=1e-5)


# -- _check_jit_scriptable ----------------------------------------------------------------------------
def test_jit_scriptable(twins, tmp_path):
    arch, reference, model, x, expected = twins
    scripted = torch.jit.script(model)
    with torch.no_grad():
        eager_out = model(x)
        script_out = scripted(x)
    _close(script_out, eager_out)
    _close(script_out, expected)
    path = tmp_path / "script.pt"
    scripted.save(str(path))
    imported = torch.jit.load(str(path))
    with torch.no_grad():
        _close(imported(x), script_out, atol=3e-4, rtol=3e-4)


# -- _check_fx_compatible (+ torchvision's feature extraction, which is built on fx) ----------------
def test_fx_compatible(twins):
    arch, reference, model, x, expected = twins
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        eager_out = model(x)
        fx_out = traced(x)
    torch.testing.assert_close(fx_out, eager_out)
    _close(fx_out, expected)
    # the traced graph is torchvision's: same module calls in the same order
    reference_traced = torch.fx.symbolic_trace(reference)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == \
        [n.target for n in reference_traced.graph.nodes if n.op == "call_module"]


def test_feature_extraction(twins):
    arch, reference, model, x, expected = twins
    assert get_graph_node_names(model) == get_graph_node_names(reference)
    nodes = {"layer2": "mid", "layer4": "last", "fc": "logits"}
    ours = create_feature_extractor(model, return_nodes=nodes)
    theirs = create_feature_extractor(reference, return_nodes=nodes)
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert list(got) == ["mid", "last", "logits"]
    for key in want:
        assert got[key].shape == want[key].shape, key
        _close(got[key], want[key])


# -- _check_input_backprop ----------------------------------------------------------------------------
def test_input_backprop(twins):
    arch, reference, model, x, expected = twins
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    model(ours)[0].sum().backward()
    reference(theirs)[0].sum().backward()
    assert ours.grad is not None
    _close(ours.grad, theirs.grad)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)


# -- the model as an object: pickle, torch.save, deepcopy, jit.trace -------------------------------
def test_pickle_round_trip_after_forward(twins):
    arch, reference, model, x, expected = twins
    with torch.no_grad():
        before = model(x)               # after a forward: whatever the model caches must pickle
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), before, atol=0, rtol=0)


def test_torch_save_whole_model(twins, tmp_path):
    arch, reference, model, x, expected = twins
    with torch.no_grad():
        before = model(x)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert isinstance(loaded, fastres.ResNet) and loaded.arch == model.arch
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), before, atol=0, rtol=0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    assert set(torch.load(buffer, weights_only=True)) == set(reference.state_dict())


def test_deepcopy_after_forward_is_independent(twins):
    arch, reference, model, x, expected = twins
    with torch.no_grad():
        before = model(x)
        clone = copy.deepcopy(model)
        torch.testing.assert_close(clone(x), before, atol=0, rtol=0)
        clone.fc.bias.add_(1.0)
        torch.testing.assert_close(clone(x), before + 1.0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_jit_trace_follows_weight_edits(twins):
    """A traced torchvision model shares its parameters with the module: later in-place edits of
    the weights show in the traced module's output. The same must hold for fastres."""
    arch, reference, model, x, expected = twins
    with torch.no_grad():
        # check_trace=False: the outputs are compared below (the re-run check doubles the time)
        traced = torch.jit.trace(model, x, check_trace=False)
        traced_reference = torch.jit.trace(reference, x, check_trace=False)
        _close(traced(x), expected)
        try:
            for m in (model, reference):
                m.conv1.weight.mul_(0.5)            # the stem: every later value changes
                m.layer4[0].conv1.weight.mul_(2.0)
            edited = traced_reference(x)
            assert float((edited - expected).abs().max()) > 1e-2 * float(expected.abs().max())
            _close(traced(x), edited)
        finally:
            for m in (model, reference):
                m.conv1.weight.mul_(2.0)
                m.layer4[0].conv1.weight.mul_(0.5)


def test_cpu_autocast_as_torchvision(twins):
    """torchvision's harness runs the model under autocast (on CUDA); on CPU, bfloat16 autocast."""
    arch, reference, model, x, expected = twins
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(x)
        got = model(x)
    assert got.dtype == want.dtype == torch.bfloat16
    _close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


# -- test_resnet_dilation -------------------------------------------------------------------------------
@pytest.mark.parametrize("dilate", [(a, b, c) for a in (False, True) for b in (False, True) for c in (False, True)])
def test_resnet_dilation(dilate):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(replace_stride_with_dilation=list(dilate)).eval()
    with torch.device("meta"):
        model = fastres.resnet50(replace_stride_with_dilation=list(dilate))
    model.load_state_dict(reference.state_dict(), assign=True)
    model.eval()
    sliced = torch.nn.Sequential(*[m for name, m in model.named_children() if name not in ("avgpool", "fc")])
    with torch.no_grad():
        out = sliced(torch.rand(1, 3, 32, 32))
    f = 2 ** sum(dilate)
    assert out.shape == (1, 2048, f, f)     # torchvision's check at 224x224: (1, 2048, 7 * f, 7 * f)
    assert model.config["replace_stride_with_dilation"] == list(dilate)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():   # and the whole model still gives torchvision's answer
        _close(model(x), reference(x), atol=1e-5)


def test_constructors_are_torchvision_builders():
    """torchvision.models.get_model_weights / the builder signature work on every constructor."""
    for arch in ARCHS:
        builder = getattr(fastres, arch)
        assert torchvision.models.get_model_weights(builder) is \
            torchvision.models.get_model_weights(getattr(torchvision.models, arch))
        assert builder.__name__ == arch and "weights" in builder.__doc__

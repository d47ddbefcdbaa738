"""The plan guard (fastres/guard.py): every change that can alter a forward invalidates it, nothing
else does, and the C++ check (fastres._guard) agrees with the Python one on each."""
import os

import pytest
import torch
import torchvision
from torch import nn

from fastres.guard import Guard, native_guard_available


def _model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


def _mutations():
    def attribute(m):
        m.layer1[0].conv1.padding = (2, 2)

    def same_value_new_object(m):
        m.layer1[0].conv1.stride = (1, 1)

    def eps(m):
        m.bn1.eps = 1e-3

    def training_flag(m):
        m.layer2[0].bn2.train()

    def submodule(m):
        m.relu = nn.ReLU()

    def sequential_item(m):
        m.layer3[1] = nn.Identity()

    def add_module(m):
        m.add_module("extra", nn.ReLU())

    def instance_forward(m):
        m.layer4[0].forward = lambda x: x

    def class_swap(m):
        class Other(nn.ReLU):
            pass
        m.relu.__class__ = Other

    def forward_hook(m):
        m.layer1.register_forward_hook(lambda *a: None)

    def pre_hook(m):
        m.fc.register_forward_pre_hook(lambda *a: None)

    def global_hook(m):
        m._handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)

    def in_place(m):
        with torch.no_grad():
            m.conv1.weight.add_(1)

    def buffer_in_place(m):
        m.layer1[0].bn1.running_var.mul_(2)

    def param_assignment(m):
        m.fc.weight = nn.Parameter(m.fc.weight.detach().clone())

    def data_assignment(m):
        m.fc.bias.data = m.fc.bias.data.clone()

    def dtype(m):
        m.half()

    def load_state_dict(m):
        m.load_state_dict(m.state_dict())

    def register_buffer(m):
        m.fc.register_buffer("scale", torch.ones(1))

    def delete_attribute(m):
        del m.layer1[0].conv1.padding_mode

    return [attribute, same_value_new_object, eps, training_flag, submodule, sequential_item,
            add_module, instance_forward, class_swap, forward_hook, pre_hook, global_hook,
            in_place, buffer_in_place, param_assignment, data_assignment, dtype, load_state_dict,
            register_buffer, delete_attribute]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_every_mutation_invalidates(mutate):
    model = _model()
    guard = Guard(model)
    assert guard.check() and guard.check_python()
    try:
        mutate(model)
        assert not guard.check_python()
        assert not guard.check()
    finally:
        handle = model.__dict__.get("_handle")
        if handle is not None:
            handle.remove()


def test_forwards_and_unrelated_objects_do_not_invalidate():
    model = _model()
    guard = Guard(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        other = torchvision.models.resnet18()
        other.fc = nn.Linear(512, 3)
        other.conv1.weight.add_(1)
    assert guard.check() and guard.check_python()


def test_a_method_added_to_the_class_invalidates():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x)

    model = nn.Sequential(Block())
    guard = Guard(model)
    Block.forward = lambda self, x: self.conv(x) * 2
    assert not guard.check() and not guard.check_python()


def test_a_model_made_under_inference_mode_is_guarded_by_identity():
    """Inference tensors have no version counter: both guards read one as -1 (no crash), and still
    see a parameter replaced or reshaped (their in-place edits are invisible, which is why the
    drop-in module runs PyTorch's forward for such a model: tests/test_drop_in.py)."""
    with torch.inference_mode():
        model = _model()
    guard = Guard(model)
    assert guard.check() and guard.check_python()
    with torch.inference_mode():
        model.fc.weight.mul_(2)             # in place, no version bump: not seen
    assert guard.check() and guard.check_python()
    with torch.inference_mode():
        model.fc.weight = nn.Parameter(torch.zeros_like(model.fc.weight))
    assert not guard.check() and not guard.check_python()


def test_native_guard_is_built_with_the_extension():
    if os.environ.get("FASTRES_REQUIRE_CUDA_BUILD") == "1":
        assert native_guard_available()   # `make test` builds both extensions
    elif not native_guard_available():
        pytest.skip("fastres._guard was not built (pip install --no-build-isolation -e .)")
    assert Guard(_model())._native is not None


def test_a_dropped_model_is_freed():
    """The guard's snapshot holds the model's dicts and the model holds the snapshot (through its
    plan cache): the cycle must be visible to the garbage collector, or every model leaks."""
    import gc
    import weakref

    import fastres
    model = fastres.resnet18(num_classes=3).eval()
    fast = fastres.optimize(torchvision.models.resnet18(num_classes=3)).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32)), fast(torch.randn(1, 3, 32, 32))
    refs = [weakref.ref(model), weakref.ref(fast), weakref.ref(model._fastres._state.guard)]
    del model, fast
    gc.collect()
    assert all(r() is None for r in refs)

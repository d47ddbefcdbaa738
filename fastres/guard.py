"""The guard of a captured plan: everything about a module that can change what its forward computes.

A ``Guard`` is a snapshot, taken before any weight is read, of

* every submodule's attribute dict (``__dict__``: conv geometry, pool parameters, BN eps and
  momentum, ``training``, an instance-level ``forward``, any attribute a user forward reads), its
  ``_modules``, ``_parameters`` and ``_buffers`` dicts (a replaced, added or removed submodule or
  tensor) and its hook dicts, compared entry by entry by identity (keys and values, in order);
* the class of every submodule and the dicts of the classes it inherits from below ``nn.Module``
  (``m.__class__ = ...``, a monkeypatched ``forward``);
* every parameter and buffer's storage, offset, dtype, device, shape and version counter (an
  in-place update, ``load_state_dict``, an optimizer step, ``.data = ...``, ``.to()``);
* the global module hook dicts.

``check()`` answers whether all of it is unchanged. Identity comparison is conservative:
re-assigning an equal value (``conv.padding = (1, 1)``) also counts as a change, which only costs
a rebuild. Writes *through* ``.data`` (``p.data.mul_(2)``) bump no version counter of ``p`` and
stay invisible: call the model's ``plan_cache_clear()`` after them.

The check runs on every forward, so it is flat (everything gathered at snapshot time) and, when
the compiled extension ``fastres._guard`` is present, one C++ loop over the whole snapshot (a few
microseconds for resnet50; ``bench/`` measures it). Without the extension the same check runs in
Python.
"""
from __future__ import annotations

import gc

import torch
from torch import nn

__all__ = ["Guard", "native_guard_available"]

# (the *_with_kwargs / *_always_called dicts only ever hold keys of hooks in these)
_STRUCTURE_DICTS = ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks",
                    "_backward_hooks", "_backward_pre_hooks")


def _native():
    try:
        from . import _guard
    except ImportError:
        return None
    return _guard


_NATIVE = _native()


def native_guard_available() -> bool:
    return _NATIVE is not None


def _class_dict(cls) -> dict:
    """The real dict behind ``cls.__dict__`` (a read-only mappingproxy over it)."""
    return next(r for r in gc.get_referents(cls.__dict__) if isinstance(r, dict))


def _global_hook_dicts() -> list:
    m = torch.nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
             "_global_module_registration_hooks", "_global_parameter_registration_hooks",
             "_global_buffer_registration_hooks")
    return [getattr(m, n) for n in names if isinstance(getattr(m, n, None), dict)]


class Guard:
    """A snapshot of everything that changes ``module``'s forward; ``check()`` -> still valid."""

    def __init__(self, module: nn.Module):
        dicts: list[dict] = list(_global_hook_dicts())
        objects, types, tensors = [], [], []
        seen_classes: set = set()
        for m in module.modules():
            dicts.append(m.__dict__)
            for name in _STRUCTURE_DICTS:
                d = m.__dict__.get(name)
                if isinstance(d, dict):
                    dicts.append(d)
            objects.append(m)
            types.append(type(m))
            for cls in type(m).__mro__:
                if cls in (nn.Module, object) or cls in seen_classes:
                    continue
                seen_classes.add(cls)
                dicts.append(_class_dict(cls))
            tensors += [t for t in m._parameters.values() if t is not None]
            # integer buffers (BatchNorm's num_batches_tracked) never change an eval result
            tensors += [t for t in m._buffers.values() if t is not None and t.is_floating_point()]
        tensors = list({id(t): t for t in tensors}.values())
        self._dicts = dicts
        self._dict_items = [tuple(d.items()) for d in dicts]
        self._objects, self._types = objects, types
        self._tensors = tensors
        self._tensor_state = [_tensor_state(t) for t in tensors]
        self._native = (_NATIVE.Snapshot(dicts, objects, types, tensors)
                        if _NATIVE is not None else None)

    def check(self) -> bool:
        if self._native is not None:
            return self._native.check()
        return self.check_python()

    def check_python(self) -> bool:
        """The same check in plain Python (what runs without the extension; tests compare both)."""
        for d, items in zip(self._dicts, self._dict_items):
            if len(d) != len(items):
                return False
            for (k, v), (k0, v0) in zip(d.items(), items):
                if k is not k0 or v is not v0:
                    return False
        for obj, cls in zip(self._objects, self._types):
            if type(obj) is not cls:
                return False
        return all(_tensor_state(t) == s for t, s in zip(self._tensors, self._tensor_state))


def _tensor_state(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
    version = -1 if t.is_inference() else t._version     # (no version counter: csrc/guard.cpp)
    return (version, storage, t.storage_offset(), t.dtype, t.device, tuple(t.shape))

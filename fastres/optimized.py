"""``fastres.optimize``: any residual CNN's eval forward through the fused plan.

    fast = fastres.optimize(my_resnet).eval()
    with torch.inference_mode():
        y = fast(x)          # what my_resnet(x) computes in eval mode

    body = fastres.optimize(resnet, return_nodes={"layer1": "c2", "layer2": "c3",
                                                  "layer3": "c4", "layer4": "c5"})
    feats = body(x)          # {"c2": ..., "c5": ...}, channels_last feature maps

The wrapped module keeps its parameters (they are shared, not copied): training it, editing it
or hooking it is seen by the next forward (``fastres.capture``'s guard), and whatever the plan
cannot reproduce exactly runs the module's own forward with a one-time warning. Attributes the
wrapper does not have are read from the wrapped module (``backbone.out_channels``), so an
optimized backbone can replace the original inside a detector.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .capture import FastPath, feature_extractor, is_graph_capture, normalize_return_nodes

__all__ = ["optimize", "Optimized"]


class Optimized(nn.Module):
    """``module`` with its eval forward captured into a fused plan (see ``fastres.optimize``)."""

    def __init__(self, module: nn.Module, return_nodes: Optional[dict] = None):
        super().__init__()
        self.module = module
        self.return_nodes = normalize_return_nodes(return_nodes)
        self._fastres = FastPath(self.return_nodes)
        self.training = module.training     # not .train(): that would reset submodules' modes

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(super().__getattr__("module"), name)

    def forward(self, x: torch.Tensor):
        if self.training or torch.jit.is_scripting():
            return self._pytorch_forward(x)
        return self._eval_forward(x)

    @torch.jit.unused
    def _pytorch_forward(self, x):
        """The module's own forward; with ``return_nodes``, cut there (rebuilt per call: it is
        the fallback, and it must follow any edit of the module)."""
        if self.return_nodes is None:
            return self.module(x)
        return _channels_last(feature_extractor(self.module, self.return_nodes)(x))

    @torch.jit.unused
    def _eval_forward(self, x: torch.Tensor):
        if is_graph_capture():
            return self._pytorch_forward(x)
        y = self._fastres(self.module, x, self._pytorch_forward)
        return _channels_last(y) if self.return_nodes is not None else y

    def plan(self):
        """The current plan of the wrapped module (``fastres.capture.Unsupported`` says why not)."""
        return self._fastres.plan(self.module)


def _channels_last(outputs):
    if isinstance(outputs, dict):
        return type(outputs)((k, _channels_last(v)) for k, v in outputs.items())
    if torch.is_tensor(outputs) and outputs.dim() == 4:
        return outputs.contiguous(memory_format=torch.channels_last)
    return outputs


def optimize(model: nn.Module, *, example_input: Optional[torch.Tensor] = None,
             return_nodes=None) -> Optimized:
    """A module computing exactly what ``model`` computes, through the fused plan in eval mode.

    ``example_input``: a batch like the ones to come; the plan is built, its weights packed and
    its kernels compiled by one forward on it now instead of on the first call.
    ``return_nodes``: torchvision ``create_feature_extractor``'s convention (a list of node names
    or {node: key}, e.g. ``{"layer4": "c5"}``); the module returns a dict of those values, feature
    maps in channels_last memory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.optimize takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, Optimized):
        if return_nodes is None or normalize_return_nodes(return_nodes) == model.return_nodes:
            optimized = model
        else:
            optimized = Optimized(model.module, return_nodes)
    else:
        optimized = Optimized(model, return_nodes)
    if return_nodes is not None:
        feature_extractor(model if not isinstance(model, Optimized) else model.module,
                          return_nodes)   # a query that names nothing fails here, not at the first call
    if example_input is not None:
        if not torch.is_tensor(example_input):
            raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
        with torch.no_grad():
            if optimized.training:
                optimized._fastres.state(optimized.module)     # capture now, run later
            else:
                optimized(example_input)
    return optimized

"""``fastres.optimize``: any residual CNN's eval forward through the fused plan.

    fast = fastres.optimize(my_resnet).eval()
    with torch.inference_mode():
        y = fast(x)          # what my_resnet(x) computes in eval mode

The wrapped module keeps its parameters (they are shared, not copied): training it, editing it
or hooking it is seen by the next forward (``fastres.capture``'s guard), and whatever the plan
cannot reproduce exactly runs the module's own forward with a one-time warning.
"""
from __future__ import annotations

import torch
from torch import nn

from .capture import FastPath, is_graph_capture

__all__ = ["optimize", "Optimized"]


class Optimized(nn.Module):
    """``module`` with its eval forward captured into a fused plan (see ``fastres.optimize``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._fastres = FastPath()
        self.train(module.training)

    def forward(self, x: torch.Tensor):
        if self.training or torch.jit.is_scripting():
            return self.module(x)
        return self._eval_forward(x)

    @torch.jit.unused
    def _eval_forward(self, x: torch.Tensor):
        if is_graph_capture():
            return self.module(x)
        return self._fastres(self.module, x, self.module)

    def plan(self):
        """The current plan of the wrapped module (``fastres.capture.Unsupported`` says why not)."""
        return self._fastres.plan(self.module)


def optimize(model: nn.Module) -> Optimized:
    """A module computing exactly what ``model`` computes, through the fused plan in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.optimize takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, Optimized):
        return model
    return Optimized(model)

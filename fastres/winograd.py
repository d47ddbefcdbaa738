"""Winograd F(2x2, 3x3) convolutions for the CPU backend (float32, NHWC).

A 3x3 stride-1 convolution computes each 2x2 output tile from a 4x4 input tile; in Winograd's
form that is 16 products per (input, output) channel pair instead of 36, as 16 independent GEMMs
``V[k] @ U[k]`` between an input transform ``V = B^T d B`` and an output transform
``Y = A^T M A`` (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). The
transforms run in the C++ extension ``fastres._cpu`` (csrc/winograd_cpu.cpp, which also
applies bias, residual and ReLU in oneDNN's order), the GEMMs in PyTorch's ``bmm``; the weight
transform ``U = G g G^T`` is made once per program here, in float64.

Numerics: F(2x2, 3x3)'s transforms have coefficients 0, +-1 and +-1/2, so the results differ
from a direct convolution's by a few float32 roundings more (the tests bound it against F.conv2d
and against ``reference``, this algorithm in float64). Where it runs is ``CpuBackend``'s choice
(``fastres.backend.winograd_rule`` for the shapes, ``winograd_pays`` timing it against the direct
conv on this machine): a speed choice, never a different answer beyond that.
"""
from __future__ import annotations

import torch

# the compiled fastres._cpu (its conv3x3), shared with the other CPU kernels
from .cpu_kernels import available, extension, unavailable_reason  # noqa: F401

# F(2x2, 3x3) (Lavin & Gray, eq. 8)
B_T = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
A_T = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [O, C, 3, 3] -> U [16, C, O] float32 (``U[4a+b] = (G g G^T)[a, b]``), computed in
    float64 and rounded once."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"Winograd F(2x2, 3x3) takes a [O, C, 3, 3] weight, got {tuple(weight.shape)}")
    g = weight.detach().to(torch.float64)
    u = torch.einsum("ap,ocpq,bq->abco", G, g, G)             # [4, 4, C, O]
    return u.reshape(16, g.shape[1], g.shape[0]).to(torch.float32).contiguous()


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, residual: "torch.Tensor | None" = None,
            relu: bool = False) -> torch.Tensor:
    """``relu?(conv2d(x, w, bias, padding=1) + residual)`` for ``u = transform_weight(w)``: x and
    residual channels_last float32 CPU tensors; the output is channels_last."""
    ext = extension()
    if ext is None:
        raise RuntimeError(unavailable_reason())
    return ext.conv3x3(x, u, bias, residual, relu)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None,
              residual: "torch.Tensor | None" = None, relu: bool = False) -> torch.Tensor:
    """The same algorithm in float64 with PyTorch ops (tiles by ``unfold``): what the C++ transforms
    are checked against, independently of their loops."""
    n, c, h, w = x.shape
    th, tw = -(-h // 2), -(-w // 2)
    xd = torch.nn.functional.pad(x.to(torch.float64), (1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
    d = xd.unfold(2, 4, 2).unfold(3, 4, 2)                      # [N, C, th, tw, 4, 4]
    v = torch.einsum("ap,nctwpq,bq->abnctw", B_T, d, B_T)        # B^T d B
    g = weight.to(torch.float64)
    u = torch.einsum("ap,ocpq,bq->abco", G, g, G)
    m = torch.einsum("abnctw,abco->abnotw", v, u)
    y = torch.einsum("ua,abnotw,vb->notuwv", A_T, m, A_T)        # [N, O, th, 2, tw, 2]
    y = y.reshape(n, -1, 2 * th, 2 * tw)[:, :, :h, :w]
    if bias is not None:
        y = y + bias.to(torch.float64).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(torch.float64)
    return y.relu() if relu else y

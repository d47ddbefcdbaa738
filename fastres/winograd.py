"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions for the CPU backend (float32, NHWC).

A 3x3 stride-1 convolution computes each side x side output tile from a (side + 2)^2 input
tile; in Winograd's form that is (side + 2)^2 products per (input, output) channel pair instead
of 9 side^2 (F(2x2): 16 for 36, F(4x4): 36 for 144), as independent GEMMs ``V[k] @ U[k]``
between an input transform ``V = B^T d B`` and an output transform ``Y = A^T M A`` (Lavin &
Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). The transforms run in the C++
extension ``fastres._cpu`` (csrc/winograd_cpu.cpp, which also applies bias, residual and ReLU in
oneDNN's order), the GEMMs in PyTorch's ``bmm``; the weight transform ``U = G g G^T`` is made once
per program here, in float64.

Numerics: F(2x2, 3x3)'s transforms have coefficients 0, +-1 and +-1/2, so the results differ
from a direct convolution's by a few float32 roundings more; F(4x4, 3x3)'s multiply by up to 5
(input) and 8 (output), so its convs are about ten times further (the tests bound both against
F.conv2d and against ``reference``, this algorithm in float64). Where each runs is
``CpuBackend``'s choice (``fastres.backend.winograd_sides`` for the shapes, ``winograd_choice``
timing them against the direct conv on this machine): a speed choice, never a different answer
beyond that.
"""
from __future__ import annotations

import torch

# the compiled fastres._cpu (its conv3x3), shared with the other CPU kernels
from .cpu_kernels import available, extension, unavailable_reason  # noqa: F401

# The transforms per output tile side: F(2x2, 3x3) (Lavin & Gray, eq. 8) and F(4x4, 3x3) (their
# section 4.2, points 0, +-1, +-2): (B^T, G, A^T)
_F2 = (torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64),
       torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64),
       torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64))
_F4 = (torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                     [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64),
       torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                     [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64),
       torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                    dtype=torch.float64))
TRANSFORMS = {2: _F2, 4: _F4}


def transform_weight(weight: torch.Tensor, side: int = 2) -> torch.Tensor:
    """``weight`` [O, C, 3, 3] -> U [(side + 2)^2, C, O] float32 (``U[(side + 2) a + b] = (G g G^T)[a, b]``)
    for F(side x side, 3x3), side 2 or 4, computed in float64 and rounded once. The C++ op reads the
    algorithm from U's first dimension (16 or 36)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"Winograd F({side}x{side}, 3x3) takes a [O, C, 3, 3] weight, got {tuple(weight.shape)}")
    if side not in TRANSFORMS:
        raise ValueError(f"Winograd output tiles are 2x2 or 4x4, not {side}x{side}")
    g_matrix = TRANSFORMS[side][1]
    g = weight.detach().to(torch.float64)
    u = torch.einsum("ap,ocpq,bq->abco", g_matrix, g, g_matrix)        # [side + 2, side + 2, C, O]
    return u.reshape((side + 2) ** 2, g.shape[1], g.shape[0]).to(torch.float32).contiguous()


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, residual: "torch.Tensor | None" = None,
            relu: bool = False) -> torch.Tensor:
    """``relu?(conv2d(x, w, bias, padding=1) + residual)`` for ``u = transform_weight(w)``: x and
    residual channels_last float32 CPU tensors; the output is channels_last."""
    ext = extension()
    if ext is None:
        raise RuntimeError(unavailable_reason())
    return ext.conv3x3(x, u, bias, residual, relu)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None,
              residual: "torch.Tensor | None" = None, relu: bool = False, side: int = 2) -> torch.Tensor:
    """The same algorithm, F(side x side, 3x3), in float64 with PyTorch ops (tiles by ``unfold``):
    what the C++ transforms are checked against, independently of their loops."""
    b_t, g_matrix, a_t = TRANSFORMS[side]
    n, c, h, w = x.shape
    th, tw = -(-h // side), -(-w // side)
    xd = torch.nn.functional.pad(x.to(torch.float64), (1, side * tw + 1 - w, 1, side * th + 1 - h))
    d = xd.unfold(2, side + 2, side).unfold(3, side + 2, side)   # [N, C, th, tw, side + 2, side + 2]
    v = torch.einsum("ap,nctwpq,bq->abnctw", b_t, d, b_t)        # B^T d B
    g = weight.to(torch.float64)
    u = torch.einsum("ap,ocpq,bq->abco", g_matrix, g, g_matrix)
    m = torch.einsum("abnctw,abco->abnotw", v, u)
    y = torch.einsum("ua,abnotw,vb->notuwv", a_t, m, a_t)        # [N, O, th, side, tw, side]
    y = y.reshape(n, -1, side * th, side * tw)[:, :, :h, :w]
    if bias is not None:
        y = y + bias.to(torch.float64).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(torch.float64)
    return y.relu() if relu else y

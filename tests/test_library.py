"""The kernels as torch.library ops (fastres.library): values against torch.nn.functional, opcheck,
fake CUDA shape propagation, torch.compile(fullgraph=True) and strict torch.export capture."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fastres import library
from fastres.kernels._launch import record_launches

OPS = torch.ops.fastres
CL = torch.channels_last


def nhwc(t):
    return t.contiguous(memory_format=CL)


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# -- problems: (op name, args, kwargs, independent F-based expected function) -----------------------
def conv_problem(dtype=torch.float32, *, shortcut=False, residual=False, groups=1, stride=1, nchw=False):
    x = rand(2, 32, 9, 7, dtype=dtype, seed=1)
    w = rand(48, 32 // groups, 3, 3, dtype=dtype, seed=2, scale=0.1)
    b = rand(48, seed=3)
    kwargs = dict(stride=[stride, stride], padding=[1, 1], dilation=[1, 1], groups=groups, relu=True)
    oh, ow = (9 - 1) // stride + 1, (7 - 1) // stride + 1
    if residual:
        kwargs["residual"] = nhwc(rand(2, 48, oh, ow, dtype=dtype, seed=4))
    if shortcut:
        kwargs["shortcut"] = nhwc(rand(2, 16, 9, 7, dtype=dtype, seed=5))
        kwargs["shortcut_weight"] = rand(48, 16, 1, 1, dtype=dtype, seed=6, scale=0.1)
        kwargs["shortcut_stride"] = stride
    x = x if nchw else nhwc(x)

    def expected():
        out = F.conv2d(x.double(), w.double(), b.double(), stride=stride, padding=1, groups=groups)
        if shortcut:
            out = out + F.conv2d(kwargs["shortcut"].double(), kwargs["shortcut_weight"].double(), stride=stride)
        if residual:
            out = out + kwargs["residual"].double()
        return out.relu()
    return "conv2d_nhwc", (x, w, b), kwargs, expected


def pair_problem(dtype=torch.float32, *, shortcut=False, groups=1, stride=1):
    y1 = nhwc(rand(2, 32, 8, 8, dtype=dtype, seed=7))
    w_mid = rand(32, 32 // groups, 3, 3, dtype=dtype, seed=8, scale=0.1)
    b_mid = rand(32, seed=9)
    w_out = rand(64, 32, 1, 1, dtype=dtype, seed=10, scale=0.1)
    b_out = rand(64, seed=11)
    o = (8 - 1) // stride + 1
    kwargs = dict(stride=[stride, stride], padding=[1, 1], dilation=[1, 1], groups=groups)
    if shortcut:
        kwargs.update(shortcut=nhwc(rand(2, 32, 8, 8, dtype=dtype, seed=12)),
                      shortcut_weight=rand(64, 32, 1, 1, dtype=dtype, seed=13, scale=0.1), shortcut_stride=stride)
    else:
        kwargs["residual"] = nhwc(rand(2, 64, o, o, dtype=dtype, seed=14))

    def expected():
        mid = F.conv2d(y1.double(), w_mid.double(), b_mid.double(), stride=stride, padding=1, groups=groups).relu()
        mid = mid.to(dtype).double()        # the kernel rounds the mid tile to the compute dtype
        out = F.conv2d(mid, w_out.double(), b_out.double())
        if shortcut:
            out = out + F.conv2d(kwargs["shortcut"].double(), kwargs["shortcut_weight"].double(), stride=stride)
        else:
            out = out + kwargs["residual"].double()
        return out.relu()
    return "conv3x3_conv1x1_nhwc", (y1, w_mid, b_mid, w_out, b_out), kwargs, expected


def pool_problem(dtype=torch.float32, nchw=False):
    x = rand(2, 16, 13, 10, dtype=dtype, seed=15)
    x = x if nchw else nhwc(x)
    return "max_pool2d_nhwc", (x,), {}, lambda: F.max_pool2d(x.double(), 3, 2, 1)


def head_problem(dtype=torch.float32, bias=True):
    x = nhwc(rand(3, 64, 5, 4, dtype=dtype, seed=16))
    w = rand(10, 64, dtype=dtype, seed=17, scale=0.1)
    b = rand(10, seed=18) if bias else None
    return "avgpool_linear", (x, w, b), {}, lambda: F.linear(x.double().mean((2, 3)), w.double(),
                                                           b.double() if bias else None)


PROBLEMS = {
    "conv": lambda dt: conv_problem(dt),
    "conv_nchw_input": lambda dt: conv_problem(dt, nchw=True),
    "conv_residual": lambda dt: conv_problem(dt, residual=True),
    "conv_shortcut_s2": lambda dt: conv_problem(dt, shortcut=True, stride=2),
    "conv_grouped": lambda dt: conv_problem(dt, groups=8, residual=True),
    "pair_residual": lambda dt: pair_problem(dt),
    "pair_shortcut_s2": lambda dt: pair_problem(dt, shortcut=True, stride=2),
    "pair_grouped": lambda dt: pair_problem(dt, groups=2),
    "pool": lambda dt: pool_problem(dt),
    "pool_nchw_input": lambda dt: pool_problem(dt, nchw=True),
    "head": lambda dt: head_problem(dt),
    "head_no_bias": lambda dt: head_problem(dt, bias=False),
}
# (dtype, atol, rtol): fp32 accumulation, one rounding to the dtype at the store
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-2, 1e-2), (torch.bfloat16, 6e-2, 2e-2)]


def _clone_args(args, kwargs):
    return ([a.clone() if torch.is_tensor(a) else a for a in args],
            {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_cpu_op_matches_functional_and_is_functional(problem, dtype, atol, rtol):
    name, args, kwargs, expected = PROBLEMS[problem](dtype)
    before = _clone_args(args, kwargs)
    out = getattr(OPS, name)(*args, **kwargs)
    want = expected()
    assert out.dtype == dtype and out.shape == want.shape
    if out.dim() == 4:
        assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    for a, b in zip(args, before[0]):          # no input is written
        if torch.is_tensor(a):
            assert torch.equal(a, b)
    for k, v in kwargs.items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[1][k]), k
    assert all(out.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
               for a in list(args) + list(kwargs.values()) if torch.is_tensor(a))


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_opcheck(problem):
    name, args, kwargs, _ = PROBLEMS[problem](torch.float32)
    torch.library.opcheck(getattr(OPS, name).default, args, kwargs)


@pytest.mark.parametrize("problem", ["conv", "conv_shortcut_s2", "conv_grouped", "pair_residual",
                                     "pair_shortcut_s2", "pool", "head"])
def test_triton_body_matches_cpu_op(problem):
    """The ops' CUDA implementation (the Triton kernel, run here under TRITON_INTERPRET=1) gives the
    CPU implementation's answer."""
    name, args, kwargs, _ = PROBLEMS[problem](torch.float32)
    triton_out = library.TRITON_IMPLS[name](*args, **kwargs)
    cpu_out = getattr(OPS, name)(*args, **kwargs)
    assert triton_out.stride() == cpu_out.stride() and triton_out.dtype == cpu_out.dtype
    torch.testing.assert_close(triton_out, cpu_out, atol=1e-4, rtol=1e-4)


def _fake_like(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_cuda_shapes_strides_dtypes(problem, dtype):
    """Shape propagation on fake CUDA tensors (no GPU needed) runs the Triton wrapper's allocation
    and checks and gives the real output's shape, dtype and strides."""
    name, args, kwargs, _ = PROBLEMS[problem](dtype)
    real = getattr(OPS, name)(*args, **kwargs)
    with FakeTensorMode():
        fargs = [_fake_like(a) if torch.is_tensor(a) else a for a in args]
        fkwargs = {k: _fake_like(v) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        fake = getattr(OPS, name)(*fargs, **fkwargs)
        assert fake.device.type == "cuda"
        assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()


def test_fake_cuda_errors_name_the_problem():
    with FakeTensorMode():
        x = torch.empty(1, 16, 8, 8, device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
        with pytest.raises(TypeError, match="fastres::conv2d_nhwc: weight dtype torch.float32 != x dtype"):
            OPS.conv2d_nhwc(x, torch.empty(8, 16, 1, 1, device="cuda"))
        with pytest.raises(ValueError, match="x has 16 channels"):
            OPS.conv2d_nhwc(x, torch.empty(8, 4, 1, 1, device="cuda", dtype=torch.float16))
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            OPS.max_pool2d_nhwc(x.double())


def test_cpu_errors_name_the_problem():
    x = nhwc(rand(1, 16, 8, 8))
    with pytest.raises(TypeError, match="x dtype must be float16, bfloat16 or float32, got torch.float64"):
        OPS.conv2d_nhwc(x.double(), rand(8, 16, 1, 1).double())
    with pytest.raises(ValueError, match="shortcut and shortcut_weight go together"):
        OPS.conv2d_nhwc(x, rand(8, 16, 1, 1), shortcut=x)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        OPS.avgpool_linear(x, rand(10, 16), rand(9))


def _block(x, w1, b1, w_mid, b_mid, w_out, b_out, sc_w, fc_w, fc_b):
    """Stem conv + pool, a bottleneck's fused 3x3 -> 1x1 with a projection shortcut, the head."""
    y = OPS.conv2d_nhwc(x, w1, b1, [2, 2], [3, 3], [1, 1], 1, None, True)
    y = OPS.max_pool2d_nhwc(y)
    y = OPS.conv3x3_conv1x1_nhwc(y, w_mid, b_mid, w_out, b_out, [1, 1], [1, 1], [1, 1], 1, None, y, sc_w, 1)
    return OPS.avgpool_linear(y, fc_w, fc_b)


def _block_inputs():
    return (nhwc(rand(2, 3, 20, 20, seed=20)), rand(16, 3, 7, 7, seed=21, scale=0.1), rand(16, seed=22),
            rand(32, 16, 3, 3, seed=23, scale=0.1), rand(32, seed=24), rand(64, 32, 1, 1, seed=25, scale=0.1),
            rand(64, seed=26), rand(64, 16, 1, 1, seed=30, scale=0.1), rand(10, 64, seed=27, scale=0.1),
            rand(10, seed=28))


def _calls(gm):
    """Every call_function of a graph (OpOverloadPacket or .default overload alike)."""
    return [str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function"]


FOUR_OPS = ["fastres.conv2d_nhwc", "fastres.max_pool2d_nhwc", "fastres.conv3x3_conv1x1_nhwc",
            "fastres.avgpool_linear"]


def _expected_block(inputs):
    x, w1, b1, w_mid, b_mid, w_out, b_out, sc_w, fc_w, fc_b = [t.double() for t in inputs]
    y = F.max_pool2d(F.conv2d(x, w1, b1, stride=2, padding=3).relu(), 3, 2, 1)
    mid = F.conv2d(y, w_mid, b_mid, padding=1).relu()
    y = (F.conv2d(mid, w_out, b_out) + F.conv2d(y, sc_w)).relu()
    return F.linear(y.mean((2, 3)), fc_w, fc_b)


def test_torch_compile_fullgraph_captures_one_op_per_kernel():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    inputs = _block_inputs()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(_block, fullgraph=True, backend=recording_backend)
        out = compiled(*inputs)
        assert len(graphs) == 1
        assert _calls(graphs[0]) == FOUR_OPS
        torch.testing.assert_close(out.double(), _expected_block(inputs), atol=1e-4, rtol=1e-4)
        torch._dynamo.reset()
        aot = torch.compile(_block, fullgraph=True, backend="aot_eager")(*inputs)
        torch.testing.assert_close(aot, _block(*inputs), atol=0, rtol=0)
    finally:
        torch._dynamo.reset()


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        names = ["w1", "b1", "w_mid", "b_mid", "w_out", "b_out", "sc_w", "fc_w", "fc_b"]
        for name, t in zip(names, _block_inputs()[1:]):
            self.register_buffer(name, t)

    def forward(self, x):
        return _block(x, self.w1, self.b1, self.w_mid, self.b_mid, self.w_out, self.b_out, self.sc_w,
                      self.fc_w, self.fc_b)


def test_strict_export_keeps_one_op_per_kernel():
    module = Block()
    x = _block_inputs()[0]
    ep = torch.export.export(module, (x,), strict=True)
    assert _calls(ep.graph_module) == FOUR_OPS
    torch.testing.assert_close(ep.module()(x), module(x), atol=0, rtol=0)
    x2 = nhwc(rand(2, 3, 20, 20, seed=40))
    torch.testing.assert_close(ep.module()(x2).double(), _expected_block((x2, *_block_inputs()[1:])),
                               atol=1e-4, rtol=1e-4)


def test_ops_inside_record_launches_go_to_the_recording():
    """fastres aot/inspect record the launches of a forward on meta tensors: an op called inside
    ``record_launches()`` adds its KernelCall there and launches nothing."""
    with record_launches() as calls:
        x = torch.empty(2, 16, 9, 9, device="meta", dtype=torch.float16).contiguous(memory_format=CL)
        out = library.TRITON_IMPLS["conv2d_nhwc"](x, torch.empty(32, 16, 3, 3, device="meta", dtype=torch.float16),
                                                  torch.empty(32, device="meta"), [1, 1], [1, 1])
    assert [c.name for c in calls] == ["conv2d_nhwc[3x3/s1]"] and out.shape == (2, 32, 9, 9)

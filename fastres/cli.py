"""The ``fastres`` command line: verify, export (and the tools added by later subcommands)."""
from __future__ import annotations

import argparse
import sys

# Tolerance on the max logit error relative to the logit scale (docs/numerics in README).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
# 8-bit (fastres.quantize): the logits' cosine to fp32 must reach this
MIN_COSINE = 0.99
QUANTIZED = ("int8", "fp8")


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_verify(args) -> int:
    from .models import ARCHITECTURES
    from .verify import verify_arch

    device = args.device if args.device != "auto" else _default_device()
    dtype = args.dtype or ("fp16" if device == "cuda" else "fp32")
    if dtype in QUANTIZED:
        return _verify_quantized(args, device, dtype)
    if args.model:
        return _verify_user_model(args, device, dtype)
    archs = ARCHITECTURES if args.arch == "all" else args.arch.split(",")
    print(f"fastres verify: device={device} dtype={dtype} batch={args.batch} size={args.size} "
          f"(reference: torchvision fp32 eval, same weights, non-default BN statistics)")
    print(f"{'arch':<20} {'backend':<8} {'max |dlogit|/max|logit|':>24} {'top-1 agree':>12} "
          f"{'time s':>8}  status")
    failures = 0
    for arch in archs:
        r = verify_arch(arch, device=device, dtype=dtype, batch=args.batch, size=args.size,
                        seed=args.seed)
        ok = r.ok(TOLERANCE[dtype])
        failures += not ok
        print(f"{arch:<20} {r.backend:<8} {r.max_rel_error:>24.3e} {r.top1_agreement:>12.0%} "
              f"{r.seconds:>8.2f}  {'ok' if ok else 'FAIL (tolerance %.0e)' % TOLERANCE[dtype]}",
              flush=True)
    return 1 if failures else 0


def _verify_quantized(args, device: str, dtype: str) -> int:
    from .models import ARCHITECTURES
    from .verify import verify_quantized

    if args.model:
        print("fastres verify: --dtype int8/fp8 checks the architectures (--arch); quantize your own model "
              "with fastres.quantize, whose report says the same", file=sys.stderr)
        return 2
    archs = ARCHITECTURES if args.arch == "all" else args.arch.split(",")
    print(f"fastres verify: {dtype} (fastres.quantize, {args.method}) device={device} batch={args.batch} "
          f"size={args.size} (reference: the same model in fp32, non-default BN statistics; calibrated on "
          f"{args.calib_batch} other image-like inputs)")
    print(f"{'arch':<20} {'backend':<8} {'logit cosine':>12} {'max |dlogit|/max|logit|':>24} {'top-1 agree':>12} "
          f"{'time s':>8}  status")
    failures = 0
    for arch in archs:
        r = verify_quantized(arch, dtype=dtype, device=device, batch=args.batch, size=args.size, seed=args.seed,
                             method=args.method, calib_batch=args.calib_batch)
        ok = r.cosine >= MIN_COSINE
        failures += not ok
        print(f"{arch:<20} {r.backend:<8} {r.cosine:>12.5f} {r.max_rel_error:>24.3e} {r.top1_agreement:>12.0%} "
              f"{r.seconds:>8.2f}  {'ok' if ok else f'FAIL (cosine < {MIN_COSINE})'}", flush=True)
    return 1 if failures else 0


def cmd_quantize(args) -> int:
    from .checkpoint import export
    from .classify import resolve_model
    from .quantize import QuantizationError, quantize

    try:
        model = resolve_model(args.weights, args.arch).float().eval()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fastres quantize: {err}", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else _default_device()
    model = model.to(device)
    try:
        qmodel = quantize(model, args.calib, dtype=args.dtype, method=args.method, num_batches=args.num_batches,
                          progress=not args.no_progress, min_cosine=args.min_cosine)
    except QuantizationError as err:
        print(err.report, file=sys.stderr)
        print(f"fastres quantize: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"fastres quantize: {err}", file=sys.stderr)
        return 2
    print(qmodel.report)
    path = export(qmodel.to("cpu"), args.out)
    print(f"wrote {path} ({args.dtype}, {args.method}; fastres.load reads it back)")
    return 0


def _verify_user_model(args, device: str, dtype: str) -> int:
    from .verify import load_model, parse_input_shape, verify_model

    try:
        model, shape = load_model(args.model), parse_input_shape(args.input)
    except (ValueError, TypeError, ImportError, AttributeError) as err:
        print(f"fastres verify: {err}", file=sys.stderr)
        return 2
    r = verify_model(model, shape, device=device, dtype=dtype, batch=args.batch, seed=args.seed)
    tolerance = TOLERANCE[dtype]
    print(f"fastres verify: {args.model}  input {args.batch}x{args.input}  device={device} dtype={dtype} "
          f"backend={r.backend} (reference: the model's own fp32 eval forward)")
    print(f"max |error| / max |output|: {r.max_rel_error:.3e}"
          + (f"   top-1 agreement: {r.top1_agreement:.0%}" if r.top1_agreement is not None else ""))
    print(f"plan: {r.fused_steps} fused step(s), {len(r.pytorch_steps)} PyTorch step(s)")
    for note in r.pytorch_steps:
        print(f"  {note}")
    if r.fallback:
        print(f"the plan did not run: {r.fallback}")
    ok = r.ok(tolerance)
    print("ok" if ok else f"FAIL (tolerance {tolerance:.0e}{', fallback' if r.fallback else ''})")
    return 0 if ok else 1


def cmd_export(args) -> int:
    import torch

    from . import models
    from .checkpoint import export
    from .verify import DTYPES

    if args.arch not in models.ARCHITECTURES:
        print(f"unknown --arch {args.arch}; choose from {', '.join(models.ARCHITECTURES)}",
              file=sys.stderr)
        return 2
    model = getattr(models, args.arch)(weights=args.weights).eval()
    path = export(model, args.output, dtype=DTYPES[args.dtype])
    print(f"wrote {path} ({args.arch}, BN folded, {args.dtype})")
    return 0


def cmd_aot(args) -> int:
    from .aot import run_aot
    from .plan_report import record_model_launches, record_plan_launches

    # each architecture compiles the tiles the rule picks for its own GPU (kernels._target.TARGETS)
    calls, targets = {}, {}
    if args.model:
        from .verify import load_model, parse_input_shape
        shape = parse_input_shape(args.input or f"3x{args.size}x{args.size}")
    sms = _ints(args.sm)
    if args.dtype == "fp8" and any(sm < 89 for sm in sms):
        sms = [sm for sm in sms if sm >= 89]
        print(f"fastres aot: fp8 (e4m3) tensor cores start at sm_89: compiling for {sms or 'nothing'}",
              file=sys.stderr)
        if not sms:
            return 2
    for sm in sms:
        for batch in _ints(args.batch):
            if args.model:
                label = f"{args.model} b{batch} sm{sm}"
                calls[label] = record_model_launches(lambda: load_model(args.model), (batch, *shape),
                                                     args.dtype, sm=sm)
                targets[label] = sm
                continue
            for arch in args.arch.split(","):
                label = f"{arch} b{batch} sm{sm}"
                calls[label] = record_plan_launches(arch, batch, args.size, args.dtype, sm=sm)
                targets[label] = sm
    return run_aot(calls, sms=sms, workers=args.workers, loop_stats=args.loop_stats,
                   json_output=args.json, targets=targets)


def cmd_inspect(args) -> int:
    import json

    from .plan_report import format_report, inspect_arch

    if args.model:
        import torch

        from .plan_report import inspect_model, model_dtype
        from .verify import load_model, parse_input_shape

        try:
            model, shape = load_model(args.model), parse_input_shape(args.input or f"3x{args.size}x{args.size}")
        except (ValueError, TypeError, ImportError, AttributeError) as err:
            print(f"fastres inspect: {err}", file=sys.stderr)
            return 2
        with torch.no_grad():
            model = model.to(model_dtype(args.dtype)).eval()
        report = inspect_model(model, (args.batch, *shape), title=args.model, dtype=args.dtype)
    else:
        report = inspect_arch(args.arch, batch=args.batch, size=args.size, dtype=args.dtype, gpu=args.gpu)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a usage error, exit status 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def cmd_bench(args) -> int:
    import torch

    from . import benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastres bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.line:
        print(benchmark.speed_line(device, arch=(args.arch or ["resnet50"])[0].split(",")[0]))
        return 0
    try:
        batches = _ints(",".join(args.batch)) if args.batch else None
    except ValueError:
        print(f"fastres bench: --batch takes ints (comma or space separated), got {' '.join(args.batch)!r}",
              file=sys.stderr)
        return 2
    if batches is not None and (not batches or min(batches) < 1):
        print(f"fastres bench: --batch sizes must be >= 1, got {' '.join(args.batch)!r}", file=sys.stderr)
        return 2
    archs = [a for a in ",".join(args.arch).split(",") if a] if args.arch else None
    try:
        impls = benchmark.parse_compare(args.compare) if args.compare else None
    except ValueError as err:
        print(f"fastres bench: --compare: {err}", file=sys.stderr)
        return 2
    # optional dependencies are checked before the (long) comparison runs, not after it
    missing = benchmark.missing_extras(impls or benchmark.DEFAULT_IMPLS)
    for impl in (("torch-tensorrt",) if device == "cpu" else ("onnxruntime", "openvino")):
        missing.pop(impl, None)     # skipped on this device anyway
    if missing and impls:
        for impl, packages in missing.items():
            print(f"fastres bench: --compare {impl} needs {', '.join(packages)}, not installed: "
                  f"{benchmark.BENCH_INSTALL_HINT if impl != 'torch-tensorrt' else 'pip install torch-tensorrt'}",
                  file=sys.stderr)
        return 2
    for impl, packages in missing.items():
        print(f"fastres bench: {impl} will be skipped ({', '.join(packages)} not installed; "
              f"{benchmark.BENCH_INSTALL_HINT if impl != 'torch-tensorrt' else 'pip install torch-tensorrt'})",
              file=sys.stderr)
    png = benchmark.can_plot()
    if not png:
        print(f"fastres bench: matplotlib is not installed, so bench.png will be skipped "
              f"(bench.md and bench.json are written); for the plot: {benchmark.PLOT_INSTALL_HINT}",
              file=sys.stderr)
    settings = benchmark.settings_for(args.quick, archs=archs, batches=batches, size=args.size,
                                      device=device, impls=impls, competing=args.competing,
                                      rounds=args.rounds)
    results = benchmark.run_comparison(settings, device, progress=not args.no_progress)
    paths = benchmark.write_report(results, args.out, png=png)
    print(benchmark.markdown(results))
    print("wrote " + ", ".join(paths.values())
          + ("" if png else f" (bench.png skipped: no matplotlib; {benchmark.PLOT_INSTALL_HINT})"))
    return 0


def cmd_classify(args) -> int:
    from .classify import main as classify_main

    ray_main = None
    if getattr(args, "ray", None):
        from .ray import classify_main as ray_main
    return classify_main(args, ray_main)


def cmd_serve(args) -> int:
    from .ray import serve_main

    return serve_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastres", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify", help="compare fastres models with their torchvision twins")
    p.add_argument("--arch", default="all", help="architecture, comma list, or 'all'")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "int8", "fp8"],
                   help="default: fp16 on cuda, fp32 on cpu; int8 / fp8: fastres.quantize against fp32")
    p.add_argument("--method", default="percentile", choices=["percentile", "minmax", "mse"],
                   help="with --dtype int8 / fp8: how activation scales are chosen")
    p.add_argument("--calib-batch", type=positive_int, default=8,
                   help="with --dtype int8 / fp8: calibration images")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--size", type=positive_int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                   help="check your own model instead: MODULE (dotted name or .py path) and the callable "
                        "returning the nn.Module, against its own PyTorch eval forward")
    p.add_argument("--input", default="3x224x224", metavar="CxHxW", help="input shape for --model")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="write BN-folded weights to a safetensors file")
    p.add_argument("output")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--weights", default=None,
                   help="torchvision weights name (needs the network) or a local checkpoint path")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="calibrate an 8-bit (int8 / fp8) model on a directory of images and "
                                        "write it (fastres.quantize, fastres.export)")
    p.add_argument("--calib", required=True, metavar="DIR", help="calibration images (the model's preprocessing)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--weights", default="DEFAULT",
                   help="a fastres export file, a checkpoint file, or torchvision weights (as for classify)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--dtype", default="int8", choices=["int8", "fp8"])
    p.add_argument("--method", default="percentile", choices=["percentile", "minmax", "mse"])
    p.add_argument("--num-batches", type=positive_int, default=None, help="at most this many batches of 64 images")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="fail (exit 1, nothing written) when the logits' cosine to fp32 is below this")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("aot", help="compile every kernel configuration of a plan for real GPUs "
                                   "(no GPU needed) and check registers, spills, shared memory")
    p.add_argument("--arch", default="resnet50,resnext50_32x4d", help="comma list")
    p.add_argument("--batch", default="1,8,32,64,128,256")
    p.add_argument("--size", type=positive_int, default=224)
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16", "int8", "fp8"],
                   help="int8 / fp8: the fastres.quantize plan (fp8 compiles for sm_89+ only)")
    p.add_argument("--sm", default="80,90", help="target architectures; each compiles what the tile rule "
                                                 "picks for its GPU (sm_80: A100, 108 SMs; sm_90: H100, 132)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loop-stats", action="store_true",
                   help="also print the static loop report: K-loop SASS instructions per step, MMA shape, "
                        "load widths, wgmma depth, stages, CTAs per SM, waves (fastres/sass.py)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the tables")
    p.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                   help="compile what your own model's plan launches (built on the meta device)")
    p.add_argument("--input", default=None, metavar="CxHxW", help="input shape for --model (default 3xSIZExSIZE)")
    p.set_defaults(func=cmd_aot)

    p = sub.add_parser("inspect", help="print the plan: fused ops, GEMM shapes, FLOPs and modelled "
                                       "traffic per kernel, against torchvision's unfused forward")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--size", type=positive_int, default=224)
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16", "int8", "fp8"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--gpu", choices=["h100", "h200", "a100"], default=None,
                   help="add the modelled roofline floor per launch and in total (fastres/roofline.py)")
    p.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                   help="inspect your own model (see verify --model); --input sets its input shape")
    p.add_argument("--input", default=None, metavar="CxHxW", help="input shape for --model (default 3xSIZExSIZE)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="images/s of fastres against torchvision eager, torch.compile, "
                                     "ONNX Runtime, OpenVINO / TensorRT; writes DIR/bench.md, .json, .png",
                       epilog="The CPU table of the README: fastres bench --device cpu "
                              "(resnet18, resnet50, resnext50_32x4d at batch 1, 8, 32, every implementation "
                              "installed, interleaved).")
    p.add_argument("--arch", nargs="+", default=None,
                   help="architectures, comma or space separated (default: GPU resnet50,resnet18,resnet101; "
                        "CPU resnet18,resnet50,resnext50_32x4d; --quick: resnet18)")
    p.add_argument("--batch", nargs="+", default=None,
                   help="batch sizes, comma or space separated (default: GPU 1,8,64,256; CPU 1,8,32; --quick: 1,4)")
    p.add_argument("--size", type=positive_int, default=None, help="image side (default 224; --quick: 64)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--compare", default=None,
                   help="what to compare the fastres module and Engine with, comma list of "
                        "torchvision, ort (onnxruntime), openvino, compile (torch.compile), tensorrt, "
                        "int8 (fastres.quantize int8), ort-int8 (ONNX Runtime static INT8, QDQ), or "
                        "'all' (default: every fp/fp16 implementation, those not installed skipped)")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="timed calls per implementation and cell (default: sized to the call time)")
    p.add_argument("--competing", type=int, default=0, metavar="N",
                   help="start N busy processes while timing (throughput under contention; "
                        "fastres runs on the cores left unless FASTRES_ADAPTIVE_THREADS=0)")
    p.add_argument("--line", action="store_true",
                   help="only the one-line resnet50 comparison `make run` ends with (a few seconds)")
    p.add_argument("--quick", action="store_true", help="small batches and size, few rounds")
    p.add_argument("--out", default="bench-results", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("classify", help="top-k classes of image files (or directories of them)",
                       epilog="A file that cannot be decoded is reported on stderr with the reason and "
                              "skipped; the rest are classified. Exit status: 0 all classified, 1 some "
                              "path missing or skipped, 2 usage error (bad option, no images, bad weights).")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--weights", default="DEFAULT",
                   help="a fastres export file, a checkpoint file, or torchvision weights "
                        "(ResNet50_Weights.IMAGENET1K_V2, or a name like DEFAULT for --arch; "
                        "downloads need the network)")
    p.add_argument("--arch", default="resnet50", help="architecture for a checkpoint or a bare weights name")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    p.add_argument("--json", action="store_true", help='one JSON object per line: {"path", "topk"}')
    p.add_argument("--no-progress", action="store_true")
    ray = p.add_argument_group("on a Ray cluster (pip install 'fastres[ray]'; --weights must be an export file)")
    ray.add_argument("--ray", metavar="ADDRESS", default=None,
                     help="run on Ray Data: a cluster address (ray.init(address=...), e.g. auto or "
                          "HOST:PORT) or 'local' for a cluster on this machine bound to 127.0.0.1")
    ray.add_argument("--ray-workers", type=int, default=1, help="actors, one Engine each")
    ray.add_argument("--ray-gpus-per-worker", type=float, default=0)
    ray.add_argument("--ray-cpus-per-worker", type=float, default=1)
    ray.add_argument("--output", metavar="DIR", default=None,
                     help="with --ray: write the predictions to DIR as Parquet instead of printing them")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("serve", help="classify images over HTTP with Ray Serve (pip install 'fastres[ray]')")
    p.add_argument("weights", metavar="FILE", help="a fastres export file")
    p.add_argument("--address", default="local",
                   help="Ray cluster address, or 'local' (default) for a cluster on this machine bound to 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to accept other machines)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="images per micro-batch")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--num-replicas", type=int, default=1, help="replicas, one Engine each")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-replica", type=float, default=1)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--max-body-bytes", type=int, default=16 * 2**20)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""``fastres classify``: image files in, top-k classes out, through the Engine.

Files are decoded by ``torchvision.io`` in DataLoader workers, resized (shorter side) and centre-
cropped as the model's preprocessing metadata says (torchvision's ``ImageClassification`` steps:
bilinear, antialiased), and sent to the Engine as uint8 [N, H, W, 3] batches, which normalises
them. Grayscale, palette, CMYK and alpha images are converted to RGB, 16-bit PNGs scaled to 8 bits.
A file that cannot be read or decoded (truncated, not an image, an unsupported format) is reported
on stderr by name with the reason, and skipped; the others are classified. The exit status is 0
when every file was classified, 1 when any path was missing or skipped, 2 for a usage error.
"""
from __future__ import annotations

import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

__all__ = ["IMAGE_EXTENSIONS", "find_images", "load_image", "read_image", "ImageFiles", "Result",
           "resolve_model", "preprocessing", "classify_images", "classify_files", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
DEFAULT_PREPROCESS = {"resize": 256, "crop": 224}


def find_images(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """(image files, missing paths): files are taken as given, directories walked (sorted) for
    files with an image extension."""
    files, missing = [], []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names)
                          if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.exists(path):
            files.append(path)
        else:
            missing.append(path)
    return files, missing


def load_image(source, resize: int, crop: int) -> torch.Tensor:
    """uint8 [crop, crop, 3] from a file path or the encoded bytes of an image: decoded as RGB (8 bits
    per channel), shorter side resized to ``resize``, centre-cropped to ``crop``. The one image
    pipeline of fastres: ``fastres classify``, ``fastres.ray``'s predictor and its Serve replicas."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("empty image data (0 bytes)")
        source = torch.frombuffer(bytearray(source), dtype=torch.uint8)
    elif not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_image takes a path or the bytes of an image, got {type(source).__name__}")
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        image = decode_image(source, mode=ImageReadMode.RGB)
    if image.dtype == torch.uint16:      # 16-bit PNG: to 8 bits the way torchvision scales dtypes
        from torchvision.transforms.v2.functional import to_dtype
        image = to_dtype(image, torch.uint8, scale=True)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"decoded to an unsupported {image.dtype} image of shape {tuple(image.shape)} "
                         "(expected 8-bit RGB)")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image has no pixels ({image.shape[2]}x{image.shape[1]})")
    image = TF.resize(image, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
    image = TF.center_crop(image, [crop])
    return image.permute(1, 2, 0).contiguous()


def error_message(err: BaseException) -> str:
    """One line for an image that failed to load: the decoder's message without its C++ source
    location (decoders' messages can run to several lines)."""
    lines = str(err).strip().splitlines()
    text = lines[-1] if lines else ""
    text = re.sub(r"^\w+, \S+\.(?:cpp|h|cu):\d+, ", "", text)   # "decode_jpeg, .../decode_jpeg.cpp:171, "
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
    if isinstance(err, RuntimeError) and text:
        return f"cannot decode image: {text}"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_image(source, resize: int, crop: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(image, None) as ``load_image`` makes it, or (None, error message) for a file or bytes that
    cannot be read or decoded: a bad image is reported, never raised."""
    try:
        return load_image(source, resize, crop), None
    except Exception as err:   # noqa: BLE001 - one bad image is reported and skipped, whatever failed
        return None, error_message(err)


class ImageFiles(torch.utils.data.Dataset):
    """Item i: (i, uint8 [crop, crop, 3] image or None, error message or None)."""

    def __init__(self, files: list[str], resize: int, crop: int):
        self.files, self.resize, self.crop = files, resize, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return (i, *read_image(self.files[i], self.resize, self.crop))


def _collate(items):
    return items


@dataclass
class Result:
    path: str
    indices: Optional[list] = None
    probs: Optional[list] = None
    labels: Optional[list] = None
    error: Optional[str] = None

    def json(self) -> str:
        labels = self.labels or [None] * len(self.indices)
        return json.dumps({"path": self.path, "topk": [
            {"index": i, "label": label, "prob": p} for i, label, p in zip(self.indices, labels, self.probs)]})

    def text(self) -> str:
        labels = self.labels or [f"class {i}" for i in self.indices]
        return f"{self.path}: " + ", ".join(f"{label} ({p:.1%})" for label, p in zip(labels, self.probs))


def preprocessing(meta: dict) -> tuple[int, int]:
    """(resize, crop) from a model's preprocessing metadata, torchvision's defaults for the missing."""
    pre = (meta or {}).get("preprocess") or {}
    crop = pre.get("crop") or DEFAULT_PREPROCESS["crop"]
    resize = pre.get("resize") or (crop if pre.get("crop") else DEFAULT_PREPROCESS["resize"])
    return int(resize), int(crop)


def classify_images(engine, names: list[str], images: list[Optional[torch.Tensor]],
                    errors: list[Optional[str]], topk: int = 5) -> list[Result]:
    """One Result per name, in order: the Engine's top-k for each image, the error for each None
    image (``read_image``'s pairs, split into two lists). The readable images run as one batch."""
    good = [row for row, image in enumerate(images) if image is not None]
    results = [Result(name, error=error or "unreadable image") for name, error in zip(names, errors)]
    if good:
        top = engine.classify(torch.stack([images[row] for row in good]), topk=topk)
        indices, probs = top.indices.tolist(), top.probs.tolist()
        for j, row in enumerate(good):
            results[row] = Result(names[row], indices[j], probs[j],
                                  top.labels[j] if top.labels is not None else None)
    return results


def classify_files(engine, files: list[str], *, resize: int, crop: int, batch: int = 64, topk: int = 5,
                   workers: int = 2, progress: bool = True) -> Iterator[Result]:
    """Results in file order: top-k per readable file, an ``error`` for each unreadable one."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(ImageFiles(files, resize, crop), batch_size=batch,
                                         num_workers=workers, collate_fn=_collate)
    with tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr) as bar:
        for items in loader:
            _, images, errors = zip(*items)
            yield from classify_images(engine, [files[i] for i, _, _ in items], list(images),
                                       list(errors), topk=topk)
            bar.update(len(items))


def resolve_model(weights: str, arch: str = "resnet50"):
    """A model from a fastres export file, a checkpoint file (with ``arch``), or a torchvision weights
    name: ``ResNet50_Weights.IMAGENET1K_V2`` (the architecture follows from the enum) or a member
    name like ``DEFAULT`` for ``arch`` (downloaded through torchvision: needs the network)."""
    from . import models
    from .checkpoint import FORMAT, load

    if os.path.isfile(weights):
        if weights.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(weights, framework="pt") as f:
                    is_export = (f.metadata() or {}).get("format") == FORMAT
            except Exception:
                is_export = False
            if is_export:
                return load(weights)
        return getattr(models, arch)(weights=weights)
    if os.sep in weights or weights.endswith((".pth", ".pt", ".safetensors")):
        raise FileNotFoundError(f"--weights {weights}: no such file")
    enum_name, dot, _ = weights.partition(".")
    if dot:
        for name, enum in models._WEIGHT_ENUMS.items():
            if enum.__name__ == enum_name:
                arch = name
                break
        else:
            raise ValueError(f"unknown torchvision weights {weights!r}: {enum_name} is not a ResNet "
                             "weights enum (e.g. ResNet50_Weights.IMAGENET1K_V2)")
    try:
        return getattr(models, arch)(weights=weights)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:   # the download itself
        raise RuntimeError(f"could not get torchvision weights {weights!r} for {arch} ({type(err).__name__}: "
                           f"{err}); without network access pass --weights FILE, a fastres export "
                           "(fastres export) or a local checkpoint") from err


def main(args, ray_main=None) -> int:
    """The ``fastres classify`` command (arguments parsed by ``fastres.cli``); ``ray_main`` runs the
    found files on a Ray cluster (``fastres.ray.classify_main``, for ``--ray``)."""
    from .engine import Engine

    if args.topk < 1 or args.batch < 1 or args.workers < 0:
        print("fastres classify: --topk and --batch must be >= 1, --workers >= 0", file=sys.stderr)
        return 2
    if getattr(args, "output", None) and not getattr(args, "ray", None):
        print("fastres classify: --output DIR needs --ray", file=sys.stderr)
        return 2
    files, missing = find_images(args.paths)
    for path in missing:
        print(f"fastres classify: {path}: no such file or directory", file=sys.stderr)
    if not files:
        print("fastres classify: no image files found "
              f"(directories are searched for {', '.join(IMAGE_EXTENSIONS)})", file=sys.stderr)
        return 2
    if ray_main is not None:
        return ray_main(args, files, failures=len(missing))
    try:
        model = resolve_model(args.weights, args.arch)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fastres classify: {err}", file=sys.stderr)
        return 2
    resize, crop = preprocessing(getattr(model, "meta", {}))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    buckets = sorted({b for b in (1, 8, 32, 128) if b < args.batch} | {args.batch})
    try:
        engine = Engine(model, batch_sizes=buckets, image_size=crop, device=device, input="uint8_nhwc")
    except (ValueError, TypeError, RuntimeError) as err:
        print(f"fastres classify: {err}", file=sys.stderr)
        return 2
    failures = len(missing)
    progress = not args.no_progress and sys.stderr.isatty()
    for result in classify_files(engine, files, resize=resize, crop=crop, batch=args.batch,
                                 topk=args.topk, workers=args.workers, progress=progress):
        if result.error is not None:
            failures += 1
            print(f"fastres classify: skipped {result.path}: {result.error}", file=sys.stderr)
        else:
            print(result.json() if args.json else result.text(), flush=True)
    return 1 if failures else 0

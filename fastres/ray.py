"""Beyond one machine: batch inference on Ray Data and online serving on Ray Serve, one fastres
Engine per worker. Needs the optional extra: ``pip install 'fastres[ray]'`` (``ray[data,serve]``).

Offline, Ray Data::

    import ray, fastres.ray
    ray.init()                                    # or ray.init(address="auto") on a cluster
    fastres.ray.predict("images/", "r50.safetensors", num_workers=4, num_gpus_per_worker=1,
                        output="predictions/")    # Parquet, one row per image

    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
    preds = fastres.ray.predict(ds, "r50.safetensors", num_workers=4, num_gpus_per_worker=1)

``EnginePredictor`` is the callable class behind ``predict`` for ``Dataset.map_batches(...,
compute=ActorPoolStrategy(size=N))``: each actor builds one ``fastres.Engine`` from the export file
path once (the file, not a pickled model, travels to the workers: it must be readable where the
actors run), then per batch decodes, resizes and centre-crops the images exactly as ``fastres
classify`` does (``fastres.classify.load_image``, from the export's preprocessing metadata) and
returns one row per input: ``path``, ``indices``/``probs``/``labels`` (top-k) or ``logits``, and
``error`` (null, or why the image could not be read: a bad image is a row, never a failed job).

Online, Ray Serve::

    from ray import serve
    serve.run(fastres.ray.serve_app("r50.safetensors", max_batch_size=32))
    # curl --data-binary @cat.jpg http://127.0.0.1:8000/       -> {"topk": [...], ...}

Each replica owns one Engine and runs it on a worker thread of its own (the replica's event loop
only parses requests and batches them); decoding runs on a small thread pool. Requests are
micro-batched by ``@serve.batch`` (up to ``max_batch_size`` images, waiting at most
``batch_wait_timeout_s``) into the Engine's buckets. Bad requests get a 4xx with a message.

Numerics: every Engine call is padded to a full bucket (the CUDA paths do that themselves; on CPU
fastres.ray does it, since oneDNN computes a batch of one differently), so an image's answer never
depends on how Ray split the data or batched the requests, only on the bucket: on CPU oneDNN lays
out the weights per bucket, so buckets differ in the last bits. With one bucket
(``engine_options={"batch_sizes": (B,)}``) every answer is bit-identical to a single-process
``Engine`` with that bucket run over full batches. ``predict`` gives its actors one bucket,
``batch_size``, by default; Serve replicas get powers of two up to ``max_batch_size``.

This module is ``fastres.ray``; it imports the ``ray`` package absolutely and lazily, so importing it
without Ray installed works and the first use says what to install.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import importlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import torch

__all__ = ["EnginePredictor", "predict", "serve_app", "ClassifierDeployment", "output_schema",
           "INSTALL_HINT"]

INSTALL_HINT = "pip install 'fastres[ray]'"
OUTPUT_FORMATS = ("parquet", "json")


def _import(name: str):
    """``ray``, ``ray.data`` or ``ray.serve`` (the package, not this module), or a clear message."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"fastres.ray needs Ray ({name} could not be imported: {err}); install it "
                          f"with: {INSTALL_HINT}") from err


def _engine(weights, *, batch_sizes: Sequence[int], device=None, **engine_options):
    """An Engine from an export file path (each worker loads the file itself), and (resize, crop)
    from its preprocessing metadata."""
    from fastres.classify import preprocessing
    from fastres.engine import Engine

    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"fastres.ray: weights must be the path of a fastres.export file (each worker "
                        f"loads it), got {type(weights).__name__}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(os.fspath(weights), batch_sizes=batch_sizes, device=device, input="uint8_nhwc",
                    **engine_options)
    resize, crop = preprocessing({"preprocess": engine.preprocess_meta or {}})
    if crop != engine.image_size:
        raise ValueError(f"fastres.ray: the export's crop is {crop} but the engine runs "
                         f"{engine.image_size}x{engine.image_size}; leave image_size unset")
    return engine, resize, crop


class _FullBuckets:
    """The Engine's ``__call__``/``classify`` with every chunk padded to a full bucket on CPU too.

    The CUDA paths pad to the bucket themselves; the CPU path runs the rows it is given, and oneDNN
    computes a batch of one with another kernel than a batch of several (the logits then differ in
    the last bits). Padding (with copies of the first row) makes each image's answer independent
    of how Ray split the data or batched the requests: it depends only on the bucket, and with one
    bucket is bit-identical to a single-process ``Engine`` run over full batches."""

    def __init__(self, engine):
        self.engine = engine
        self.pads = engine.executor in ("onednn", "plan")

    def _chunks(self, images: torch.Tensor):
        sizes = self.engine.batch_sizes
        for start in range(0, images.shape[0], sizes[-1]):
            rows = images[start:start + sizes[-1]]
            n = rows.shape[0]
            bucket = next(b for b in sizes if b >= n)
            if self.pads and n < bucket:
                rows = torch.cat([rows, rows[:1].expand(bucket - n, *rows.shape[1:])]).contiguous()
            yield n, rows

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.engine(rows)[:n] for n, rows in self._chunks(images)])

    def classify(self, images: torch.Tensor, topk: int = 5):
        from fastres.engine import Classification

        parts = [(n, self.engine.classify(rows, topk=topk)) for n, rows in self._chunks(images)]
        labels = None
        if parts[0][1].labels is not None:
            labels = [row for n, part in parts for row in part.labels[:n]]
        return Classification(torch.cat([part.indices[:n] for n, part in parts]),
                              torch.cat([part.probs[:n] for n, part in parts]), labels)


def output_schema(logits: bool = False, node_id: bool = False):
    """The pyarrow schema of ``EnginePredictor``'s rows."""
    import pyarrow as pa

    fields = [("path", pa.string())]
    if logits:
        fields.append(("logits", pa.list_(pa.float32())))
    else:
        fields += [("indices", pa.list_(pa.int64())), ("probs", pa.list_(pa.float32())),
                   ("labels", pa.list_(pa.string()))]
    fields.append(("error", pa.string()))
    if node_id:
        fields.append(("node_id", pa.string()))
    return pa.schema(fields)


# -- offline: Ray Data ------------------------------------------------------------------------
class EnginePredictor:
    """Callable class for ``ray.data.Dataset.map_batches``: one Engine per actor, built from the
    export file at ``weights`` when the actor starts.

    Batches (``batch_format="numpy"``) carry ``path`` (str) and optionally ``bytes`` (the encoded
    image, as ``ray.data.read_binary_files(..., include_paths=True)`` makes it); without ``bytes``
    the actor reads the file at ``path``. Returns a ``pyarrow.Table`` (``output_schema``), one row
    per input row, in order. ``topk`` classes per row, or the raw ``logits`` (float32) when
    ``logits=True``. ``batch_size`` is the Engine's one bucket unless ``engine_options`` gives
    ``batch_sizes``; ``device`` defaults to CUDA when the actor sees a GPU. ``node_id=True`` adds
    the Ray node id of the actor that computed each row.
    """

    def __init__(self, weights, *, topk: int = 5, batch_size: int = 64, logits: bool = False,
                 device=None, node_id: bool = False, engine_options: Optional[dict] = None):
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"fastres.ray.EnginePredictor: topk must be a positive int, got {topk!r}")
        options = dict(engine_options or {})
        batch_sizes = options.pop("batch_sizes", (batch_size,))
        self.engine, self.resize, self.crop = _engine(weights, batch_sizes=batch_sizes, device=device,
                                                      **options)
        self._run = _FullBuckets(self.engine)
        self.topk, self.logits = topk, logits
        self.schema = output_schema(logits, node_id)
        self.node_id = None
        if node_id:
            self.node_id = _import("ray").get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> "Any":
        import pyarrow as pa

        from fastres.classify import classify_images, read_image

        if "path" not in batch:
            raise KeyError(f"fastres.ray.EnginePredictor: batches need a 'path' column (and optionally "
                           f"'bytes'), got columns {sorted(batch)}")
        paths = [str(p) for p in batch["path"]]
        sources = list(batch["bytes"]) if "bytes" in batch else paths
        images, errors = zip(*(read_image(s, self.resize, self.crop) for s in sources)) if paths else ((), ())
        columns: dict[str, list] = {"path": paths}
        if self.logits:
            logits: list = [None] * len(paths)
            good = [row for row, image in enumerate(images) if image is not None]
            if good:
                out = self._run(torch.stack([images[row] for row in good])).float().cpu()
                for j, row in enumerate(good):
                    logits[row] = out[j].numpy()
            columns["logits"] = logits
            columns["error"] = list(errors)
        else:
            results = classify_images(self._run, paths, list(images), list(errors), topk=self.topk)
            columns["indices"] = [r.indices for r in results]
            columns["probs"] = [r.probs for r in results]
            columns["labels"] = [r.labels for r in results]
            columns["error"] = [r.error for r in results]
        if self.node_id is not None:
            columns["node_id"] = [self.node_id] * len(paths)
        return pa.Table.from_pydict(columns, schema=self.schema)


def _paths_dataset(paths):
    from fastres.classify import find_images

    rd = _import("ray.data")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files, missing = find_images([os.fspath(p) for p in paths])
    if missing:
        raise FileNotFoundError(f"fastres.ray.predict: no such file or directory: {', '.join(missing)}")
    if not files:
        raise ValueError("fastres.ray.predict: no image files found")
    return rd.from_items([{"path": os.path.abspath(f)} for f in files])


def _check_cpus(ray, num_workers: int, cpus_per_worker: float) -> None:
    """An actor pool holding every CPU starves the read and write tasks: the job hangs silently."""
    total = ray.cluster_resources().get("CPU", 0)
    held = num_workers * cpus_per_worker
    if total and held > total - 1:
        raise ValueError(f"fastres.ray.predict: {num_workers} workers x {cpus_per_worker} CPUs hold "
                         f"{held:g} of the cluster's {total:g} CPUs; Ray Data's read and write tasks "
                         f"need at least one free CPU or the job hangs. Use fewer workers or a "
                         f"fractional num_cpus_per_worker (e.g. 0.5).")


def predict(dataset_or_paths, weights, *, batch_size: int = 64, num_workers: int = 1,
            num_gpus_per_worker: float = 0, num_cpus_per_worker: float = 1, topk: int = 5,
            logits: bool = False, output: Optional[str] = None, output_format: str = "parquet",
            node_id: bool = False, device=None, engine_options: Optional[dict] = None,
            start_timeout_s: float = 600):
    """Top-k (or logits) for every image of a Ray Dataset or of files and directories, on a pool of
    ``num_workers`` actors each holding one Engine built from the export file ``weights``.

    ``dataset_or_paths``: a ``ray.data.Dataset`` with a ``path`` column (and optionally ``bytes``,
    e.g. ``ray.data.read_binary_files(..., include_paths=True)``), or a path or list of paths (files,
    or directories searched like ``fastres classify`` does; read by the actors, so they must be
    visible on every node). Returns the lazy predictions Dataset (``output_schema``) when ``output``
    is None, else writes it to the directory ``output`` with Ray Data's writer for
    ``output_format`` (Parquet by default) and returns ``output``.

    Ray must be initialised (``ray.init(...)``): fastres never picks a cluster for you. Actors
    take ``num_cpus_per_worker`` CPUs and ``num_gpus_per_worker`` GPUs each (one GPU per actor
    gives one Engine per GPU), spread over the nodes (Ray Data's default scheduling strategy); at
    least one CPU must stay free for Ray Data's own tasks. The job starts when the whole pool is up
    and fails if that takes more than ``start_timeout_s`` (the cluster cannot place the actors).
    """
    ray = _import("ray")
    rd = _import("ray.data")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"fastres.ray.predict: output_format must be one of {OUTPUT_FORMATS}, "
                         f"got {output_format!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"fastres.ray.predict: num_workers must be a positive int, got {num_workers!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fastres.ray.predict: batch_size must be a positive int, got {batch_size!r}")
    if not os.path.isfile(os.fspath(weights)):
        raise FileNotFoundError(f"fastres.ray.predict: no export file at {weights} (it is read by "
                                f"each actor: use a path every node can read)")
    dataset = dataset_or_paths if isinstance(dataset_or_paths, rd.Dataset) else _paths_dataset(dataset_or_paths)
    if not ray.is_initialized():
        raise RuntimeError("fastres.ray.predict: Ray is not initialised; call ray.init(address=...) "
                           "first (ray.init(address='auto') joins a running cluster, "
                           "ray.init(address='local') starts one on this machine)")
    _check_cpus(ray, num_workers, num_cpus_per_worker)
    predictions = dataset.map_batches(
        EnginePredictor, batch_size=batch_size, batch_format="numpy",
        compute=rd.ActorPoolStrategy(size=num_workers),
        fn_constructor_kwargs=dict(weights=os.path.abspath(os.fspath(weights)), topk=topk,
                                   batch_size=batch_size, logits=logits, device=device,
                                   node_id=node_id, engine_options=engine_options),
        num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker or None)
    # wait for the whole pool before the first batch (work spreads over every actor), and fail with a
    # timeout instead of hanging when the cluster cannot place it
    predictions.context.wait_for_min_actors_s = max(1, int(start_timeout_s))
    if output is None:
        return predictions
    getattr(predictions, f"write_{output_format}")(os.fspath(output))
    return output


# -- online: Ray Serve ------------------------------------------------------------------------
class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _pixels_in_header(data: bytes) -> Optional[int]:
    """width x height read from the image header without decoding it (None when the header is
    not one PIL reads: the decoder then says what is wrong)."""
    try:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        return width * height
    except Exception:
        return None


class ClassifierDeployment:
    """A Ray Serve replica holding one Engine (wrapped by ``serve.deployment`` in ``serve_app``).

    HTTP ``POST /``: the body is one encoded image (any content type but JSON), or JSON
    ``{"images": [base64, ...]}`` for a batch; ``?topk=K`` overrides the default. Answers
    ``{"topk": [{"index", "label", "prob"}, ...]}`` for one image, ``{"results": [{"topk": ...},
    ...]}`` for a batch; the header ``x-fastres-batch-sizes`` lists the micro-batch size each image
    ran in. ``GET /`` describes the model. 400 (not an image, bad JSON, bad topk), 413 (body,
    image pixels or batch over the limits), 405 (other methods); the replica keeps serving.
    """

    def __init__(self, weights, *, topk: int = 5, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, max_body_bytes: int = 16 * 2**20,
                 max_batch_images: int = 64, max_image_pixels: int = 50_000_000, device=None,
                 decode_threads: int = 2, engine_options: Optional[dict] = None):
        serve = _import("ray.serve")
        options = dict(engine_options or {})
        batch_sizes = options.pop("batch_sizes", None) or sorted(
            {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size} | {max_batch_size})
        if max(batch_sizes) < max_batch_size:
            raise ValueError(f"fastres.ray.serve_app: max_batch_size {max_batch_size} is larger than the "
                             f"largest engine bucket {max(batch_sizes)}")
        self.engine, self.resize, self.crop = _engine(weights, batch_sizes=batch_sizes, device=device,
                                                      **options)
        self._run = _FullBuckets(self.engine)
        self.topk = topk
        self.max_body_bytes = max_body_bytes
        self.max_batch_images = max_batch_images
        self.max_image_pixels = max_image_pixels
        self.max_batch_size = max_batch_size
        # the Engine on one thread of its own, decoding on a few others: the event loop stays free
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastres-engine")
        self._decoders = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="fastres-decode")
        self._classify_batched = serve.batch(max_batch_size=max_batch_size,
                                             batch_wait_timeout_s=batch_wait_timeout_s)(self._classify_batch)
        self.batches_run = 0

    # -- the micro-batch --------------------------------------------------------------------
    async def _classify_batch(self, items: list) -> list:
        """items: (uint8 [crop, crop, 3], topk) each; one Engine call for all of them."""
        loop = asyncio.get_running_loop()
        images = torch.stack([image for image, _ in items])
        k = max(topk for _, topk in items)
        top = await loop.run_in_executor(self._engine_thread, self._run.classify, images, k)
        self.batches_run += 1
        indices, probs = top.indices.tolist(), top.probs.tolist()
        out = []
        for row, (_, topk) in enumerate(items):
            labels = top.labels[row][:topk] if top.labels is not None else [None] * topk
            out.append(([{"index": i, "label": label, "prob": p} for i, label, p in
                         zip(indices[row][:topk], labels, probs[row][:topk])], len(items)))
        return out

    # -- HTTP -------------------------------------------------------------------------------
    async def _read_body(self, request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise BadRequest(413, f"request body of {int(length)} bytes is over the limit of "
                                  f"{self.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BadRequest(413, f"request body is over the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _images_of(self, request, body: bytes) -> tuple[list[bytes], bool]:
        """(encoded images, whether the request was a batch)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            if not body:
                raise BadRequest(400, "empty request body: POST the bytes of an image, or JSON "
                                      '{"images": [base64, ...]}')
            return [body], False
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(400, f"request body is not valid JSON: {err}") from None
        images = payload.get("images") if isinstance(payload, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise BadRequest(400, 'JSON requests must be {"images": [base64 string, ...]}')
        if not images:
            raise BadRequest(400, "empty batch: \"images\" holds no images")
        if len(images) > self.max_batch_images:
            raise BadRequest(413, f"batch of {len(images)} images is over the limit of "
                                  f"{self.max_batch_images} per request")
        decoded = []
        for n, text in enumerate(images):
            try:
                decoded.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError) as err:
                raise BadRequest(400, f"images[{n}] is not valid base64: {err}") from None
        return decoded, True

    def _decode(self, data: bytes, what: str) -> torch.Tensor:
        from fastres.classify import read_image

        pixels = _pixels_in_header(data)
        if pixels is not None and pixels > self.max_image_pixels:
            raise BadRequest(413, f"{what} has {pixels} pixels, over the limit of {self.max_image_pixels}")
        image, error = read_image(data, self.resize, self.crop)
        if image is None:
            raise BadRequest(400, f"{what} is not a readable image ({error})")
        return image

    def _topk_of(self, request) -> int:
        text = request.query_params.get("topk")
        if text is None:
            return min(self.topk, self.engine.num_classes)
        if not text.isdigit() or not 1 <= int(text) <= self.engine.num_classes:
            raise BadRequest(400, f"topk must be an integer from 1 to {self.engine.num_classes}, got {text!r}")
        return int(text)

    def info(self) -> dict:
        e = self.engine
        return {"model": e.arch, "num_classes": e.num_classes, "categories": e.categories,
                "image_size": e.image_size, "resize": self.resize, "device": str(e.device),
                "dtype": str(e.dtype).removeprefix("torch."), "batch_sizes": list(e.batch_sizes),
                "max_batch_size": self.max_batch_size, "max_body_bytes": self.max_body_bytes,
                "max_batch_images": self.max_batch_images, "max_image_pixels": self.max_image_pixels,
                "batches_run": self.batches_run}

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if request.method == "GET":
            return JSONResponse(self.info())
        if request.method != "POST":
            return JSONResponse({"error": f"method {request.method} not allowed: POST an image"},
                                status_code=405)
        loop = asyncio.get_running_loop()
        try:
            topk = self._topk_of(request)
            body = await self._read_body(request)
            encoded, is_batch = self._images_of(request, body)
            names = [f"images[{n}]" for n in range(len(encoded))] if is_batch else ["request body"]
            images = await asyncio.gather(*(loop.run_in_executor(self._decoders, self._decode, data, name)
                                            for data, name in zip(encoded, names)))
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        answers = await asyncio.gather(*(self._classify_batched((image, topk)) for image in images))
        headers = {"x-fastres-batch-sizes": ",".join(str(size) for _, size in answers)}
        if is_batch:
            return JSONResponse({"results": [{"topk": top} for top, _ in answers]}, headers=headers)
        return JSONResponse({"topk": answers[0][0]}, headers=headers)


def serve_app(weights, *, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
              num_replicas: int = 1, num_gpus_per_replica: float = 0, num_cpus_per_replica: float = 1,
              topk: int = 5, max_ongoing_requests: Optional[int] = None, name: str = "fastres",
              **options):
    """A Ray Serve application (``serve.run(app)``) classifying images over HTTP with one Engine per
    replica (see ``ClassifierDeployment`` for the protocol). ``options`` go to the replica:
    ``max_body_bytes``, ``max_batch_images``, ``max_image_pixels``, ``device``, ``decode_threads``,
    ``engine_options`` (Engine keywords; ``batch_sizes`` defaults to powers of two up to
    ``max_batch_size``)."""
    serve = _import("ray.serve")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"fastres.ray.serve_app: max_batch_size must be a positive int, got {max_batch_size!r}")
    if not os.path.isfile(os.fspath(weights)):
        raise FileNotFoundError(f"fastres.ray.serve_app: no export file at {weights} (each replica "
                                f"reads it: use a path every node can read)")
    actor_options: dict[str, Any] = {"num_cpus": num_cpus_per_replica}
    if num_gpus_per_replica:
        actor_options["num_gpus"] = num_gpus_per_replica
    deployment = serve.deployment(
        ClassifierDeployment, name=name, num_replicas=num_replicas, ray_actor_options=actor_options,
        # enough requests in flight per replica to fill a micro-batch, with the next one queueing
        max_ongoing_requests=max_ongoing_requests or max(16, 4 * max_batch_size))
    return deployment.bind(os.path.abspath(os.fspath(weights)), topk=topk, max_batch_size=max_batch_size,
                           batch_wait_timeout_s=batch_wait_timeout_s, **options)


# -- command line ---------------------------------------------------------------------------
def connect(address: str) -> bool:
    """Join the cluster at ``address`` (``ray.init(address=...)``), or start one on this machine for
    ``"local"``, bound to 127.0.0.1 without the dashboard. Returns whether this call initialised
    Ray (False when the process already was connected: that connection is used)."""
    ray = _import("ray")
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def classify_main(args, files: list[str], failures: int) -> int:
    """``fastres classify --ray ADDRESS|local PATH...``: the files through ``predict``; results
    printed like ``fastres classify`` does (or written to ``--output DIR`` as Parquet)."""
    import sys

    from fastres.checkpoint import ExportFormatError, read_export
    from fastres.classify import Result

    try:
        read_export(args.weights)
    except (FileNotFoundError, ExportFormatError) as err:
        print(f"fastres classify --ray: --weights must be a fastres export file every node can read "
              f"(fastres export ...): {err}", file=sys.stderr)
        return 2
    try:
        started = connect(args.ray)
    except (ImportError, ConnectionError, RuntimeError, ValueError) as err:
        print(f"fastres classify: --ray {args.ray}: {err}", file=sys.stderr)
        return 2
    ray = _import("ray")
    try:
        predictions = predict(files, args.weights, batch_size=args.batch, num_workers=args.ray_workers,
                              num_gpus_per_worker=args.ray_gpus_per_worker,
                              num_cpus_per_worker=args.ray_cpus_per_worker, topk=args.topk,
                              device=None if args.device == "auto" else args.device)
        if args.output:
            predictions.write_parquet(args.output)
            predictions = ray.data.read_parquet(args.output)
        by_path: dict[str, dict] = {}
        for row in predictions.select_columns(["path", "indices", "probs", "labels", "error"]).iter_rows():
            by_path[row["path"]] = row
    except ValueError as err:
        print(f"fastres classify: {err}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    for path in files:
        row = by_path[os.path.abspath(path)]
        if row["error"] is not None:
            failures += 1
            print(f"fastres classify: skipped {path}: {row['error']}", file=sys.stderr)
        elif not args.output:
            result = Result(path, list(row["indices"]), list(row["probs"]),
                            list(row["labels"]) if row["labels"] is not None else None)
            print(result.json() if args.json else result.text(), flush=True)
    if args.output:
        print(f"wrote {len(files)} rows to {args.output} (Parquet)")
    return 1 if failures else 0


def serve_main(args) -> int:
    """``fastres serve FILE``: the Serve application on HTTP ``--host``:``--port`` until Ctrl-C."""
    import signal
    import sys
    import threading

    try:
        serve = _import("ray.serve")
        started = connect(args.address)
    except (ImportError, ConnectionError, RuntimeError, ValueError) as err:
        print(f"fastres serve: --address {args.address}: {err}", file=sys.stderr)
        return 2
    ray = _import("ray")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (
            1 if ray.cluster_resources().get("GPU", 0) else 0)
        app = serve_app(args.weights, max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_timeout_s, num_replicas=args.num_replicas,
                        num_gpus_per_replica=gpus, num_cpus_per_replica=args.cpus_per_replica,
                        topk=args.topk, max_body_bytes=args.max_body_bytes)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="fastres", route_prefix="/")
        print(f"fastres serve: {args.weights} on http://{args.host}:{args.port}/ ({args.num_replicas} "
              f"replica(s), {gpus} GPU each); POST an image, Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
    except (ValueError, FileNotFoundError) as err:
        print(f"fastres serve: {err}", file=sys.stderr)
        return 2
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return 0

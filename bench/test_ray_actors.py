"""images/s of ``fastres.ray.predict`` with 1 and 2 actors on one machine (measured, not asserted).

    make bench-ray      # = .ci/loopback-netns .venv/bin/python -m pytest bench/test_ray_actors.py -s

Like the Ray tests, this starts a local cluster only inside a loopback-only network namespace
(elsewhere it skips). Workload: a resnet18-structured fastres model (random weights, 10 classes),
fp32 on CPU, PNG files of 80x80 resized to 72 and centre-cropped to 64, batch 16; each actor reads
and decodes its own files and holds 1 CPU (Ray gives it one intra-op thread), one CPU stays free
for Ray Data. Two timings per actor count: the whole job (actor start included) for SMALL and LARGE
images, and the marginal rate ``(LARGE - SMALL) / (t_LARGE - t_SMALL)``, which cancels the actor
start-up and shows the steady-state throughput. On a 2-core machine the cluster gets 3 logical CPUs
(2 actors + 1 for Ray Data), so 2 actors oversubscribe the cores slightly.
"""
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

import fastres
from fastres import benchmark as fb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ray_cluster import NOT_LOOPBACK_ONLY, local_ray_cluster, loopback_only, ray_environment  # noqa: E402

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed: "
                       "pip install 'fastres[ray]'"),
    pytest.mark.skipif(not loopback_only(), reason=NOT_LOOPBACK_ONLY),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
SMALL, LARGE = 64, int(os.environ.get("FASTRES_RAY_BENCH_IMAGES", "1536"))
BATCH = 16
ACTORS = (1, 2)
_rates: dict = {}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-bench")
    torch.manual_seed(0)
    export = root / "r18.safetensors"
    fastres.export(fastres.resnet18(num_classes=10).eval(), export, dtype=torch.float32,
                   preprocess={"resize": 72, "crop": 64})
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(LARGE):
        coarse = torch.rand(1, 3, 5, 5, generator=g)
        image = torch.nn.functional.interpolate(coarse, size=(80, 80), mode="bilinear")[0]
        path = root / f"img_{i:04d}.png"
        write_png((image * 255).round().to(torch.uint8), str(path))
        paths.append(str(path))
    with ray_environment() as ray, local_ray_cluster(ray, num_cpus=max(ACTORS) + 1):
        yield ray, str(export), paths


def _job(ray, export, paths, actors) -> float:
    start = time.perf_counter()
    rows = fastres.ray.predict(paths, export, batch_size=BATCH, num_workers=actors,
                               num_cpus_per_worker=1).materialize()
    elapsed = time.perf_counter() - start
    assert rows.count() == len(paths)
    return elapsed


@pytest.mark.parametrize("actors", ACTORS)
def test_ray_predict_throughput(benchmark, workload, actors):
    ray, export, paths = workload
    benchmark.group = f"fastres.ray.predict resnet18 cpu fp32 64x64 batch {BATCH}"
    t_small = _job(ray, export, paths[:SMALL], actors)
    t_large = benchmark.pedantic(_job, args=(ray, export, paths, actors), rounds=1, iterations=1)
    marginal = (LARGE - SMALL) / max(t_large - t_small, 1e-9)
    _rates[actors] = marginal
    info = {"actors": actors, "images": LARGE, "job_s": round(t_large, 2),
            "job_images_per_s": round(LARGE / t_large, 1), f"job_s_{SMALL}_images": round(t_small, 2),
            "marginal_images_per_s": round(marginal, 1), "device": fb.device_name("cpu"),
            "versions": {**fb.versions(), "ray": ray.__version__}}
    if 1 in _rates and actors != 1:
        info["speedup_over_1_actor"] = round(marginal / _rates[1], 2)
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info))

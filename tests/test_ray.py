"""fastres.ray on real Ray clusters started by the tests: Ray Data predictions with two actors equal
a single-process Engine bit for bit, bad files are error rows, a two-node cluster places actors on
both nodes; the Serve deployment under a bounded concurrent load answers like the Engine, batches
requests, and answers bad requests with 4xx while it keeps serving; ``fastres classify --ray`` and
``fastres serve``. Two tests need no cluster (the predictor's batch function alone, the message
when Ray is missing) and run anywhere.

Network: the cluster tests run only inside a network namespace whose sole interface is loopback
(``make test-ray`` runs this file through ``.ci/loopback-netns``: ``unshare -n`` + ``ip link set
lo up``); elsewhere they skip. Every Ray address is 127.0.0.1 and the tests check that every
address the cluster reports and every socket listening in the namespace is loopback. Clusters use
their own temp dir and a token made for the test (nothing read from or written to ~/.ray); every
process a test starts is stopped by its pid (``ray_cluster.stop_processes``), never by name.
"""
import base64
import concurrent.futures
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import torch
import torchvision
from torchvision.io import write_png

import fastres
from fastres import cli
from fastres.classify import load_image, preprocessing

from digits import MEAN, SIZE, STD, trained_digits_model
from ray_cluster import (NOT_LOOPBACK_ONLY, assert_cluster_on_loopback, free_port, interfaces,
                         local_ray_cluster, loopback_only, ray_environment, stop_processes)

CATEGORIES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_IMAGES = 40
BATCH = 8                    # Ray Data batch size and the Engine's one bucket
TOPK = 3
RAY_STARTUP_S = 120


needs_cluster = [
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason="Ray is not installed: pip install 'fastres[ray]' (make test installs it)"),
    pytest.mark.skipif(not loopback_only(), reason=NOT_LOOPBACK_ONLY),
]


def with_cluster(test):
    for mark in needs_cluster:
        test = mark(test)
    return test


pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),     # Ray's own pydantic use
]


# -- data and reference -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(export path, {png path: label}, broken paths): held-out digits as PNGs (some larger and
    non-square, some grayscale) and two files that are not images."""
    model, _, labels, images = trained_digits_model()
    root = tmp_path_factory.mktemp("ray-digits")
    export = root / "digits.safetensors"
    fastres.export(model, export, dtype=torch.float32, categories=CATEGORIES,
                   preprocess={"resize": SIZE, "crop": SIZE, "mean": MEAN, "std": STD})
    image_dir = root / "images"
    image_dir.mkdir()
    files = {}
    for i in range(N_IMAGES):
        pixels = (images[i] * 255).round().to(torch.uint8)
        if i % 3 == 1:
            pixels = torchvision.transforms.functional.resize(pixels, [20, 24], antialias=True)
        if i % 4 == 2:
            pixels = pixels[:1]
        path = image_dir / f"digit_{i:02d}.png"
        write_png(pixels, str(path))
        files[str(path)] = int(labels[i])
    broken = [image_dir / "broken.png", image_dir / "truncated.png"]
    broken[0].write_bytes(b"this is not a PNG")
    broken[1].write_bytes(open(next(iter(files)), "rb").read()[:60])
    return export, files, [str(p) for p in broken]


def reference_engine(export):
    """The independent reference: a single-process Engine with the same one bucket."""
    return fastres.Engine(str(export), batch_sizes=(BATCH,), device="cpu")


def reference_topk(export, paths, topk=TOPK):
    """{path: (indices, probs, labels)} from the single-process Engine over all files at once, in
    full batches (fastres.ray pads every batch to its bucket)."""
    assert len(paths) % BATCH == 0
    resize, crop = preprocessing(fastres.load(export).meta)
    images = torch.stack([load_image(p, resize, crop) for p in paths])
    top = reference_engine(export).classify(images, topk=topk)
    return {p: (top.indices[i].tolist(), top.probs[i].tolist(), top.labels[i]) for i, p in enumerate(paths)}


# -- clusters ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_module():
    with ray_environment() as ray:
        yield ray


@pytest.fixture(scope="class")
def local_cluster(ray_module):
    with local_ray_cluster(ray_module, num_cpus=2) as cluster:
        yield cluster


def read_predictions(ds_or_dir, ray):
    rows = ray.data.read_parquet(ds_or_dir).take_all() if isinstance(ds_or_dir, str) else ds_or_dir.take_all()
    return {row["path"]: row for row in rows}


# -- without a cluster ------------------------------------------------------------------------
def test_missing_ray_says_what_to_install(monkeypatch, digits):
    export, files, _ = digits
    for name in ("ray", "ray.data", "ray.serve"):
        monkeypatch.setitem(sys.modules, name, None)     # import ray -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastres\[ray\]'"):
        fastres.ray.predict(sorted(files), str(export))
    with pytest.raises(ImportError, match=r"pip install 'fastres\[ray\]'"):
        fastres.ray.serve_app(str(export))


def test_engine_predictor_in_process(digits):
    """The predictor's batch function alone (no Ray: pyarrow only): rows in order, error rows, and
    every batch padded to the bucket, so odd batch sizes give the full-batch answers bit for bit."""
    pytest.importorskip("pyarrow", reason="pip install 'fastres[ray]'")
    import numpy as np

    export, files, broken = digits
    predictor = fastres.ray.EnginePredictor(str(export), topk=TOPK, batch_size=BATCH)
    paths = sorted(files)
    expected = reference_topk(export, paths)
    batch = [paths[0], broken[0], paths[1], broken[1], paths[2]]     # 3 images: padded to 8
    for chunk in ([paths[5]], batch, paths[8:24]):                   # 1, 5 and 16 (two buckets) rows
        table = predictor({"path": np.array(chunk, dtype=object)})
        assert table.schema == fastres.ray.output_schema() and table.column("path").to_pylist() == chunk
        for row in table.to_pylist():
            if row["path"] in broken:
                assert row["indices"] is None and row["error"].startswith("cannot decode image")
            else:
                assert (row["indices"], row["probs"], row["labels"]) == expected[row["path"]]
                assert row["error"] is None
    table = predictor({"path": np.array(paths[:2], dtype=object),
                       "bytes": np.array([open(p, "rb").read() for p in paths[:2]], dtype=object)})
    assert [r["indices"] for r in table.to_pylist()] == [expected[p][0] for p in paths[:2]]


@with_cluster
class TestLocalCluster:
    def test_cluster_is_on_loopback(self, local_cluster):
        ray, _ = local_cluster
        assert interfaces() == ["lo"]
        assert_cluster_on_loopback(ray)

    def test_predict_two_actors_equals_engine(self, local_cluster, digits, tmp_path):
        ray, _ = local_cluster
        export, files, broken = digits
        out = tmp_path / "predictions"
        start = time.monotonic()
        assert fastres.ray.predict(sorted(files) + broken, str(export), batch_size=BATCH, num_workers=2,
                                   num_cpus_per_worker=0.5, topk=TOPK, output=str(out)) == str(out)
        elapsed = time.monotonic() - start
        assert list(out.glob("*.parquet"))
        rows = read_predictions(str(out), ray)
        assert set(rows) == set(files) | set(broken)            # one row per input, with its path
        expected = reference_topk(export, sorted(files))
        correct = 0
        for path, (indices, probs, labels) in expected.items():
            row = rows[path]
            assert row["error"] is None, row
            assert list(row["indices"]) == indices
            assert list(row["labels"]) == labels == [CATEGORIES[i] for i in indices]
            # bit for bit: the float32 probabilities round-trip Parquet exactly
            assert torch.equal(torch.tensor(list(row["probs"]), dtype=torch.float32),
                               torch.tensor(probs, dtype=torch.float32)), path
            correct += indices[0] == files[path]
        assert correct >= 0.8 * len(files)
        for path in broken:
            assert rows[path]["indices"] is None and rows[path]["probs"] is None
            assert "cannot decode image" in rows[path]["error"]
        print(f"\nRay Data: {len(rows)} images, 2 actors, {elapsed:.1f} s including actor start")

    def test_predict_dataset_of_bytes_and_logits(self, local_cluster, digits):
        """A Dataset from Ray's own reader (bytes + path columns); logits instead of top-k."""
        ray, _ = local_cluster
        export, files, broken = digits
        paths = sorted(files)[:16] + broken[:1]
        ds = ray.data.read_binary_files(paths, include_paths=True)
        rows = read_predictions(fastres.ray.predict(ds, str(export), batch_size=BATCH, num_workers=1,
                                                    num_cpus_per_worker=0.5, logits=True), ray)
        assert len(rows) == len(paths)
        rows = {os.path.basename(p): r for p, r in rows.items()}   # readers may drop the leading /
        resize, crop = preprocessing(fastres.load(export).meta)
        good = sorted(files)[:16]
        expected = reference_engine(export)(torch.stack([load_image(p, resize, crop) for p in good]))
        assert len(good) % BATCH == 0
        for i, path in enumerate(good):
            row = rows[os.path.basename(path)]
            assert row["error"] is None
            # CPU oneDNN programs: a batch padded or split differently may differ in the last bits
            torch.testing.assert_close(torch.tensor(row["logits"]), expected[i], rtol=1e-5, atol=1e-6, msg=path)
        bad = rows[os.path.basename(broken[0])]
        assert bad["logits"] is None and "cannot decode image" in bad["error"]

    def test_predict_refuses_to_starve_the_readers(self, local_cluster, digits):
        export, files, _ = digits
        with pytest.raises(ValueError, match="need at least one free CPU"):
            fastres.ray.predict(sorted(files), str(export), num_workers=2, num_cpus_per_worker=1)
        with pytest.raises(TypeError, match="path of a fastres.export file"):
            fastres.ray.EnginePredictor(fastres.load(export))

    def test_classify_cli_on_ray(self, local_cluster, digits, capsys):
        export, files, broken = digits
        some = sorted(files)[:BATCH]
        code = cli.main(["classify", "--ray", "local", *some, broken[0], "--weights", str(export),
                         "--json", "--topk", str(TOPK), "--batch", str(BATCH), "--ray-workers", "1",
                         "--ray-cpus-per-worker", "0.5"])
        out, err = capsys.readouterr()
        assert code == 1 and "broken.png" in err and "skipped" in err
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["path"] for r in rows] == some
        expected = reference_topk(export, some)
        for row in rows:
            indices, probs, _ = expected[row["path"]]
            assert [t["index"] for t in row["topk"]] == indices
            assert [t["prob"] for t in row["topk"]] == probs

    def test_serve_under_load(self, local_cluster, digits):
        ray, _ = local_cluster
        from ray import serve

        export, files, broken = digits
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = fastres.ray.serve_app(str(export), max_batch_size=BATCH, batch_wait_timeout_s=0.05,
                                    num_cpus_per_replica=0.5, topk=TOPK, max_body_bytes=64 * 1024,
                                    max_batch_images=16, max_image_pixels=100_000,
                                    engine_options={"batch_sizes": (BATCH,)})
        serve.run(app, name="digits", route_prefix="/")
        url = f"http://127.0.0.1:{port}/"
        assert_cluster_on_loopback(ray, serve_replicas=1)
        paths = sorted(files)
        expected = reference_topk(export, paths)
        blobs = {p: open(p, "rb").read() for p in paths}

        def post(body: bytes, content_type="image/png", query=""):
            request = urllib.request.Request(url + query, data=body, method="POST",
                                             headers={"content-type": content_type})
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    return r.status, json.loads(r.read()), r.headers.get("x-fastres-batch-sizes")
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read()), None

        big = io.BytesIO()
        from PIL import Image
        Image.new("RGB", (400, 400)).save(big, format="PNG")   # 160000 pixels, a small body
        bad_requests = [
            (lambda: post(b"this is not an image"), 400, "not a readable image"),
            (lambda: post(open(broken[1], "rb").read()), 400, "not a readable image"),
            (lambda: post(b""), 400, "empty request body"),
            (lambda: post(os.urandom(100 * 1024)), 413, "over the limit"),
            (lambda: post(big.getvalue()), 413, "pixels, over the limit"),
            (lambda: post(b"{not json", "application/json"), 400, "not valid JSON"),
            (lambda: post(json.dumps({"images": ["@@@"]}).encode(), "application/json"), 400, "base64"),
            (lambda: post(json.dumps({"images": [base64.b64encode(blobs[paths[0]]).decode()] * 17})
                          .encode(), "application/json"), 413, "per request"),
            (lambda: post(blobs[paths[0]], query="?topk=0"), 400, "topk must be"),
        ]

        def good_single(i):
            path = paths[i % len(paths)]
            status, body, sizes = post(blobs[path])
            return [(path, status, body.get("topk"), sizes)]

        def good_batch(i):
            chosen = [paths[(i + j) % len(paths)] for j in range(3)]
            payload = json.dumps({"images": [base64.b64encode(blobs[p]).decode() for p in chosen]})
            status, body, sizes = post(payload.encode(), "application/json")
            results = body.get("results") or [{}] * 3
            return [(p, status, r.get("topk"), sizes) for p, r in zip(chosen, results)]

        n_requests, deadline = 200, time.monotonic() + 240
        jobs = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for i in range(n_requests):
                if i % 20 == 7:
                    call, status, message = bad_requests[(i // 20) % len(bad_requests)]
                    jobs.append(("bad", status, message, pool.submit(call)))
                else:
                    jobs.append(("good", None, None, pool.submit(good_batch if i % 10 == 3 else good_single, i)))
            answers, batch_sizes, bad_seen = [], [], 0
            for kind, status, message, future in jobs:
                result = future.result(timeout=max(1.0, deadline - time.monotonic()))
                if kind == "bad":
                    got_status, body, _ = result
                    assert got_status == status and message in body["error"], (status, message, body)
                    bad_seen += 1
                else:
                    answers += result
        assert bad_seen == 10
        for path, status, top, sizes in answers:
            assert status == 200, (path, status, top)
            indices, probs, labels = expected[path]
            assert [t["index"] for t in top] == indices, path
            assert [t["label"] for t in top] == labels
            # (the last bits may differ: the CPU oneDNN program's batches are composed differently)
            torch.testing.assert_close([t["prob"] for t in top], probs, rtol=1e-5, atol=1e-7, msg=path)
            batch_sizes += [int(s) for s in sizes.split(",")]
        assert len(answers) == (n_requests - 10 - 20) + 20 * 3      # 170 single images, 20 batches of 3
        assert max(batch_sizes) > 1, "no micro-batch held more than one request"
        # every bad request got its 4xx from the same, still serving replica
        for call, status, _ in bad_requests:
            assert call()[0] == status
        status, body, _ = post(blobs[paths[0]])
        assert status == 200 and [t["index"] for t in body["topk"]] == expected[paths[0]][0]
        with urllib.request.urlopen(url, timeout=30) as r:
            info = json.loads(r.read())
        assert info["batch_sizes"] == [BATCH] and info["categories"] == CATEGORIES
        assert serve.status().applications["digits"].status == "RUNNING"
        replicas = serve.status().applications["digits"].deployments["fastres"].replica_states
        assert replicas == {"RUNNING": 1}, replicas
        print(f"\nServe: {len(answers)} answers, micro-batches up to {max(batch_sizes)} images, "
              f"mean {sum(batch_sizes) / len(batch_sizes):.1f}")
        serve.delete("digits")


# -- two nodes on one machine -----------------------------------------------------------------
def _ray_start(args: list[str], env: dict, log) -> subprocess.Popen:
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.Popen([ray_cli, "start", "--block", "--disable-usage-stats",
                             "--node-ip-address=127.0.0.1", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


@with_cluster
def test_two_node_cluster_places_actors_on_both_nodes(ray_module, digits, tmp_path):
    """``ray start --head`` + ``ray start --address`` on this machine (each node with its own ports
    and the cluster's token), a driver joining them, one actor per node."""
    ray = ray_module
    export, files, broken = digits
    temp_dir = tempfile.mkdtemp(prefix="fastres-ray2-")
    env = dict(os.environ)     # the token and auth mode set by ray_module: the second node needs them
    gcs_port = free_port()
    common = ["--num-cpus=2", "--object-store-memory=" + str(150 * 2**20)]
    procs = []
    log = open(tmp_path / "ray-start.log", "w")

    def ports():
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]

    try:
        procs.append(_ray_start(["--head", f"--port={gcs_port}", "--include-dashboard=false",
                                 f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
                                 *common, *ports()], env, log))
        address = f"127.0.0.1:{gcs_port}"
        deadline = time.monotonic() + RAY_STARTUP_S
        ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
        procs.append(_ray_start([f"--address={address}", *common, *ports()], env, log))
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, open(tmp_path / "ray-start.log").read()[-3000:]
            assert all(p.poll() is None for p in procs), open(tmp_path / "ray-start.log").read()[-3000:]
            time.sleep(0.5)
        assert_cluster_on_loopback(ray)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        rows = read_predictions(fastres.ray.predict(
            sorted(files) + broken, str(export), batch_size=BATCH, num_workers=2, num_cpus_per_worker=1,
            topk=TOPK, node_id=True), ray)
        assert {row["node_id"] for row in rows.values()} == nodes     # actors on both nodes
        expected = reference_topk(export, sorted(files))
        for path, (indices, probs, _) in expected.items():
            assert list(rows[path]["indices"]) == indices
            assert list(rows[path]["probs"]) == probs
        assert all(rows[p]["error"] for p in broken)
    finally:
        ray.shutdown()
        leftover = stop_processes(temp_dir, procs)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftover, f"processes still running after the nodes were stopped, killed: {leftover}"


# -- fastres serve ----------------------------------------------------------------------------
@with_cluster
def test_serve_command(ray_module, digits, tmp_path):
    """``fastres serve FILE`` in a process of its own (its own local cluster, in a temp dir of its
    own): it answers over loopback like the Engine, and Ctrl-C stops it and everything it started."""
    export, files, _ = digits
    temp_dir = tempfile.mkdtemp(prefix="fastres-serve-")
    port = free_port()
    env = dict(os.environ, RAY_TMPDIR=temp_dir)   # the token and auth mode set by ray_module
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "fastres"), "serve", str(export),
                             "--port", str(port), "--max-batch-size", "4", "--cpus-per-replica", "0.5",
                             "--topk", str(TOPK)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + RAY_STARTUP_S
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            assert time.monotonic() < deadline, open(tmp_path / "serve.log").read()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    info = json.loads(r.read())
                break
            except OSError:          # not listening yet, or the app not yet deployed
                time.sleep(1)
        assert info["batch_sizes"] == [1, 2, 4] and info["max_batch_size"] == 4
        path = sorted(files)[0]
        request = urllib.request.Request(url, data=open(path, "rb").read(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as r:
            top = json.loads(r.read())["topk"]
        resize, crop = preprocessing(fastres.load(export).meta)
        # alone in its micro-batch: the bucket of one
        expected = fastres.Engine(str(export), batch_sizes=(1,), device="cpu").classify(
            load_image(path, resize, crop)[None], topk=TOPK)
        assert [t["index"] for t in top] == expected.indices[0].tolist()
        assert [t["prob"] for t in top] == expected.probs[0].tolist()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, open(tmp_path / "serve.log").read()[-3000:]
    finally:
        leftover = stop_processes(temp_dir, [proc])
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftover, f"processes still running after fastres serve stopped, killed: {leftover}"

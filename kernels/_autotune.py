"""Optional autotuning on a real GPU, with an on-disk cache of its choices.

Off by default: each kernel's documented rule picks its configuration (and only those choices are
AOT-checked for spills). With ``FASTRES_AUTOTUNE=1`` the first launch of each distinct problem
(kernel name + the shape key the rule is keyed on) on a CUDA device times every candidate
configuration with ``triton.testing.do_bench`` and keeps the fastest. Choices are stored per GPU
model in a JSON file — ``FASTRES_AUTOTUNE_CACHE``, default ``~/.cache/fastres/autotune.json`` — so
later processes reuse them without timing again. The cache holds configuration *names* only; a
name the current candidate list no longer has is ignored and re-tuned.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Mapping


def enabled() -> bool:
    return os.environ.get("FASTRES_AUTOTUNE", "0") not in ("", "0")


def cache_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastres" / "autotune.json"
    return Path(os.environ.get("FASTRES_AUTOTUNE_CACHE", default))


class ChoiceCache:
    """``{gpu name: {kernel: {key: config name}}}`` in one JSON file, written atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict | None = None

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
                if not isinstance(self._data, dict):
                    self._data = {}
            except (OSError, ValueError):
                self._data = {}   # missing or unreadable: tune again, overwrite on the next choice
        return self._data

    def get(self, gpu: str, kernel: str, key: str) -> str | None:
        with self._lock:
            return self._load().get(gpu, {}).get(kernel, {}).get(key)

    def put(self, gpu: str, kernel: str, key: str, choice: str) -> None:
        with self._lock:
            data = self._load()
            data.setdefault(gpu, {}).setdefault(kernel, {})[key] = choice
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


_caches: dict[Path, ChoiceCache] = {}


def _cache() -> ChoiceCache:
    path = cache_path()
    if path not in _caches:
        _caches[path] = ChoiceCache(path)
    return _caches[path]


def _do_bench(fn: Callable[[], None]) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=20)


def choose(kernel: str, key: tuple, candidates: Mapping[str, object], run: Callable[[object], None],
           gpu: str, *, timer: Callable[[Callable[[], None]], float] = _do_bench):
    """The fastest of ``candidates`` for this problem: from the cache, else timed now and cached.

    ``run(config)`` launches the kernel once with ``config`` (into scratch outputs); ``timer(fn)``
    returns a time in ms (``triton.testing.do_bench`` on a GPU).
    """
    cache = _cache()
    key_text = repr(key)
    cached = cache.get(gpu, kernel, key_text)
    if cached in candidates:
        return candidates[cached]
    timings = {name: timer(lambda cfg=cfg: run(cfg)) for name, cfg in candidates.items()}
    best = min(timings, key=timings.get)
    cache.put(gpu, kernel, key_text, best)
    return candidates[best]

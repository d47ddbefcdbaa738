"""Measured choices between equivalent implementations, with an on-disk cache of them.

On a GPU it is optional and off by default: each kernel's documented rule picks its configuration
(and only those choices are AOT-checked for spills). With ``FASTRES_AUTOTUNE=1`` the first launch
of each distinct problem (kernel name + the shape key the rule is keyed on) on a CUDA device times
every candidate configuration with ``triton.testing.do_bench`` and keeps the fastest. On the CPU
the backend's Winograd-or-direct choice for a 3x3 conv is made this way by default
(``fastres.backend.winograd_choice``). Choices are stored per device model in a JSON file —
``FASTRES_AUTOTUNE_CACHE``, default ``~/.cache/fastres/autotune.json`` — so later processes reuse
them without timing again (and so give the same bits). The cache holds candidate *names* only; a
name the current candidate list no longer has is ignored and re-tuned.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Mapping

try:
    import fcntl
except ImportError:          # not Unix: no lock between processes
    fcntl = None


def enabled() -> bool:
    return os.environ.get("FASTRES_AUTOTUNE", "0") not in ("", "0")


def cache_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastres" / "autotune.json"
    return Path(os.environ.get("FASTRES_AUTOTUNE_CACHE", default))


class ChoiceCache:
    """``{device name: {kernel: {key: candidate name}}}`` in one JSON file, written atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict | None = None
        self._unwritable = False        # warned once that the file cannot be written

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
                if not isinstance(self._data, dict):
                    self._data = {}
            except (OSError, ValueError):
                self._data = {}   # missing or unreadable: tune again, overwrite on the next choice
        return self._data

    def get(self, device: str, kernel: str, key: str) -> str | None:
        with self._lock:
            return self._load().get(device, {}).get(kernel, {}).get(key)

    def put(self, device: str, kernel: str, key: str, choice: str) -> str:
        """Keep ``choice`` in memory and in the file and return the choice kept: under a lock file
        the file is read again and merged, and where another process stored a choice for this key
        first, that one is kept (so every process uses the same). Where the file cannot be written
        (a read-only home, a full disk) the choice is kept for this process only, with one warning."""
        with self._lock:
            data = self._load()
            tmp = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
                    if fcntl is not None:
                        fcntl.flock(lock, fcntl.LOCK_EX)
                    try:
                        stored = json.loads(self.path.read_text())
                    except (OSError, ValueError):
                        stored = {}
                    for dev, kernels in (stored.items() if isinstance(stored, dict) else ()):
                        for name, choices in (kernels.items() if isinstance(kernels, dict) else ()):
                            if isinstance(choices, dict):
                                data.setdefault(dev, {}).setdefault(name, {}).update(
                                    {k: v for k, v in choices.items() if isinstance(v, str)})
                    choice = data.setdefault(device, {}).setdefault(kernel, {}).setdefault(key, choice)
                    fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1, sort_keys=True)
                    os.replace(tmp, self.path)
            except OSError as e:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
                choice = data.setdefault(device, {}).setdefault(kernel, {}).setdefault(key, choice)
                if not self._unwritable:
                    self._unwritable = True
                    warnings.warn(f"fastres: cannot save measured choices to {self.path} ({e}); they are "
                                  "kept for this process only (FASTRES_AUTOTUNE_CACHE names another file)",
                                  RuntimeWarning, stacklevel=3)
            return choice


_caches: dict[Path, ChoiceCache] = {}


def _cache() -> ChoiceCache:
    path = cache_path()
    if path not in _caches:
        _caches[path] = ChoiceCache(path)
    return _caches[path]


def _do_bench(fn: Callable[[], None]) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=20)


def choose(kernel: str, key: tuple, candidates: Mapping[str, object], run: Callable[[object], None] | None,
           device: str, *, timer: Callable[[Callable[[], None]], float] = _do_bench,
           measure: Callable[[Mapping[str, object]], Mapping[str, float]] | None = None,
           prefer: str | None = None, margin: float = 1.0):
    """The fastest of ``candidates`` for this problem on ``device`` (its model's name): from the
    cache, else timed now and cached.

    ``run(config)`` launches the kernel once with ``config`` (into scratch outputs) and
    ``timer(fn)`` returns a time in ms (``triton.testing.do_bench`` on a GPU); or ``measure``
    times all the candidates itself (interleaved, on a CPU) and returns their times. With
    ``prefer``, another candidate is chosen only at or under ``margin`` times its time: a near tie
    keeps the preferred one, whatever the timing noise.
    """
    cache = _cache()
    key_text = repr(key)
    cached = cache.get(device, kernel, key_text)
    if cached in candidates:
        return candidates[cached]
    timings = (dict(measure(candidates)) if measure is not None
               else {name: timer(lambda cfg=cfg: run(cfg)) for name, cfg in candidates.items()})
    best = min(timings, key=timings.get)
    if prefer is not None and timings[best] > margin * timings[prefer]:
        best = prefer
    kept = cache.put(device, kernel, key_text, best)     # another process's earlier choice wins
    return candidates[kept] if kept in candidates else candidates[best]

"""Optional GPU autotuning: the choice logic and its on-disk cache (the timing itself needs a GPU;
here a fake timer stands in for triton.testing.do_bench)."""
import json

import pytest
import torch

from fastres.kernels import _autotune
from fastres.kernels.conv2d_nhwc import (CONV_CONFIGS, _candidate_configs, conv_config,
                                         pack_conv_weight)


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("FASTRES_AUTOTUNE_CACHE", str(path))
    monkeypatch.setattr(_autotune, "_caches", {})
    return path


def test_choose_times_once_then_reads_the_cache(cache_file, monkeypatch):
    ran = []
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    candidates = {name: name.upper() for name in times}

    def timer(fn):
        fn()
        return times[ran[-1]]

    choice = _autotune.choose("k", (1, 2), candidates, run=lambda cfg: ran.append(cfg.lower()),
                              device="GPU-X", timer=timer)
    assert choice == "B" and sorted(ran) == ["a", "b", "c"]
    assert json.loads(cache_file.read_text()) == {"GPU-X": {"k": {"(1, 2)": "b"}}}

    # a new process (fresh in-memory cache) reuses the stored choice without timing
    monkeypatch.setattr(_autotune, "_caches", {})

    def no_timing(fn):
        raise AssertionError("should not time again")

    assert _autotune.choose("k", (1, 2), candidates, run=None, device="GPU-X", timer=no_timing) == "B"
    # another GPU model or another problem is tuned separately
    assert _autotune.choose("k", (1, 2), candidates, run=lambda c: ran.append(c.lower()),
                            device="GPU-Y", timer=timer) == "B"
    assert set(json.loads(cache_file.read_text())) == {"GPU-X", "GPU-Y"}


def test_stale_or_corrupt_cache_is_retuned(cache_file, monkeypatch):
    cache_file.write_text(json.dumps({"G": {"k": {"(3,)": "gone"}}}))
    pick = _autotune.choose("k", (3,), {"x": 1, "y": 2}, run=lambda c: None, device="G",
                            timer=lambda fn: 1.0)
    assert pick == 1
    cache_file.write_text("{not json")
    monkeypatch.setattr(_autotune, "_caches", {})
    assert _autotune.choose("k", (3,), {"x": 1, "y": 2}, run=lambda c: None, device="G",
                            timer=lambda fn: 1.0) == 1
    assert json.loads(cache_file.read_text())["G"]["k"]["(3,)"] == "x"


def test_an_unwritable_cache_keeps_the_choice_for_the_process(tmp_path, monkeypatch):
    """A read-only or missing directory: the choice is still made, kept in memory, warned once."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTRES_AUTOTUNE_CACHE", str(blocker / "autotune.json"))   # (its parent is a file)
    monkeypatch.setattr(_autotune, "_caches", {})
    timed = []
    with pytest.warns(RuntimeWarning, match="cannot save measured choices"):
        assert _autotune.choose("k", (1,), {"x": 1, "y": 2}, run=lambda c: timed.append(c), device="D",
                                timer=lambda fn: (fn(), 1.0)[1]) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _autotune.choose("k", (2,), {"x": 1, "y": 2}, run=lambda c: timed.append(c), device="D",
                                timer=lambda fn: (fn(), 1.0)[1]) == 1
        assert _autotune.choose("k", (1,), {"x": 1, "y": 2}, run=None, device="D",
                                timer=lambda fn: pytest.fail("timed again")) == 1
    assert len(timed) == 4


def test_a_preferred_candidate_keeps_near_ties(cache_file):
    measure = lambda cands: {"direct": 1.0, "other": 0.95}
    assert _autotune.choose("k", (1,), {"direct": "D", "other": "O"}, run=None, device="C",
                            measure=measure, prefer="direct", margin=0.9) == "D"
    assert _autotune.choose("k", (2,), {"direct": "D", "other": "O"}, run=None, device="C",
                            measure=lambda c: {"direct": 1.0, "other": 0.9}, prefer="direct", margin=0.9) == "O"
    assert _autotune.choose("k", (3,), {"direct": "D", "other": "O"}, run=None, device="C",
                            measure=measure) == "O"


def test_enabled_switch(monkeypatch):
    monkeypatch.delenv("FASTRES_AUTOTUNE", raising=False)
    assert not _autotune.enabled()
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    assert _autotune.enabled()


@pytest.mark.parametrize("c_in, c_out, k, groups, dtype", [
    (64, 64, 3, 1, torch.float16), (3, 64, 7, 1, torch.float16), (128, 128, 3, 32, torch.bfloat16),
    (256, 1024, 1, 1, torch.float32),
])
def test_candidates_include_the_rule_and_respect_its_clamps(c_in, c_out, k, groups, dtype):
    weight = torch.empty(c_out, c_in // groups, k, k, dtype=dtype, device="meta")
    packed = pack_conv_weight(weight, groups=groups)
    x = torch.empty(8, c_in, 14, 14, dtype=dtype, device="meta", memory_format=torch.channels_last)
    out = torch.empty(8, c_out, 14, 14, dtype=dtype, device="meta", memory_format=torch.channels_last)
    problem = dict(stride=(1, 1), padding=(k // 2, k // 2), shortcut=None, mean_out=None, quant=None)
    candidates = _candidate_configs(x, packed, out, problem)
    cin_g, cout_g = packed.group_in_channels, packed.group_out_channels
    flat = cin_g % 16 != 0
    plain_gemm = k == 1 and groups == 1
    spatial = (8, 14, 14, k * k) if groups == 1 and not plain_gemm and not flat and k > 1 else None
    steps = k * k * cin_g // min(64, cin_g & -cin_g) if groups == 1 and not flat else 0
    assert candidates["rule"] == conv_config(8 * 14 * 14, cout_g, c_out // cout_g, cin_g, flat, dtype, "cuda",
                                             split_k_steps=steps, plain_gemm=plain_gemm, spatial=spatial)
    for cfg in candidates.values():
        assert cfg.BLOCK_N <= max(16, cout_g) and (flat or cin_g % cfg.BLOCK_K == 0)
        assert cfg != CONV_CONFIGS["interpreter"]


def test_the_rule_candidate_is_the_launchs_choice_tma_included():
    """The autotuner's "rule" candidate is what a launch without autotuning runs: on sm_90 a large
    1x1 GEMM and a stride-1 3x3 of many waves take their tiles by TMA (so FASTRES_AUTOTUNE times the
    TMA paths against the cp.async tiles, not only the latter)."""
    from fastres.kernels._target import use_target
    for c, k, n, hw in ((256, 1, 256, 56), (64, 3, 256, 56)):
        packed = pack_conv_weight(torch.empty(c, c, k, k, dtype=torch.float16, device="meta"))
        x = torch.empty(n, c, hw, hw, dtype=torch.float16, device="meta", memory_format=torch.channels_last)
        problem = dict(stride=(1, 1), padding=(k // 2, k // 2), shortcut=None, mean_out=None, quant=None)
        with use_target(90):
            assert _candidate_configs(x, packed, torch.empty_like(x), problem)["rule"].TMA, (c, k)
        with use_target(80):
            assert not _candidate_configs(x, packed, torch.empty_like(x), problem)["rule"].TMA, (c, k)


def test_two_processes_merge_their_choices_and_the_first_choice_wins(tmp_path):
    path = tmp_path / "autotune.json"
    a, b = _autotune.ChoiceCache(path), _autotune.ChoiceCache(path)     # two processes' caches
    assert a.get("cpu: x", "k", "K2") is None and b.get("cpu: x", "k", "K1") is None
    assert a.put("cpu: x", "k", "K1", "fast") == "fast"
    assert b.put("cpu: x", "k", "K2", "slow") == "slow"
    assert b.put("cpu: x", "k", "K1", "other") == "fast"                # A stored K1 first
    stored = json.loads(path.read_text())["cpu: x"]["k"]
    assert stored == {"K1": "fast", "K2": "slow"}
    assert _autotune.ChoiceCache(path).get("cpu: x", "k", "K1") == "fast"

"""Profiles: interpolation through the measured points, the engine benchmark's JSON format."""

from __future__ import annotations

import json
import os

import pytest

from disagg.plan.profile import Profile, from_json, interp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_interp_hits_points_and_extrapolates_along_end_segments() -> None:
    xs, ys = [1.0, 2.0, 4.0], [10.0, 20.0, 30.0]
    assert [interp(xs, ys, x) for x in xs] == ys
    assert interp(xs, ys, 3.0) == pytest.approx(25.0)
    assert interp(xs, ys, 8.0) == pytest.approx(50.0)  # last segment's slope
    assert interp(xs, ys, 0.0) == pytest.approx(0.0)  # first segment's slope
    assert interp([5.0], [7.0], 100.0) == 7.0  # one point: flat


def test_engine_benchmark_profile_format() -> None:
    data = {
        "prefill": [{"tokens": 512, "ms": 40.0}, {"tokens": 128, "ms": 12.0}],
        "decode": [
            {"batch": 1, "context": 128, "step_ms": 20.0},
            {"batch": 8, "context": 128, "step_ms": 30.0},
            {"batch": 1, "context": 512, "step_ms": 24.0},
            {"batch": 8, "context": 512, "step_ms": 40.0},
        ],
        "kv_bytes_per_token": 2**20,
        "transfer": {"base_ms": 1.0, "ms_per_mb": 2.0},
    }
    p = from_json(data)
    assert p.prefill_ms(128) == pytest.approx(12.0)
    assert p.prefill_ms(320) == pytest.approx(26.0)
    assert p.prefill_ms(64) == pytest.approx(12.0 - 64 * 28 / 384)  # along the first segment
    assert p.prefill_ms(1) > 0
    assert p.prefill_ms(0) == 0.0
    assert p.decode_ms(8, 128) == pytest.approx(30.0)
    assert p.decode_ms(8, 320) == pytest.approx(35.0)  # between the contexts
    assert p.decode_ms(0, 128) == 0.0
    assert p.transfer_ms(10) == pytest.approx(21.0)


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(ValueError):
        Profile(prefill=(), decode=((1, 1, 1.0),))
    with pytest.raises(ValueError):
        Profile(prefill=((10, 0.0),), decode=((1, 1, 1.0),))


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "benchmarks", "profiles"))))
def test_shipped_profiles_load_and_cite_sources(name: str) -> None:
    with open(os.path.join(ROOT, "benchmarks", "profiles", name)) as f:
        data = json.load(f)
    p = from_json(data)
    assert p.prefill_ms(2048) > p.prefill_ms(128) > 0
    assert p.decode_ms(256, 2048) >= p.decode_ms(1, 2048) > 0
    assert data["sources"]["published"] and data["sources"]["derived"]

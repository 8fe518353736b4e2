"""The side-by-side step benchmark against TRL (`benchmarks/peer_trl.py`) on a tiny budget: both sides run, do the
same work (forced lengths: every sample generates exactly the asked tokens) and the ratio is their quotient."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("trl", reason="TRL is not installed: it is a bench-only extra (pip install -e '.[bench]')")

from mosaic_ray.benchmarks import peer_trl

from mosaic_ray.hygiene import THREAD_VARS, set_torch_threads


@pytest.fixture
def keep_threads():
    """The benchmark sets torch threads (2) for the whole process; put the test session's back afterwards."""
    import torch

    threads, env = torch.get_num_threads(), {v: os.environ.get(v) for v in THREAD_VARS}
    yield
    set_torch_threads(threads)
    for var, value in env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def test_peer_trl_tiny_budget(tmp_path, capsys, keep_threads):
    out = tmp_path / "peer.json"
    returned = peer_trl.main(["--prompts", "2", "--group-size", "2", "--new-tokens", "8", "--steps", "1",
                              "--json", str(out)])
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    for side in ("ours", "trl"):
        assert result[side]["steps"] == 1
        assert len(result[side]["step_s"]) == 1 and result[side]["step_s"][0] > 0
        assert result[side]["s_per_step"] > 0
        assert result[side]["gen_tokens_per_step"] == 2 * 2 * 8   # forced lengths: the same work on both sides
    assert result["ratio"] == result["ours"]["s_per_step"] / result["trl"]["s_per_step"]
    printed = capsys.readouterr().out
    assert "ratio ours/TRL:" in printed
    assert json.loads(printed.strip().splitlines()[-1])["ratio"] == result["ratio"]

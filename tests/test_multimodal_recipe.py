"""recipe=multimodal_digits end to end through the real CLI (debug preset): every stage runs and
report.json / report.md / the PNGs are written with numbers that parse and agree."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_debug_preset_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dsframe", "recipe=multimodal_digits", "debug=multimodal_fast",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((run_dir / "report.json").read_text())
    s = rep["summary"]
    assert rep["seeds"] == [42, 43] and set(rep["per_seed"]) == {"42", "43"}
    assert rep["n_test"] == 750
    for name in ("text", "image", "audio", "fused"):
        accs = [rep["per_seed"][seed]["test"][name] for seed in rep["per_seed"]]
        assert all(0.0 <= a <= 100.0 for a in accs)
        assert s["test"][name]["mean"] == pytest.approx(sum(accs) / 2, abs=1e-3)
        # each seed's model was trained in its own run (the top-level stage or the nested seed run)
    assert (run_dir / "fused" / "model.pt").exists() and (run_dir / "seeds" / "seed_43" / "fused" / "model.pt").exists()
    assert set(s["missing"]["fused"]) == {"text", "image", "audio", "text+image", "text+audio", "image+audio"}
    gate = rep["per_seed"]["42"]["gate"]["fused"]
    assert gate["modalities"] == ["text", "image", "audio"] and all(0.0 <= g <= 1.0 for g in gate["mean"])
    # an absent modality gets no weight
    assert gate["by_missing"]["image"][1] == 0.0 and gate["by_missing"]["text+audio"][0] == 0.0
    assert len(rep["per_seed"]["42"]["examples"]) == 4
    lat = rep["latency"]
    assert lat["batch_size"] == 1 and lat["fusion"]["min"] <= lat["fusion"]["median"] <= lat["fusion"]["max"]
    assert s["gain_over_best_single"]["mean"] == pytest.approx(
        s["test"]["fused"]["mean"] - s["test"][s["best_single"]]["mean"], abs=0.01)
    md = (run_dir / "report.md").read_text()
    assert f"| fused | {s['val']['fused']['mean']:.2f} ± {s['val']['fused']['std']:.2f} |" in md
    for png in ("report_accuracy.png", "report_missing.png", "report_gate.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no fit stage read the test split: only evaluate did
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all("test" not in metrics[name] for name in ("text", "image", "audio", "fused"))

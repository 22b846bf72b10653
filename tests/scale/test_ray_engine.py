"""The Ray Data engine reproduces the local engine on a local 2-CPU Ray instance.

One Ray execution only (actor start-up costs seconds on 2 cores): the CLI path with two
actors, a corrupt file and a missing file, heat maps written by the actors.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from medsight.cli import app
from medsight.scale.engine import BatchJob, run_local

ray = pytest.importorskip("ray", reason="the Ray engine needs the optional extra: pip install 'medsight[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_matches_local_engine(local_ray, tiny_package, batch_manifest, scale_settings, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSIGHT_CACHE_DIR", str(scale_settings.cache_dir))
    r = CliRunner().invoke(app, ["predict", "--engine", "ray", "--workers", "2", str(batch_manifest), "-m", str(tiny_package),
                                 "--backend", "onnx", "--batch-size", "4", "-o", str(tmp_path / "ray")])
    assert r.exit_code == 1, r.output  # 1: some inputs could not be analysed, and were reported
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert (summary["engine"], summary["n"], summary["failed"], summary["backend"], summary["workers"]) == ("ray", 12, 2, "onnx", 2)

    local = run_local(BatchJob(batch_manifest, str(tiny_package), tmp_path / "local", backend="onnx", heatmaps=True, batch_size=4),
                      scale_settings)
    a, b = pd.read_parquet(local.parquet), pd.read_parquet(tmp_path / "ray" / "results.parquet")
    assert a["index"].tolist() == b["index"].tolist() == list(range(12))  # input order kept across actors
    exact = ["source", "model", "backend", "label", "refer", "ood_flag", "statement", "heatmap_label", "error", "error_type"]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    probs = ["p_bar", "p_disc", "confidence"]
    pd.testing.assert_frame_equal(a[probs], b[probs], check_exact=False, atol=1e-6)
    errors = b[b["error"].notna()]
    assert errors["source"].str.endswith(("case99_corrupt.png", "gone/missing.png")).all() and len(errors) == 2
    assert "ImageNotFoundError" in set(errors["error_type"])
    names = lambda df: [None if pd.isna(p) else p.rsplit("/", 1)[-1] for p in df["heatmap"]]  # noqa: E731
    assert names(a) == names(b) and sum(n is not None for n in names(b)) == 10
    assert all((tmp_path / "ray" / "heatmaps" / n).is_file() for n in names(b) if n)
    assert pd.read_csv(tmp_path / "ray" / "results.csv")["source"].tolist() == b["source"].tolist()


def test_cli_engine_usage_errors(tiny_package, batch_npz):
    r = CliRunner().invoke(app, ["predict", "--engine", "ray", str(batch_npz), str(batch_npz), "-m", str(tiny_package)])
    assert r.exit_code == 2 and "exactly one SOURCE" in r.output
    r = CliRunner().invoke(app, ["predict", "--engine", "spark", str(batch_npz), "-m", str(tiny_package)])
    assert r.exit_code == 2 and "--engine must be one of local, ray" in r.output

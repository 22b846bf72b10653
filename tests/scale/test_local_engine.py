"""The in-process batch engine: typed rows, errors reported per image, Parquet + CSV written."""

from __future__ import annotations

import pandas as pd
import pytest

from medsight.scale.engine import BatchJob, run_local
from medsight.scale.rows import columns


def test_corrupt_file_is_reported_and_the_rest_finish(tiny_package, batch_folder, scale_settings, tmp_path):
    s = run_local(BatchJob(batch_folder, str(tiny_package), tmp_path, backend="onnx", heatmaps=True, batch_size=4), scale_settings)
    assert (s.n, s.failed) == (11, 1) and s.extra["backend"] == "onnx"
    df = pd.read_csv(s.csv)
    assert list(df.columns) == list(columns(["bar", "disc"]))
    bad = df[df["error"].notna()]
    assert bad["source"].str.endswith("case99_corrupt.png").all() and bad["label"].isna().all()
    ok = df[df["error"].isna()]
    assert ok["label"].isin(["bar", "disc"]).all()
    assert ((ok["p_bar"] + ok["p_disc"]) - 1).abs().max() < 1e-6
    assert all((tmp_path / "heatmaps").joinpath(p.rsplit("/", 1)[-1]).is_file() for p in ok["heatmap"])
    # rows carry exactly what the one inference path says about each file
    import medsight

    direct = list(medsight.load_model(tiny_package).stream(list(ok["source"]), explain=False))
    for (_, row), r in zip(ok.iterrows(), direct):
        assert row["label"] == r.label and row["refer"] == r.refer and row["statement"] == r.statement
        assert row["p_disc"] == pytest.approx(r.probabilities["disc"], abs=1e-5)


def test_parquet_has_the_same_rows_when_pyarrow_is_present(tiny_package, batch_npz, scale_settings, tmp_path):
    pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow (installed with medsight[ray])")
    s = run_local(BatchJob(batch_npz, str(tiny_package), tmp_path, backend="torch", split="test", batch_size=3), scale_settings)
    pq, csv = pd.read_parquet(s.parquet), pd.read_csv(s.csv)
    assert len(pq) == len(csv) == s.n == 8 and s.failed == 0
    assert pq["index"].tolist() == list(range(8)) and pq["heatmap"].isna().all()
    pd.testing.assert_series_equal(pq["p_disc"], csv["p_disc"], check_exact=False, atol=1e-9)
    assert str(pq["refer"].dtype) == "boolean"


def test_ray_engine_without_ray_says_how_to_install(tiny_package, batch_npz, tmp_path, monkeypatch):
    """The base install has no Ray: the Ray engine must fail with the install hint, not an ImportError."""
    import sys

    from medsight.errors import EngineUnavailableError
    from medsight.scale.engine import run_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(EngineUnavailableError, match=r"pip install 'medsight\[ray\]'"):
        run_ray(BatchJob(batch_npz, str(tiny_package), tmp_path))

from medsight.cli.demo import run_demo


def test_demo_writes_overlays_and_summary(tmp_path):
    rows = run_demo(tmp_path / "demo")
    assert rows and not [r for r in rows if "error" in r]
    html = (tmp_path / "demo" / "summary.html").read_text()
    for r in rows:
        assert (tmp_path / "demo" / r["heatmap"]).is_file()
        assert r["sample"] in html
    assert "not for primary diagnosis" in html

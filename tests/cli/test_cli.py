"""The command-line contract that scripts rely on (README 'CLI' section)."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from medsight.cli import app
from tests.conftest import make_images

runner = CliRunner()


@pytest.fixture
def images(tmp_path):
    imgs, labels = make_images(2, seed=5)
    paths = []
    for i, im in enumerate(imgs):
        p = tmp_path / "in" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(im).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("cmd", [[], ["models"], ["predict"], ["explain"], ["train"], ["evaluate"], ["demo"]])
def test_help_everywhere(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_models_json_lists_zoo():
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert isinstance(rows, list)
    for row in rows:
        assert {"name", "modality", "labels"} <= set(row)


def test_predict_json_contract(tiny_package, images, tmp_path):
    r = runner.invoke(app, ["predict", *map(str, images), "--model", str(tiny_package), "--json", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert len(rows) == len(images)
    for row in rows:
        assert {"path", "label", "probabilities", "confidence", "heatmap"} <= set(row)
        assert (tmp_path / "o").exists() and row["heatmap"].endswith(".png")
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5


def test_predict_folder_with_bad_file_reports_and_exits_1(tiny_package, images, tmp_path):
    (images[0].parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = runner.invoke(app, ["predict", str(images[0].parent), "-m", str(tiny_package), "--json", "--no-heatmap"])
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    errors = [x for x in rows if "error" in x]
    assert len(rows) == len(images) + 1 and len(errors) == 1 and "broken.png" in errors[0]["path"]


def test_predict_csv_and_table(tiny_package, images):
    r = runner.invoke(app, ["predict", str(images[0]), "-m", str(tiny_package), "--format", "csv", "--no-heatmap"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("path,label,p_bar,p_disc")
    r = runner.invoke(app, ["predict", str(images[0]), "-m", str(tiny_package), "--no-heatmap"])
    assert r.exit_code == 0 and "P(disc)" in r.stdout


def test_unknown_model_exits_2_with_message(images):
    r = runner.invoke(app, ["predict", str(images[0]), "--model", "nope"])
    assert r.exit_code == 2 and "unknown model 'nope'" in r.output


def test_evaluate_json_contract(tiny_package, tiny_npz):
    r = runner.invoke(app, ["evaluate", "--model", str(tiny_package), "--data", str(tiny_npz), "--split", "test", "--json", "--n-boot", "100"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n"] == 50
    for k in ("auc", "accuracy", "sensitivity", "specificity", "ece"):
        assert set(res[k]) == {"value", "ci"}
    assert res["auc"]["value"] > 0.85 and res["auc"]["ci"][0] <= res["auc"]["value"] <= res["auc"]["ci"][1]


def test_evaluate_missing_data_exits_2(tiny_package, tmp_path):
    r = runner.invoke(app, ["evaluate", "--model", str(tiny_package), "--data", str(tmp_path / "none.npz")])
    assert r.exit_code == 2 and "not found" in r.output


def test_explain_writes_overlay_and_heatmap(tiny_package, images, tmp_path):
    r = runner.invoke(app, ["explain", str(images[0]), "-m", str(tiny_package), "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "x").glob("*_overlay.png"))) == 1 and len(list((tmp_path / "x").glob("*_heatmap.png"))) == 1
    overlay = Image.open(next((tmp_path / "x").glob("*_overlay.png")))
    assert overlay.size == Image.open(images[0]).size


def test_train_cli_writes_package(tiny_npz, tmp_path):
    r = runner.invoke(app, ["train", "--data", str(tiny_npz), "--out", str(tmp_path / "m"), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "card.json").is_file() and (tmp_path / "m" / "weights.safetensors").is_file()
    assert json.loads(r.stdout)["name"] == "m"


def test_train_needs_exactly_one_source(tmp_path):
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "exactly one of --data or --recipe" in r.output

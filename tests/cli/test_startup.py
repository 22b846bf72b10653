"""The command line starts without the heavy libraries (benchmarks/cli_startup times it; this guards it).

Each command runs in a fresh interpreter, since this test process has long imported them all.
Importing torch, MONAI, pandas, SciPy or ONNX Runtime costs seconds on a small machine, several
times the whole of ``medsight --help``; listing the zoo reads the cards' JSON and needs none of
them, nor NumPy, the image codecs or the service's libraries.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: top-level packages none of the commands below may import
HEAVY = ("torch", "monai", "onnxruntime", "onnx", "scipy", "sklearn", "pandas", "matplotlib", "numpy", "PIL",
         "pydicom", "nibabel", "pynetdicom", "highdicom", "fastapi", "sqlalchemy", "safetensors")

PROBE = """
import json, sys
from medsight.cli.main import app
try:
    app(sys.argv[1:], prog_name="medsight")
    code = 0
except SystemExit as e:
    code = e.code or 0
print(json.dumps({"exit": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def loaded_after(*args: str) -> tuple[int, set[str]]:
    """(exit code, top-level modules imported) of ``medsight ARGS`` in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120, check=True)
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    return probe["exit"], set(probe["modules"])


@pytest.mark.parametrize("args", [["--help"], ["models"], ["models", "--json"], ["predict", "--help"],
                                  ["dicom", "--help"], ["serve", "--help"], ["runtime", "--help"]])
def test_command_starts_without_heavy_libraries(args):
    code, modules = loaded_after(*args)
    assert code == 0
    assert not modules & set(HEAVY), f"medsight {' '.join(args)} imported {sorted(modules & set(HEAVY))}"


def test_probe_sees_an_import():
    # the guard above is only worth something if the probe reports what a command did import
    code, modules = loaded_after("models", "--json")
    assert code == 0 and {"medsight", "pydantic"} <= modules


def test_library_facade_still_names_everything_lazily():
    probe = ("import json, sys, medsight; before = {m.split('.')[0] for m in sys.modules}; "
             "names = [n for n in medsight.__all__ if getattr(medsight, n) is None]; "
             "print(json.dumps({'torch_before': 'torch' in before, 'missing': names}))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(r.stdout)
    assert out == {"torch_before": False, "missing": []}

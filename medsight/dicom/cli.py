"""``medsight deid`` and ``medsight dicom ...``: thin wrappers over :mod:`medsight.dicom`.

Heavy imports (pynetdicom, highdicom, torch) happen inside the commands so
that ``medsight --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from medsight.errors import MedSightError

err = Console(stderr=True)
dicom_app = typer.Typer(help="DICOM gateway: receive studies, analyse them, send SR + overlay back.", no_args_is_help=True)


def _fail(e: Exception, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def deid_cmd(
    src: Annotated[Path, typer.Argument(help="DICOM file or folder to de-identify")],
    dst: Annotated[Path, typer.Argument(help="output file, or folder (files named after the new UIDs)")],
    key_file: Annotated[Optional[Path], typer.Option("--key-file", help="site secret key (default: $MEDSIGHT_DEID_KEY_FILE or ~/.config/medsight/deid.key)")] = None,
    create_key: Annotated[bool, typer.Option("--create-key", help="create the key file with a new random key if it does not exist")] = False,
    allow_burned_in: Annotated[bool, typer.Option("--allow-burned-in", help="also process images flagged Burned In Annotation = YES")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line per input file on stdout")] = False,
) -> None:
    """De-identify DICOM (PS3.15 Basic Profile + modified dates, patient characteristics, clean descriptors)."""
    from medsight.dicom.deid import DeidConfig, deidentify_path, load_key, summarize

    try:
        config = DeidConfig(key=load_key(key_file, create=create_key), allow_burned_in=allow_burned_in)
        outcomes = deidentify_path(src, dst, config)
    except MedSightError as e:
        _fail(e)
    failed = [o for o in outcomes if o.error]
    for o in outcomes:
        if as_json:
            print(json.dumps(o.to_dict()), flush=True)
        elif o.error:
            err.print(f"[red]refused:[/red] {o.error}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps({"summary": summarize(outcomes)}), flush=True)
    err.print(f"de-identified {len(outcomes) - len(failed)} of {len(outcomes)} files into {dst}", highlight=False)
    if failed:
        raise typer.Exit(1)

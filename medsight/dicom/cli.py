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


@dicom_app.command("listen")
def listen_cmd(
    aet: Annotated[str, typer.Option("--aet", help="our AE title")] = "MEDSIGHT",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 11112,
    host: Annotated[str, typer.Option("--host", help="address to bind; loopback unless you mean it")] = "127.0.0.1",
    data_dir: Annotated[Path, typer.Option("--data-dir", help="where received instances and results are kept")] = Path("medsight-dicom"),
    calling_aet: Annotated[Optional[list[str]], typer.Option("--calling-aet", help="calling AE title allowed to send (repeatable)")] = None,
    allow_any_ae: Annotated[bool, typer.Option("--allow-any-ae", help="accept associations from any calling AE title")] = False,
    idle_timeout: Annotated[float, typer.Option("--idle-timeout", min=0.1, help="seconds without new instances before a study is complete")] = 30.0,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="analyse complete studies with this model (zoo name or package)")] = None,
    dest: Annotated[Optional[str], typer.Option("--dest", help="send SR + overlay to AE@host:port (C-STORE) or a STOW-RS URL")] = None,
    deid_key_file: Annotated[Optional[Path], typer.Option("--deid-key-file", help="de-identify every instance on arrival with this site key")] = None,
) -> None:
    """Run a DICOM Storage SCP (C-ECHO, C-STORE) and analyse each study once it is complete."""
    from medsight.dicom.listener import ListenerConfig, StorageSCP
    from medsight.dicom.pipeline import build_default_callback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not allow_any_ae and not calling_aet:
        _fail(ValueError("give at least one --calling-aet (or --allow-any-ae to accept every modality/PACS)"))
    try:
        deid = None
        if deid_key_file is not None:
            from medsight.dicom.deid import DeidConfig, load_key

            deid = DeidConfig(key=load_key(deid_key_file))
        callback = build_default_callback(data_dir, model=model, dest=dest, ae_title=aet) if model else None
        cfg = ListenerConfig(ae_title=aet, host=host, port=port, data_dir=data_dir, allowed_calling_aets=tuple(calling_aet or ()),
                             allow_any_ae=allow_any_ae, idle_timeout=idle_timeout, deid=deid)
        scp = StorageSCP(cfg, on_study_complete=callback)
        scp.start()
        if callback is not None and callback.outbox is not None:
            from medsight.dicom.sender import OutboxRetrier

            OutboxRetrier(callback.outbox, interval=60.0).start()  # failed sends are retried, never dropped
    except (MedSightError, OSError) as e:
        _fail(e)
    err.print(f"listening as {aet} on {host}:{port}; data in {data_dir}" + ("" if model else " (no --model: studies are stored only)"))
    signal.signal(signal.SIGTERM, lambda *_: scp.stop())
    try:
        scp.wait()
    except KeyboardInterrupt:
        pass
    finally:
        scp.stop()


@dicom_app.command("send")
def send_cmd(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders to send")],
    dest: Annotated[str, typer.Option("--dest", help="AE@host:port (C-STORE) or STOW-RS base URL")],
    aet: Annotated[str, typer.Option("--aet", help="our (calling) AE title")] = "MEDSIGHT",
    outbox: Annotated[Path, typer.Option("--outbox", help="failed sends are kept here and retried")] = Path("medsight-dicom/outbox"),
) -> None:
    """Send DICOM files (C-STORE or STOW-RS); anything that fails stays in the outbox for retry."""
    from medsight.dicom.sender import Outbox, parse_destination

    try:
        box = Outbox(outbox, parse_destination(dest), calling_aet=aet)
        files = [f for p in paths for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()))]
        for f in files:
            box.put_file(f)
        report = box.flush()
    except MedSightError as e:
        _fail(e)
    err.print(f"sent {report.sent}, still queued {report.pending}", highlight=False)
    if report.pending:
        raise typer.Exit(1)


@dicom_app.command("retry")
def retry_cmd(
    dest: Annotated[str, typer.Option("--dest", help="AE@host:port (C-STORE) or STOW-RS base URL")],
    aet: Annotated[str, typer.Option("--aet")] = "MEDSIGHT",
    outbox: Annotated[Path, typer.Option("--outbox")] = Path("medsight-dicom/outbox"),
) -> None:
    """Retry everything waiting in the outbox."""
    from medsight.dicom.sender import Outbox, parse_destination

    try:
        report = Outbox(outbox, parse_destination(dest), calling_aet=aet).flush()
    except MedSightError as e:
        _fail(e)
    err.print(f"sent {report.sent}, still queued {report.pending}", highlight=False)
    if report.pending:
        raise typer.Exit(1)


@dicom_app.command("pull")
def pull_cmd(
    url: Annotated[str, typer.Option("--url", help="DICOMweb base URL (QIDO-RS/WADO-RS)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the retrieved instances")],
    study: Annotated[Optional[str], typer.Option("--study", help="Study Instance UID (default: search with the filters)")] = None,
    modality: Annotated[Optional[str], typer.Option("--modality", help="QIDO filter: ModalitiesInStudy")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 10,
) -> None:
    """Pull studies from a DICOMweb server (QIDO-RS search, WADO-RS retrieve)."""
    from medsight.dicom.dicomweb import DicomWebSource

    try:
        src = DicomWebSource(url)
        uids = [study] if study else [s.study_instance_uid for s in src.search_studies(modality=modality, limit=limit)]
        for uid in uids:
            paths = src.retrieve_study(uid, out_dir)
            err.print(f"{uid}: {len(paths)} instances -> {out_dir}", highlight=False)
    except MedSightError as e:
        _fail(e)

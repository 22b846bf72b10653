"""``medsight deid`` and ``medsight dicom ...``: thin wrappers over :mod:`medsight.integration`.

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


TlsCert = Annotated[Optional[Path], typer.Option("--tls-cert", help="DICOM over TLS: our certificate (PEM)")]
TlsKey = Annotated[Optional[Path], typer.Option("--tls-key", help="DICOM over TLS: its private key (PEM)")]
TlsCa = Annotated[Optional[Path], typer.Option("--tls-ca", help="DICOM over TLS: CA certificates trusted for the peer (listener: clients must present a certificate it signed)")]


def _tls(cert: Path | None, key: Path | None, ca: Path | None, server: bool):  # noqa: ANN202
    """TLS settings from the --tls-* options (None: plain TCP), checked now so a bad file fails at start."""
    if not (cert or key or ca):
        return None
    from medsight.integration.tls import TlsSettings

    tls = TlsSettings(cert_file=cert, key_file=key, ca_file=ca)
    tls.server_context() if server else tls.client_context()
    return tls


def deid_cmd(
    src: Annotated[Path, typer.Argument(help="DICOM file or folder to de-identify")],
    dst: Annotated[Path, typer.Argument(help="output file, or folder (files named after the new UIDs)")],
    key_file: Annotated[Optional[Path], typer.Option("--key-file", help="site secret key (default: $MEDSIGHT_DEID_KEY_FILE or ~/.config/medsight/deid.key)")] = None,
    create_key: Annotated[bool, typer.Option("--create-key", help="create the key file with a new random key if it does not exist")] = False,
    allow_burned_in: Annotated[bool, typer.Option("--allow-burned-in", help="also process images flagged Burned In Annotation = YES")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line per input file on stdout")] = False,
) -> None:
    """De-identify DICOM (PS3.15 Basic Profile + modified dates, patient characteristics, clean descriptors)."""
    from medsight.integration.deid import DeidConfig, deidentify_path, load_key, summarize

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
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", "-d", help="the service's data folder (default: $MEDSIGHT_DATA_DIR or ./medsight-data); received instances go to <data-dir>/dicom-inbox")] = None,
    settings_file: Annotated[Optional[Path], typer.Option("--settings", help="JSON file of service settings (share it with 'medsight serve' / 'medsight worker')")] = None,
    calling_aet: Annotated[Optional[list[str]], typer.Option("--calling-aet", help="calling AE title allowed to send (repeatable)")] = None,
    allow_any_ae: Annotated[bool, typer.Option("--allow-any-ae", help="accept associations from any calling AE title")] = False,
    idle_timeout: Annotated[float, typer.Option("--idle-timeout", min=0.1, help="seconds without new instances before a study is complete")] = 30.0,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="analyse every study with this model (default: the service's model for the study's modality)")] = None,
    dest: Annotated[Optional[str], typer.Option("--dest", help="send SR + overlays to AE@host:port (C-STORE) or a DICOMweb URL (STOW-RS)")] = None,
    fhir_url: Annotated[Optional[str], typer.Option("--fhir-url", help="POST a FHIR R4 DiagnosticReport transaction to this server")] = None,
    hl7: Annotated[Optional[str], typer.Option("--hl7", help="send an HL7 v2 ORU^R01 over MLLP to host:port")] = None,
    deid_key_file: Annotated[Optional[Path], typer.Option("--deid-key-file", help="de-identify every instance on arrival with this site key")] = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    keep_received: Annotated[bool, typer.Option("--keep-received", help="keep the inbox copy of each study after the service stored its own (default: removed once queued)")] = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="worker threads in this process that analyse and deliver (0: 'medsight serve' / 'medsight worker' do it)")] = 1,
    acse_timeout: Annotated[float, typer.Option("--acse-timeout", min=0.1, help="seconds a connection may take for its TLS handshake and association request before it is closed")] = 5.0,
    max_associations: Annotated[int, typer.Option("--max-associations", min=1, help="associations at once (as many connections still negotiating are kept; the oldest is closed for a new one)")] = 32,
    max_per_peer: Annotated[int, typer.Option("--max-per-peer", min=1, help="associations at once from one IP address")] = 8,
    any_called_aet: Annotated[bool, typer.Option("--any-called-aet", help="accept requests addressed to any called AE title (default: only --aet)")] = False,
) -> None:
    """Run a DICOM Storage SCP (C-ECHO, C-STORE) that queues each complete study in the service.

    Analysis and delivery of the results (--dest, --fhir-url, --hl7) are the
    service's durable jobs: failed sends are retried with backoff, never dropped.
    """
    import threading

    from medsight.gateway.listener import ListenerConfig, StorageSCP
    from medsight.gateway.pipeline import ServiceStudyCallback
    from medsight.cli.serve import load_settings
    from medsight.serve.context import ServiceContext
    from medsight.serve.shared_outputs import claim_outputs
    from medsight.serve.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not allow_any_ae and not calling_aet:
        _fail(ValueError("give at least one --calling-aet (or --allow-any-ae to accept every modality/PACS)"))
    try:
        cfg = load_settings(data_dir, settings_file)
        outputs = cfg.outputs.model_dump() | {k: v for k, v in {
            "dicom_destination": dest, "fhir_url": fhir_url, "hl7_destination": hl7, "calling_aet": aet}.items() if v}
        cfg = cfg.model_validate(cfg.model_dump() | {"outputs": outputs} | ({"deid_key_file": deid_key_file} if deid_key_file else {}))
        ctx = ServiceContext.build(cfg)
        release = claim_outputs(cfg, "listener")  # refused when 'medsight serve' here sends results elsewhere
        deid = None
        if cfg.deid_key_file is not None:
            from medsight.integration.deid import DeidConfig, load_key

            deid = DeidConfig(key=load_key(cfg.deid_key_file))
        listener = ListenerConfig(ae_title=aet, host=host, port=port, data_dir=cfg.data_dir / "dicom-inbox",
                                  allowed_calling_aets=tuple(calling_aet or ()), allow_any_ae=allow_any_ae,
                                  idle_timeout=idle_timeout, deid=deid, keep_received=keep_received,
                                  tls=_tls(tls_cert, tls_key, tls_ca, server=True), acse_timeout=acse_timeout,
                                  max_associations=max_associations, max_per_peer=max_per_peer,
                                  require_called_aet=not any_called_aet)
        scp = StorageSCP(listener, on_study_complete=ServiceStudyCallback(ctx, model=model))
        scp.start()
    except (MedSightError, OSError, ValueError) as e:
        _fail(e)
    pool = [Worker(ctx) for _ in range(workers)]
    threads = [threading.Thread(target=w.run, name=f"medsight-worker-{k}", daemon=True) for k, w in enumerate(pool)]
    for t in threads:
        t.start()
    channels = ", ".join(c for c in ("dicom", "fhir", "hl7") if cfg.outputs.destination(c)) or "none"
    err.print(f"listening as {aet} on {host}:{port}; service data in {cfg.data_dir} ({ctx.db.dialect}); "
              f"{workers} worker thread(s); results out: {channels}", highlight=False)
    signal.signal(signal.SIGTERM, lambda *_: scp.stop())
    try:
        scp.wait()
    except KeyboardInterrupt:
        pass
    finally:
        scp.stop()
        for w in pool:
            w.stop()
        for t in threads:
            t.join(timeout=60)
        release()
        ctx.close()


@dicom_app.command("send")
def send_cmd(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders to send")],
    dest: Annotated[str, typer.Option("--dest", help="AE@host:port (C-STORE) or STOW-RS base URL")],
    aet: Annotated[str, typer.Option("--aet", help="our (calling) AE title")] = "MEDSIGHT",
    outbox: Annotated[Path, typer.Option("--outbox", help="failed sends are kept here and retried")] = Path("medsight-dicom/outbox"),
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Send DICOM files (C-STORE or STOW-RS); anything that fails stays in the outbox for retry."""
    from medsight.integration.sender import Outbox, parse_destination

    try:
        box = Outbox(outbox, parse_destination(dest, tls=_tls(tls_cert, tls_key, tls_ca, server=False)), calling_aet=aet)
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
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Retry everything waiting in the outbox."""
    from medsight.integration.sender import Outbox, parse_destination

    try:
        dest_ = parse_destination(dest, tls=_tls(tls_cert, tls_key, tls_ca, server=False))
        report = Outbox(outbox, dest_, calling_aet=aet).flush()
    except MedSightError as e:
        _fail(e)
    err.print(f"sent {report.sent}, still queued {report.pending}", highlight=False)
    if report.pending:
        raise typer.Exit(1)


@dicom_app.command("pull")
def pull_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the retrieved instances")],
    url: Annotated[Optional[str], typer.Option("--url", help="DICOMweb base URL (QIDO-RS/WADO-RS)")] = None,
    pacs: Annotated[Optional[str], typer.Option("--from", help="PACS as AE@host:port: C-FIND to search, C-GET to retrieve")] = None,
    aet: Annotated[str, typer.Option("--aet", help="with --from: our (calling) AE title, as the PACS knows it")] = "MEDSIGHT",
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Study Instance UID (default: search with the filters)")] = None,
    modality: Annotated[Optional[str], typer.Option("--modality", help="QIDO filter: ModalitiesInStudy")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 10,
    queue: Annotated[bool, typer.Option("--queue", help="queue each retrieved study in the service for analysis (as the listener does)")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="with --queue: analyse with this model")] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", "-d", help="with --queue: the service's data folder")] = None,
    settings_file: Annotated[Optional[Path], typer.Option("--settings", help="with --queue: JSON file of service settings")] = None,
) -> None:
    """Pull studies from a PACS (DICOMweb: QIDO-RS/WADO-RS, or DIMSE: C-FIND/C-GET), optionally queueing them for analysis."""
    from medsight.gateway.dicomweb import DicomWebSource
    from medsight.gateway.qr import DimseSource
    from medsight.integration.sender import DimseDestination, parse_destination

    if (url is None) == (pacs is None):
        _fail(ValueError("give exactly one source: --url (DICOMweb) or --from AE@host:port (C-FIND/C-GET)"))

    callback = ctx = None
    try:
        if queue:
            from medsight.gateway.pipeline import ServiceStudyCallback
            from medsight.cli.serve import load_settings
            from medsight.serve.context import ServiceContext

            ctx = ServiceContext.build(load_settings(data_dir, settings_file))
            callback = ServiceStudyCallback(ctx, model=model)
        if url is not None:
            src = DicomWebSource(url)
        else:
            dest = parse_destination(pacs, tls=_tls(tls_cert, tls_key, tls_ca, server=False))
            if not isinstance(dest, DimseDestination):
                raise ValueError(f"--from takes AE@host:port; for a DICOMweb URL use --url {pacs}")
            src = DimseSource(dest, calling_aet=aet)
        uids = [study] if study else [s.study_instance_uid for s in src.search_studies(modality=modality, limit=limit)]
        origin = "DICOMWEB" if url is not None else src.dest.ae_title
        for uid in uids:
            paths = src.retrieve_study(uid, out_dir)  # -> out_dir/<study>/<sop>.dcm
            line = f"{uid}: {len(paths)} instances -> {out_dir / uid}"
            if callback is not None:
                from medsight.gateway.listener import ReceivedStudy

                line += f"; {callback(ReceivedStudy(uid, paths, {origin}))}"
            err.print(line, highlight=False, soft_wrap=True)
    except (MedSightError, ValueError) as e:
        _fail(e)
    finally:
        if ctx is not None:
            ctx.close()

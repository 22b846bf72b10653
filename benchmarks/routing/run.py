"""Routing of every pydicom-data file with pixel data: which shipped model each one would be given, or why none.

Reads each file's header only (no pixel decoding) and routes it with the service's rule
(:func:`medsight.models.applicability.route`, the zoo cards, the service's default models,
no site rules). Files: the pydicom-data store (``data_store``) and pydicom's own test files.

    .venv/bin/python benchmarks/routing/run.py [--out benchmarks/routing] [--docs docs/routing.md]

Writes results.json and results.md to ``--out``; ``--docs`` also rewrites the generated
tables of docs/routing.md (between its ``<!-- routing:... -->`` markers).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medsight.models.applicability import BODY_PART_KEYWORDS, VIEW_KEYWORDS, StudyAttributes, route  # noqa: E402
from medsight.models.registry import ZOO_DIR, list_cards  # noqa: E402
from medsight.serve.config import ServiceSettings  # noqa: E402

HERE = Path(__file__).resolve().parent


def pydicom_data_files() -> list[tuple[str, Path]]:
    """(source, path) of every file of the pydicom-data store and of pydicom's test files, each once."""
    import data_store
    from pydicom.data import get_testdata_files

    found: dict[Path, tuple[str, Path]] = {}
    for p in sorted((Path(data_store.__file__).parent / "data").iterdir()):
        found.setdefault(p.resolve(), ("pydicom-data", p))
    for f in sorted(get_testdata_files()):
        found.setdefault(Path(f).resolve(), ("pydicom test file", Path(f)))
    return sorted(found.values(), key=lambda sp: sp[1].name)


def rows() -> list[dict]:
    cards = list_cards([ZOO_DIR])
    preferred = ServiceSettings().default_models
    out = []
    for source, path in pydicom_data_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, force=True, defer_size="1 KB")
            except Exception:  # noqa: BLE001 - not DICOM, or too broken to have a header: not a study
                continue
        if "PixelData" not in ds:
            continue
        a = StudyAttributes.from_header(ds)
        d = route(a, cards, preferred=preferred)
        out.append({
            "file": path.name, "source": source, "modality": a.modality, "body_part_examined": a.body_part_examined,
            "view_position": a.view_position, "age_years": a.age_years, "photometric": a.photometric,
            "descriptions": dict(a.descriptions), "study": d.study, "model": d.model,
            "message": d.message,
            "fits": {f.model: {"applies": f.applies, "reasons": list(f.reasons), "missing": list(f.missing)}
                     for f in d.fits if f.reads_modality},  # the cards of this modality; the others read another
        })
    return out


def _cell(text: object) -> str:
    return "" if text is None else str(text).replace("|", "\\|")


def routing_table(results: list[dict]) -> str:
    lines = ["| file | Modality | BodyPartExamined | ViewPosition | age | descriptions | model, or why none |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        why = r["model"] or "none: " + r["message"].split("): ", 1)[-1]
        desc = "; ".join(f"{k}: {v}" for k, v in r["descriptions"].items())
        lines.append(f"| {r['file']} | {_cell(r['modality'])} | {_cell(r['body_part_examined'])} | "
                     f"{_cell(r['view_position'])} | {_cell(r['age_years'])} | {_cell(desc)} | {_cell(why)} |")
    return "\n".join(lines)


def keyword_table() -> str:
    lines = ["| code | words (whole word, any case) |", "|---|---|"]
    lines += [f"| {code} | {', '.join(words)} |" for code, words in BODY_PART_KEYWORDS.items()]
    lines += ["", "| view (only when ViewPosition is absent) | words |", "|---|---|"]
    lines += [f"| {code} | {', '.join(words)} |" for code, words in VIEW_KEYWORDS.items()]
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    chosen: dict[str, int] = {}
    for r in results:
        chosen[r["model"] or "not analysed"] = chosen.get(r["model"] or "not analysed", 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(chosen.items()))


def replace_between(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- routing:{name}:start -->\n).*?(<!-- routing:{name}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- routing:{name}:start/end --> markers in the docs page")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--docs", type=Path, default=None, help="docs page whose generated tables to rewrite")
    args = ap.parse_args(argv)
    results = rows()
    args.out.mkdir(parents=True, exist_ok=True)
    rows_json = ",\n".join(json.dumps(r) for r in results)  # one file a line
    (args.out / "results.json").write_text(f'{{"files": {len(results)}, "rows": [\n{rows_json}\n]}}\n')
    md = (f"# Routing of every pydicom-data file with pixel data\n\n"
          f"{len(results)} files (`benchmarks/routing/run.py`): {summary(results)}.\n\n{routing_table(results)}\n")
    (args.out / "results.md").write_text(md)
    if args.docs is not None:
        page = args.docs.read_text()
        page = replace_between(page, "keywords", keyword_table())
        page = replace_between(page, "summary", f"{len(results)} files: {summary(results)}.")
        page = replace_between(page, "table", routing_table(results))
        args.docs.write_text(page)
    print(f"{len(results)} files routed: {summary(results)}; wrote {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

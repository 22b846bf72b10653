"""Worklist priority: hand-computed scores, a known order, configurable weights, filters and pages."""

from __future__ import annotations

from datetime import datetime

import pytest

from medsight.serve.config import TriageWeights
from medsight.serve.db import Study
from medsight.serve.triage import base_score, score
from medsight.serve.worklist import worklist

NOW = 1_750_000_000.0

# name, requested, P(critical) (None: not analysed yet), refer, minutes waiting, modality, status
CASES = [
    ("A", "routine", 0.95, False, 0, "CR", "analysed"),
    ("B", "stat", 0.05, False, 0, "CR", "analysed"),
    ("C", "routine", 0.20, True, 0, "CT", "analysed"),
    ("D", "routine", 0.10, False, 300, "CR", "analysed"),
    ("E", "urgent", 0.45, False, 0, "CT", "analysed"),
    ("F", "routine", None, False, 60, "CR", "queued"),
    ("G", "stat", 0.99, False, 0, "CR", "reviewed"),
]
# Hand-computed with the default weights (0.40 * P + requested + 0.10 * refer + 0.10 * min(wait / 240 min, 1)):
EXPECTED = {"B": 0.52, "E": 0.43, "A": 0.38, "C": 0.18, "D": 0.14, "F": 0.025, "G": 0.896}


def _add_cases(svc, w: TriageWeights) -> dict[str, int]:  # noqa: ANN001
    ids = {}
    with svc.ctx.db.session() as s:
        for name, req, p, refer, wait, mod, status in CASES:
            st = Study(study_uid=f"1.2.3.{name}", modality=mod, model="tiny-xr", requested_priority=req,
                       source_format="png", status=status, received_at=datetime(2025, 6, 15), accession_number=name,
                       received_epoch=NOW - wait * 60, critical_probability=p, refer=refer,
                       priority_base=base_score(w, req, p, refer))
            s.add(st)
            s.flush()
            ids[name] = st.id
    return ids


def test_scores_and_order_match_hand_computation(svc) -> None:  # noqa: ANN001
    w = TriageWeights()
    _add_cases(svc, w)
    with svc.ctx.db.session() as s:
        wl = worklist(s, w, status="open", now_epoch=NOW)
    assert [i["accession_number"] for i in wl["items"]] == ["B", "E", "A", "C", "D", "F"]  # G is reviewed
    for item in wl["items"]:
        assert item["score"] == pytest.approx(EXPECTED[item["accession_number"]], abs=1e-4)
    assert [i["urgency"] for i in wl["items"]] == ["high", "medium", "medium", "low", "low", "low"]
    assert wl["items"][4]["waiting_minutes"] == 300.0
    # SQL and Python agree.
    for name, req, p, refer, wait, *_ in CASES:
        assert score(w, req, p, refer, NOW - wait * 60, NOW) == pytest.approx(EXPECTED[name], abs=1e-9)


def test_weights_are_configurable(svc) -> None:  # noqa: ANN001
    """A department that trusts the model more than the request form: P(critical) dominates."""
    w = TriageWeights(critical=1.0, requested={"stat": 0.2, "urgent": 0.1, "routine": 0.0}, refer=0.0, waiting=0.0)
    _add_cases(svc, w)
    with svc.ctx.db.session() as s:
        wl = worklist(s, w, status="open", now_epoch=NOW)
    assert [i["accession_number"] for i in wl["items"]] == ["A", "E", "B", "C", "D", "F"]


def test_waiting_time_is_added_and_capped(svc) -> None:  # noqa: ANN001
    w = TriageWeights()
    _add_cases(svc, w)
    with svc.ctx.db.session() as s:
        later = worklist(s, w, status="open", now_epoch=NOW + 240 * 60)  # four hours on
    # Everyone gained waiting bonus up to the cap; D was already capped, so F (0.025 -> 0.1) closed in on it.
    assert [i["accession_number"] for i in later["items"]] == ["B", "E", "A", "C", "D", "F"]
    scores = {i["accession_number"]: i["score"] for i in later["items"]}
    assert scores["C"] == pytest.approx(0.28) and scores["D"] == pytest.approx(0.14) and scores["F"] == pytest.approx(0.1)


def test_filters_and_pagination_through_the_api(svc) -> None:  # noqa: ANN001
    _add_cases(svc, TriageWeights())
    h = svc.headers["radiologist"]
    r = svc.client.get("/api/worklist", params={"modality": "ct", "status": "all"}, headers=h).json()
    assert sorted(i["accession_number"] for i in r["items"]) == ["C", "E"]
    r = svc.client.get("/api/worklist", params={"status": "reviewed"}, headers=h).json()
    assert [i["accession_number"] for i in r["items"]] == ["G"]
    pages = [svc.client.get("/api/worklist", params={"status": "open", "page": p, "page_size": 4}, headers=h).json()
             for p in (1, 2)]
    assert pages[0]["total"] == 6 and pages[0]["pages"] == 2
    got = [i["accession_number"] for pg in pages for i in pg["items"]]
    assert sorted(got) == ["A", "B", "C", "D", "E", "F"] and len(pages[1]["items"]) == 2
    assert svc.client.get("/api/worklist", params={"status": "bogus"}, headers=h).status_code == 422

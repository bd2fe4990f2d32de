"""Controlled documents: sandboxed Jinja with autoescape and strict undefined, the institution's
override folder, same record -> same bytes, and the repo's dose receipt template rendered from
a real ``run_record``."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest

from flows.errors import DocumentRenderError
from flows.outputs.documents import render_document
from flows.record import ledger
from flows.record.db import read_session, write_session
from flows.record.query import run_record
from flows.record.tables import Deviation
from tests.conftest import FIXED_AT, TEMPLATES, MakeRun

ZONE = "Asia/Shanghai"


def _templates(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "templates"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_documents_autoescape_entered_text(tmp_path: Path) -> None:
    root = _templates(tmp_path, {"note.html.j2": "<p>{{ note }}</p>"})

    text, _ = render_document(root, "demo_hospital", ZONE, "note.html.j2", {"note": "<script>alert('x')</script> & co"})

    assert text == "<p>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co</p>"


def test_documents_missing_value_names_the_template(tmp_path: Path) -> None:
    root = _templates(tmp_path, {"receipt.html.j2": "<p>{{ record.run.lot }}</p>"})

    with pytest.raises(DocumentRenderError, match="uses a value the record does not have") as info:
        render_document(root, "demo_hospital", ZONE, "receipt.html.j2", {"record": {"run": {"id": "r1"}}})

    assert info.value.template == "receipt.html.j2"
    assert str(info.value).startswith("template 'receipt.html.j2': ")
    assert "lot" in str(info.value)


def test_documents_missing_value_through_a_filter_is_an_error(tmp_path: Path) -> None:
    root = _templates(tmp_path, {"t.html.j2": "{{ record.signed_at | local_time }}"})

    with pytest.raises(DocumentRenderError, match="uses a value the record does not have") as info:
        render_document(root, "demo_hospital", ZONE, "t.html.j2", {"record": {}})

    assert info.value.template == "t.html.j2"


def test_documents_missing_template_is_an_error(tmp_path: Path) -> None:
    root = _templates(tmp_path, {"other.html.j2": ""})

    with pytest.raises(DocumentRenderError, match="not found under") as info:
        render_document(root, "demo_hospital", ZONE, "absent.html.j2", {})

    assert info.value.template == "absent.html.j2"


def test_documents_syntax_error_names_template_and_line(tmp_path: Path) -> None:
    root = _templates(tmp_path, {"broken.html.j2": "<p>\n{% if x %}\n</p>\n"})

    with pytest.raises(DocumentRenderError) as info:
        render_document(root, "demo_hospital", ZONE, "broken.html.j2", {"x": True})

    assert str(info.value).startswith("template 'broken.html.j2': line ")


def test_documents_sandbox_refuses_unsafe_attributes(tmp_path: Path) -> None:
    root = _templates(tmp_path, {"evil.html.j2": "{{ note.__class__.__mro__ }}"})

    with pytest.raises(DocumentRenderError) as info:
        render_document(root, "demo_hospital", ZONE, "evil.html.j2", {"note": "x"})

    assert str(info.value).startswith("template 'evil.html.j2': refused by the sandbox: ")
    assert "unsafe" in str(info.value)


def test_documents_institution_override_wins(tmp_path: Path) -> None:
    root = _templates(tmp_path, {"receipt.html.j2": "generic {{ n }}", "demo_hospital/receipt.html.j2": "demo {{ n }}"})

    demo, _ = render_document(root, "demo_hospital", ZONE, "receipt.html.j2", {"n": 1})
    other, _ = render_document(root, "other_hospital", ZONE, "receipt.html.j2", {"n": 1})

    assert (demo, other) == ("demo 1", "generic 1")


def test_documents_same_context_gives_same_sha256(tmp_path: Path) -> None:
    root = _templates(
        tmp_path, {"t.html.j2": "{% for k, v in d | dictsort %}{{ k }}={{ v }};{% endfor %}{{ at | local_time }}\n"}
    )
    context = {"d": {"b": 2, "a": "数"}, "at": "2026-11-02T01:30:00+00:00"}

    first = render_document(root, "demo_hospital", ZONE, "t.html.j2", context)
    second = render_document(root, "demo_hospital", ZONE, "t.html.j2", {"d": {"a": "数", "b": 2}, "at": context["at"]})

    assert first == second
    assert first[0] == "a=数;b=2;2026-11-02 09:30:00 CST (UTC+0800)\n"
    assert first[1] == hashlib.sha256(first[0].encode("utf-8")).hexdigest()
    changed = render_document(root, "demo_hospital", ZONE, "t.html.j2", {**context, "d": {"a": "数", "b": 3}})
    assert changed[1] != first[1]


def test_documents_local_time_of_nothing_is_blank(tmp_path: Path) -> None:
    root = _templates(tmp_path, {"t.j2": "[{{ none | local_time }}]"})

    text, _ = render_document(root, "demo_hospital", "UTC", "t.j2", {"none": None})

    assert text == "[]"


def test_documents_repo_dose_receipt_renders_run_record(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        arrival = {
            "arrived_at": "2026-11-02T01:00:00+00:00",
            "courier": "SF Express <script>x</script>",
            "shipper_id": "DS-1",
            "seal_intact": True,
            "logger_max_c": -120,
            "transit_hours": 20,
        }
        made.record(s, "arrival", "waiting", {"role": "cell_lab"}, at=FIXED_AT)
        signed = made.record(s, "arrival", "signed", arrival, user="ana", sign=True, at=FIXED_AT + timedelta(minutes=5))
        made.record(
            s,
            "arrival",
            "done",
            arrival,
            user="ana",
            signature_id=signed.signature_id,
            at=FIXED_AT + timedelta(minutes=6),
        )
        made.record(s, "transit_temperature", "failed", {"passed": False}, at=FIXED_AT + timedelta(minutes=7))
        ledger.append(
            s,
            Deviation(
                run_id=made.run.id,
                step_id="transit_temperature",
                classification="major",
                description="Transit temperature above the storage limit or seal not intact",
                quarantine=True,
                opened_at=FIXED_AT + timedelta(minutes=7),
            ),
            actor="system",
        )
        run_id = made.run.id
        step = made.sop.step("receipt_record")
        step_ctx = {"id": step.id, "title": step.title or step.id}

    with read_session(db_url) as s:
        record = run_record(s, run_id, with_history=False)
    text, digest = render_document(
        TEMPLATES, "demo_hospital", ZONE, "dose_receipt.html.j2", {"record": record, "step": step_ctx}
    )

    assert f"<title>CAR-T dose receipt and acceptance — run {run_id}</title>" in text
    assert "<h1>Dose receipt and acceptance record</h1>" in text
    assert "Axicabtagene ciloleucel (Yikaida) (Fosun Kite)" in text
    assert "<tr><th>coi</th><td>COI-2026-0001</td></tr>" in text
    assert "Started</th><td>2026-11-02 09:30:00 CST (UTC+0800)" in text
    assert "Ana Li 李安娜<br>2026-11-02 09:35:00 CST (UTC+0800)" in text  # the signature, in the institution's zone
    assert "<em>performed</em>: Received and inspected the shipper" in text
    assert "Logger maximum transit temperature: -120 °C" in text
    assert "SF Express &lt;script&gt;x&lt;/script&gt;" in text
    assert "<script>x" not in text
    assert '<td class="fail">failed</td>' in text
    assert '<td>transit_temperature</td><td class="fail">major</td>' in text
    assert "not reached" in text  # qa_acceptance
    again, digest_again = render_document(
        TEMPLATES, "demo_hospital", ZONE, "dose_receipt.html.j2", {"record": record, "step": step_ctx}
    )
    assert (again, digest_again) == (text, digest)

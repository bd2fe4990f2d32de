"""Stage 1: loading SOP YAML, with every problem located as file:line: path: message."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from flows.errors import SopDefinitionError
from flows.sop import Catalog, load_institution_file, load_products_file, load_sop

TESTS = Path(__file__).parent
REPO = TESTS.parent
INVALID = TESTS / "sops" / "invalid"
VALID_SOPS = TESTS / "sops" / "valid" / "sops"
VALID_TEMPLATES = TESTS / "sops" / "valid" / "templates"
CASES = sorted(p for p in INVALID.glob("*.yaml") if p.name not in ("institution.yaml", "products.yaml"))
MARK = "# <- error"


def _expected(case: Path) -> tuple[list[str], list[int]]:
    """The `# error: <text>` header lines and the lines marked `# <- error`."""
    lines = case.read_text(encoding="utf-8").splitlines()
    texts = [line.removeprefix("# error: ") for line in lines if line.startswith("# error: ")]
    marked = [number for number, line in enumerate(lines, start=1) if line.rstrip().endswith(MARK)]
    return texts, marked


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_invalid_sop_reports_message_at_file_line(case: Path) -> None:
    texts, marked = _expected(case)
    assert texts, f"{case.name} needs a first line '# error: <expected text>'"
    assert marked, f"{case.name} needs '{MARK}' on the line each problem is on"

    problems = Catalog(INVALID, VALID_TEMPLATES).validate(case)

    shown = [str(p) for p in problems]
    assert sorted(p.line or 0 for p in problems) == marked, shown
    for text in texts:
        assert any(text in line for line in shown), f"{text!r} not in {shown}"
    for problem, line in zip(problems, shown, strict=True):
        assert (
            line.startswith(f"tests/sops/invalid/{case.name}:{problem.line}: ")
            or f"{case.name}:{problem.line}: " in line
        )


def test_load_sop_reports_all_four_problems_at_once() -> None:
    case = INVALID / "four_problems.yaml"

    with pytest.raises(SopDefinitionError) as info:
        load_sop(case)

    problems = info.value.problems
    assert [(p.line, p.path) for p in problems] == [
        (10, "params.dose_ml"),
        (13, "steps[0].kind"),
        (16, "steps[1].titel"),
        (20, "steps[1].timeout"),
    ]
    assert str(info.value).count("\n") == 3


def test_load_sop_keeps_exact_bytes_and_hash() -> None:
    path = VALID_SOPS / "test_hospital" / "every_kind.yaml"

    loaded = load_sop(path)

    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.text == path.read_text(encoding="utf-8")
    assert loaded.definition.id == "every_kind"
    assert loaded.lines.line("steps", 1, "expect") == 24
    with pytest.raises(FrozenInstanceError):
        loaded.sha256 = "x"  # type: ignore[misc]


def test_load_sop_flattens_union_tag_out_of_path(tmp_path: Path) -> None:
    path = tmp_path / "tagged.yaml"
    path.write_text(
        "schema_version: 1\nid: tagged\ntitle: t\nversion: 1\nsteps:\n"
        "  - {id: a, kind: record, role: qa, fields: {x: {type: number}}}\n"
        "  - id: b\n    kind: record\n    role: qa\n",
        encoding="utf-8",
    )

    with pytest.raises(SopDefinitionError) as info:
        load_sop(path)

    [problem] = info.value.problems
    assert (problem.line, problem.path, problem.message) == (
        7,
        "steps[1].fields",
        "missing required key 'fields'",
    )


def test_load_sop_rejects_invalid_id_with_rule(tmp_path: Path) -> None:
    path = tmp_path / "ids.yaml"
    path.write_text(
        "schema_version: 1\nid: ids\ntitle: t\nversion: 1\nparams:\n  Lot-No: {type: text}\n"
        "steps:\n  - {id: a, kind: approve, role: QA, meaning: m}\n",
        encoding="utf-8",
    )

    with pytest.raises(SopDefinitionError) as info:
        load_sop(path)

    messages = [(p.line, p.path, p.message) for p in info.value.problems]
    assert messages == [
        (
            6,
            "params['Lot-No']",
            "'Lot-No' is not a valid key: use lower-case letters, digits and '_', starting with a letter",
        ),
        (
            8,
            "steps[0].role",
            "'QA' is not a valid id: use lower-case letters, digits and '_', starting with a letter",
        ),
    ]


def test_load_sop_literal_error_suggests_close_match(tmp_path: Path) -> None:
    path = tmp_path / "lit.yaml"
    path.write_text(
        "schema_version: 1\nid: lit\ntitle: t\nversion: 1\nsteps:\n"
        "  - {id: a, kind: check, expect: 'true', on_fail: devation}\n",
        encoding="utf-8",
    )

    with pytest.raises(SopDefinitionError, match="Did you mean 'deviation'") as info:
        load_sop(path)

    assert str(info.value) == (
        f"{path}:6: steps[0].on_fail: expected 'deviation' or 'stop', got 'devation'. Did you mean 'deviation'?"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty; expected a YAML mapping"),
        ("- a\n- b\n", "expected a YAML mapping at the top, got list"),
        (
            "a: 1\n---\nb: 2\n",
            "invalid YAML: expected a single document in the stream but found another document",
        ),
    ],
    ids=["empty", "list", "two-documents"],
)
def test_load_sop_rejects_file_that_is_not_one_mapping(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(SopDefinitionError) as info:
        load_sop(path)

    assert [p.message for p in info.value.problems] == [message]


def test_load_sop_reports_unreadable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes("title: caf\xe9\n".encode("latin-1"))

    with pytest.raises(SopDefinitionError, match="not UTF-8"):
        load_sop(path)


def test_load_institution_requires_id_equal_to_folder(tmp_path: Path) -> None:
    folder = tmp_path / "north"
    folder.mkdir()
    (folder / "institution.yaml").write_text(
        "schema_version: 1\nid: south\nname: N\nroles: {qa: {label: QA}}\n",
        encoding="utf-8",
    )

    with pytest.raises(SopDefinitionError) as info:
        load_institution_file(folder / "institution.yaml")

    assert str(info.value).endswith(
        "institution.yaml:2: id: id 'south' must equal the institution's folder name 'north'"
    )


def test_load_products_reads_catalogue() -> None:
    catalogue = load_products_file(VALID_SOPS / "test_hospital" / "products.yaml")

    assert catalogue.products["tecartus"].storage_max_c == -150


def test_import_flows_sop_loads_neither_prefect_nor_sqlmodel() -> None:
    code = (
        "import sys, flows.sop, flows.sop.catalog, flows.sop.inputs, flows.sop.schema\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'sqlmodel')"
        " or m.startswith(('flows.engine', 'flows.record')))\n"
        "print(','.join(bad))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )

    assert result.stdout.strip() == ""


def test_load_sop_text_reports_schema_and_cross_reference_problems_in_one_pass() -> None:
    """Issue 15: a broken step used to hide the duplicate id and the broken expression of the others."""
    from flows.sop.editing import validate_sop_text

    case = INVALID / "five_problems.yaml"
    institution = load_institution_file(INVALID / "institution.yaml")

    found = validate_sop_text(case.read_text(encoding="utf-8"), name="five.yaml", institution=institution)

    assert [(p["line"], p["path"]) for p in found] == [
        (16, "steps[1].meaning"),
        (21, "steps[2].titel"),
        (27, "steps[3].role"),
        (28, "steps[4].id"),
        (34, "steps[5].expect"),
    ]


def test_load_sop_reads_a_broken_step_as_anything_not_as_a_second_problem(tmp_path: Path) -> None:
    path = tmp_path / "reads_broken.yaml"
    path.write_text(
        "schema_version: 1\nid: reads_broken\ntitle: t\nversion: 1\nsteps:\n"
        "  - {id: arrival, kind: record, role: qa, fields: {temp: {type: numbr}}}\n"
        "  - {id: cold, kind: check, expect: 'arrival.temp < -150 and arival.temp < 0'}\n",
        encoding="utf-8",
    )

    with pytest.raises(SopDefinitionError) as info:
        load_sop(path)

    assert [(p.line, p.path) for p in info.value.problems] == [(6, "steps[0].fields.temp.type"), (7, "steps[1].expect")]
    assert "unknown name 'arival'" in info.value.problems[1].message

"""Stage 1: cross-references, expressions (load-time names, run-time sandbox) and the catalogue."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.errors import SopDefinitionError, SopNotFoundError
from flows.sop import (
    Catalog,
    ExpressionError,
    check_sop,
    evaluate_check,
    find_template,
    load_sop,
    render_message,
)
from flows.sop.model import CheckStepSpec, NotifyStepSpec

TESTS = Path(__file__).parent
VALID_SOPS = TESTS / "sops" / "valid" / "sops"
VALID_TEMPLATES = TESTS / "sops" / "valid" / "templates"
EVERY_KIND = VALID_SOPS / "test_hospital" / "every_kind.yaml"

CONTEXT = {
    "params": {"coi": "COI-123456", "patient_id": "P1234"},
    "product": {
        "name": "Tecartus",
        "storage_max_c": -150.0,
        "documents": ["CoA", "RFI"],
    },
    "arrival": {
        "logger_max_c": -160.0,
        "seal_intact": True,
        "items": 2.0,
        "signed_by": "li.wei",
    },
    "release": {"decision": "approved", "signed_by": "qa.zhang"},
    "identity": {"documents": "complete", "signed_by": "pharm.chen"},
    "run": {"id": "r-1", "sop_id": "every_kind", "institution": "test_hospital"},
}


@pytest.fixture(name="catalog")
def catalog_fixture() -> Catalog:
    return Catalog(VALID_SOPS, VALID_TEMPLATES)


def test_check_sop_passes_every_kind_fixture(catalog: Catalog) -> None:
    institution = catalog.institution("test_hospital")

    problems = check_sop(
        institution.sops["every_kind"],
        institution=institution.spec,
        templates_dir=VALID_TEMPLATES,
    )

    assert problems == []
    assert sorted(institution.products) == ["abecma", "tecartus"]


def test_check_sop_skips_roles_and_templates_without_context() -> None:
    loaded = load_sop(TESTS / "sops" / "invalid" / "unknown_template.yaml")

    assert check_sop(loaded) == []


def test_find_template_prefers_institution_override() -> None:
    assert find_template("receipt.html.j2", VALID_TEMPLATES, "test_hospital") == (
        VALID_TEMPLATES / "test_hospital" / "receipt.html.j2"
    )
    assert find_template("receipt.html.j2", VALID_TEMPLATES) == VALID_TEMPLATES / "receipt.html.j2"
    assert find_template("label.html.j2", VALID_TEMPLATES) is None


@pytest.mark.parametrize("name", ["../secrets.txt", "/etc/passwd", ""])
def test_find_template_refuses_paths_outside_templates(name: str) -> None:
    assert find_template(name, VALID_TEMPLATES, "test_hospital") is None


def test_evaluate_check_reads_params_product_and_steps() -> None:
    loaded = load_sop(EVERY_KIND)
    expects = [s.expect for s in loaded.definition.steps if isinstance(s, CheckStepSpec)]

    assert [evaluate_check(e, CONTEXT) for e in expects] == [True, True]
    assert (
        evaluate_check(
            "arrival.logger_max_c <= product.storage_max_c",
            {**CONTEXT, "arrival": {"logger_max_c": -120}},
        )
        is False
    )


def test_evaluate_check_reads_field_named_like_dict_method() -> None:
    assert evaluate_check("arrival.items == 2", CONTEXT) is True


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("arrival.nope > 1", "'arrival' has no value 'nope'"),
        ("params.coi > 3", "'>' not supported between instances of 'str' and 'int'"),
        ("arrival.logger_max_c / 0", "division by zero"),
        ("arrival.__class__", "unsafe"),
        ("'x' * 1000000 == ''", "repeating a sequence 1000000 times is above the limit"),
        ("2 ** 1000 > 1", "exponent 1000 is too large"),
        ("arrival.logger_max_c <=", "unexpected 'end of template'"),
    ],
    ids=[
        "missing-value",
        "type",
        "zero-division",
        "dunder",
        "big-repeat",
        "big-power",
        "syntax",
    ],
)
def test_evaluate_check_raises_expression_error(expr: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        evaluate_check(expr, CONTEXT)

    assert str(info.value).startswith(f"check {expr!r} failed: ")
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_render_message_fills_notify_template() -> None:
    loaded = load_sop(EVERY_KIND)
    step = loaded.definition.step("tell")
    assert isinstance(step, NotifyStepSpec)
    message = step.message

    assert render_message(message, CONTEXT) == "Run r-1: dose COI-123456 (Tecartus) CoA RFI released by qa.zhang."


def test_render_message_raises_on_missing_value() -> None:
    with pytest.raises(ExpressionError, match="'run' has no value 'sop'"):
        render_message("{{ run.sop }}", CONTEXT)


def test_catalog_get_sop_suggests_close_id(catalog: Catalog) -> None:
    with pytest.raises(SopNotFoundError) as info:
        catalog.get_sop("test_hospital", "every_knd")

    assert str(info.value) == "no SOP 'every_knd' in test_hospital. Did you mean 'every_kind'?"


def test_catalog_lists_choices_when_nothing_is_close(catalog: Catalog) -> None:
    with pytest.raises(SopNotFoundError) as info:
        catalog.institution("zzz")

    assert str(info.value) == "no institution 'zzz'. Known institutions: 'test_hospital'."


def test_catalog_product_suggests_close_id(catalog: Catalog) -> None:
    assert catalog.product("test_hospital", "abecma").mah == "BMS"
    with pytest.raises(SopNotFoundError, match="Did you mean 'tecartus'"):
        catalog.product("test_hospital", "tecartis")


def test_catalog_institution_collects_problems_of_every_file(tmp_path: Path) -> None:
    folder = tmp_path / "sops" / "test_hospital"
    shutil.copytree(VALID_SOPS / "test_hospital", folder)
    shutil.copy(TESTS / "sops" / "invalid" / "unknown_kind.yaml", folder)
    shutil.copy(TESTS / "sops" / "invalid" / "unknown_key.yaml", folder)
    catalog = Catalog(tmp_path / "sops", VALID_TEMPLATES)

    with pytest.raises(SopDefinitionError) as info:
        catalog.institution("test_hospital")

    assert sorted(Path(p.file).name for p in info.value.problems) == [
        "unknown_key.yaml",
        "unknown_kind.yaml",
    ]
    assert catalog.get_sop("test_hospital", "every_kind").definition.version == 2


def test_catalog_validate_reports_sop_outside_institution_folder(
    tmp_path: Path,
) -> None:
    shutil.copy(EVERY_KIND, tmp_path / "every_kind.yaml")

    problems = Catalog(tmp_path, VALID_TEMPLATES).validate()

    assert [p.message for p in problems] == ["no institution.yaml beside it; SOPs live in sops/<institution>/"]


def test_catalog_validate_missing_path_is_a_problem(catalog: Catalog, tmp_path: Path) -> None:
    [problem] = catalog.validate(tmp_path / "nowhere.yaml")

    assert problem.message == "no such file"


def test_catalog_defaults_follow_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOPFLOW_SOPS_DIR", str(VALID_SOPS))
    monkeypatch.setenv("SOPFLOW_TEMPLATES_DIR", str(VALID_TEMPLATES))

    catalog = Catalog()

    assert (catalog.sops_dir, catalog.templates_dir) == (VALID_SOPS, VALID_TEMPLATES)
    assert catalog.institutions() == ["test_hospital"]


def test_catalog_defaults_to_repository_folders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SOPFLOW_SOPS_DIR", raising=False)
    monkeypatch.delenv("SOPFLOW_TEMPLATES_DIR", raising=False)

    catalog = Catalog()

    assert catalog.sops_dir == TESTS.parent.resolve() / "sops"
    assert catalog.templates_dir == TESTS.parent.resolve() / "templates"

"""Every file under the repository's sops/ loads and passes every check (templates included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.sop import Catalog

REPO = Path(__file__).resolve().parent.parent
CATALOG = Catalog(REPO / "sops", REPO / "templates")
FILES = CATALOG.files()


def test_repo_sops_folder_has_files() -> None:
    assert FILES, "sops/ holds no .yaml files"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO / "sops")) for p in FILES])
def test_repo_sop_file_validates(path: Path) -> None:
    assert [str(p) for p in CATALOG.validate(path)] == []


@pytest.mark.parametrize("inst_id", CATALOG.institutions())
def test_repo_institution_loads_with_every_sop(inst_id: str) -> None:
    institution = CATALOG.institution(inst_id)

    assert institution.sops, f"{inst_id} has no SOPs"
    for sop_id, loaded in institution.sops.items():
        assert loaded.definition.id == sop_id

"""Stage 1: the keys of sub-runs and deviation lifecycles are checked when an SOP loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.errors import SopDefinitionError
from flows.sop import Catalog

DEV_HOSPITAL = Path(__file__).parent / "sops" / "engine" / "dev_hospital"


def _problems(tmp_path: Path, name: str, text: str) -> list[str]:
    folder = tmp_path / "dev_hospital"
    shutil.copytree(DEV_HOSPITAL, folder)
    (folder / f"{name}.yaml").write_text("# Owner: test · Approval: none · Effective: n/a\n" + text, encoding="utf-8")
    with pytest.raises(SopDefinitionError) as info:
        Catalog(tmp_path, tmp_path).get_sop("dev_hospital", name)
    return [str(p) for p in info.value.problems]


def test_engine_test_institution_is_valid() -> None:
    assert Catalog(DEV_HOSPITAL.parent, DEV_HOSPITAL.parent).validate() == []


def test_subrun_naming_an_unknown_sop_or_a_bad_expression_is_refused(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        "bad_parent",
        """schema_version: 1
id: bad_parent
title: t
version: 1
params: {coi: {type: text}}
steps:
  - {id: child, kind: subrun, sop: child_flw, params: {coi: "params.cio"}}
  - {id: after, kind: check, expect: "child.status == 'completed'"}
  - {id: own, kind: subrun, sop: bad_parent}
""",
    )
    assert [p.split("dev_hospital/", 1)[1] for p in problems] == [
        "bad_parent.yaml:8: steps[0].params.coi: step 'child': 'params' has no 'cio' in 'params.cio'. Did you mean 'coi'?",
        "bad_parent.yaml:8: steps[0].sop: unknown SOP 'child_flw' in dev_hospital. Did you mean 'child_flow'?",
        "bad_parent.yaml:10: steps[2].sop: SOP 'bad_parent' cannot run itself as a sub-run",
    ]


def test_lifecycle_steps_need_deviation_id_and_capa_fields(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        "bad_capa",
        """schema_version: 1
id: bad_capa
title: t
version: 1
steps:
  - {id: capa, kind: record, role: qa, updates_deviation: capa, fields: {action: {type: text}, due: {type: text}}}
  - {id: check, kind: check, expect: "true", deviation: {sop: deviation_cap}}
  - {id: dispose, kind: record, role: qa, updates_deviation: disposition, fields: {note: {type: text}}}
""",
    )
    text = "\n".join(problems)
    assert "'updates_deviation' needs a param 'deviation_id'" in text
    assert "a 'capa' step needs a field 'owner' of type 'text'" in text
    assert "a 'capa' step needs a field 'due' of type 'datetime'" in text
    assert "steps[2].updates_deviation: a 'disposition' step must be an approve step or have a choice field" in text
    assert "steps[1].deviation.sop: unknown SOP 'deviation_cap' in dev_hospital. Did you mean 'deviation_capa'?" in text


def test_unknown_lifecycle_event_is_a_schema_error(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        "bad_event",
        """schema_version: 1
id: bad_event
title: t
version: 1
params: {deviation_id: {type: text}}
steps:
  - {id: closure, kind: approve, role: qa, meaning: m, updates_deviation: closd}
""",
    )
    assert len(problems) == 1
    assert "steps[0].updates_deviation" in problems[0]
    assert "Did you mean 'closed'?" in problems[0]

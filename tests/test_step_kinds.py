"""One table of step kinds (issue 10): ``flows.sop.model.STEP_KINDS``. The model's union, the JSON
Schema editors get, the engine's walk and handlers, the human kinds the services sign, and the
README's table all name exactly its kinds."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from flows.engine.run_sop import WALKS
from flows.engine.steps import AUTOMATED
from flows.sop.model import HUMAN_KINDS, STEP_KINDS, HumanStepSpec, StepSpec
from flows.sop.schema import sop_json_schema

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_step_kinds_each_row_names_the_spec_of_its_kind():
    for kind, row in STEP_KINDS.items():
        (literal,) = typing.get_args(row.spec.model_fields["kind"].annotation)
        assert literal == kind
        assert row.human == issubclass(row.spec, HumanStepSpec), kind
        assert row.help


def test_step_kinds_the_model_union_is_the_table():
    union, _discriminator = typing.get_args(StepSpec)
    assert set(typing.get_args(union)) == {row.spec for row in STEP_KINDS.values()}


def test_step_kinds_the_json_schema_is_the_table():
    steps = sop_json_schema()["properties"]["steps"]["items"]
    assert set(steps["discriminator"]["mapping"]) == set(STEP_KINDS)
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in steps["oneOf"]} == {r.spec.__name__ for r in STEP_KINDS.values()}


def test_step_kinds_the_engine_walks_every_kind_and_runs_the_automated_ones():
    assert set(WALKS) == set(STEP_KINDS)
    assert set(AUTOMATED) == {k for k, r in STEP_KINDS.items() if not r.human} - {"subrun"}
    assert {k for k in STEP_KINDS if WALKS[k] is WALKS["record"]} == HUMAN_KINDS


def test_step_kinds_the_readme_table_lists_exactly_them():
    table = README[README.index("Step kinds:") :].split("\n\n")[1]
    assert re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE) == list(STEP_KINDS)

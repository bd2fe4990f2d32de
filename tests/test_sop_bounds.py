"""Stage 1: the loader's bounds (issue 15). Every text ends in a definition or a SopDefinitionError
with file:line, within a second, through a file and through the web editor's text alike."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.errors import SopDefinitionError
from flows.sop import load_institution_file, load_sop
from flows.sop.editing import validate_sop_text
from flows.sop.safe_yaml import MAX_ALIASES, MAX_BYTES, MAX_DEPTH, MAX_NODES

HEAD = "schema_version: 1\nid: case\ntitle: t\nversion: 1\n"
STEPS = "steps:\n  - {id: a, kind: approve, role: qa, meaning: m}\n"


def _bomb(levels: int, width: int) -> str:
    """The 'billion laughs': each level lists the level below `width` times."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return HEAD + STEPS + "\n".join(lines) + "\n"


CASES = {
    # name: (text, line, message part)
    "alias-bomb-count": (_bomb(6, 9), 13, f"more than {MAX_ALIASES} aliases"),
    "alias-bomb-expansion": (_bomb(6, 7), 11, f"aliases expand this file to more than {MAX_NODES} values"),
    "alias-self": (HEAD + STEPS + "x: &x [a, *x]\n", 7, "an alias refers to the node that contains it"),
    "deep-flow": (HEAD + STEPS + "x: " + "[" * 100_000 + "\n", 7, f"nested more than {MAX_DEPTH} levels deep"),
    "deep-block": (
        HEAD + STEPS + "".join(" " * i + f"k{i}:\n" for i in range(40)) + " " * 40 + "v\n",
        38,
        f"nested more than {MAX_DEPTH} levels deep",
    ),
    "tag-int": ("schema_version: !!int 1\n" + HEAD[18:] + STEPS, 1, "explicit tag '!!int' is not allowed"),
    "tag-python": (
        HEAD + STEPS + "x: !!python/object/apply:os.system ['true']\n",
        7,
        "explicit tag '!!python/object/apply:os.system' is not allowed",
    ),
    "tag-local": (HEAD + "title: !secret t\n" + STEPS, 5, "explicit tag '!secret' is not allowed"),
    "nul": (HEAD + "description: a\x00b\n" + STEPS, 5, "contains a NUL character"),
    "control": (HEAD + "description: a\x07b\n" + STEPS, 5, "the character U+0007 is not allowed in YAML"),
    "control-after-chinese": (HEAD + "title: 毒性监测\ndescription: a\x07b\n" + STEPS, 6, "U+0007 is not allowed"),
    "bidi": (HEAD + "description: 'a\u202eb'\n" + STEPS, 5, "bidirectional control character U+202E"),
    "huge-integer": (HEAD.replace("\nversion: 1\n", "\nversion: " + "9" * 5000 + "\n"), 4, "at most 32 characters"),
    "infinite-float": (HEAD.replace("\nversion: 1\n", "\nversion: 1.0e+400\n"), 4, "is not finite"),
    "impossible-date": (HEAD + "description: 2026-02-30\n" + STEPS, 5, "cannot read '2026-02-30'"),
    "too-large": (HEAD + STEPS + "description: '" + "x" * MAX_BYTES + "'\n", None, f"at most {MAX_BYTES} bytes"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_sop_refuses_unbounded_text_fast_at_its_line(tmp_path: Path, name: str) -> None:
    text, line, message = CASES[name]
    path = tmp_path / "case.yaml"
    path.write_text(text, encoding="utf-8")

    # The bound is on the work done (this thread's CPU seconds, as in test_sop_fuzz), not on how busy the
    # shared machine is: the wall clock of a 1-second bound failed at a load average of 18 on 2 cores.
    started = time.thread_time()
    with pytest.raises(SopDefinitionError) as info:
        load_sop(path)
    from_file = time.thread_time() - started
    started = time.thread_time()
    from_editor = validate_sop_text(text, name="case.yaml")
    from_text = time.thread_time() - started

    [problem] = info.value.problems
    assert (problem.line, message in problem.message) == (line, True), str(problem)
    assert [(p["line"], p["message"]) for p in from_editor] == [(problem.line, problem.message)]
    assert from_file < 1.0, from_file
    assert from_text < 1.0, from_text


def test_load_sop_accepts_a_few_aliases_within_bounds(tmp_path: Path) -> None:
    path = tmp_path / "case.yaml"
    path.write_text(
        HEAD + "steps:\n  - &s {id: a, kind: approve, role: qa, meaning: m}\n"
        "  - {id: b, kind: verify, of: a, role: qa}\n"
        "distinct_signers: [[a, b]]\nstart_roles: &roles [qa]\n",
        encoding="utf-8",
    )

    assert load_sop(path).definition.start_roles == ("qa",)


def test_load_institution_resolves_a_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: run inside the folder, 'institution.yaml' was compared with the folder name ''."""
    folder = tmp_path / "north"
    folder.mkdir()
    (folder / "institution.yaml").write_text(
        "schema_version: 1\nid: north\nname: N\nroles: {qa: {label: QA}}\n", encoding="utf-8"
    )
    monkeypatch.chdir(folder)

    assert load_institution_file("institution.yaml").id == "north"
    (folder / "institution.yaml").write_text(
        "schema_version: 1\nid: south\nname: N\nroles: {qa: {label: QA}}\n", encoding="utf-8"
    )
    with pytest.raises(SopDefinitionError, match="must equal the institution's folder name 'north'"):
        load_institution_file("institution.yaml")


def test_validate_sop_text_refuses_a_lone_surrogate_from_the_editor() -> None:
    """JSON can carry '\\ud800'; it is not a character and cannot be encoded for the parser."""
    [problem] = validate_sop_text(HEAD + "title: 'a\ud800'\n" + STEPS, name="case.yaml")

    assert (problem["line"], problem["message"]) == (
        5,
        "the text contains a lone surrogate U+D800, which is not a character",
    )

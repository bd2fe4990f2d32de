"""The service floor: SOP content in the words people use, as structures the pages put into their
language (issue 14). Nothing here decides anything; it reads definitions and records.

    role_labels      an institution's role ids → their labels (``institution.yaml``)
    dose_facts       the dose a run is about: product, COI, lot, patient id (from its params)
    format_words     a text field's format as words and an example (a DIN: what it looks like,
                     where it is on the label) instead of a regular expression
    check_clauses    a check's expression as clauses (field label, comparison, limit) instead of code
    reads_of         the fields a computed value is worked out from
    document_name    a document as people name it: the step's title, language, HTML or PDF
    next_steps       what happens after a step is signed: the automated steps, then who signs next

Pages render the structures with their own catalogue (``flows/web/locales``), so the words come in
the reader's language; the English SOP text and every id stay as they are for the CLI and tests.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment

from flows.config import Settings
from flows.errors import SopDefinitionError
from flows.record.dose import dose_facts
from flows.sop.catalog import INSTITUTION_FILE
from flows.sop.load import load_institution_file
from flows.sop.model import CheckStepSpec, FieldSpec, HumanStepSpec, SopDefinition, SubrunStepSpec, text_in

__all__ = [
    "check_clauses",
    "document_name",
    "dose_facts",
    "format_words",
    "institution_language",
    "next_steps",
    "reads_of",
    "role_labels",
]


@lru_cache(maxsize=64)
def _roles(path: Path, mtime: float) -> dict[str, Any]:
    spec = load_institution_file(path)
    return {"roles": dict(spec.roles.items()), "language": spec.language}


def role_labels(settings: Settings, institution: str, language: str | None = None) -> dict[str, str]:
    """Role id → label of ``institution`` (its ids where the file cannot be read)."""
    path = settings.sops_dir / institution / INSTITUTION_FILE
    try:
        roles = _roles(path, path.stat().st_mtime)["roles"]
    except (OSError, SopDefinitionError):
        return {}
    return {rid: text_in(r.label, language) for rid, r in roles.items()}


def institution_language(settings: Settings, institution: str) -> str:
    """The language of the institution's documents and notifications (``institution.yaml``; ``en``)."""
    path = settings.sops_dir / institution / INSTITUTION_FILE
    try:
        return str(_roles(path, path.stat().st_mtime)["language"])
    except (OSError, SopDefinitionError):
        return "en"


_SIMPLE = re.compile(r"^\^\[([^\]\\]+)\](\{(\d+)(,(\d*))?\}|\+|\*)\$$")


def format_words(field: dict[str, Any] | FieldSpec, example: str | None = None) -> dict[str, Any] | None:
    """A text field's format as a structure a page puts into words: ``{"kind": "din"}``, ``{"kind":
    "coi", "example"}``, ``{"kind": "chars", "min", "max", "sets", "others", "example"}``, or
    ``{"kind": "pattern", "pattern"}`` for a pattern too rich to describe; None without a format."""
    f = field.model_dump(exclude_none=True) if isinstance(field, FieldSpec) else field
    if f.get("format") == "isbt128_din":
        return {"kind": "din", "example": "G1234 26 654321 H"}
    if f.get("format") == "coi":
        return {"kind": "coi", "example": example}
    pattern = f.get("pattern")
    if not pattern:
        return None
    m = _SIMPLE.match(pattern)
    if m is None:
        return {"kind": "pattern", "pattern": pattern}
    chars, low, high = m.group(1), m.group(3), m.group(5)
    sets = []
    for token, name in (("A-Z", "upper"), ("a-z", "lower"), ("0-9", "digits")):
        if token in chars:
            sets.append(name)
            chars = chars.replace(token, "")
    if "-" in chars[1:-1] or "\\" in chars:
        return {"kind": "pattern", "pattern": pattern}  # another range: the rule as written
    lo = int(low) if low else (1 if m.group(2) == "+" else 0)
    hi = (int(m.group(5)) if high else None) if m.group(4) else (lo if low else None)
    return {
        "kind": "chars",
        "min": lo,
        "max": hi,
        "sets": sets,
        "others": chars,
        "example": _example(sets, chars, lo, hi),
    }


def _example(sets: list[str], others: str, lo: int, hi: int | None) -> str:
    head = "ABC" if "upper" in sets else "abc" if "lower" in sets else ""
    tail = "1234" if "digits" in sets else ""
    sep = next((c for c in "-/." if c in others), "") if head and tail else ""
    text = head + sep + tail or (others[:1] * max(lo, 1))
    while len(text) < lo:
        text += "5" if "digits" in sets else text[-1]
    return text[:hi] if hi else text


_ENV = SandboxedEnvironment()
_OPS = {"lt": "lt", "lteq": "le", "gt": "gt", "gteq": "ge", "eq": "eq", "ne": "ne", "in": "in", "notin": "notin"}
_ARITH = {nodes.Mul: "\u00d7", nodes.Add: "+", nodes.Sub: "\u2212", nodes.Div: "\u00f7"}


def _term(node: nodes.Node, labels: dict[str, dict[str, Any]], product: dict[str, Any]) -> dict[str, Any]:
    if isinstance(node, nodes.Const):
        return {"value": node.value}
    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name):
        owner, key = node.node.name, node.attr
        if owner == "product":
            return {"product": key, "value": product.get(key)}
        spec = labels.get(owner, {}).get(key)
        if spec is not None:
            return {"field": spec.get("label") or key, "unit": spec.get("unit")}
        return {"name": f"{owner}.{key}"}
    for kind, sign in _ARITH.items():
        if isinstance(node, kind):
            return {
                "arith": sign,
                "left": _term(node.left, labels, product),
                "right": _term(node.right, labels, product),
            }
    return {"code": _source(node)}


def _source(node: nodes.Node) -> str:
    if isinstance(node, nodes.Getattr):
        return f"{_source(node.node)}.{node.attr}"
    if isinstance(node, nodes.Name):
        return node.name
    if isinstance(node, nodes.Const):
        return repr(node.value)
    return type(node).__name__.lower()


def _clause(node: nodes.Node, labels: dict[str, dict[str, Any]], product: dict[str, Any]) -> dict[str, Any]:
    if isinstance(node, nodes.And | nodes.Or):
        key = "all" if isinstance(node, nodes.And) else "any"
        parts: list[dict[str, Any]] = []
        for side in (node.left, node.right):
            sub = _clause(side, labels, product)
            parts.extend(sub.get(key, [sub]))
        return {key: parts}
    if isinstance(node, nodes.Not):
        return {"not": _clause(node.node, labels, product)}
    if isinstance(node, nodes.Compare) and len(node.ops) == 1 and node.ops[0].op in _OPS:
        return {
            "left": _term(node.expr, labels, product),
            "op": _OPS[node.ops[0].op],
            "right": _term(node.ops[0].expr, labels, product),
        }
    term = _term(node, labels, product)
    return {"left": term, "op": "yes"} if "field" in term else {"left": term, "op": "true"}


def step_field_labels(sop: SopDefinition) -> dict[str, dict[str, Any]]:
    """``{step: {field: {label, unit}}}`` and ``{"params": {...}}`` for reading expressions."""
    out: dict[str, dict[str, Any]] = {"params": {n: {"label": f.label, "unit": f.unit} for n, f in sop.params.items()}}
    for st in sop.steps:
        if isinstance(st, HumanStepSpec):
            out[st.id] = {n: {"label": f.label, "unit": f.unit} for n, f in st.fields.items()}
    return out


def check_clauses(sop: SopDefinition, expect: str, product: dict[str, Any] | None = None) -> dict[str, Any]:
    """A check's expression as clauses over field labels and product limits (``{"code": …}`` where
    a part is beyond words, so nothing is hidden)."""
    try:
        template = _ENV.parse("{{ " + expect + " }}")
        output = template.body[0]
        expr = output.nodes[0]  # type: ignore[attr-defined]
    except Exception:  # compiled at load time already; a page never fails on its words
        return {"left": {"code": expect}, "op": "true"}
    return _clause(expr, step_field_labels(sop), product or {})


def reads_of(sop: SopDefinition, expression: str, this_step: HumanStepSpec | None = None) -> list[str]:
    """The labels of the fields (and params) a computed expression reads, in the order it names them."""
    labels = step_field_labels(sop)
    if this_step is not None:
        labels["s"] = labels.get(this_step.id, {})
    out: list[str] = []
    try:
        tree = _ENV.parse("{{ " + expression + " }}")
    except Exception:
        return out
    for node in tree.find_all(nodes.Getattr):
        if isinstance(node.node, nodes.Name):
            spec = labels.get(node.node.name, {}).get(node.attr)
            label = (spec or {}).get("label") or (node.attr if spec is not None else None)
            if label and label not in out:
                out.append(label)
    return out


def document_name(template: str, path: str, title: str | None, institution_language: str) -> dict[str, str]:
    """``{"title", "language", "format"}``: the document step's title (the template's name without its
    suffixes when it has none), its language (``en`` / ``zh``) and ``PDF`` or ``HTML``."""
    m = re.search(r"\.(en|zh)\.html\.j2$", template)
    stem = re.sub(r"(\.(en|zh))?\.html\.j2$", "", Path(template).name).replace("_", " ")
    return {
        "title": title or stem,
        "language": m.group(1) if m else institution_language,
        "format": "PDF" if path.lower().endswith(".pdf") else "HTML",
    }


def next_steps(
    sop: SopDefinition, step_id: str, roles: dict[str, str], language: str | None = None
) -> list[dict[str, Any]]:
    """What follows ``step_id`` in the SOP: its automated steps, up to and including the next step a
    person signs (with the role's label). Conditional steps are marked; repetitions point at their step."""
    base = step_id.partition("#")[0].removesuffix("__disposition")
    ids = [st.id for st in sop.steps]
    if base not in ids:
        return []
    out: list[dict[str, Any]] = []
    for st in sop.steps[ids.index(base) + 1 :]:
        entry: dict[str, Any] = {"id": st.id, "kind": st.kind, "title": text_in(st.title, language) or st.id}
        entry["when"] = st.when
        if isinstance(st, HumanStepSpec):
            entry["role"] = st.role
            entry["role_label"] = roles.get(st.role, st.role)
            out.append(entry)
            break
        if isinstance(st, CheckStepSpec):
            entry["clauses"] = check_clauses(sop, st.expect)
        if isinstance(st, SubrunStepSpec):
            entry["sop"] = st.sop
        out.append(entry)
    return out

"""Stage 1 of the data path: what changed between two SOP definitions, as an administrator reads it.

Works on the definitions (``SopDefinition``), not on the text: reformatting, comments and key
order are no change; a step moved is one change, not a removed and an added block. Steps are
matched by id: added, removed, moved (not in the longest run of steps kept in the same order),
and for steps in both, every attribute that differs (role, fields and their limits, check
expressions, deviations, time-outs, templates, recipients …) as ``old → new``. Params and
other top-level keys (``distinct_signers``, ``deadlines`` …) alike. The version number and
``schema_version`` are not changes: they say which two versions these are.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flows.sop.model import SopDefinition, format_duration

__all__ = ["Change", "diff_sops"]

_HEADER = frozenset({"id", "version", "schema_version", "steps", "params"})


@dataclass(frozen=True)
class Change:
    """One difference. ``kind``: added, removed, moved or changed; ``where``: e.g. ``step 'arrival', field 'x', max``."""

    kind: str
    where: str
    old: Any = None
    new: Any = None

    def __str__(self) -> str:
        if self.kind == "changed":
            return f"{self.where}: {_show(self.old)} → {_show(self.new)}"
        if self.kind == "moved":
            return f"{self.where} moved: position {self.old} → {self.new}"
        detail = self.new if self.kind == "added" else self.old
        return f"{self.where} {self.kind}" + (f" ({detail})" if detail else "")


def _plain(value: Any) -> Any:
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items() if v not in (None, (), [], {})) + "}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


_CHILD = {"fields": "field", "params": "param"}


def _summary(value: Any) -> str:
    if isinstance(value, dict):
        if "kind" in value:
            return str(value["kind"]) + (f", role {value['role']}" if value.get("role") else "")
        if "type" in value:
            return str(value["type"])
    return _show(value)


def _compare(where: str, old: Any, new: Any, out: list[Change]) -> None:
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            label = f"{where}, {key}" if where else str(key)
            if key in _CHILD and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                _named(f"{where}, " if where else "", _CHILD[str(key)], old[key], new[key], out)
            elif key not in new:
                out.append(Change("removed", label, old=_summary(old[key])))
            elif key not in old:
                out.append(Change("added", label, new=_summary(new[key])))
            else:
                _compare(label, old[key], new[key], out)
        return
    out.append(Change("changed", where, old, new))


def _named(prefix: str, noun: str, old: dict[str, Any], new: dict[str, Any], out: list[Change]) -> None:
    for name in list(old) + [k for k in new if k not in old]:
        label = f"{prefix}{noun} {name!r}"
        if name not in new:
            out.append(Change("removed", label, old=_summary(old[name])))
        elif name not in old:
            out.append(Change("added", label, new=_summary(new[name])))
        else:
            _compare(label, old[name], new[name], out)


def _kept_in_order(old: list[str], new: list[str]) -> set[str]:
    """The longest sequence of common step ids in the same order in both (the rest moved)."""
    common_old = [s for s in old if s in new]
    common_new = [s for s in new if s in old]
    n, m = len(common_old), len(common_new)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            table[i][j] = (
                table[i + 1][j + 1] + 1 if common_old[i] == common_new[j] else max(table[i + 1][j], table[i][j + 1])
            )
    kept, i, j = set(), 0, 0
    while i < n and j < m:
        if common_old[i] == common_new[j]:
            kept.add(common_old[i])
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return kept


def diff_sops(old: SopDefinition, new: SopDefinition) -> list[Change]:
    """Every difference between two definitions of an SOP, in reading order: top-level keys,
    params, then steps (removed, added, moved, changed)."""
    a = _plain(old.model_dump(mode="python"))
    b = _plain(new.model_dump(mode="python"))
    out: list[Change] = []
    _compare(
        "", {k: v for k, v in a.items() if k not in _HEADER}, {k: v for k, v in b.items() if k not in _HEADER}, out
    )
    _named("", "param", a["params"], b["params"], out)
    old_steps = {s["id"]: s for s in a["steps"]}
    new_steps = {s["id"]: s for s in b["steps"]}
    old_ids, new_ids = list(old_steps), list(new_steps)
    for sid in old_ids:
        if sid not in new_steps:
            out.append(Change("removed", f"step {sid!r}", old=_summary(old_steps[sid])))
    for pos, sid in enumerate(new_ids, start=1):
        if sid not in old_steps:
            out.append(Change("added", f"step {sid!r}", new=f"{_summary(new_steps[sid])}, at position {pos}"))
    kept = _kept_in_order(old_ids, new_ids)
    for sid in new_ids:
        if sid in old_steps and sid not in kept:
            out.append(Change("moved", f"step {sid!r}", old=old_ids.index(sid) + 1, new=new_ids.index(sid) + 1))
    for sid in new_ids:
        if sid in old_steps:
            _compare(f"step {sid!r}", old_steps[sid], new_steps[sid], out)
    return out

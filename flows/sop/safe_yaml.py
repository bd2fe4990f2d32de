"""Stage 1 of the data path: YAML text -> a node tree and plain data, within bounds.

Every SOP, institution and products file, and every draft typed in the web editor, is read here
(through :func:`flows.sop.source.parse_yaml`) before anything else looks at it. A broken or
hostile text must end in problems with a line, quickly, never in another exception or a long wait:

    size            at most MAX_BYTES of UTF-8 text
    characters      no NUL, no bidirectional override/embedding/isolate (U+202A-U+202E, U+2066-U+2069);
                    YAML itself refuses the other control characters
    tags            none: no ``!!int``, ``!!python/...``, ``!local``; SOP files are plain YAML
    aliases         at most MAX_ALIASES, no alias inside the node it names, and the tree they expand
                    to at most MAX_NODES nodes and MAX_DEPTH levels
    nesting         at most MAX_DEPTH levels, as written and as expanded
    numbers         at most MAX_NUMBER_CHARS characters; no infinite or not-a-number floats
    values          a scalar YAML cannot turn into a value (``2026-02-30``) is a problem at its line

The limits are far above what an SOP needs (the library's largest file is under 6 KB, nests 8
levels and uses no alias) and low enough that the slowest text within them loads in well
under a second (``tests/test_sop_fuzz.py``).

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.error import MarkedYAMLError
from yaml.resolver import Resolver

__all__ = [
    "FAST",
    "MAX_ALIASES",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_NUMBER_CHARS",
    "BoundedLoader",
    "YamlRefused",
    "check_expansion",
    "precheck",
]

MAX_BYTES = 128 * 1024
"""Largest SOP text, in UTF-8 bytes."""
MAX_NODES = 10_000
"""Most nodes (mappings, lists, scalars) in a document, counting each use of an alias in full."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists, as written and with aliases expanded."""
MAX_ALIASES = 50
"""Most aliases (``*name``) in a document."""
MAX_NUMBER_CHARS = 32
"""Longest integer or float literal."""

_STANDARD = "tag:yaml.org,2002:"
_INT = _STANDARD + "int"
_FLOAT = _STANDARD + "float"
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class YamlRefused(MarkedYAMLError):
    """The text breaks one of the bounds above; ``problem_mark`` says where."""

    def __init__(self, mark: Any, problem: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)


def _line(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def precheck(text: str) -> tuple[int | None, str] | None:
    """``(line, problem)`` when the text is too large or holds a NUL or a bidi control; else None."""
    size = len(text.encode("utf-8", "surrogatepass"))  # a lone surrogate is refused below
    if size > MAX_BYTES:
        return None, f"the text is {size} bytes long; an SOP file may be at most {MAX_BYTES} bytes"
    nul = text.find("\x00")
    if nul >= 0:
        return _line(text, nul), "the text contains a NUL character (U+0000); SOP files are plain text"
    surrogate = _SURROGATE.search(text)
    if surrogate is not None:
        return _line(
            text, surrogate.start()
        ), f"the text contains a lone surrogate U+{ord(surrogate.group()):04X}, which is not a character"
    bidi = _BIDI.search(text)
    if bidi is not None:
        return _line(text, bidi.start()), (
            f"the text contains the bidirectional control character U+{ord(bidi.group()):04X}, which makes "
            "text display in another order than it is read; remove it"
        )
    return None


_Base: Any = yaml.SafeLoader  # PyYAML without libyaml: all in Python (about 8 times slower)
if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _Fast(Composer, CParser, SafeConstructor, Resolver):
        """libyaml's scanner and parser, PyYAML's composer (bounded below) and safe constructor:
        the same nodes, values and marks as ``yaml.SafeLoader``."""

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _Base = _Fast

FAST = bool(yaml.__with_libyaml__)
"""Whether libyaml reads the text (``ReaderError`` positions are then byte offsets)."""


class BoundedLoader(_Base):  # type: ignore[misc]
    """PyYAML's safe loader, refusing tags and counting nodes, aliases and depth as it composes."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._nodes = 0
        self._aliases = 0

    def fetch_flow_sequence_start(self) -> None:
        self._flow_bound()
        super().fetch_flow_sequence_start()

    def fetch_flow_mapping_start(self) -> None:
        self._flow_bound()
        super().fetch_flow_mapping_start()

    def _flow_bound(self) -> None:
        # Checked while scanning, before composing: the scanner's work per '[' or '{' grows with
        # the flow level, so a line of 100,000 '[' would take minutes before any node exists.
        if self.flow_level >= MAX_DEPTH:
            raise YamlRefused(self.get_mark(), f"nested more than {MAX_DEPTH} levels deep")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlRefused(event.start_mark, f"more than {MAX_ALIASES} aliases ('*name') in one file")
            return super().compose_node(parent, index)
        tag = getattr(event, "tag", None)
        if tag is not None:
            shown = "!!" + tag.removeprefix(_STANDARD) if tag.startswith(_STANDARD) else tag
            raise YamlRefused(
                event.start_mark,
                f"explicit tag {shown!r} is not allowed: SOP files are plain YAML (mappings, lists, text, "
                "numbers, true/false); remove the tag, and quote the value if it must stay text",
            )
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise YamlRefused(event.start_mark, f"more than {MAX_NODES} values in one file")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YamlRefused(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.ScalarNode) and node.tag in (_INT, _FLOAT) and len(node.value) > MAX_NUMBER_CHARS:
            raise YamlRefused(
                node.start_mark,
                f"a number may have at most {MAX_NUMBER_CHARS} characters, this one has {len(node.value)}",
            )
        return node

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:  # e.g. the date 2026-02-30
            shown = repr(node.value) if isinstance(node, yaml.ScalarNode) else "this value"
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ConstructorError(None, None, f"cannot read {shown}: {exc}", node.start_mark) from exc

    def construct_yaml_float(self, node: Any) -> float:
        value = float(super().construct_yaml_float(node))
        if not math.isfinite(value):
            raise ConstructorError(
                None, None, f"the number {node.value!r} is not finite; use a number like 1.5e3", node.start_mark
            )
        return value


BoundedLoader.add_constructor(_FLOAT, BoundedLoader.construct_yaml_float)


def check_expansion(root: yaml.Node) -> None:
    """Refuse a tree whose aliases make it cyclic, or expand it beyond MAX_NODES or MAX_DEPTH.

    Iterative (an expanded tree may be deeper than Python's stack) and linear in the number of
    distinct nodes: each node's expanded size and height are computed once.

    Raises:
        YamlRefused: at the first node found too large, too deep or inside itself.
    """
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            height[key] = 1 + max((height[id(c)] for c in children), default=0)
            if size[key] > MAX_NODES:
                raise YamlRefused(node.start_mark, f"aliases expand this file to more than {MAX_NODES} values")
            if height[key] > MAX_DEPTH:
                raise YamlRefused(node.start_mark, f"aliases nest this file more than {MAX_DEPTH} levels deep")
            continue
        if key in size:
            continue
        if key in on_path:
            raise YamlRefused(node.start_mark, "an alias refers to the node that contains it")
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise YamlRefused(child.start_mark, "an alias refers to the node that contains it")
            if id(child) not in size:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []

"""Edge: small charts as inline SVG, drawn on the server (no script, no build): ``bars`` turns
(label, value) pairs into the geometry a template writes out as ``<rect>`` and ``<text>``. Pages
show the same figures as a table beside the picture, for screen readers and for exact numbers.
"""

from __future__ import annotations

from typing import Any

from flows.web.i18n import N_

__all__ = ["STAGE_WORDS", "bars"]

STAGE_WORDS = [N_("collection"), N_("receipt"), N_("storage"), N_("infusion"), N_("other")]
"""Chain stages as the dashboard labels them (``{{ label|t }}``)."""


def bars(items: list[tuple[str, float]], *, width: int = 340, height: int = 150, pad: int = 22) -> dict[str, Any]:
    """Vertical bars for ``items`` in a ``width`` by ``height`` box; the tallest bar fills the plot."""
    top = max((float(v) for _, v in items), default=0.0) or 1.0
    n = max(len(items), 1)
    slot = (width - 2 * 4) / n
    plot = height - 2 * pad
    out = []
    for i, (label, value) in enumerate(items):
        h = plot * float(value) / top
        out.append(
            {
                "label": label,
                "value": value,
                "x": round(4 + i * slot + slot * 0.15, 1),
                "w": round(slot * 0.7, 1),
                "y": round(pad + plot - h, 1),
                "h": round(h, 1),
                "cx": round(4 + i * slot + slot / 2, 1),
            }
        )
    return {
        "bars": out,
        "width": width,
        "height": height,
        "base": height - pad,
        "label_y": height - 6,
        "empty": not items,
    }

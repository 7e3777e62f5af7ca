"""``budget_report`` rows as an aligned text table (``vllm-elastic inspect``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm_elastic.spec.axes import AXES


def human_count(n: float) -> str:
    """``1234567`` -> ``"1.23M"``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: int) -> str:
    """``1048576`` -> ``"1.0 MiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    """One line per budget: its size on every axis of the family, kept layers, parameters
    (and active parameters where they differ), bytes, fraction; ``*`` marks the default."""
    axes = [a for a in AXES.values() if a.field in rows[0]]
    moe = any(r["active_parameters"] != r["parameters"] for r in rows)
    header = ["budget", *[a.alias for a in axes], "layers", "params"]
    header += ["active", "frac", "active frac"] if moe else ["frac"]
    header.insert(-2 if moe else -1, "size")
    table = [header]
    most = max(r["num_layers"] for r in rows)
    for row in rows:
        line = [row["name"] + (" *" if row["default"] else "")]
        line += ["-" if row[a.field] is None else str(row[a.field]) for a in axes]
        every = row["layers"] == list(range(most))
        kept = "all" if every else ",".join(str(i) for i in row["layers"])
        line.append(f"{row['num_layers']} [{kept}]")
        line.append(human_count(row["parameters"]))
        if moe:
            line.append(human_count(row["active_parameters"]))
        line.append(human_bytes(row["bytes"]))
        line.append(f"{row['fraction']:.3f}")
        if moe:
            line.append(f"{row['active_fraction']:.3f}")
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    left = {0, len(axes) + 1}
    lines = []
    for line in table:
        cells = [
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)

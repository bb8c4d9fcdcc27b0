"""Text renderings derived from a lifecycle table."""

from __future__ import annotations

from esper.statemachines.table import LifecycleTable


def to_mermaid(table: LifecycleTable) -> str:
    """A mermaid ``stateDiagram-v2`` of the table."""
    lines = ["stateDiagram-v2", f"    [*] --> {table.initial}"]
    for e in table.edges:
        label = e.trigger + (f" [{e.gate}]" if e.gate else "")
        for s in e.sources:
            lines.append(f"    {s} --> {e.dest}: {label}")
    for t in sorted(table.terminal, key=table.value_of):
        lines.append(f"    {t} --> [*]")
    return "\n".join(lines) + "\n"

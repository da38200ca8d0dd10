"""What every stage report shares: numbers written as text, and matplotlib figures as PNG bytes for the
run directory. The reports themselves live beside their stages (guard evaluation, comparison, the loop,
SHARD)."""

from __future__ import annotations

import io


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, ``n/a`` for a figure that could not be computed."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def png_bytes(fig, **savefig: object) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards); ``savefig`` options pass through."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig)
    plt.close(fig)
    return buffer.getvalue()

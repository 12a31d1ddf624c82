"""The link model: which split wins on which link.

End-to-end time of one image = device encode + bytes × 8 ÷ link rate + server time, with the link
rate in kbit/s (= bits per millisecond), so::

    t_e2e [ms] = t_encode [ms] + 8 · bytes / rate [kbit/s] + t_server [ms]

Links (``DEFAULT_LINKS``, overridable in the sweep): LoRa 37.5 kbit/s (Entropic Student's
setting), an LTE-M-class link at 1 Mbit/s (LTE Cat-M1's peak rate is about 1 Mbit/s) and Wi-Fi at
50 Mbit/s. Radio wake-up, protocol overhead, duty-cycle limits and queueing are left out: the model
compares what the payload size and the compute cost, nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .sweep import DEFAULT_LINKS

__all__ = ["DEFAULT_LINKS", "end_to_end_ms", "link_tables", "transfer_ms", "winners"]


def transfer_ms(num_bytes: float, kbit_s: float) -> float:
    return 8.0 * num_bytes / kbit_s


def end_to_end_ms(encode_ms: float, num_bytes: float, server_ms: float, kbit_s: float) -> float:
    return encode_ms + transfer_ms(num_bytes, kbit_s) + server_ms


def winners(points: Sequence[Mapping[str, Any]], links: Mapping[str, float], min_accuracy: float | None
            ) -> dict[str, dict[str, Any]]:
    """Per link: for each method its fastest point whose accuracy is at least ``min_accuracy``
    (None: any), and the overall winner. Points carry method, setting, accuracy, bytes_per_image,
    encode_ms, server_ms."""
    out: dict[str, dict[str, Any]] = {}
    for link, kbit in links.items():
        best: dict[str, dict[str, Any]] = {}
        for p in points:
            if min_accuracy is not None and p["accuracy"] < min_accuracy:
                continue
            t = end_to_end_ms(p["encode_ms"], p["bytes_per_image"], p["server_ms"], kbit)
            if p["method"] not in best or t < best[p["method"]]["ms"]:
                best[p["method"]] = {"setting": p["setting"], "ms": t, "accuracy": p["accuracy"],
                                     "bytes_per_image": p["bytes_per_image"]}
        winner = min(best, key=lambda m: best[m]["ms"]) if best else None
        out[link] = {"kbit_s": kbit, "per_method": best, "winner": winner}
    return out


def link_tables(points: Sequence[Mapping[str, Any]], links: Mapping[str, float], reference: float | None,
                tolerances: Sequence[float]) -> list[dict[str, Any]]:
    """One :func:`winners` table per tolerance: a point counts as "as good as the uncompressed
    input" when its accuracy is at least ``reference − tolerance`` (no reference: any accuracy).
    Several tolerances show how the verdict moves as one gives up more accuracy for fewer bytes."""
    tables = []
    for tol in tolerances:
        floor = reference - tol if reference is not None else None
        tables.append({"tolerance": tol, "min_accuracy": floor, "per_link": winners(points, links, floor)})
    return tables

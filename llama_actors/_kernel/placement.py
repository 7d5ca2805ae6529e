"""Placement: which host a new instance goes to (CONTRACT §12). Pure, like admission:
the supervisor gives it the hosts (their labels, GPUs and admission verdicts for the
need), it answers.

The rules: only hosts that are up and match the spec's ``host_labels`` (every label,
exactly) and ``host_gpus`` (at least that many GPUs) are candidates. Among those where
the instance fits now, ``spread`` takes the one with the most free RAM (then the fewest
instances), ``pack`` the one with the least free RAM that still fits (then the most
instances); ties go to the host listed first. When it fits nowhere, the candidate that
needs the fewest evictions evicts; else it waits for room; else (larger than every
candidate's capacity, or no candidate at all) it never fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from llama_actors._kernel.admission import Verdict

__all__ = ["HostView", "Placed", "PlacementPolicy", "matches", "place"]

PlacementPolicy = Literal["spread", "pack"]


@dataclass(frozen=True)
class HostView:
    """One host as placement sees it: its name, labels, GPU count, how many instances
    it runs, and admission's verdict for the need on it."""

    host_id: str
    labels: Mapping[str, str]
    gpus: int
    instances: int
    verdict: Verdict
    up: bool = True


@dataclass(frozen=True)
class Placed:
    """Where the instance goes: ``kind`` is admission's (``fits``: start it on
    ``host_id``; ``evict``: on ``host_id`` once ``verdict.evict`` are gone; ``wait``;
    ``never``), ``why`` says why for an error message when it is not ``fits``."""

    kind: Literal["fits", "evict", "wait", "never"]
    host_id: str | None
    verdict: Verdict | None
    why: str = ""


def matches(labels: Mapping[str, str], gpus: int, want: Mapping[str, str], want_gpus: int) -> bool:
    """Whether a host with ``labels`` and ``gpus`` GPUs satisfies a spec that wants
    ``want`` (every label, exactly) and ``want_gpus`` GPUs."""
    return gpus >= want_gpus and all(labels.get(k) == v for k, v in want.items())


def place(
    hosts: Sequence[HostView],
    *,
    labels: Mapping[str, str],
    gpus: int,
    policy: PlacementPolicy,
) -> Placed:
    """The host for a new instance; see the module docstring."""
    up = [h for h in hosts if h.up]
    candidates = [h for h in up if matches(h.labels, h.gpus, labels, gpus)]
    if not candidates:
        return Placed("never", None, None, _no_candidate(up, labels, gpus))
    fitting = [h for h in candidates if h.verdict.kind == "fits"]
    if fitting:
        order = {h.host_id: i for i, h in enumerate(candidates)}
        if policy == "spread":
            best = min(fitting, key=lambda h: (-_free_ram(h), h.instances, order[h.host_id]))
        else:
            best = min(fitting, key=lambda h: (_free_ram(h), -h.instances, order[h.host_id]))
        return Placed("fits", best.host_id, best.verdict)
    evicting = [h for h in candidates if h.verdict.kind == "evict"]
    if evicting:
        best = min(evicting, key=lambda h: len(h.verdict.evict))
        return Placed("evict", best.host_id, best.verdict)
    waiting = [h for h in candidates if h.verdict.kind == "wait"]
    if waiting:
        return Placed("wait", waiting[0].host_id, waiting[0].verdict)
    return Placed("never", candidates[0].host_id, candidates[0].verdict)


def _free_ram(host: HostView) -> float:
    free = host.verdict.free.get("ram")
    return float("inf") if free is None else free


def _no_candidate(up: Sequence[HostView], labels: Mapping[str, str], gpus: int) -> str:
    want = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "no labels"
    if not up:
        return "no host is up"
    seen = "; ".join(
        f"{h.host_id} ({', '.join(f'{k}={v}' for k, v in sorted(h.labels.items())) or 'no labels'}"
        f", {h.gpus} GPU{'s' if h.gpus != 1 else ''})"
        for h in up
    )
    gpu_text = f" and at least {gpus} GPU{'s' if gpus != 1 else ''}" if gpus else ""
    return f"no host that is up has {want}{gpu_text}; the hosts that are up: {seen}"

"""What makes two stored analyses comparable, query for query: the protocol, and the blocks of a ranking.

Two analyses of one dataset, modality and condition score the same queries against the same
gallery when their protocol (:func:`protocol`) matches; ``k`` changes only purity@k and the kNN
vote. Sampled analyses (``--sample-queries``) are their own blocks and are never ranked among
full ones. The report's leaderboard and paired comparisons and ``vlmindex findings`` use this one rule.
"""

from __future__ import annotations

from typing import Any


def protocol(s: dict[str, Any]) -> tuple[Any, ...]:
    """What must match for two analyses' per-query AP to be comparable (k does not change AP)."""
    sample = ((int(s["sampled_queries"]), (s.get("provenance") or {}).get("seed", 0))
              if s.get("sampled_queries") is not None else None)  # same N and seed: the same queries
    return (bool(s.get("exclude_group")), s.get("query_split"), s.get("gallery_split"),
            (s.get("provenance") or {}).get("modality"),
            (s.get("duplicates_model") or True) if s.get("exclude_duplicates") else False, sample)


def protocol_text(s: dict[str, Any]) -> str:
    excl, qs, gs, mod, dups, sample = protocol(s)
    parts = ["group excluded" if excl else "group not excluded"]
    if dups:
        parts.append("duplicates excluded" + (f" (near pairs of {dups})" if isinstance(dups, str) else ""))
    if qs:
        parts.append(f"queries: {qs}")
    if gs:
        parts.append(f"gallery: {gs}")
    if mod:
        parts.append(f"modality: {mod}")
    if sample:
        parts.append(f"{sample[0]} sampled queries (seed {sample[1]})")
    return ", ".join(parts)


def blocks(summaries: list[dict[str, Any]]) -> dict[tuple[str, str | None, str], list[dict[str, Any]]]:
    """Summary rows by (dataset, modality, condition), in the order they come; modality None is
    the all-modality analyses. Sampled analyses (``--sample-queries``) form blocks of their own,
    named ``clean (sampled N of M queries)``: they are never ranked among full analyses."""
    out: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
    for s in summaries:
        cond = s["condition"]
        if s.get("sampled_queries") is not None:
            seed = (s.get("provenance") or {}).get("seed", 0)
            cond = f"{cond} (sampled {s['sampled_queries']} of {s.get('query_pool')} queries, seed {seed})"
        out.setdefault((s["dataset"], s.get("modality"), cond), []).append(s)
    return out


def block_name(dataset: str, modality: str | None, condition: str) -> str:
    """``demo / clean``, or ``demo · xray / clean`` for one modality's block."""
    return f"{dataset}{' · ' + modality if modality is not None else ''} / {condition}"

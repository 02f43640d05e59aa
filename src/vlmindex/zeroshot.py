"""Zero-shot classification with a model's own text tower, clean against overlaid images.

For each modality, every class c of that modality gets prompts from the shipped templates
(``vlmindex/prompts/templates.json``; ``{label}`` is the class name with ``-``/``_`` as spaces).
The class vector is the mean of the L2-normalised prompt embeddings,
:math:`w_c = \\sum_t \\hat{u}_{c,t} / \\lVert \\sum_t \\hat{u}_{c,t} \\rVert`, and an image with stored
feature x is assigned :math:`\\arg\\max_c \\hat{x} \\cdot w_c` over its modality's classes only (a chest
X-ray is never called "melanoma"). Image features are the stored embeddings of the run (the
model's image features), so nothing is embedded again.

Per (condition, modality) and pooled (``modality = 'all'``): accuracy, balanced accuracy (mean
recall over the classes present), and for overlays that write a class name (``label``,
``wrong-label``) the share of images predicted as the written class, the same share for their clean
versions, and the flip rate (clean prediction not the written class, overlaid prediction the
written class): the typographic effect on the model's text side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vlmindex.analyze import RunData, load
from vlmindex.catalog import CLEAN, RunKey, Workspace, fingerprints, results
from vlmindex.catalog.datasets import class_pools, require_dataset
from vlmindex.catalog.embeddings import newest_weights
from vlmindex.errors import VlmindexError
from vlmindex.models import LoadOptions
from vlmindex.overlay import get_condition, overlay_text_for

ALL = "all"


@dataclass(frozen=True)
class ZeroShotOptions:
    checkpoint: str | None = None       # the same --checkpoint the images were embedded with
    trust_remote_code: bool = False
    device: str | None = None           # None: cuda when present, else cpu
    templates: str | Path | None = None  # a JSON file replacing the shipped templates
    batch_size: int = 256               # prompts per text-tower call
    allow_partial: bool = False         # classify the images that have embeddings even when some have none


# --------------------------------------------------------------------------------------------------
# Prompts


def load_templates(path: str | Path | None = None) -> dict[str, Any]:
    """The prompt templates: ``{"templates": {modality: [str]}, "aliases": {name: modality}}``.

    Shipped with the package unless ``path`` names a JSON file of the same shape (or a plain
    ``{modality: [templates]}`` object). Every template must contain ``{label}``; a ``default``
    entry is required, as the fallback for unlisted modalities.
    """
    if path is None:
        text = resources.files("vlmindex").joinpath("prompts", "templates.json").read_text(encoding="utf-8")
        where = "shipped templates.json"
    else:
        p = Path(path)
        if not p.is_file():
            raise VlmindexError(f"--templates {p} does not exist; give a JSON file of prompt templates")
        text, where = p.read_text(encoding="utf-8"), str(p)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise VlmindexError(f"{where} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "templates" not in data:
        data = {"templates": data}
    templates = data.get("templates") if isinstance(data, dict) else None
    if not isinstance(templates, dict) or "default" not in templates:
        raise VlmindexError(
            f"{where}: need an object of modality -> list of templates, with a 'default' entry")
    for modality, items in templates.items():
        if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
            raise VlmindexError(f"{where}: templates of {modality!r} must be a non-empty list of strings")
        bad = [t for t in items if "{label}" not in t]
        if bad:
            raise VlmindexError(f"{where}: template {bad[0]!r} of {modality!r} has no {{label}} placeholder")
    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict):
        raise VlmindexError(f"{where}: 'aliases' must map a modality name to a templates key")
    return {"templates": templates, "aliases": {str(k).lower(): str(v) for k, v in aliases.items()}}


def label_text(name: str) -> str:
    """How a class name is written into a prompt: ``'benign-nodule'`` → ``'benign nodule'``."""
    return " ".join(str(name).replace("-", " ").replace("_", " ").split())


def templates_for(modality: str | None, templates: dict[str, Any]) -> list[str]:
    """Templates of a modality: its own entry, its alias's, else ``default`` (case-insensitive)."""
    table = templates["templates"]
    key = (modality or "").strip().lower()
    by_lower = {k.lower(): k for k in table}
    if key in by_lower:
        return list(table[by_lower[key]])
    alias = templates["aliases"].get(key)
    if alias is not None and alias.lower() in by_lower:
        return list(table[by_lower[alias.lower()]])
    return list(table["default"])


def class_prompts(classes: Sequence[str], modality: str | None, templates: dict[str, Any]) -> list[list[str]]:
    """One list of prompts per class, in the order of ``classes``."""
    temps = templates_for(modality, templates)
    return [[t.replace("{label}", label_text(c)) for t in temps] for c in classes]


# --------------------------------------------------------------------------------------------------
# Classifier (pure NumPy)


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise VlmindexError(f"a {what} embedding is all zeros or not finite")
    return x / norms


def text_classifier(encode: Callable[[list[str]], np.ndarray],
                    prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """``[C, d]`` unit class vectors: mean of each class's normalised prompt embeddings, renormalised."""
    flat = [p for ps in prompts for p in ps]
    feats = _unit_rows(encode(flat), "prompt")
    out, start = [], 0
    for ps in prompts:
        out.append(feats[start : start + len(ps)].mean(axis=0))
        start += len(ps)
    return _unit_rows(np.stack(out), "class (mean prompt)")


def predict(image_vectors: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """Index of the class with the largest cosine for each image (ties: the first class)."""
    return np.argmax(_unit_rows(image_vectors, "image") @ classifier.T, axis=1)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in ``y_true`` of the recall (as scikit-learn's)."""
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    classes = sorted(set(y_true.tolist()))
    if not classes:
        return float("nan")
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


# --------------------------------------------------------------------------------------------------
# Workspace level


def _require_text_tower(model: str) -> None:
    from vlmindex.models import get_spec

    try:
        spec = get_spec(model)
    except VlmindexError:
        raise VlmindexError(
            f"model '{model}' is not one vlmindex can load (imported embeddings?), so it has no text tower "
            "for zero-shot classification; use a CLIP- or SigLIP-style model"
        ) from None
    if not spec.has_text:
        raise VlmindexError(
            f"model '{model}' has no text tower, so it cannot classify zero-shot; use a CLIP- or "
            "SigLIP-style model (`vlmindex models` shows which have one)"
        )


def _encoder(extractor: Any, batch_size: int) -> Callable[[list[str]], np.ndarray]:
    def encode(texts: list[str]) -> np.ndarray:
        parts = [np.asarray(extractor.encode_text(texts[i : i + batch_size]), dtype=np.float64)
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts)

    return encode


STAGE = "zeroshot"


def _prompt_plan(modalities: list[str | None], pools: dict[str | None, list[str]], templates: dict[str, Any]
                 ) -> tuple[dict[str | None, tuple[list[str], list[list[str]]]], str]:
    """Per modality: its classes and their prompts; and the sha256 of every prompt used."""
    plan: dict[str | None, tuple[list[str], list[list[str]]]] = {}
    used: dict[str, dict[str, list[str]]] = {}
    for m in modalities:
        classes = list(pools.get(m, []))
        if not classes:
            continue
        prompts = class_prompts(classes, m, templates)
        plan[m] = (classes, prompts)
        used[str(m)] = dict(zip(classes, prompts, strict=True))
    return plan, hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()


def _stage_options(prompts_sha256: str, weights: str | None) -> dict[str, Any]:
    return {"prompts_sha256": prompts_sha256, "weights_sha256": weights}


def is_current(ws: Workspace, model: str, dataset: str, conditions: Sequence[str] = (CLEAN,),
               options: ZeroShotOptions | None = None) -> bool:
    """Whether stored zero-shot rows of every condition were computed from the runs, prompts and
    weights as they are now."""
    opts = options or ZeroShotOptions()
    conds = [CLEAN] + [c for c in dict.fromkeys(conditions) if c != CLEAN]
    keys = [RunKey(model, dataset, c) for c in conds]
    with ws.read(views=False) as con:
        pools = class_pools(con, dataset)
        stored = set()
        for c in conds:
            stored |= results.stored_fingerprints(con, "zeroshot_results",
                                                  {"model": model, "dataset": dataset, "condition": c})
    if len(stored) != 1:
        return False
    _, digest = _prompt_plan(sorted(pools, key=lambda m: (m is None, m)), pools, load_templates(opts.templates))
    options_now = _stage_options(digest, newest_weights(ws, keys[0]))
    return fingerprints.is_current(ws, next(iter(stored)), STAGE, keys, options_now)


def zeroshot(
    ws: Workspace,
    model: str,
    dataset: str,
    conditions: Sequence[str] = (CLEAN,),
    options: ZeroShotOptions | None = None,
    *,
    extractor: Any = None,
    save: bool = True,
) -> list[dict[str, Any]]:
    """Zero-shot accuracy of ``model`` on ``dataset`` under each condition; rows in ``zeroshot_results``.

    ``clean`` is always evaluated (first), since overlaid conditions are read against it. The text
    tower is loaded with ``options`` (``checkpoint`` as given to ``embed``) unless ``extractor``
    (anything with ``encode_text(list[str])``) is passed. Returns one row per condition and modality
    plus a pooled ``'all'`` row per condition.
    """
    opts = options or ZeroShotOptions()
    if extractor is None:
        _require_text_tower(model)  # before anything is read: the one error that matters here
    conds = [CLEAN] + [c for c in dict.fromkeys(conditions) if c != CLEAN]
    keys = [RunKey(model, dataset, c) for c in conds]
    templates = load_templates(opts.templates)
    with ws.read(views=False) as con:
        require_dataset(con, dataset)
        recipes = {c: get_condition(con, dataset, c) for c in conds}
        pools = class_pools(con, dataset)
    runs: dict[str, RunData] = {k.condition: load(ws, k) for k in keys}
    missing = {c: r.missing for c, r in runs.items() if r.missing}
    if missing and not opts.allow_partial:
        which = ", ".join(f"{n} have no {c} embedding" for c, n in missing.items())
        raise VlmindexError(f"of the labelled images of {dataset}, {which} for {model}; embed them (`vlmindex "
                            f"embed -m {model} -d {dataset} -c {next(iter(missing))}`) or pass --allow-partial")
    embedded_with = newest_weights(ws, keys[0])
    if extractor is None:
        extractor = LoadOptions(checkpoint=opts.checkpoint, trust_remote_code=opts.trust_remote_code,
                                device=opts.device).load(model)
        loaded = extractor.weights_sha256
        for k in keys:
            stored = newest_weights(ws, k)
            if loaded and stored and loaded != stored:
                raise VlmindexError(
                    f"the weights loaded for '{model}' (sha256 {loaded[:12]}) are not those that embedded "
                    f"{dataset}/{k.condition} ({stored[:12]}); pass the --checkpoint the images were embedded with"
                )
    encode = _encoder(extractor, max(1, opts.batch_size))

    # One classifier per modality present in any run.
    modalities = sorted({m for r in runs.values() for m in r.modalities.tolist()},
                        key=lambda m: (m is None, m))
    plan, digest = _prompt_plan(modalities, pools, templates)
    classifiers = {m: (classes, text_classifier(encode, prompts)) for m, (classes, prompts) in plan.items()}
    n_prompts = {m: len(templates_for(m, templates)) for m in modalities}
    stage_options = _stage_options(_prompt_plan(sorted(pools, key=lambda m: (m is None, m)), pools, templates)[1],
                                   embedded_with)
    fp = fingerprints.combine(STAGE, {k: runs[k.condition].fingerprint for k in keys}, stage_options)

    predictions: dict[str, dict[int, str]] = {}
    rows: list[dict[str, Any]] = []
    now = datetime.now()
    for c in conds:
        run = runs[c]
        pred = np.empty(len(run.ids), dtype=object)
        for m, (classes, w) in classifiers.items():
            sel = run.modalities == m if m is not None else np.array([x is None for x in run.modalities])
            if sel.any():
                if run.vectors.shape[1] != w.shape[1]:
                    raise VlmindexError(
                        f"stored embeddings of '{model}' on {dataset}/{c} have {run.vectors.shape[1]} "
                        f"dimensions but its text tower gives {w.shape[1]}; were they made by another model?"
                    )
                pred[sel] = np.array(classes, dtype=object)[predict(run.vectors[sel], w)]
        predictions[c] = dict(zip(run.ids.tolist(), pred.tolist(), strict=True))
        recipe = recipes[c]
        written = None
        if recipe is not None and recipe.text in ("label", "wrong-label"):
            written = np.array(
                [overlay_text_for(recipe, image_id=int(i), label=lab, class_names=pools.get(m, []))
                 for i, lab, m in zip(run.ids, run.labels, run.modalities, strict=True)], dtype=object)
            clean_pred = np.array([predictions[CLEAN].get(int(i)) for i in run.ids], dtype=object)

        groups = [(ALL, np.ones(len(run.ids), dtype=bool))]
        if len(modalities) > 1:
            groups = [(m, np.array([x == m for x in run.modalities])) for m in modalities] + groups
        for name, sel in groups:
            if not sel.any():
                continue
            y, p = run.labels[sel], pred[sel]
            row: dict[str, Any] = {
                "model": model, "dataset": dataset, "condition": c, "modality": name, "n": int(sel.sum()),
                "n_classes": len(set(y.tolist())), "accuracy": float(np.mean(p == y)),
                "balanced_accuracy": balanced_accuracy(y, p), "written_share": None,
                "written_share_clean": None, "flip_rate": None,
                "n_prompts": n_prompts.get(name) if name != ALL else (
                    n_prompts[modalities[0]] if len(set(n_prompts.values())) == 1 else None),
                "prompts_sha256": digest, "created_at": now, "inputs_fingerprint": fp,
            }
            if written is not None:
                w_sel, cp = written[sel], clean_pred[sel]
                paired = np.array([x is not None for x in cp])
                row["written_share"] = float(np.mean(p == w_sel))
                if paired.any():
                    row["written_share_clean"] = float(np.mean(cp[paired] == w_sel[paired]))
                    row["flip_rate"] = float(np.mean((cp[paired] != w_sel[paired])
                                                     & (p[paired] == w_sel[paired])))
            rows.append(row)
    if save:
        with fingerprints.committing(ws, fp, STAGE, keys, stage_options,
                                     what=f"zero-shot of {model} on {dataset}") as con:
            results.store_zeroshot(con, model, dataset, conds, rows)
    return rows

"""How far a new site's images are from the ones a model was trained on.

Before a model is used at a new site, its images can be compared with the model's validation
images in the model's own feature space, with no labels needed:

- the share of the site's images beyond the input check's limit (not assessed by ``predict``);
- a two-sample test of the site's features against the validation features kept in the input
  check (:mod:`pneumo_utils.model.input_check`): the maximum mean discrepancy (MMD, Gretton
  et al. 2012) with a Gaussian kernel whose width is the median pairwise distance, and a
  permutation p-value, as drift detectors such as alibi-detect's ``MMDDrift`` compute it.

A small p-value says the site's images differ from the training collection in a way the model
sees: calibrate on a labelled sample of them (``calibrate``) before trusting its threshold. A
large one does not prove there is no shift that matters, only that none was detected.
``pneumo site-shift --model MODEL.keras --data FOLDER`` prints the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics.pairwise import euclidean_distances

DEFAULT_PERMUTATIONS = 500
MAX_SITE_IMAGES = 500
"""Most site images in the two-sample test (a seeded sample; the flagged share uses all)."""

SIGNIFICANCE = 0.01
MANY_FLAGGED = 0.10
"""Share of a site's images beyond the input check's limit above which the site is called
unlike the training images whatever the test says."""


def mmd_test(
    x: np.ndarray, y: np.ndarray, *, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0
) -> tuple[float, float]:
    """Squared MMD between samples ``x`` ``(n, d)`` and ``y`` ``(m, d)`` (biased estimate,
    Gaussian kernel, median-distance width) and its permutation p-value
    ``(1 + #{permuted >= observed}) / (1 + permutations)``."""
    pooled = np.vstack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)])
    n = len(x)
    distances = euclidean_distances(pooled, squared=True)
    upper = distances[np.triu_indices(len(pooled), k=1)]
    width = float(np.median(upper)) if upper.size else 1.0
    kernel = np.exp(-distances / max(width, 1e-12))

    def statistic(order: np.ndarray) -> float:
        a, b = order[:n], order[n:]
        return float(kernel[np.ix_(a, a)].mean() + kernel[np.ix_(b, b)].mean() - 2 * kernel[np.ix_(a, b)].mean())

    identity = np.arange(len(pooled))
    observed = statistic(identity)
    rng = np.random.default_rng(seed)
    exceed = sum(statistic(rng.permutation(identity)) >= observed for _ in range(permutations))
    return observed, (1 + exceed) / (1 + permutations)


def site_report(check, looks, *, data: str = "", permutations: int = DEFAULT_PERMUTATIONS,
                seed: int = 0) -> dict:
    """The site-shift report for a site's images, seen as ``looks``
    (:class:`~pneumo_utils.model.input_check.Looks`) by input check ``check``.

    Returns ``images``, ``flagged`` (share beyond the check's limits), the median score of
    each view (``score_median``; about 1 for training-like images), ``mmd2`` and ``p_value``
    of :func:`mmd_test` on the whitened features against the check's validation reference
    (``reference`` images), ``verdict`` (one sentence) and ``data``.
    """
    if looks.features is None or len(looks) < 2 or len(check.reference) < 2:
        raise ValueError(f"a site-shift test needs the model's features of at least 2 site images and 2 "
                         f"reference images, got {len(looks)} and {len(check.reference)}")
    scores = check.scores(looks)
    coordinates = check.coordinates(looks.features)
    if len(coordinates) > MAX_SITE_IMAGES:
        keep = np.random.default_rng(seed).choice(len(coordinates), MAX_SITE_IMAGES, replace=False)
        coordinates = coordinates[np.sort(keep)]
    mmd2, p_value = mmd_test(coordinates, check.reference, permutations=permutations, seed=seed)
    flagged = float(check.flagged(looks).mean())
    if flagged > MANY_FLAGGED:
        verdict = (f"{flagged:.0%} of the images are unlike the training images: check what was "
                   "given, and calibrate on a labelled sample before use")
    elif p_value < SIGNIFICANCE:
        verdict = ("the images differ from the training collection as the model sees them "
                   f"(p = {p_value:.3g}): calibrate on a labelled sample before use")
    else:
        verdict = (f"no shift detected against the validation images (p = {p_value:.3g}); this "
                   "does not prove there is none")
    return {
        "data": data,
        "images": int(len(looks)),
        "flagged": flagged,
        "score_median": {view: float(np.median(s)) for view, s in scores.items()},
        "mmd2": mmd2,
        "p_value": p_value,
        "permutations": permutations,
        "reference": int(len(check.reference)),
        "verdict": verdict,
    }


def describe(report: dict) -> str:
    """One paragraph for a terminal or a report."""
    return (f"{report['images']} images{' from ' + report['data'] if report.get('data') else ''}: "
            f"{report['flagged']:.1%} beyond the input check's limits (median scores "
            + ", ".join(f"{view} {v:.2f}" for view, v in report["score_median"].items())
            + "; training-like images score about 1); "
            + f"MMD against {report['reference']} validation images {report['mmd2']:.4f}, "
            f"permutation p = {report['p_value']:.3g} ({report['permutations']} permutations). "
            f"Verdict: {report['verdict']}.")


def screen(
    model,
    check,
    sets: Mapping[str, Sequence[str] | None],
    *,
    site: str | None = None,
    data: str = "",
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """The input check's figures for a notebook's report and the index page.

    ``sets`` maps a name (``"test"``, ``"external validation"``) to image paths, to what the
    check sees of them already (:class:`~pneumo_utils.model.input_check.Looks`), or to
    ``None`` (skipped). Returns the ``limits`` and their ``limit_rule``, ``flagged`` (share
    beyond a limit) per set with ``validation`` first, and, when ``site`` names one of the
    sets, ``site_shift``: :func:`site_report` for it.
    """
    from pneumo_utils.model.input_check import Looks, looks_of

    result: dict = {"limits": dict(check.limits), "limit_rule": check.limit_rule,
                    "flagged": {"validation": check.validation.get("flagged")}}
    for name, given in sets.items():
        if given is None or len(given) == 0:
            continue
        looks = given if isinstance(given, Looks) else looks_of(model, list(given), batch_size)
        result["flagged"][name] = float(check.flagged(looks).mean())
        if name == site:
            result["site_shift"] = site_report(check, looks, data=data, seed=seed)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    from pneumo_utils.cli import fail

    parser = argparse.ArgumentParser(
        prog="pneumo site-shift",
        description="How far a site's chest X-rays are from a model's training images: the share "
        "beyond its input check's limit and an MMD two-sample test against its validation images "
        "(labels not needed; research use only).",
    )
    parser.add_argument("--model", required=True, help="MODEL.keras saved with an input check")
    parser.add_argument("--data", required=True, help="folder of the site's images (searched recursively)")
    parser.add_argument("--permutations", type=int, default=DEFAULT_PERMUTATIONS,
                        help=f"permutations of the two-sample test ({DEFAULT_PERMUTATIONS})")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (32)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not 19 <= args.permutations <= 100_000:
        return fail(f"--permutations must be from 19 to 100000, got {args.permutations}")
    if not 1 <= args.batch_size <= 1024:
        return fail(f"--batch-size must be from 1 to 1024, got {args.batch_size}")

    from pathlib import Path

    from pneumo_utils.data.image_checks import check_image
    from pneumo_utils.data.images import is_image_file

    folder = Path(args.data)
    if not folder.is_dir():
        return fail(f"--data {folder} is not a folder of images")
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    readable = [f for f in files if check_image(f) is None]
    if len(readable) < 2:
        return fail(f"folder {folder} holds {len(readable)} readable .jpeg/.jpg/.png/.dcm images; "
                    "the test needs at least 2")
    if len(readable) < len(files):
        print(f"skipped {len(files) - len(readable)} unreadable or damaged images", file=sys.stderr)

    from pneumo_utils.model.inference import is_exported
    from pneumo_utils.sidecar import ModelFileError

    if is_exported(args.model):
        return fail(f"{args.model} is an export; the site-shift test needs the .keras model's features")
    try:
        from pneumo_utils.model import input_check
        from pneumo_utils.model.saving import load_model

        model, meta = load_model(args.model)
        check = input_check.of(meta, f"sidecar of {args.model}")
        if check is None:
            return fail(f"{args.model} was saved without an input check (sidecar field input_check); "
                        "save it again from a notebook to fit one")
        looks = input_check.looks_of(model, readable, args.batch_size)
        report = site_report(check, looks, data=str(folder), permutations=args.permutations)
    except (ModelFileError, FileNotFoundError, ValueError) as exc:
        return fail(exc)
    print(json.dumps(report, indent=2) if args.json else describe(report))
    return 0

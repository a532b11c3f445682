"""Did last night's label rows drift from the reference? Each metric with its value, threshold
and verdict, from scipy's tests and distances.

Which metric decides follows the usual convention for drift on samples of different sizes:
while either sample has at most ``large_sample`` rows, the tests decide (chi-square for the class
shares, two-sample Kolmogorov-Smirnov for confidence and entropy); on larger samples the
distances do (Jensen-Shannon, PSI), because a test on so many rows flags shifts too small to
matter. Every metric is reported either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import chi2_contingency, ks_2samp
from scipy.stats.contingency import expected_freq

from clf.monitor.rows import LabelStats

INSUFFICIENT = "insufficient data"
# Cochran's rule for chi-square: no expected count below 1 and at most a fifth below 5.
MIN_EXPECTED, LOW_EXPECTED, MAX_LOW_SHARE = 1.0, 5.0, 0.2
MIN_ROWS = 30  # per sample, for KS and for PSI's ten bins
PSI_BINS = 10  # quantile bins of the reference
PSI_FLOOR = 1e-4  # an empty bin's share, so that PSI stays finite


@dataclass
class Thresholds:
    p_value: float = 0.05
    js_distance: float = 0.1
    psi: float = 0.1
    error_share: float = 0.05
    large_sample: int = 1000


def drift_report(reference: LabelStats, run: LabelStats, th: Thresholds) -> dict[str, Any]:
    """``{"drift", "metrics": {name: {...}}, "classes", ...}``: each metric's value, threshold,
    own ``drift`` and whether it ``decides`` the verdict; one that lacks the data to be valid
    says ``insufficient data`` and never drifts."""
    k = min(reference.topk.shape[1], run.topk.shape[1])
    tests_decide = min(reference.labelled, run.labelled) <= th.large_sample
    metrics = {
        **class_shift(reference.classes, run.classes, th, tests_decide),
        **distribution_shift("confidence", reference.confidence, run.confidence, th, tests_decide),
        **distribution_shift("entropy", reference.entropy(k), run.entropy(k), th, tests_decide),
        "error_share": error_shift(reference, run, th),
    }
    return {
        "drift": any(m["drift"] and m["decides"] for m in metrics.values()),
        "decided_by": "tests" if tests_decide else "distances",
        "rule": (
            f"tests (chi-square, KS) decide while either sample has at most {th.large_sample} "
            "labelled rows; distances (Jensen-Shannon, PSI) decide above that"
        ),
        "entropy": f"of the top {k} scores and the rest of the mass as one outcome, in nats",
        "metrics": metrics,
        "classes": class_shares(reference.classes, run.classes),
    }


def class_shift(
    reference: dict[str, int], run: dict[str, int], th: Thresholds, tests_decide: bool
) -> dict[str, dict[str, Any]]:
    """Chi-square test of homogeneity and Jensen-Shannon distance of the predicted classes."""
    names = sorted(set(reference) | set(run))
    table = np.array([[reference.get(c, 0) for c in names], [run.get(c, 0) for c in names]])
    chi2 = {"test": "chi-square, predicted class counts", "threshold": th.p_value}
    js = {"test": "Jensen-Shannon distance (base 2), class shares", "threshold": th.js_distance}
    why = _chi2_invalid(table)
    if why:
        return {
            "class_chi2": _insufficient(chi2, why, tests_decide),
            "class_js": _insufficient(js, why, not tests_decide),
        }
    result = chi2_contingency(table)
    distance = float(jensenshannon(table[0], table[1], base=2))
    return {
        "class_chi2": _verdict(chi2, float(result.pvalue), result.pvalue < th.p_value, tests_decide)
        | {"statistic": float(result.statistic)},
        "class_js": _verdict(js, distance, distance >= th.js_distance, not tests_decide),
    }


def distribution_shift(
    name: str, reference: np.ndarray, run: np.ndarray, th: Thresholds, tests_decide: bool
) -> dict[str, dict[str, Any]]:
    """Two-sample KS test and PSI of one per-row score."""
    ks = {"test": f"two-sample Kolmogorov-Smirnov, {name}", "threshold": th.p_value}
    psi = {"test": f"PSI over {PSI_BINS} reference quantile bins, {name}", "threshold": th.psi}
    if min(len(reference), len(run)) < MIN_ROWS:
        why = f"{min(len(reference), len(run))} labelled rows, fewer than {MIN_ROWS}"
        return {
            f"{name}_ks": _insufficient(ks, why, tests_decide),
            f"{name}_psi": _insufficient(psi, why, not tests_decide),
        }
    result = ks_2samp(reference, run)
    value = population_stability(reference, run)
    return {
        f"{name}_ks": _verdict(ks, float(result.pvalue), result.pvalue < th.p_value, tests_decide)
        | {"statistic": float(result.statistic)},
        f"{name}_psi": _verdict(psi, value, value >= th.psi, not tests_decide),
    }


def population_stability(reference: np.ndarray, run: np.ndarray) -> float:
    """PSI, sum((a - e) ln(a / e)) over the reference's quantile bins: scipy has no PSI, but it
    is the symmetric sum of the two relative entropies, which scipy has."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, PSI_BINS + 1))[1:-1])
    expected = _shares(np.searchsorted(edges, reference, side="right"), len(edges) + 1)
    actual = _shares(np.searchsorted(edges, run, side="right"), len(edges) + 1)
    return float(np.sum(rel_entr(actual, expected) + rel_entr(expected, actual)))


def error_shift(reference: LabelStats, run: LabelStats, th: Thresholds) -> dict[str, Any]:
    """How much the share of error rows grew, by reason."""
    ref_share = sum(reference.errors.values()) / max(reference.rows, 1)
    run_share = sum(run.errors.values()) / max(run.rows, 1)
    growth = run_share - ref_share
    reasons = sorted(set(reference.errors) | set(run.errors))
    return _verdict(
        {"test": "share of error rows, run minus reference", "threshold": th.error_share},
        growth,
        growth >= th.error_share,
        True,
    ) | {
        "by_reason": {
            r: {
                "reference": reference.errors.get(r, 0) / max(reference.rows, 1),
                "run": run.errors.get(r, 0) / max(run.rows, 1),
            }
            for r in reasons
        }
    }


def class_shares(reference: dict[str, int], run: dict[str, int]) -> dict[str, dict[str, float]]:
    ref_total, run_total = max(sum(reference.values()), 1), max(sum(run.values()), 1)
    return {
        c: {"reference": reference.get(c, 0) / ref_total, "run": run.get(c, 0) / run_total}
        for c in sorted(set(reference) | set(run))
    }


def _chi2_invalid(table: np.ndarray) -> str | None:
    """Why chi-square is not valid on ``table`` (2 x classes), or None."""
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return "fewer than two classes, or an empty sample"
    expected = expected_freq(table)
    low = (expected < LOW_EXPECTED).mean()
    if expected.min() < MIN_EXPECTED or low > MAX_LOW_SHARE:
        return (
            f"{low:.0%} of expected class counts are below {LOW_EXPECTED:g} "
            f"(the smallest {expected.min():.2f}); chi-square needs about {LOW_EXPECTED:g} or more"
        )
    return None


def _shares(bins: np.ndarray, n: int) -> np.ndarray:
    shares = np.maximum(np.bincount(bins, minlength=n) / len(bins), PSI_FLOOR)
    return shares / shares.sum()


def _verdict(metric: dict, value: float, drift: bool, decides: bool) -> dict[str, Any]:
    status = "drift" if drift else "no drift"
    return metric | {"value": value, "drift": bool(drift), "decides": decides, "status": status}


def _insufficient(metric: dict, why: str, decides: bool) -> dict[str, Any]:
    return metric | {
        "value": None,
        "drift": False,
        "decides": decides,
        "status": INSUFFICIENT,
        "why": why,
    }

"""The ``"budget"`` truncation guard: keep the fewest modules whole, in order of measured harm, such that the
calibration loss stays within a relative tolerance of the original model's.

Harm order: the truncated modules sorted by their measured relative output change
``‖W_minor X‖_F / ‖W X‖_F`` (largest first, ties by name; modules no calibration token reached come last), taken
from the one statistics pass every guard makes. Write ``L(k)`` for the calibration loss with the first ``k``
modules of that order kept whole and the other ``n − k`` truncated: ``L(0)`` is the fully truncated model,
``L(n)`` the original model ``L_orig``. With tolerance ``tol`` the target is

    L(k) ≤ L_orig + tol·|L_orig|

and the guard returns the ``k`` found by bisection over ``0 … n`` with the invariant "``L(lo)`` misses the target,
``L(hi)`` meets it" (``lo = 0``, ``hi = n`` at the start; ``L(n)`` meets it because it *is* the original loss).
So the returned ``k`` always satisfies ``L(k) ≤ target`` and ``L(k − 1) > target``: keeping one module fewer along
the order breaks the tolerance. If sparing more modules never raises the loss (``L`` non-increasing in ``k``), that
``k`` is the fewest modules of any prefix of the harm order; if ``L`` is not monotone, a smaller prefix may also
meet the target, and the search does not look for it (that would cost up to ``n`` passes).

Cost, in passes over the calibration batches (one pass = one forward of every batch, no backward):

    1 (per-module statistics and L_orig) + 1 (L(0)) + at most ⌈log₂ n⌉ (bisection)

e.g. at most 7 for SmolLM2's 30 v_proj modules, and 2 when truncating everything already meets the target.
No per-module loss passes (that would be ``n`` more).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from .spectral import MinorComponents
from .truncation_report import TruncationReport, truncated_loss


@dataclass
class BudgetSearch:
    """How many modules of the harm order to keep whole, and every loss the search measured."""

    kept: int  # k: the first k modules of the order are kept whole
    target: float  # L_orig + tol·|L_orig|
    losses: dict[int, float] = field(default_factory=dict)  # k → L(k), for every k known (0 and n included)
    evaluations: int = 0  # loss passes the bisection itself ran (L(0) and L(n) are given, not counted)


def loss_target(loss_original: float, tolerance: float) -> float:
    """``L_orig + tol·|L_orig|``: the highest calibration loss the budget accepts."""
    return loss_original + tolerance * abs(loss_original)


def bisect_kept_count(
    n: int, loss_with_first_kept: Callable[[int], float], target: float, loss_none_kept: float, loss_all_kept: float
) -> BudgetSearch:
    """The ``k`` in ``0 … n`` described in the module docstring, from at most ⌈log₂ n⌉ calls of
    ``loss_with_first_kept(k)`` (= ``L(k)``, called only for ``0 < k < n``). ``loss_all_kept`` (``L(n)``) must meet
    the target. A NaN loss counts as missing it."""
    if not loss_all_kept <= target:
        raise ValueError(f"the loss with every module kept whole ({loss_all_kept}) is above the target {target}.")
    losses = {0: loss_none_kept, n: loss_all_kept}
    if loss_none_kept <= target:
        return BudgetSearch(0, target, losses)
    low, high, evaluations = 0, n, 0  # invariant: L(low) > target, L(high) <= target
    while high - low > 1:
        middle = (low + high) // 2
        losses[middle] = loss_with_first_kept(middle)
        evaluations += 1
        if losses[middle] <= target:
            high = middle
        else:
            low = middle
    return BudgetSearch(high, target, losses, evaluations)


def harm_order(report: TruncationReport) -> list[str]:
    """The truncated modules of ``report``, most harmful first: by output change, descending; ties by name; modules
    that no calibration token reached (no output change measured) last."""
    truncated = [m for m in report.modules if m.truncated]
    return [m.name for m in sorted(truncated, key=lambda m: (m.output_change is None, -(m.output_change or 0.0), m.name))]


@dataclass
class BudgetDecision:
    """The budget guard's choice: ``kept_whole`` (a prefix of ``order``) and what it measured."""

    order: list[str]  # the truncated candidates, most harmful first
    kept_whole: list[str]
    tolerance: float
    loss_original: float
    loss_all_truncated: float
    loss_chosen: float
    search: BudgetSearch

    @property
    def forward_passes(self) -> int:
        """Passes over the calibration batches: statistics + L_orig, L(0), and the bisection's."""
        return 2 + self.search.evaluations

    def summary(self) -> str:
        return (
            f"keeping {len(self.kept_whole)} of {len(self.order)} candidate modules whole keeps the calibration loss "
            f"within {self.tolerance * 100:.3g} % of the original ({self.loss_original:.3f} → {self.loss_chosen:.3f}, target "
            f"≤ {self.search.target:.3f}; {self.loss_all_truncated:.3f} with all {len(self.order)} truncated; "
            f"{self.forward_passes} calibration passes)"
        )


def choose_modules_to_keep(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    minors: Mapping[str, MinorComponents | None],
    batches: list[dict],
    report: TruncationReport,
    tolerance: float,
) -> BudgetDecision:
    """The fewest modules of the harm order to keep whole (see the module docstring), for the modules whose dropped
    part is in ``minors`` (``None`` = already kept whole). ``report`` is ``measure_truncation``'s for the same
    ``minors`` and batches; it supplies the output changes, ``L_orig`` and ``L(0)``. Raises a one-line
    ``ValueError`` when the batches give no finite loss."""
    if report.loss_original is None or report.loss_truncated is None:
        raise ValueError(
            "KasaConfig truncation_guard='budget' needs a calibration loss: give the calibration batches labels "
            "(for a causal LM, batch['labels'] = batch['input_ids']) and use a model whose forward returns a loss."
        )
    if not math.isfinite(report.loss_original):
        raise ValueError(
            f"KasaConfig truncation_guard='budget': the original model's calibration loss is {report.loss_original}; "
            "the budget needs a finite loss (check the calibration batches)."
        )
    order = harm_order(report)
    truncated = {name: minor for name, minor in minors.items() if minor is not None}

    def loss_with_first_kept(k: int) -> float:
        kept = set(order[:k])
        loss = truncated_loss(model, layers, {n: m for n, m in truncated.items() if n not in kept}, batches)
        return float("nan") if loss is None else loss

    target = loss_target(report.loss_original, tolerance)
    search = bisect_kept_count(len(order), loss_with_first_kept, target, report.loss_truncated, report.loss_original)
    return BudgetDecision(
        order=order,
        kept_whole=order[: search.kept],
        tolerance=tolerance,
        loss_original=report.loss_original,
        loss_all_truncated=report.loss_truncated,
        loss_chosen=search.losses[search.kept],
        search=search,
    )

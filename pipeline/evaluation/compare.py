"""Every method on one env-step axis: the comparison table and the two published claims it checks.

The x-axis is *env steps the policy had trained on* when it produced the measured episodes:

- EPG, PPO, PG and the random loss (``run_lifetimes``): a curve point closes an update window of M =
  ``update_every`` steps and holds the mean return of the episodes that finished inside it. The policy
  acting in the window ``(s - M, s]`` was updated last at step ``s - M``, so the point sits at
  ``x = s - M`` (the first window, acted by the initial policy, at x = 0). A lifetime in which no episode
  finished inside a window (a long cart-pole episode) keeps its last finished episodes' return
  (carried forward); before the first finished episode it has none (nan, left out of the mean).
- MAML and the pretrained policy (``adaptation_curves``): point k holds the rollouts sampled after k
  policy-gradient steps, ``AdaptationCurves.env_steps[k]`` steps into the budget (x = 0 before any step).

A method's return at x is its latest point at or before x (a step function: no interpolation, so no
value is invented between two measurements). Columns of the table: x_1 and x_K = the env steps MAML had
used after 1 and after K inner steps, mid = half the budget, end = the budget. Lifetimes are (seed,
task) pairs in the same seed-major order for every method, so differences are paired per lifetime.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .stats import mean_ci

ADAPTING = ("maml", "pretrained")  # methods whose curves come from MAML's adaptation


@dataclass(frozen=True)
class LifetimeCurves:
    """One method on one split: returns ``[lifetimes, points]`` at ascending ``env_steps``."""

    env_steps: list[int]
    returns: torch.Tensor

    def __post_init__(self):
        if self.returns.dim() != 2 or self.returns.shape[1] != len(self.env_steps):
            raise ValueError(
                f"returns must be [lifetimes, {len(self.env_steps)}], got {list(self.returns.shape)}"
            )
        if list(self.env_steps) != sorted(self.env_steps):
            raise ValueError(f"env_steps must ascend, got {self.env_steps}")

    def index_at(self, steps: int) -> int | None:
        """The latest point at or before ``steps``; None before the first point."""
        return max((i for i, s in enumerate(self.env_steps) if s <= steps), default=None)

    def at(self, steps: int) -> torch.Tensor:
        """[lifetimes] return at the latest point at or before ``steps``; nan before the first point."""
        index = self.index_at(steps)
        if index is None:
            return torch.full((self.returns.shape[0],), math.nan)
        return self.returns[:, index]

    def mean_curve(self) -> list[float]:
        """Mean over finite lifetimes at every point."""
        return [mean_ci(self.returns[:, i].tolist()).mean for i in range(len(self.env_steps))]


def carry_forward(returns: torch.Tensor) -> torch.Tensor:
    """[lifetimes, points]: a nan point takes the lifetime's latest finite point (leading nans stay)."""
    out = returns.clone()
    for point in range(1, out.shape[1]):
        missing = torch.isnan(out[:, point])
        out[missing, point] = out[missing, point - 1]
    return out


def epg_curves(curve: torch.Tensor, curve_steps: list[int], update_every: int) -> LifetimeCurves:
    """``run_lifetimes``' curve of one member, ``[updates, lifetimes]``, on the trained-on axis."""
    return LifetimeCurves([s - update_every for s in curve_steps], carry_forward(curve.T.float()))


@dataclass(frozen=True)
class Cell:
    """Mean with its CI over lifetimes (n finite ones)."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: torch.Tensor, confidence: float) -> Cell:
        return cls(*mean_ci(values.reshape(-1).tolist(), confidence))

    def above_zero(self) -> bool:
        return self.n > 1 and self.low > 0


@dataclass(frozen=True)
class MethodRow:
    """One method's table row: return at each column, env steps to reach PPO's final return (None: not
    reached), and whether it learns (its last point's CI lies above its first point's)."""

    method: str
    returns: dict[str, Cell]
    steps_to_ppo_final: int | None
    first: Cell
    last: Cell
    learns: bool


@dataclass(frozen=True)
class SplitComparison:
    columns: dict[str, int]  # column name -> env steps
    rows: dict[str, MethodRow]
    best: dict[str, str]  # column -> method with the highest mean return there
    ppo_final: float | None


@dataclass(frozen=True)
class ClaimVerdict:
    claim: str
    criterion: str
    reproduced: bool | None  # None: a needed method was not evaluated, or the data cannot check it
    evidence: dict[str, Cell]
    verdict: str


@dataclass(frozen=True)
class Comparison:
    budget: int
    inner_steps: int | None
    confidence: float
    splits: dict[str, SplitComparison]
    claims: list[ClaimVerdict]

    def to_dict(self) -> dict:
        return asdict(self)


def table_columns(budget: int, adapting: LifetimeCurves | None, inner_steps: int | None) -> dict[str, int]:
    """x_1 and x_K (one column when K = 1), mid and end of the budget, in env steps. x_1 and x_K are
    left out when MAML did not run or its K inner steps' episodes did not fit in the budget."""
    columns = {}
    if adapting is not None and inner_steps and len(adapting.env_steps) > inner_steps:
        if inner_steps > 1:
            columns["1 step"] = adapting.env_steps[1]
        columns[f"K: {inner_steps} step{'s' if inner_steps > 1 else ''}"] = adapting.env_steps[inner_steps]
    columns["mid"] = budget // 2
    columns["end"] = budget
    return columns


def k_column(columns: dict[str, int]) -> str | None:
    """The name of the K-inner-steps column, None when MAML did not run."""
    return next((name for name in columns if name.startswith("K: ")), None)


def steps_to_reach(curves: LifetimeCurves, target: float) -> int | None:
    """The first point's env steps whose mean return is >= ``target``; None if none is."""
    if not math.isfinite(target):
        return None
    return next((s for s, m in zip(curves.env_steps, curves.mean_curve(), strict=True) if m >= target), None)


def compare_split(
    curves: dict[str, LifetimeCurves], columns: dict[str, int], confidence: float
) -> SplitComparison:
    """The table of one split: every method's return at every column, best per column, steps to PPO."""
    end = columns["end"]
    ppo_final = Cell.of(curves["ppo"].at(end), confidence).mean if "ppo" in curves else None
    rows = {}
    for method, curve in curves.items():
        first, last = Cell.of(curve.returns[:, 0], confidence), Cell.of(curve.returns[:, -1], confidence)
        rows[method] = MethodRow(
            method=method,
            returns={name: Cell.of(curve.at(steps), confidence) for name, steps in columns.items()},
            steps_to_ppo_final=steps_to_reach(curve, ppo_final) if ppo_final is not None else None,
            first=first,
            last=last,
            learns=last.low > first.high,
        )
    best = {name: max(rows, key=lambda m: _finite(rows[m].returns[name].mean)) for name in columns}
    return SplitComparison(columns, rows, best, ppo_final)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def paired(a: LifetimeCurves, a_steps: int, b: LifetimeCurves, b_steps: int, confidence: float) -> Cell:
    """CI of a(a_steps) - b(b_steps) over the same lifetimes (pairs with a nan side are left out)."""
    return Cell.of(a.at(a_steps) - b.at(b_steps), confidence)


def claim_faster(
    curves: dict[str, LifetimeCurves], columns: dict[str, int], confidence: float
) -> ClaimVerdict:
    """(a) on held-out tasks the evolved loss trains fresh policies faster than PPO."""
    checked = [name for name in (k_column(columns), "mid") if name]
    criterion = (
        "held-out (test) tasks: the paired difference evolved − PPO over the same (seed, task) "
        f"lifetimes has its CI above 0 at {' and at '.join(checked)} env steps"
    )
    if not {"evolved", "ppo"} <= set(curves):
        return ClaimVerdict("a", criterion, None, {}, "not checked: needs `evolved` and `ppo`")
    evidence = {
        f"evolved − PPO at {name}": paired(
            curves["evolved"], columns[name], curves["ppo"], columns[name], confidence
        )
        for name in checked
    }
    reproduced = all(cell.above_zero() for cell in evidence.values())
    return ClaimVerdict("a", criterion, reproduced, evidence, _verdict(reproduced, evidence))


# MAML's K-step mean at or above this fraction of its return ceiling leaves its adaptation no room to show
CEILING_FRACTION = 0.95


def claim_keeps_learning(
    curves: dict[str, LifetimeCurves],
    columns: dict[str, int],
    confidence: float,
    maml_ceiling: float | None = None,
) -> ClaimVerdict:
    """(b) out of distribution the evolved loss keeps learning where MAML's adaptation does not.

    Not checkable when MAML's adapted return is at its ceiling (``maml_ceiling``, e.g. cart-pole's
    horizon): no gain is possible there, so its absence says nothing about adaptation."""
    k_name = k_column(columns)
    criterion = (
        "ood tasks: the evolved loss's paired gain end − K steps has its CI above 0, and MAML's "
        "adaptation gain K steps − 0 steps does not (MAML's end − K steps is shown too when the budget "
        "left MAML steps after K)"
    )
    if not {"evolved", "maml"} <= set(curves):
        return ClaimVerdict("b", criterion, None, {}, "not checked: needs `evolved` and `maml`")
    if k_name is None:
        steps = curves["maml"].env_steps
        return ClaimVerdict(
            "b",
            criterion,
            None,
            {},
            f"not checked: MAML's K inner steps did not fit in the {columns['end']}-step budget (its "
            f"curve has points at {steps} env steps only)",
        )
    k, end = columns[k_name], columns["end"]
    evolved, maml = curves["evolved"], curves["maml"]
    evidence = {
        "evolved: end − K steps": paired(evolved, end, evolved, k, confidence),
        "MAML: K steps − 0 steps": paired(maml, k, maml, 0, confidence),
    }
    if maml.env_steps[-1] > k:  # MAML went on after its adaptation within the budget
        evidence["MAML: end − K steps"] = paired(maml, end, maml, k, confidence)
    at_k = Cell.of(maml.at(k), confidence)
    if maml_ceiling is not None and at_k.mean >= CEILING_FRACTION * maml_ceiling:
        return ClaimVerdict(
            "b",
            criterion,
            None,
            evidence,
            f"not checkable: MAML's return after K steps ({at_k.mean:.1f}) is at its ceiling "
            f"({maml_ceiling:g}: the episodes' longest return), so it has no room to gain; "
            + _evidence_text(evidence),
        )
    reproduced = evidence["evolved: end − K steps"].above_zero() and not (
        evidence["MAML: K steps − 0 steps"].above_zero()
    )
    verdict = _verdict(reproduced, evidence)
    if maml_ceiling is not None:  # how much room MAML had: a reader weighs its flat curve by it
        verdict += f" (MAML's return after K steps {at_k.mean:.1f} of its ceiling {maml_ceiling:g})"
    return ClaimVerdict("b", criterion, reproduced, evidence, verdict)


def _evidence_text(evidence: dict[str, Cell]) -> str:
    return "; ".join(f"{name} {c.mean:.1f} [{c.low:.1f}, {c.high:.1f}]" for name, c in evidence.items())


def _verdict(reproduced: bool, evidence: dict[str, Cell]) -> str:
    return f"{'reproduced' if reproduced else 'not reproduced'}: {_evidence_text(evidence)}"


def compare(
    curves: dict[str, dict[str, LifetimeCurves]],
    budget: int,
    inner_steps: int | None,
    confidence: float,
    maml_ceiling: float | None = None,
) -> Comparison:
    """``curves[split][method]`` -> the table per split and the verdicts on claims (a) and (b);
    ``maml_ceiling``: the largest return MAML's evaluation episodes can reach (None: unbounded)."""
    splits, claims = {}, []
    columns_of = {}
    for split, methods in curves.items():
        adapting = next((methods[m] for m in ADAPTING if m in methods), None)
        columns_of[split] = table_columns(budget, adapting, inner_steps)
        splits[split] = compare_split(methods, columns_of[split], confidence)
    if "test" in curves:
        claims.append(claim_faster(curves["test"], columns_of["test"], confidence))
    if "ood" in curves:
        claims.append(claim_keeps_learning(curves["ood"], columns_of["ood"], confidence, maml_ceiling))
    return Comparison(budget, inner_steps, confidence, splits, claims)


def mean_cells(curves: LifetimeCurves, confidence: float) -> list[Cell]:
    """Mean and CI over lifetimes at each of the curve's points."""
    return [Cell.of(curves.returns[:, i], confidence) for i in range(len(curves.env_steps))]

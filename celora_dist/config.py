"""CELoRAConfig: which layers to convert and how hard to approximate them.

Defaults are the CE-LoRA authors' released configuration (docs/design.md §1): q/k/gate
exact, v/o at keep 0.55, up/down at keep 0.65, r = r0 = 14, rsLoRA alpha 32,
index refresh every 200 optimizer steps.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

SCORE_MODES = ("gradient", "static")
SVD_METHODS = ("exact", "randomized")
AUTO = "auto"

RELEASED_KEEP = {"v_proj": 0.55, "o_proj": 0.55, "up_proj": 0.65, "down_proj": 0.65}
RELEASED_EXACT = ("q_proj", "k_proj", "gate_proj")


@dataclass
class CELoRAConfig:
    """Configuration of a CE-LoRA fine-tune.

    keep: fraction of output features KEPT in the approximate ``G @ W0`` per module
        name (the last component of the module path, e.g. ``"v_proj"``), or ``"auto"``:
        k chosen on every refresh step to meet ``error_budget`` (see selection.choose_k).
        ``keep="auto"`` makes every released approximate module (v/o/up/down) auto.
    exact: module names converted as plain LoRA (keep = 1, no SVD).
    refresh_every: optimizer steps between index refreshes (tau).
    score: ``"gradient"`` (‖G[:, i]‖·‖Ws[i, :]‖, the default) or ``"static"``
        (‖Ws[i, :]‖ alone, the released code's behaviour, for comparison).
    sync_indices: all-reduce the scores over the data-parallel group so every rank
        selects the same indices.
    error_budget: target relative dX error per layer for ``"auto"`` keeps.
    head_keep: fraction of vocabulary rows kept in the LM head's backward (None: the
        head's dX stays exact). See celora_dist/head.py.
    head_tail_correction: add the dropped vocabulary rows' gradient-weighted mean to the
        head's approximate dH and always keep label rows (celora_dist/head.py, "Tail
        correction"). On by default: measured on SmolLM2 / PIQA at head_keep 0.1 it took the
        LoRA gradient's relative error from 19% to 3% (BENCHMARKS.md, "Vocab-sparse head").
    dense_warmup: optimizer steps at the start during which every approximate layer and the
        vocab-sparse head run the exact dX (the model trains as plain LoRA), each a refresh step,
        as SparseLoRA's dense warm-up; 0 (the default) starts approximating after step 0's
        refresh (docs/design.md §1, "Dense warm-up").
    svd: how the start-up split W0 = B0 A0 + Ws finds its top-r0 subspace: ``"randomized"``
        (the default: range finder with ``svd_oversample`` extra columns and ``svd_niter``
        power iterations, seeded by the weight's bytes) or ``"exact"`` (torch.linalg.svd).
        The default was chosen from measurements (docs/design.md §1, BENCHMARKS.md).
    """

    r: int = 14
    alpha: float = 32.0
    rslora: bool = True
    r0: int = 14
    keep: dict[str, float | str] | str = field(default_factory=lambda: dict(RELEASED_KEEP))
    exact: tuple[str, ...] = RELEASED_EXACT
    dropout: float = 0.0
    refresh_every: int = 200
    score: str = "gradient"
    sync_indices: bool = True
    error_budget: float = 0.3
    head_keep: float | None = None
    head_tail_correction: bool = True
    dense_warmup: int = 0
    svd: str = "randomized"
    svd_oversample: int = 16
    svd_niter: int = 4

    def __post_init__(self) -> None:
        self.exact = tuple(self.exact)
        if self.keep == AUTO:
            self.keep = {name: AUTO for name in RELEASED_KEEP}
        if not isinstance(self.keep, Mapping):
            raise ValueError(f"CELoRAConfig.keep must be a dict of module name -> fraction or 'auto', "
                             f"or 'auto'; got {self.keep!r}")
        self.keep = dict(self.keep)
        self.validate()

    # -- validation ---------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the offending field; called on construction."""
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"CELoRAConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.r0, int) or self.r0 < 0:
            raise ValueError(f"CELoRAConfig.r0 must be a non-negative integer, got {self.r0!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"CELoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"CELoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise ValueError(
                f"CELoRAConfig.refresh_every must be a positive integer (optimizer steps), "
                f"got {self.refresh_every!r}"
            )
        if self.score not in SCORE_MODES:
            raise ValueError(f"CELoRAConfig.score must be one of {SCORE_MODES}, got {self.score!r}")
        for name, value in self.keep.items():
            if value != AUTO and not is_fraction(value):
                raise ValueError(
                    f"CELoRAConfig.keep[{name!r}] must be a fraction in (0, 1] (the share of output "
                    f"features kept) or 'auto', got {value!r}"
                )
        if not is_error_budget(self.error_budget):
            raise ValueError(f"CELoRAConfig.error_budget must be in [0, 1), got {self.error_budget!r}")
        if self.head_keep is not None and not is_fraction(self.head_keep):
            raise ValueError(f"CELoRAConfig.head_keep must be None or a fraction in (0, 1], got {self.head_keep!r}")
        if not isinstance(self.head_tail_correction, bool):
            raise ValueError(f"CELoRAConfig.head_tail_correction must be True or False, "
                             f"got {self.head_tail_correction!r}")
        if not is_step_count(self.dense_warmup):
            raise ValueError(f"CELoRAConfig.dense_warmup must be an integer >= 0 (optimizer steps), "
                             f"got {self.dense_warmup!r}")
        check_svd(self.svd, self.svd_oversample, self.svd_niter, "CELoRAConfig.")
        both = sorted(set(self.keep) & set(self.exact))
        if both:
            raise ValueError(f"CELoRAConfig: modules {both} are listed in both keep and exact")
        if not self.keep and not self.exact:
            raise ValueError("CELoRAConfig: keep and exact are both empty; nothing to convert")

    # -- helpers ------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """LoRA scale s: alpha/sqrt(r) with rsLoRA, alpha/r otherwise."""
        return lora_scaling(self.alpha, self.r, self.rslora)

    @property
    def target_modules(self) -> list[str]:
        return list(self.exact) + list(self.keep)

    @property
    def svd_method(self) -> "SVDMethod":
        """The split's SVD settings as the one object factors.py and the cache key read."""
        return SVDMethod(self.svd, self.svd_oversample, self.svd_niter)

    def keep_for(self, module_name: str) -> float | str | None:
        """Keep ratio (or "auto") for a module path, 1.0 for exact modules, None if not targeted."""
        leaf = module_name.rsplit(".", 1)[-1]
        for key in self.exact:
            if module_name == key or leaf == key or module_name.endswith("." + key):
                return 1.0
        for key, value in self.keep.items():
            if module_name == key or leaf == key or module_name.endswith("." + key):
                return value if value == AUTO else float(value)
        return None

    def layer_kwargs(self, module_name: str) -> dict[str, Any]:
        """Keyword arguments of ``CELoRALinear`` (and the TP layers) for a targeted module."""
        keep = self.keep_for(module_name)
        if keep is None:
            raise ValueError(f"CELoRAConfig: {module_name!r} is not a target module ({self.target_modules})")
        return dict(r=self.r, alpha=self.alpha, rslora=self.rslora, r0=self.r0, keep=keep, dropout=self.dropout,
                    refresh_every=self.refresh_every, score=self.score, sync_indices=self.sync_indices,
                    error_budget=self.error_budget, name=module_name,
                    svd=self.svd_method, dense_warmup=self.dense_warmup)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exact"] = list(self.exact)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CELoRAConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"CELoRAConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(d))


def is_fraction(value: Any) -> bool:
    """The rule for every keep ratio (layers and LM head): a real number in (0, 1] (NaN fails)."""
    return isinstance(value, (int, float)) and 0.0 < value <= 1.0


def is_step_count(value: Any) -> bool:
    """The rule for a count of optimizer steps that may be zero (an int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_svd(method: Any, oversample: Any, niter: Any, prefix: str = "") -> None:
    """The rule for the split's SVD settings; raises ValueError naming the bad field
    (``prefix`` + svd / svd_oversample / svd_niter)."""
    if method not in SVD_METHODS:
        raise ValueError(f"{prefix}svd must be one of {SVD_METHODS}, got {method!r}")
    for name, value in (("svd_oversample", oversample), ("svd_niter", niter)):
        if not is_step_count(value):
            raise ValueError(f"{prefix}{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class SVDMethod:
    """How the split's top-r0 subspace is found.

    ``"exact"`` (a bare CELoRALinear's default): ``torch.linalg.svd``, oversample/niter
    ignored. ``"randomized"`` (CELoRAConfig's default, so inject_celora's and the trainer's): a
    Gaussian test matrix of r0 + ``oversample`` columns, ``niter`` power (subspace)
    iterations, then an exact SVD of the small projected matrix (Halko, Martinsson &
    Tropp 2011, Alg. 4.4 + 5.1).
    """

    method: str = "exact"
    oversample: int = 16
    niter: int = 4

    def __post_init__(self) -> None:
        check_svd(self.method, self.oversample, self.niter, "SVDMethod: ")

    @property
    def key(self) -> str:
        """The part of a factor-cache key that names the method: exact and randomized
        (or two randomized settings) never share an entry."""
        return "exact" if self.method == "exact" else f"rand_p{self.oversample}_q{self.niter}"


EXACT = SVDMethod()


def is_error_budget(value: Any) -> bool:
    """The rule for an adaptive keep's error budget: a relative dX error in [0, 1)."""
    return isinstance(value, (int, float)) and 0.0 <= value < 1.0


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """LoRA scale s: alpha/sqrt(r) with rsLoRA, alpha/r otherwise."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def num_kept(keep: float, m: int) -> int:
    """k = ceil(keep * m), robust to float noise (0.55 * 100 is 55.000000000000007)."""
    return min(m, max(1, math.ceil(round(keep * m, 9))))

"""Skip training steps whose loss or gradients are NaN / inf, count them, stop after too many in a row.

A skipped step learns nothing: the stage drops its gradients before the optimiser call (so Adam's
moments, step counts and the weights stay as they were; with a fp16 ``GradScaler`` the gradients
are made non-finite instead, so the scaler skips the step as it does for an overflow), leaves the
EMA, the codebook upkeep and the discriminator alone, and puts back the BatchNorm running
statistics the step's forward passes changed. It still counts as a step, like a step a fp16 ``GradScaler`` skips:
``trainer.global_step``, the step-indexed schedules (learning rate, fidelity weight, GAN start) and
the data position advance, so a run's schedule does not depend on how many steps were skipped.
Under DDP every rank takes the same decision (one all-reduce of a flag per check).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import pytorch_lightning as pl
import torch
from torch import nn

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or non-finite gradients."""


def nonfinite_terms(terms: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the ``terms`` (loss terms, or any float tensors) holding a NaN or inf."""
    names = [k for k, v in terms.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([terms[k].detach().isfinite().all() for k in names]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]


def gradients_finite(params: Iterable[nn.Parameter]) -> bool:
    """Whether every gradient of ``params`` is finite (parameters without gradients are ignored)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.nn.utils.get_total_norm(grads, norm_type=2.0).isfinite())


def skip_update(module: pl.LightningModule, params: Iterable[nn.Parameter]) -> None:
    """Make the next optimiser call leave ``params`` (and the optimiser's state) untouched.

    Without a GradScaler the gradients are set to None (torch optimisers skip such parameters).
    With one they are filled with NaN: the scaler then skips the step and lowers its scale, as
    for any overflow (it refuses an optimiser without gradients).
    """
    scaler = _has_grad_scaler(module)
    for p in params:
        if p.grad is None:
            continue
        if scaler:
            p.grad.fill_(float("nan"))
        else:
            p.grad = None


class RunningStats:
    """The BatchNorm running statistics of ``module`` now, to put back after a skipped step."""

    def __init__(self, module: nn.Module | None) -> None:
        self.saved = []
        if module is not None:
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                    self.saved += [(m, name, getattr(m, name).clone()) for name in ("running_mean", "running_var",
                                   "num_batches_tracked") if getattr(m, name, None) is not None]  # fmt: skip

    @torch.no_grad()
    def restore(self) -> None:
        for m, name, value in self.saved:
            getattr(m, name).copy_(value)


class NonFiniteGuard:
    """Decides, counts and logs non-finite steps of one stage (see the module docstring).

    Args:
        max_consecutive: the run stops with :class:`NonFiniteLossError` (naming the step and the
            loss terms) once this many steps in a row were non-finite; None never stops.

    Per step: :meth:`check` once per network update (all ranks must call it: it all-reduces),
    then :meth:`end_step`. The counters are saved in checkpoints through :meth:`state_dict`.
    """

    def __init__(self, max_consecutive: int | None = 20) -> None:
        if max_consecutive is not None and int(max_consecutive) < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1 or null (never stop), got {max_consecutive}")
        self.max_consecutive = None if max_consecutive is None else int(max_consecutive)
        self.consecutive = 0
        self.total = 0
        self._problems: list[str] = []

    def check(
        self,
        module: pl.LightningModule,
        terms: Mapping[str, torch.Tensor],
        params: Iterable[nn.Parameter] | None = None,
        prefix: str = "",
    ) -> bool:
        """True when ``terms`` (and the gradients of ``params``, if given) are finite on every rank.

        With a fp16 ``GradScaler`` the gradients are left to the scaler (it skips overflowing steps
        and lowers the scale; those are not failures); the loss terms are still checked.
        """
        bad = [prefix + name for name in nonfinite_terms(terms)]
        if params is not None and not bad and not _has_grad_scaler(module) and not gradients_finite(params):
            bad = [f"{prefix}gradients"]
        trainer = module._trainer
        any_bad = bool(bad)
        if trainer is not None and trainer.world_size > 1:
            any_bad = trainer.strategy.reduce_boolean_decision(any_bad, all=False)
        if any_bad:
            self._problems.extend(bad or [f"{prefix}loss on another rank"])
        return not any_bad

    def end_step(self, module: pl.LightningModule, step: int) -> None:
        """Close step ``step``: count it if a check failed, log, raise after too many in a row."""
        problems, self._problems = self._problems, []
        if problems:
            self.consecutive += 1
            self.total += 1
            detail = ", ".join(dict.fromkeys(problems))
            if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
                raise NonFiniteLossError(
                    f"step {step}: non-finite {detail}; {self.consecutive} consecutive non-finite steps "
                    f"(model.max_nonfinite_steps={self.max_consecutive}), {self.total} in total. Check the data "
                    "(a corrupt batch?), lower the learning rate or enable gradient clipping (model.grad_clip)"
                )
            if module.trainer.is_global_zero:
                log.warning(
                    "step %d skipped: non-finite %s (%d in a row, %d in total)", step, detail, self.consecutive,
                    self.total,
                )  # fmt: skip
        else:
            self.consecutive = 0
        module.log("train/nonfinite_steps", float(self.total), on_step=True, batch_size=1)

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))


def _has_grad_scaler(module: pl.LightningModule) -> bool:
    trainer = module._trainer
    return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None

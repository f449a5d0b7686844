"""Lightning: a callback that probes the LightningModule on a fixed batch every N steps.

::

    from plasticity_probe.integrations.lightning import ProbeCallback
    trainer = L.Trainer(callbacks=[ProbeCallback(every=100)])

Metrics are logged with ``pl_module.log_dict`` as ``plasticity/<layer>/<metric>``, so they
reach every logger of the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from plasticity_probe.probe import Probe
from plasticity_probe.report import Report

try:
    import lightning.pytorch as L
except ImportError:  # pragma: no cover - exercised only without the extra
    try:
        import pytorch_lightning as L  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError(
            "plasticity_probe.integrations.lightning needs Lightning: pip install 'plasticity-probe[lightning]'"
        ) from err

__all__ = ["ProbeCallback"]


def first_tensor(batch: Any) -> torch.Tensor:
    """The model input of a batch: the batch itself, or its first element (``(x, y)`` pairs)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and batch:
        value = next(iter(batch.values()))
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("ProbeCallback: cannot find the model input in the batch; pass probe_batch=")


class ProbeCallback(L.Callback):
    """Every ``every`` training steps, measure ``pl_module`` on a fixed probe batch.

    Args:
        every: optimizer steps (``trainer.global_step``) between reports: one report at each
            multiple, none at step 0 (with gradient accumulation, several batches end on one step).
        probe_batch: the fixed input; default: the first ``max_samples`` inputs of the first batch.
        metrics: per-layer metrics (default: ``Probe``'s).
        layers: module paths to probe (default: all layers).
        eval_mode: measure in eval mode (dropout off), restoring every submodule's own mode
            afterwards (a frozen, eval-mode backbone stays in eval mode).
        input_fn: picks the model input from a batch (default: :func:`first_tensor`).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` on the first training batch (kept fixed):
            adds the gradient metrics (``grad_norm``, ``grad_to_weight_ratio``, GraMa's
            ``grad_dormant_fraction``).
        trainability: add the trainability probe (fit random targets on a private copy).

    ``distance_from_init`` is measured from the parameters at the start of training.
    """

    def __init__(
        self,
        every: int = 100,
        probe_batch: torch.Tensor | None = None,
        metrics: Sequence[str] | None = None,
        layers: Sequence[str] | None = None,
        eval_mode: bool = False,
        max_samples: int = 512,
        input_fn: Callable[[Any], torch.Tensor] = first_tensor,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        trainability: bool = False,
    ) -> None:
        super().__init__()
        if every < 1:
            raise ValueError("every must be >= 1")
        self.every, self.probe_batch, self.metrics, self.layers = every, probe_batch, metrics, layers
        self.eval_mode, self.max_samples, self.input_fn = eval_mode, max_samples, input_fn
        self.loss_fn, self.trainability = loss_fn, trainability
        self.loss_batch: Any = None
        self.probe: Probe | None = None
        self.last_report: Report | None = None
        self._last_step = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.probe = Probe(pl_module, layers=self.layers, metrics=self.metrics)  # θ_0: now

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.probe_batch is None:
            self.probe_batch = self.input_fn(batch)[: self.max_samples].detach().clone()
        if self.loss_batch is None:
            self.loss_batch = batch
        step = trainer.global_step  # optimizer steps: with gradient accumulation, several batches share one
        if step == 0 or step % self.every != 0 or step == self._last_step:
            return
        self._last_step = step
        probe = self.probe or Probe(pl_module, layers=self.layers, metrics=self.metrics)
        user_loss, loss_batch = self.loss_fn, self.loss_batch
        loss_fn = (lambda: user_loss(pl_module, loss_batch)) if user_loss is not None else None
        modes = [(m, m.training) for m in pl_module.modules()]  # each submodule's own (frozen parts stay eval)
        if self.eval_mode:
            pl_module.eval()
        try:
            report = probe.measure(
                self.probe_batch.to(pl_module.device),
                loss_fn=loss_fn,
                gradients=loss_fn is not None,
                trainability=self.trainability,
            )
        finally:
            for module, training in modes:
                module.training = training
        self.last_report = report
        values = {f"plasticity/{r['layer']}/{r['metric']}": float(r["value"]) for r in report.rows()}
        pl_module.log_dict(values, on_step=True, on_epoch=False)


class InterventionCallback(L.Callback):
    """Every ``every`` training steps, apply an intervention to ``pl_module`` with the trainer's
    (first) optimizer, on the current batch's input.

    Args:
        intervention: ``"redo"`` (:class:`~plasticity_probe.interventions.ReDo` on the batch
            input), ``"shrink-perturb"``, or ``fn(pl_module, optimizer, x) -> ResetRecord``.
        every: optimizer steps (``trainer.global_step``) between interventions (one per multiple).
        tau: ReDo's τ; shrink, perturb: Shrink & Perturb's λ and σ.
        seed: with the step, seeds the fresh initializations.
        input_fn: picks the model input from a batch (default: :func:`first_tensor`).

    ``records`` holds ``(global_step, ResetRecord)``; ``interventions/units_reset`` is logged.
    """

    def __init__(
        self,
        intervention: str | Callable[..., Any] = "redo",
        every: int = 1000,
        tau: float = 0.025,
        shrink: float = 0.8,
        perturb: float = 0.01,
        seed: int = 0,
        input_fn: Callable[[Any], torch.Tensor] = first_tensor,
    ) -> None:
        super().__init__()
        if every < 1:
            raise ValueError("every must be >= 1")
        if isinstance(intervention, str) and intervention not in ("redo", "shrink-perturb"):
            raise ValueError(f"unknown intervention {intervention!r}; use 'redo', 'shrink-perturb' or a callable")
        self.intervention, self.every, self.tau = intervention, every, tau
        self.shrink, self.perturb, self.seed, self.input_fn = shrink, perturb, seed, input_fn
        self.records: list[tuple[int, Any]] = []
        self._last_step = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        from plasticity_probe.interventions import ReDo, shrink_perturb

        step = trainer.global_step  # optimizer steps: with gradient accumulation, several batches share one
        if step == 0 or step % self.every != 0 or step == self._last_step:
            return
        self._last_step = step
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.intervention == "redo":
            record = ReDo(pl_module, optimizer, tau=self.tau).reset(self.input_fn(batch), generator=generator)
        elif self.intervention == "shrink-perturb":
            record = shrink_perturb(pl_module, self.shrink, self.perturb, optimizer=optimizer, generator=generator)
        else:
            assert callable(self.intervention)
            record = self.intervention(pl_module, optimizer, self.input_fn(batch))
        self.records.append((step, record))
        if trainer.logger is not None:
            pl_module.log("interventions/units_reset", float(record.units_reset), on_step=True, on_epoch=False)


__all__ += ["InterventionCallback"]

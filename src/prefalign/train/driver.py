"""The outer loop every trainer runs, offline steps and online iterations alike.

:func:`train_steps` takes a run (anything with the attributes and methods of :class:`StepRun`) and
owns what is the same for every method: the lean layers (:class:`prefalign.memory.lean_layers`, entered
here and nowhere else, undone when training ends, also on an error or Ctrl-C), Ctrl-C (a checkpoint
after the current step, then stop), a non-finite step (the last good state saved, then stop), the
cadence of metrics (``log_every``), evaluation (``eval_every``), checkpoints (``save_every``) and the
callback, a progress bar, and the checkpoint and evaluation after the last step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, Protocol

from torch import nn
from tqdm.auto import tqdm

from prefalign.memory import lean_layers
from prefalign.train.options import TrainOptions
from prefalign.train.processes import sum_over_processes
from prefalign.train.run_folder import MetricsWriter

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """A step's loss or gradient is not finite; the message names the step. ``partial``: the failing
    step had already changed the weights (an online iteration whose earlier minibatches were applied),
    so its state is not a good one to save."""

    def __init__(self, message: str, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


class Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to save a checkpoint after the current step and stop; a
    second one stops at once. Installed only in the main thread (where Python delivers signals)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class StepRun(Protocol):
    """What :func:`train_steps` needs of a run."""

    config: TrainOptions
    accelerator: Any
    state: dict[str, Any]
    """``state["step"]``: steps done so far (restored on resume); checkpointed with the run."""
    total: int
    """Steps the run ends after."""
    writer: MetricsWriter
    callback: Callable[[int, nn.Module], None] | None
    interrupt: Interrupt
    saved_step: int
    """The step of the newest checkpoint this run wrote or resumed from (-1: none)."""
    name: str
    """The progress bar's label."""
    unit: str
    """What one step is called on the progress bar."""
    shown: tuple[str, ...]
    """Metrics shown next to the progress bar."""
    release_every: int
    """Return freed memory to the OS after every this-many decoder layers of a training forward (0:
    never; :class:`~prefalign.memory.lean_layers`)."""

    def lean_target(self) -> tuple[nn.Module, list[nn.Parameter]]:
        """The module whose layers :class:`~prefalign.memory.lean_layers` swaps, and the parameters whose
        gradients may be added in place (single process, gradients kept allocated)."""
        ...

    def begin(self) -> None:
        """Work before the first step (inside the lean layers), e.g. the starting policy's evaluation."""
        ...

    def advance(self) -> dict[str, float]:
        """One step (``state["step"]`` not yet counted); its metrics. ``"_interrupt"`` in them, when
        present, is the Ctrl-C requests of every process, already summed."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (empty without a held-out set); called on every process."""
        ...

    def save(self) -> None:
        """Checkpoint at ``state["step"]`` and set ``saved_step`` (every process calls it)."""
        ...

    def trained_model(self) -> nn.Module:
        """The unwrapped model the callback gets."""
        ...


def train_steps(run: StepRun) -> tuple[dict[str, float], dict[str, float]]:
    """Run the remaining steps of ``run``, then checkpoint the last one (unless just saved) and evaluate;
    returns the last step's metrics (empty if none ran) and the final evaluation.

    Raises:
        DivergenceError: a step is not finite; the last good state is saved first (not when the step had
            already changed the weights: ``partial``, an online iteration's later minibatch).
        KeyboardInterrupt: after Ctrl-C, once a checkpoint of the last finished step is saved.
    """
    from prefalign.packing import recompute_activations
    from prefalign.train.precision import autocast, subnormals_flushed

    model, in_place = run.lean_target()
    with (
        subnormals_flushed(),
        lean_layers(model, in_place, run.release_every),
        recompute_activations(model, run.config.gradient_checkpointing),
        autocast(run.config.mixed_precision, run.accelerator.device),
    ):
        with run.interrupt:  # (Ctrl-C during the steps: stop after the current one)
            run.begin()
            last = _loop(run)
        save_unless_saved(run)
        final_eval = run.evaluate()
        if final_eval:
            run.writer.write(run.state["step"], final_eval)
    return last, final_eval


def save_unless_saved(run: StepRun) -> None:
    """Checkpoint the run's current step unless that is the newest checkpoint already."""
    if run.saved_step != run.state["step"]:
        run.save()


def _loop(run: StepRun) -> dict[str, float]:
    config, state = run.config, run.state
    bar = tqdm(
        total=run.total,
        initial=state["step"],
        desc=run.name,
        unit=run.unit,
        disable=not config.progress,
        dynamic_ncols=True,
    )
    metrics: dict[str, float] = {}
    while state["step"] < run.total:
        try:
            metrics = run.advance()
        except DivergenceError as err:
            if not err.partial:
                save_unless_saved(run)
            kept = (
                f"The last good state is checkpoints/step-{run.saved_step} in {config.output}"
                if run.saved_step >= 0
                else f"No good state was saved in {config.output} (the step had already changed the weights)"
            )
            raise DivergenceError(
                f"{err}; stopped. {kept}: lower --lr, or resume with --skip-nonfinite to skip such steps"
            ) from None
        state["step"] += 1
        interrupted = _stop_requested(run, metrics)
        _after_step(run, metrics)
        bar.set_postfix(
            {k.split("/")[-1]: f"{metrics[k]:.4g}" for k in run.shown if k in metrics}, refresh=False
        )
        bar.update(1)
        if interrupted:
            save_unless_saved(run)
            bar.close()
            log.warning(
                "stopped at step %d; checkpoint saved in %s/checkpoints", state["step"], config.output
            )
            raise KeyboardInterrupt(f"interrupted at step {state['step']}")
    bar.close()
    return metrics


def _stop_requested(run: StepRun, metrics: dict[str, float]) -> bool:
    """Whether any process got Ctrl-C during the step (every process decides alike)."""
    flag = metrics.pop("_interrupt", None)
    if flag is None:
        (flag,) = sum_over_processes(run.accelerator, float(run.interrupt.requested))
    return flag > 0


def _after_step(run: StepRun, metrics: dict[str, float]) -> None:
    """Metrics, evaluation, checkpoint and callback due after the step just counted."""
    config, step = run.config, run.state["step"]
    last = step == run.total
    at_eval = bool(config.eval_every) and step % config.eval_every == 0
    if step % config.log_every == 0 or last:
        run.writer.write(step, metrics)
    if at_eval and not last:
        evaluated = run.evaluate()
        if evaluated:
            run.writer.write(step, evaluated)
    if config.save_every and step % config.save_every == 0:
        run.save()
    if run.callback is not None and run.accelerator.is_main_process and (at_eval or last):
        run.callback(step, run.trained_model())

"""Progress display for training and evaluation (tqdm).

  bar = TrainProgress(total_steps, initial_step=step)
  wait = DataWait()
  while step < total_steps:
    with wait:                       # time spent waiting for the input
      batch = next(train_iter)
    ...
    bar.update(step, loss=..., lr=..., images_per_sec=...,
               data_wait=wait.share())  # shown at log steps
  bar.close()

The bar shows step/total, ETA and rate (tqdm), and the last scalars given.
It is quiet when stderr is not a terminal (tqdm's ``disable=None``: logs and
CI output stay clean; the trainer's log lines carry the same numbers) and on
every process but process 0 of a multi-host run.
"""
from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm


def _default_enabled() -> bool | None:
  """None (= tqdm decides: on for a terminal) on process 0, False elsewhere."""
  try:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
      return False
  except (ImportError, RuntimeError):
    pass
  return None


def _fmt(value) -> str:
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
      return f"{value:.2e}"
    return f"{value:.4g}"
  return str(value)


_SHORT = {"learning_rate": "lr", "images_per_sec": "img/s",
          "examples_per_sec": "img/s", "data_wait": "data_wait"}


class TrainProgress:
  """A step bar: ``update(step, **scalars)`` jumps to ``step`` (absolute).

  Args:
    total_steps: the run's last step.
    initial_step: where a resumed run starts (the ETA counts from here).
    enabled: True/False to force; None (default): on for a terminal on
      process 0 only.
    desc: the bar's label.
  """

  def __init__(self, total_steps: int, initial_step: int = 0,
               enabled: bool | None = None, desc: str = "train",
               file=None):
    if enabled is None:
      enabled = _default_enabled()
    self.step = int(initial_step)
    self._scalars: dict[str, str] = {}
    self._bar = tqdm(total=int(total_steps), initial=self.step, desc=desc,
                     unit="step", dynamic_ncols=True, smoothing=0.1,
                     disable=None if enabled is None else not enabled,
                     file=file or sys.stderr)

  @property
  def enabled(self) -> bool:
    return not self._bar.disable

  def update(self, step: int, **scalars) -> None:
    """Moves to ``step``; ``scalars`` (loss, lr, images_per_sec, data_wait as
    a 0..1 share, ...) replace the ones shown."""
    for key, value in scalars.items():
      if key == "data_wait" and isinstance(value, float):
        self._scalars["data_wait"] = f"{100 * value:.0f}%"
      else:
        self._scalars[_SHORT.get(key, key)] = _fmt(value)
    if scalars:
      self._bar.set_postfix(self._scalars, refresh=False)
    delta = int(step) - self.step
    self.step = int(step)
    if delta > 0:
      self._bar.update(delta)
    elif scalars:
      self._bar.refresh()

  def set_total(self, total_steps: int) -> None:
    """A new last step (a time budget's plan, known after the window)."""
    self._bar.total = int(total_steps)
    self._bar.refresh()

  def write(self, message: str) -> None:
    """Prints a line above the bar (or plainly when the bar is off)."""
    if self.enabled:
      self._bar.write(message)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class DataWait:
  """Share of wall time spent waiting for input, since the last ``share()``.

  Use as a context manager around ``next(iterator)``.
  """

  def __init__(self):
    self._waited = 0.0
    self._since = time.perf_counter()
    self._t0 = None

  def __enter__(self):
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self._waited += time.perf_counter() - self._t0

  def share(self, reset: bool = True) -> float:
    """Waiting time / wall time (0..1) over the window; starts a new one."""
    now = time.perf_counter()
    total = now - self._since
    share = self._waited / total if total > 0 else 0.0
    if reset:
      self._waited, self._since = 0.0, now
    return min(1.0, share)


def eval_bar(iterable, total: int, *, desc: str = "eval",
             enabled: bool | None = None):
  """``iterable`` wrapped in a batch bar (same quiet rules as TrainProgress)."""
  if enabled is None:
    enabled = _default_enabled()
  return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False,
              dynamic_ncols=True,
              disable=None if enabled is None else not enabled)

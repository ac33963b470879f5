"""The time budget: how many steps fit in ``--config.time_budget``, and the stop.

With a budget (``'30m'``, ``'1h30m'``, ``'90s'`` or seconds; ``''``/``0`` =
off) the run's length comes from the clock, not from ``config.total_steps``:

  1. the trainer compiles its step and trains a short measurement window
     (``window_s`` seconds, at least ``MIN_WINDOW_STEPS`` steps; real steps
     that count as training, the compile excluded: the window starts after
     the first step has finished);
  2. it times one evaluation round (the splits it evaluates while training;
     a second pass, so that the evaluation's compile is excluded) and one
     synchronous checkpoint save at the window's last step;
  3. ``make_plan`` sets the step count so that training, the planned
     evaluations and saves and a safety margin end within what is left of
     the budget, and scales the config's step cadences with it (below);
  4. after each evaluation while training, the rest is planned again
     (``Tracker.replan``) from the pace the steps actually kept since the
     last plan (evaluations and saves excluded), with the evaluation and
     checkpoint cadences kept: the window's 30 s can misjudge a long run's
     pace (on the 2-core Intel VM the FER2013 recipe's steady steps were 5%
     slower than its window's, and two 30-minute runs stopped at 95% and 98%
     of their plans with the learning rate not yet at its end);
  5. while training, ``Deadline`` stops the run early (a final evaluation and
     checkpoint, and a warning that says the schedule did not reach its end)
     if the machine slowed so much that the rest would not fit.

The budget counts wall-clock time from the process's start (as the OS
records it: ``/proc/self/stat``), so the interpreter's and JAX's imports, data
checks, compilation, the window, evaluations and saves all count, as on a
user's stopwatch from pressing Enter; what comes after the last save (the
summary printed, the process exiting) does not.

Scaling, with ``f = plan.total_steps / config.total_steps``: the evaluation
and checkpoint cadences and ``transfer.unfreeze_step`` are multiplied by
``f`` (the run keeps the config's number of evaluations and the same phase
split); ``optimizer.warmup_steps`` is kept as configured (warmup protects
the first absolute steps of Adam; it is capped at the plan's length) and so
is ``log_every_steps``. The learning-rate schedule is the config's with
``total_steps`` replaced, so it ends on the plan's last step. The schedule's
length and ``unfreeze_step`` reach the compiled step as traced arguments:
planning (and planning again) does not compile it again; a new length
moves the cosine's remaining curve by as much as the length changed, without
a jump in the rate larger than that. The window's steps run with the
config's own ``total_steps``: its learning rates are the plan's while the
window is inside the warmup (the usual case), and differ by a cosine factor
within about ``window/total`` of 1 otherwise.

The plan lives in ``W/time_budget.json`` (written whole; ``config.json``
and ``run_contract.json`` are rewritten at every start, the plan is not). A
resumed (or preempted and requeued) run keeps it and does not plan again:
its ``ledger`` records, for each saved step, the budget spent up to that
save, and the resumed process's deadline is its own start plus the budget
less the ledger's entry for the step it resumes from. Start-up and any
steps replayed after a preemption therefore come out of what is left, and a
run preempted late usually ends a little before the schedule's end (with
the warning). Process 0 measures and decides; every process receives the
plan (and each stop decision) by broadcast, so all stop after the same step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from affectjax import fileio

PLAN_NAME = "time_budget.json"
MIN_WINDOW_STEPS = 3
# Planning again needs this many steps paced since the last plan, and keeps
# the plan when the new length differs by less than REPLAN_MIN_CHANGE of it.
MIN_REPLAN_STEPS = 10
REPLAN_MIN_CHANGE = 0.005
# The plan leaves this share of the budget (at least MIN_MARGIN_S) unused,
# for jitter: other processes on the host, a slower input for a while.
MARGIN_FRACTION = 0.03
MIN_MARGIN_S = 2.0
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_FORMAT = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
                     r"(?:(\d+(?:\.\d+)?)s)?$")


class BudgetError(ValueError):
  """A ``--config.time_budget`` that cannot be read (the trainer's ConfigError)."""


def parse(value) -> float:
  """Seconds of ``--config.time_budget``: '30m', '1h30m', '90s', '1800'; 0 = off."""
  if value is None:
    return 0.0
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    seconds = float(value)
  else:
    text = str(value).strip().lower().replace(" ", "")
    if text in ("", "0", "none", "off"):
      return 0.0
    try:
      seconds = float(text)
    except ValueError:
      match = _FORMAT.match(text)
      if not match or not any(match.groups()):
        raise BudgetError(
            f"--config.time_budget={value!r} is not a duration: use e.g. "
            "'30m', '1h30m', '90s' or a number of seconds ('' or 0 = "
            "off).") from None
      seconds = sum(float(g) * u for g, u in zip(match.groups(),
                                                  _UNITS.values()) if g)
  if not math.isfinite(seconds) or seconds < 0:
    raise BudgetError(f"--config.time_budget={value!r} must be a positive "
                      "duration ('' or 0 = off).")
  return seconds


def describe(seconds: float) -> str:
  """'1h30m', '30m', '45s': a budget as a person writes it."""
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s"))
                 if v) or "0s"


def process_start_time() -> float:
  """This process's start, in ``time.time()`` seconds (the OS's record).

  Linux: ``/proc/self/stat``'s start time after boot plus ``/proc/stat``'s
  boot time. Elsewhere: the time this module was imported (the package is
  imported within seconds of the start).
  """
  try:
    with open("/proc/self/stat", encoding="ascii") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[19])  # Field 22 of the man page, after pid and comm.
    with open("/proc/stat", encoding="ascii") as f:
      boot = next(int(line.split()[1]) for line in f
                  if line.startswith("btime "))
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    if started <= time.time():
      return started
  except (OSError, ValueError, IndexError, StopIteration):
    pass
  return _IMPORTED_AT


_IMPORTED_AT = time.time()


@dataclasses.dataclass
class Plan:
  """The run's plan; numbers are per run (all processes), times in seconds."""
  budget_s: float
  total_steps: int  # The last step; the learning-rate schedule ends here.
  eval_every_steps: int
  checkpoint_every_steps: int
  unfreeze_step: int
  warmup_steps: int
  # About a second of steps at the measured pace: the deadline's check
  # interval with several processes (every step with one), and 2 of them
  # are in the margin.
  check_every_steps: int
  step_s: float  # Measured seconds per train step (the window).
  window_steps: int
  window_s: float
  eval_s: float  # One evaluation round while training (measured).
  # One checkpoint save, written synchronously (measured after a first,
  # which sets the checkpointer up). Periodic saves are asynchronous, but
  # their writing competes with training for the CPU: each counts as one.
  save_s: float
  margin_s: float
  planned_at_step: int
  planned_at_s: float  # Budget spent when the plan was made.
  evaluations: int  # Evaluation rounds the plan reserves time for.
  # [[step, budget spent when that step was saved], ...]
  ledger: list = dataclasses.field(default_factory=list)
  # [[step, total_steps before, after, paced seconds per step], ...]: each
  # planning again (the first entry's "before" is the first plan's length).
  replans: list = dataclasses.field(default_factory=list)
  stopped_early_at: int | None = None
  finished_at_s: float | None = None

  _NUMERIC = ("budget_s", "total_steps", "eval_every_steps",
              "checkpoint_every_steps", "unfreeze_step", "warmup_steps",
              "check_every_steps", "step_s", "window_steps", "window_s",
              "eval_s", "save_s", "margin_s", "planned_at_step",
              "planned_at_s", "evaluations")

  def used_at(self, step: int) -> float:
    """Budget spent up to the save of ``step`` (or the latest save before)."""
    spent = [s for st, s in self.ledger if st <= step]
    return float(spent[-1]) if spent else float(self.planned_at_s)

  def record_save(self, step: int, used_s: float) -> None:
    self.ledger = [e for e in self.ledger if e[0] < step] + [
        [int(step), round(float(used_s), 3)]]

  def summary(self) -> str:
    return (f"time budget {describe(self.budget_s)}: {self.total_steps} steps "
            f"at {self.step_s * 1e3:.1f} ms/step (measured over "
            f"{self.window_steps} steps), evaluation every "
            f"{self.eval_every_steps} steps ({self.evaluations} rounds of "
            f"{self.eval_s:.1f} s), checkpoint every "
            f"{self.checkpoint_every_steps} steps ({self.save_s:.1f} s each), "
            f"{self.planned_at_s:.0f} s spent before the plan, "
            f"{self.margin_s:.0f} s margin")

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, obj: dict) -> "Plan":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in obj.items() if k in names})


def apply(config, plan: Plan | None):
  """``config`` with the plan's step counts (a copy; ``config`` unchanged)."""
  if plan is None:
    return config
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.total_steps = int(plan.total_steps)
    out.eval_every_steps = int(plan.eval_every_steps)
    out.checkpoint_every_steps = int(plan.checkpoint_every_steps)
    out.transfer.unfreeze_step = int(plan.unfreeze_step)
    out.optimizer.warmup_steps = int(plan.warmup_steps)
  return out


def window_seconds(budget_s: float) -> float:
  """The measurement window: 2% of the budget, within [1 s, 30 s]."""
  return float(np.clip(0.02 * budget_s, 1.0, 30.0))


def _scaled(value: int, factor: float, *, at_least: int = 1) -> int:
  return max(at_least, int(round(int(value) * factor)))


def _rounds(every: int, start: int, total: int) -> int:
  """Cadence points in [start, total], the last step counted once (the plan
  is made at ``start`` before that step's own evaluation and save)."""
  every = max(1, int(every))
  n = total // every - (start - 1) // every
  return n + (0 if total % every == 0 else 1)


def make_plan(config, *, budget_s: float, spent_s: float, step: int,
              step_s: float, window_steps: int, window_s: float,
              eval_s: float, save_s: float, processes: int = 1,
              cadence: Plan | None = None) -> Plan:
  """The step count and cadences that fit the rest of the budget.

  Args:
    config: the run's config (its cadences and ``total_steps`` give the
      shape scaled to the plan).
    budget_s: the whole budget.
    spent_s: budget spent so far (process start to now, plus earlier
      attempts').
    step: the step trained so far (the window's last).
    step_s: measured seconds per train step.
    window_steps, window_s: the measurement, recorded.
    eval_s: one evaluation round; save_s: one save.
    processes: process count (recorded; the deadline is checked about
      every second: each check waits for the step, and with several
      processes is a broadcast).
    cadence: planning again: the plan whose evaluation and checkpoint
      cadences, unfreeze and warmup steps are kept (``step`` was just
      evaluated and saved; only later rounds are counted).
  """
  del processes  # The same rule for any count.
  step_s = max(float(step_s), 1e-6)
  left = float(budget_s) - float(spent_s)
  # Jitter: MARGIN_FRACTION of the budget (at least MIN_MARGIN_S), plus
  # two deadline checks' worth of steps (about 2 s).
  check_every = max(1, int(round(1.0 / step_s)))
  margin = (max(MARGIN_FRACTION * budget_s, MIN_MARGIN_S)
            + 2 * check_every * step_s)
  base_total = max(1, int(config.total_steps))

  first = step if cadence is None else step + 1  # The first round to count.

  def cost(total: int):
    """(seconds from now to the end, eval cadence, save cadence, rounds)."""
    factor = total / base_total
    if cadence is None:
      eval_every = _scaled(config.eval_every_steps, factor)
      ckpt_every = (_scaled(config.checkpoint_every_steps, factor)
                    if int(config.checkpoint_every_steps) > 0 else 0)
    else:
      eval_every = cadence.eval_every_steps
      ckpt_every = cadence.checkpoint_every_steps
    evals = _rounds(eval_every, first, total)
    saves = evals + (_rounds(ckpt_every, first, total) if ckpt_every else 0)
    seconds = (total - step) * step_s + evals * eval_s + saves * save_s
    return seconds, eval_every, ckpt_every, evals

  # From the steps alone (too many), down until everything fits.
  available = left - margin
  total = step + max(1, int(available / step_s))
  for _ in range(100):
    seconds, eval_every, ckpt_every, evals = cost(total)
    over = seconds - available
    if over <= 0 or total == step + 1:
      break
    total = max(step + 1, total - max(1, math.ceil(over / step_s)))
  # The cost is not monotonic (a length the cadence does not divide adds a
  # final round): the longest run that fits among the next few hundred.
  reach = int(min(10_000, max(100, 4 * (eval_s + save_s) / step_s)))
  for longer in range(total + 1, total + reach + 1):
    option = cost(longer)
    if option[0] <= available:
      total = longer
      seconds, eval_every, ckpt_every, evals = option
  if seconds > available:
    logging.warning(
        "--config.time_budget=%s: only %.0f s were left after start-up and "
        "the measurement, less than one step, an evaluation round and a "
        "save need; training one more step.", describe(budget_s),
        max(left, 0.0))
  factor = total / base_total
  unfreeze = int(config.transfer.unfreeze_step)
  if cadence is not None:
    unfreeze = cadence.unfreeze_step
  elif config.transfer.mode == "two_phase":
    unfreeze = min(int(round(unfreeze * factor)), total - 1)
  return Plan(
      budget_s=float(budget_s), total_steps=int(total),
      eval_every_steps=int(eval_every), checkpoint_every_steps=int(ckpt_every),
      unfreeze_step=int(unfreeze),
      warmup_steps=int(min(int(config.optimizer.warmup_steps), total)
                       if cadence is None else cadence.warmup_steps),
      check_every_steps=int(check_every), step_s=float(step_s),
      window_steps=int(window_steps), window_s=float(window_s),
      eval_s=float(eval_s), save_s=float(save_s), margin_s=float(margin),
      planned_at_step=int(step), planned_at_s=float(spent_s),
      evaluations=int(evals))


# --------------------------------------------------------------------------
# The plan file and the processes' agreement.
# --------------------------------------------------------------------------
def load(workdir) -> Plan | None:
  """``W/time_budget.json``, or None when the run has no plan yet."""
  path = epath.Path(workdir) / PLAN_NAME
  if not path.exists():
    return None
  try:
    return Plan.from_json(json.loads(path.read_text()))
  except (json.JSONDecodeError, TypeError) as e:
    raise BudgetError(
        f"{path} is not a time-budget plan ({e}); delete it to plan the run "
        "again (its learning-rate schedule then restarts from the "
        "config's).") from None


def save(workdir, plan: Plan) -> None:
  """Writes the plan whole (process 0 only)."""
  if jax.process_index() == 0:
    fileio.write_json(epath.Path(workdir) / PLAN_NAME, plan.to_json())


def agree(plan: Plan | None) -> Plan | None:
  """Process 0's plan on every process (None where process 0 has none)."""
  if jax.process_count() == 1:
    return plan
  names = Plan._NUMERIC  # pylint: disable=protected-access
  mine = np.asarray([0.0 if plan is None else 1.0] + [
      0.0 if plan is None else float(getattr(plan, n)) for n in names],
                    np.float64)
  got = np.asarray(multihost_utils.broadcast_one_to_all(mine))
  if got[0] == 0.0:
    return None
  if jax.process_index() == 0:
    return plan
  ints = {f.name for f in dataclasses.fields(Plan) if f.type in ("int", int)}
  return Plan(**{n: int(v) if n in ints else float(v)
                 for n, v in zip(names, got[1:])})


def agree_flag(flag: bool) -> bool:
  """Process 0's ``flag`` on every process."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


class Deadline:
  """When the run must stop for the budget to hold (process 0 decides).

  Checked after a step (``due``): every step with one process; with
  several, about once a second (process 0 names the next check step with
  each answer, from the pace it sees, so a slowdown shortens the interval in
  steps). At a check, process 0 compares the clock with the deadline less
  what a final evaluation and save and the steps until the next check would
  take, scaled by the slowdown seen since the last check.
  """

  def __init__(self, plan: Plan, *, deadline: float):
    self.plan = plan
    self.deadline = float(deadline)  # time.time() seconds.
    self._last = None  # (step, time) of the last check.
    self._next = 0  # The next check's step (several processes).
    self.slowdown = 1.0
    # Steps and seconds between checks (evaluations excluded): the pace.
    self.paced_steps, self.paced_s = 0, 0.0

  def remaining(self) -> float:
    return self.deadline - time.time()

  def due(self, step: int, eval_due: bool) -> bool:
    return eval_due or jax.process_count() == 1 or step >= self._next

  def should_stop(self, step: int) -> bool:
    """True when the final evaluation and save must start now (all processes)."""
    now = time.time()
    if self._last is not None and step > self._last[0]:
      per_step = (now - self._last[1]) / (step - self._last[0])
      self.slowdown = max(1.0, per_step / max(self.plan.step_s, 1e-9))
      self.paced_steps += step - self._last[0]
      self.paced_s += now - self._last[1]
    self._last = (step, now)
    step_s = self.plan.step_s * self.slowdown
    interval = 1 if jax.process_count() == 1 else max(
        1, int(round(1.0 / step_s)))
    reserve = ((self.plan.eval_s + self.plan.save_s) * self.slowdown
               + (interval + 1) * step_s)
    stop = now + reserve >= self.deadline
    if jax.process_count() > 1:
      got = np.asarray(multihost_utils.broadcast_one_to_all(
          np.asarray([int(stop), step + interval], np.int64)))
      stop, self._next = bool(got[0]), int(got[1])
    return stop

  def restart_clock(self) -> None:
    """Forgets the last check (after an evaluation, which is not a step)."""
    self._last = None


# --------------------------------------------------------------------------
# The trainer's side: one object per run.
# --------------------------------------------------------------------------
# The window's steps (before a plan exists) run on a schedule this long: its
# warmup is the plan's, and after the warmup its rate stays within a
# rounding error of the peak, where the plan's cosine starts.
_WINDOW_SCHEDULE_STEPS = 1 << 30


def schedule_args(total_steps: int, unfreeze_step: int, mesh) -> dict:
  """The train step's ``schedule`` argument: int32 scalars, replicated.

  Made by a tiny jitted constant (no host array crosses processes).
  """
  from affectjax import sharding  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  total, unfreeze = int(total_steps), int(unfreeze_step)
  return jax.jit(lambda: {"total_steps": jnp.int32(total),
                          "unfreeze_step": jnp.int32(unfreeze)},
                 out_shardings=sharding.replicated(mesh))()


class Tracker:
  """A run's time budget: the window, the plan, the ledger and the deadline.

  ``active`` is False without a budget (and the trainer then runs as if this
  class did not exist). While ``measuring``, the run has no plan yet and
  ``run_config`` is the config itself (no periodic evaluation or save).
  """

  def __init__(self, config, workdir, *, budget_s: float, started_at: float,
               step: int, mesh):
    self.config = config
    self.workdir = epath.Path(workdir)
    self.started_at = float(started_at)
    self.mesh = mesh
    self.active = budget_s > 0 or (self.workdir / PLAN_NAME).exists()
    self.plan: Plan | None = None
    self.deadline: Deadline | None = None
    self.used_before = 0.0
    self.run_config = config
    self.schedule = None
    self.measuring = False
    self._window = None  # (step, time) when the window started.
    self._in_flight = None  # The metrics of the last step checked.
    if not self.active:
      return
    mine = load(self.workdir) if jax.process_index() == 0 else None
    if budget_s <= 0:
      raise BudgetError(
          f"{self.workdir / PLAN_NAME} holds this run's time-budget plan "
          f"({mine.total_steps if mine else '?'} steps for "
          f"{describe(mine.budget_s) if mine else '?'}) but "
          "--config.time_budget is off: rerun with the same "
          "--config.time_budget to resume it, or use another --workdir.")
    if mine is not None:
      self.used_before = mine.used_at(step)
      if abs(mine.budget_s - budget_s) > 0.5:
        logging.warning(
            "--config.time_budget=%s, but this run was planned for %s "
            "(%s): the plan is kept.", describe(budget_s),
            describe(mine.budget_s), self.workdir / PLAN_NAME)
    self.plan = agree(mine)
    self.budget_s = budget_s if self.plan is None else self.plan.budget_s
    if self.plan is None:
      self.measuring = True
      self.schedule = schedule_args(_WINDOW_SCHEDULE_STEPS,
                                    config.transfer.unfreeze_step, mesh)
      logging.info("Time budget %s: measuring the train step's speed for "
                   "about %.0f s after it compiles.", describe(budget_s),
                   window_seconds(budget_s))
    else:
      self._use(self.plan)
      if jax.process_index() == 0:
        logging.info("Resuming the time-budget plan at step %d: %s; %.0f s "
                     "of the budget left.", step, self.plan.summary(),
                     self.deadline.remaining())

  def spent(self) -> float:
    """Budget spent so far: this process's time plus earlier attempts'."""
    return self.used_before + time.time() - self.started_at

  def _use(self, plan: Plan) -> None:
    self.plan = plan
    self.run_config = apply(self.config, plan)
    self.schedule = schedule_args(plan.total_steps, plan.unfreeze_step,
                                  self.mesh)
    self.deadline = Deadline(
        plan, deadline=self.started_at + plan.budget_s - self.used_before)

  @property
  def finished_early(self) -> bool:
    """The run already stopped at its budget (a rerun only evaluates)."""
    return self.plan is not None and self.plan.stopped_early_at is not None

  def window_done(self, step: int, last_metrics, *, warm_up=None) -> bool:
    """After each step while measuring: True when it is time to plan.

    The first step (the compile) is waited for and not measured; then
    ``warm_up()`` runs, outside the window (the trainer saves a checkpoint:
    a first save sets up the checkpointer, seconds that later saves do not
    take, so the save timed for the plan is a later one).
    """
    if not self.measuring:
      return False
    if self._window is None:
      jax.block_until_ready(last_metrics)
      if warm_up is not None:
        warm_up()
      self._window = (step, time.perf_counter())
      return False
    done = (step - self._window[0] >= MIN_WINDOW_STEPS and
            time.perf_counter() - self._window[1]
            >= window_seconds(self.budget_s))
    return agree_flag(done)

  def make_plan(self, step: int, last_metrics, *, measure_eval,
                measure_save) -> Plan:
    """Ends the window at ``step``, times an evaluation round and a save,
    and plans (process 0; every process gets the same plan).

    ``measure_eval()`` returns an evaluation round's seconds;
    ``measure_save()`` saves ``step`` and returns its seconds.
    """
    jax.block_until_ready(last_metrics)
    window_steps = step - self._window[0]
    window_s = time.perf_counter() - self._window[1]
    eval_s = float(measure_eval())
    save_s = float(measure_save())
    plan = make_plan(
        self.config, budget_s=self.budget_s, spent_s=self.spent(), step=step,
        step_s=window_s / window_steps, window_steps=window_steps,
        window_s=window_s, eval_s=eval_s, save_s=save_s,
        processes=jax.process_count())
    plan = agree(plan)
    self.measuring = False
    self._use(plan)
    if jax.process_index() == 0:
      plan.record_save(step, self.spent())
      save(self.workdir, plan)
    # On every process (each received it from process 0).
    logging.info("Plan: %s.", plan.summary())
    return plan

  def replan(self, step: int) -> Plan | None:
    """After an evaluation and its save at ``step``: the rest planned again.

    Process 0 sets the length from the pace its deadline checks saw since
    the last plan (at least MIN_REPLAN_STEPS steps; evaluations and saves
    are not steps), keeping the cadences; every process gets the same
    plan. Returns the new plan, or None when it is kept (too few steps
    paced, or a change below REPLAN_MIN_CHANGE of the length).
    """
    old = self.plan
    if (self.deadline is None or old is None or step >= old.total_steps
        or self.measuring):
      return None
    mine = None
    paced = self.deadline.paced_steps
    if jax.process_index() == 0 and paced >= MIN_REPLAN_STEPS:
      pace = self.deadline.paced_s / paced
      mine = make_plan(
          self.config, budget_s=old.budget_s, spent_s=self.spent(),
          step=step, step_s=pace, window_steps=old.window_steps,
          window_s=old.window_s, eval_s=old.eval_s, save_s=old.save_s,
          processes=jax.process_count(), cadence=old)
      if abs(mine.total_steps - old.total_steps) < max(
          1, REPLAN_MIN_CHANGE * old.total_steps):
        mine = None
      else:
        # The first plan's measurement and bookkeeping stay.
        mine.window_steps, mine.window_s = old.window_steps, old.window_s
        mine.planned_at_step = old.planned_at_step
        mine.planned_at_s = old.planned_at_s
        mine.evaluations = _rounds(old.eval_every_steps, old.planned_at_step,
                                   mine.total_steps)
        mine.ledger = list(old.ledger)
        mine.replans = list(old.replans) + [
            [int(step), int(old.total_steps), int(mine.total_steps),
             round(pace, 6)]]
    new = agree(mine)
    if new is None:  # The pace keeps accumulating until the next try.
      return None
    if jax.process_index() != 0:  # Process 0's bookkeeping is the file's.
      new.ledger = list(old.ledger)
    self._use(new)
    if jax.process_index() == 0:
      save(self.workdir, new)
    logging.info(
        "Time budget %s: planned again at step %d from the pace since the "
        "last plan (%.1f ms/step, was %.1f): %d steps (was %d).",
        describe(new.budget_s), step, new.step_s * 1e3, old.step_s * 1e3,
        new.total_steps, old.total_steps)
    return new

  def record_save(self, step: int) -> None:
    """Notes the budget spent at a save (the resume's accounting)."""
    if self.plan is not None and jax.process_index() == 0:
      self.plan.record_save(step, self.spent())
      save(self.workdir, self.plan)

  def should_stop(self, step: int, eval_due: bool, last_metrics) -> bool:
    """Whether the budget ends the run after ``step`` (same on all processes).

    Checked after every step (about once a second with several
    processes) and before each evaluation (which
    then becomes the final one when the rest would not fit).
    """
    if self.deadline is None or step >= self.plan.total_steps:
      return False
    if not self.deadline.due(step, eval_due):
      return False
    # The clock must see the steps done: all but this one, which may run
    # on while the host checks (the reserve counts it).
    previous, self._in_flight = self._in_flight, last_metrics
    jax.block_until_ready(previous if previous is not None else last_metrics)
    return self.deadline.should_stop(step)

  def after_eval(self) -> None:
    """An evaluation is not a step: the slowdown estimate skips it."""
    if self.deadline is not None:
      self.deadline.restart_clock()

  def stopped(self, step: int) -> str:
    """Records the early stop; returns the line to log."""
    lr = float(_learning_rate(self.run_config, step - 1))
    self.plan.stopped_early_at = int(step)
    self.record_save(step)
    return (f"Time budget {describe(self.plan.budget_s)} reached: stopped at "
            f"step {step} of the plan's {self.plan.total_steps} (the machine "
            f"ran {self.deadline.slowdown:.1f}x slower than measured), after a "
            f"final evaluation and checkpoint. The learning-rate schedule did "
            f"not reach its end (lr {lr:.2e} at the last step, 0 at step "
            f"{self.plan.total_steps}).")

  def finished(self, step: int) -> None:
    if self.plan is not None and jax.process_index() == 0:
      self.plan.finished_at_s = round(self.spent(), 3)
      self.record_save(step)
      logging.info("Time budget %s: finished %d steps in %.0f s of it.",
                   describe(self.plan.budget_s), step, self.spent())

  def result(self) -> dict | None:
    """For the run's result (``summary.table`` prints it)."""
    if self.plan is None:
      return None
    return {"budget_s": self.plan.budget_s,
            "total_steps": self.plan.total_steps,
            "step_s": self.plan.step_s,
            "stopped_early_at": self.plan.stopped_early_at,
            "spent_s": round(self.spent(), 1)}


def _learning_rate(config, step: int) -> float:
  from affectjax import optim  # pylint: disable=g-import-not-at-top
  return optim.learning_rate(config, max(int(step), 0))

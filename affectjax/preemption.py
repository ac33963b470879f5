"""SIGTERM/SIGINT: stop at a step boundary that every process agrees on.

``train.train_and_evaluate`` runs its loop inside a ``StopRequest``::

  with preemption.StopRequest() as stop:
    while step < total_steps:
      ...one step...
      if stop.should_stop(step):
        ...save synchronously, close, return {"preempted": True, ...}

The first SIGTERM or SIGINT asks the run to stop; the loop finishes the step it
is in, saves and returns, and ``main`` exits 75 (EX_TEMPFAIL, so schedulers
requeue it) saying how to resume. A second signal aborts at once, by the rule
of ``affectjax.signal_rules`` (a second SIGINT; a SIGTERM 2 s or more after
the first, never under SLURM), and so does a run that reaches no step
boundary within ``abort_after_s`` of the first signal (a hung collective).
Signals are seen by a watcher thread on Python's wakeup fd, so even while the
main thread is stuck in C (``signal_rules``).

Several processes (``jax.distributed``): each must stop after the same step, or
the survivors hang in the next collective. JAX's preemption sync manager
(``multihost_utils.reached_preemption_sync_point``) solves that: once any
process publishes a notice under the coordination service key
``RECEIVED_PREEMPTION_NOTICE``, every process publishes the step it is at,
and all of them stop at max + 1 (a background protocol; the per-step check is
local). ``jax.distributed.initialize`` wires it to a C++ SIGTERM handler
(xla's ``SigtermNotifier``) that only records the signal ("SIGTERM caught at
..." in the log): nothing in affectjax ever asked the sync manager, so SIGTERM
was swallowed and ``timeout`` could not stop a 2-process run. Now
``distributed.initialize`` takes SIGTERM back
(``early_signals.reclaim_sigterm``: the early handler, or the default), and
``StopRequest`` publishes the notice itself, for SIGINT too, then asks the
sync manager at every step.

Start-up (``affectjax.early_signals``): a signal before the loop is recorded
there; ``StopRequest.__enter__`` takes it over and, if any process was
signalled, raises ``early_signals.StoppedBeforeStart`` on every process.
"""
from __future__ import annotations

import datetime
import signal
import socket
import sys
import threading
import time

# No module-level JAX import: affectjax.main imports this module before JAX.
from absl import logging

from affectjax import early_signals
from affectjax import signal_rules

# The coordination-service key JAX's preemption sync manager watches
# (xla/pjrt/distributed/preemption/preemption_sync_manager.cc); its value is
# the expected time of death in RFC 3339.
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
# Which signal reached which process, for the message on the other processes.
_SIGNAL_KEY = "affectjax/stop_signal"
_loop_entered = False


def loop_entered() -> bool:
  """Whether a ``StopRequest`` was entered in this process: start-up is over
  and the training loop runs (or ran). ``affectjax.main`` tells a file
  missing at start (the command's input, exit 2) from one that vanished
  during the run (exit 1) by it."""
  return _loop_entered


class StopRequest:
  """Turns SIGTERM/SIGINT into a stop after a step every process agrees on.

  Args:
    signals: the signals that request a stop.
    abort_after_s: after the first signal, abort (exit 128 + signal number)
      if ``should_stop`` has not returned True within this many seconds: the
      loop is hung (a collective waiting for a dead peer). None disables it.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), *,
               abort_after_s: float | None = 300.0):
    self._signals = tuple(signal.Signals(s) for s in signals)
    self._abort_after_s = abort_after_s
    self._lock = threading.Lock()
    self._received: list[signal.Signals] = []
    self._first_at = 0.0  # time.monotonic() of the first signal.
    self._requested = threading.Event()
    self._stopped_at: int | None = None
    self._remote_name: str | None = None
    self._timer: threading.Timer | None = None
    self._installed = False
    self._old_handlers: dict = {}
    self._old_wakeup_fd = -1
    self._sockets: tuple[socket.socket, socket.socket] | None = None
    self._watcher: threading.Thread | None = None
    self._client = None
    self._sync_manager = None

  # ------------------------------------------------------------------
  # Context manager.
  # ------------------------------------------------------------------
  def __enter__(self) -> StopRequest:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      from jax._src import distributed  # pylint: disable=g-import-not-at-top
      self._client = distributed.global_state.client
      self._sync_manager = distributed.global_state.preemption_sync_manager
      if self._client is None or self._sync_manager is None:
        raise RuntimeError(
            "A multi-process run needs JAX's preemption sync manager to stop "
            "every process at the same step: keep jax_enable_preemption_service "
            "on (the default) and start with affectjax.distributed.initialize.")
    if threading.current_thread() is not threading.main_thread():
      logging.warning("StopRequest entered outside the main thread: signal "
                      "handlers cannot be installed here; %s will not stop "
                      "the run cleanly.", "/".join(s.name for s in self._signals))
      return self
    reader, writer = socket.socketpair()
    writer.setblocking(False)  # set_wakeup_fd requires it.
    self._sockets = (reader, writer)
    self._old_wakeup_fd = signal.set_wakeup_fd(writer.fileno(),
                                               warn_on_full_buffer=False)
    for s in self._signals:
      self._old_handlers[s] = signal.signal(s, signal_rules.ignore)
    self._watcher = threading.Thread(target=self._watch, name="StopRequest",
                                     daemon=True)
    self._watcher.start()
    self._installed = True
    # From here on this object's handlers catch every signal; take over what
    # the early handler recorded (and the handlers it replaced, which
    # __exit__ puts back).
    early = early_signals.hand_over()
    if early is not None:
      received, handlers, wakeup_fd = early
      self._old_handlers.update(
          {s: h for s, h in handlers.items() if s in self._old_handlers})
      self._old_wakeup_fd = wakeup_fd
    else:
      received = []
    try:
      before = early_signals.agree_on_start(
          self._client, received[0] if received else None)
    except BaseException:
      self.__exit__(*sys.exc_info())
      raise
    if before is not None:
      logging.warning("Stopping before the first step (%s during start-up): "
                      "nothing new to save.", before)
      self.__exit__(None, None, None)
      raise early_signals.StoppedBeforeStart(before)
    global _loop_entered
    _loop_entered = True
    return self

  def __exit__(self, *exc_info) -> None:
    self._disarm()
    if not self._installed:
      return
    for s, old in self._old_handlers.items():
      # None: the old handler was not set from Python (e.g. XLA's SIGTERM
      # notifier); the default lets SIGTERM end the process again.
      signal.signal(s, old if old is not None else signal.SIG_DFL)
    signal.set_wakeup_fd(self._old_wakeup_fd)
    reader, writer = self._sockets
    try:
      writer.send(b"\0")  # Ends the watcher.
    except OSError:
      pass
    self._watcher.join(timeout=5)
    reader.close()
    writer.close()
    self._installed = False

  # ------------------------------------------------------------------
  # The loop's side.
  # ------------------------------------------------------------------
  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after ``step``; the same answer on every process.

    Call it after every step, with increasing steps, on every process (the
    multi-process protocol counts on it). Cheap: an Event check, or a local
    query of JAX's sync manager.
    """
    if self._sync_manager is not None:
      if not self._sync_manager.reached_sync_point(step):
        return False
    elif not self._requested.is_set():
      return False
    if self._stopped_at is None:
      self._stopped_at = step
      self._disarm()
      if self._sync_manager is not None and not self._received:
        self._remote_name = self._read_remote_name()
      logging.warning("Stopping after step %d (%s): saving a checkpoint.",
                      step, self.signal_name)
    return True

  @property
  def signal_name(self) -> str | None:
    """'SIGTERM', 'SIGINT', 'SIGTERM on process 1', ...; None if no stop."""
    if self._received:
      return self._received[0].name
    return self._remote_name

  def request(self, signum: int = signal.SIGTERM) -> None:
    """Acts as if ``signum`` had arrived (a second call aborts the process)."""
    self._on_signal(signal.Signals(signum))

  # ------------------------------------------------------------------
  # Internals.
  # ------------------------------------------------------------------
  def _watch(self) -> None:
    signal_rules.watch_wakeup_socket(self._sockets[0], self._signals,
                                     self._on_signal)

  def _on_signal(self, signum: signal.Signals) -> None:
    now = time.monotonic()
    with self._lock:
      kind, self._first_at = signal_rules.record(
          self._received, self._first_at, signum, now)
    if kind == "repeat":
      logging.info("%s again %.3f s after the first: the scheduler repeating "
                   "itself, not an abort; still stopping after this step.",
                   signum.name, now - self._first_at)
      return
    if kind == "again":
      self._abort(signum, f"second signal ({signum.name}) while stopping")
      return
    logging.warning(
        "%s received: finishing the current step, then saving a checkpoint "
        "and stopping. %s", signum.name, signal_rules.how_to_abort())
    self._requested.set()
    if self._client is not None:
      self._notify_peers(signum)
    if self._abort_after_s is not None and self._stopped_at is None:
      self._timer = threading.Timer(
          self._abort_after_s, self._abort,
          (signum, f"no step finished within {self._abort_after_s:g} s of "
           f"{signum.name} (a hung collective or a dead peer?)"),
          {"unless_stopped": True})
      self._timer.daemon = True
      self._timer.start()

  def _notify_peers(self, signum: signal.Signals) -> None:
    """Starts JAX's sync protocol on every process through the coordination service."""
    import jax  # pylint: disable=g-import-not-at-top
    name = f"{signum.name} on process {jax.process_index()}"
    death = datetime.datetime.now(datetime.timezone.utc).isoformat()
    for key, value in ((_SIGNAL_KEY, name), (_NOTICE_KEY, death)):
      try:
        self._client.key_value_set(key, value)
      except Exception as e:  # pylint: disable=broad-except
        # ALREADY_EXISTS: another process was signalled first; that is fine.
        if "ALREADY_EXISTS" not in str(e).upper().replace(" ", "_"):
          logging.error("Could not tell the other processes about %s (%s); "
                        "they stop when the coordination service notices "
                        "this process is gone.", signum.name, e)

  def _read_remote_name(self) -> str:
    try:
      return self._client.key_value_try_get(_SIGNAL_KEY)
    except Exception:  # pylint: disable=broad-except
      return "a preemption notice"

  def _disarm(self) -> None:
    timer, self._timer = self._timer, None
    if timer is not None:
      timer.cancel()

  def _abort(self, signum: signal.Signals, reason: str, *,
             unless_stopped: bool = False) -> None:
    """Ends the process now: kills its worker processes, exits 128 + signum."""
    if unless_stopped and self._stopped_at is not None:
      return  # The loop got there after all.
    signal_rules.abort(signum, reason)

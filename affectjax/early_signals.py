"""SIGTERM/SIGINT during a run's start-up, before its training loop exists.

``affectjax.main`` calls ``catch_signals_early`` before anything slow
(importing JAX, ``jax.distributed``, building and compiling the model), so a
scheduler's warning during start-up is not fatal: the signal is recorded (a
second one still aborts at once, by the rule of ``signal_rules``, and so does
a start-up that reaches no ``StopRequest`` within ``abort_after_s``).
``jax.distributed`` replaces the SIGTERM handler with its notifier (see
``affectjax.preemption``); ``distributed.initialize`` puts the early one back
(``reclaim_sigterm``). ``main`` asks, on every process, whether any process
was signalled so far (``stop_if_signalled_during_start_up``); the loop's
``preemption.StopRequest`` then takes over: it installs its own handlers
first (no gap), collects what the early handler recorded (``hand_over``),
and the processes agree (``agree_on_start``, through the coordination
service) whether any of them was signalled. If so, every process raises
``StoppedBeforeStart``: the run stops before its first step, with nothing new
to save, and ``main`` exits with the preemption status (75) like any other
stop. ``StopRequest`` cannot come first because it starts the JAX backend
(``jax.process_count``), which must wait for ``jax.distributed``.
"""
from __future__ import annotations

import itertools
import signal
import socket
import threading
import time

# No module-level JAX import: ``catch_signals_early`` runs before JAX is
# imported (which takes seconds).
from absl import logging

from affectjax import signal_rules

# How long the processes wait for each other to agree, at a StopRequest's
# start, whether one was signalled during start-up (they are at the same
# point of start-up by then, so this is a dead peer's bound, not a pace).
_START_BARRIER_S = 600
_entries = itertools.count()  # Agreements so far, for unique barrier ids.


class StoppedBeforeStart(Exception):
  """Raised by ``StopRequest.__enter__`` when a process was signalled during
  start-up: the run stops before its first step (every process raises it).

  ``signal_name``: 'SIGTERM', or 'SIGTERM on process 1' on the others.
  """

  def __init__(self, signal_name: str):
    super().__init__(f"stopped by {signal_name} before the first step")
    self.signal_name = signal_name


def agree_on_start(client, received: signal.Signals | None) -> str | None:
  """Which signal stopped the run during start-up, on any process; None if
  none. Every process gets the same answer: each publishes its own (or
  nothing), all meet at a barrier, then all read what was published. A
  signal after this process published counts at the next agreement (or is
  handled as during training). ``client``: JAX's coordination client; None
  for one process."""
  if client is None:
    return received.name if received is not None else None
  import jax  # pylint: disable=g-import-not-at-top
  me, n = jax.process_index(), next(_entries)
  prefix = f"affectjax/start_{n}/signalled/"
  if received is not None:
    client.key_value_set(f"{prefix}{me}", f"{received.name} on process {me}")
  client.wait_at_barrier(f"affectjax_start_{n}", _START_BARRIER_S * 1000)
  if received is not None:
    return received.name
  published = sorted(value for _, value in client.key_value_dir_get(prefix))
  return published[0] if published else None


def stop_if_signalled_during_start_up() -> None:
  """Raises ``StoppedBeforeStart`` (on every process) if the early handler
  caught a signal on any process so far; nothing without one.

  A point of start-up every process reaches (``main``, before building the
  run), so a stop there does not wait for the model to be built. Call it
  after ``distributed.initialize``, on every process.
  """
  if not _EARLY.installed:
    return
  import jax  # pylint: disable=g-import-not-at-top
  client = None
  if jax.process_count() > 1:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
  received = _EARLY.first_received()
  before = agree_on_start(client, received)
  if before is not None:
    logging.warning("Stopping before the first step (%s during start-up): "
                    "nothing new to save.", before)
    raise StoppedBeforeStart(before)


class _EarlySignals:
  """SIGTERM/SIGINT from a run's first moment until a ``StopRequest`` exists.

  Records the signals (a watcher thread reads them from Python's wakeup fd,
  so it reacts even while the main thread is inside a long C call: an
  import, a compile, ``jax.distributed`` waiting for its peers). A second
  one aborts at once by ``signal_rules.record``'s rule (a second SIGINT; a
  SIGTERM 2 s or more after the first, never under SLURM: one sooner is the
  scheduler repeating itself), as does a start-up that reaches no
  ``StopRequest`` within ``abort_after_s`` of the first. See the module doc.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._signals: tuple[signal.Signals, ...] = ()
    self._received: list[signal.Signals] = []
    self._first_at = 0.0
    self._handlers: dict = {}
    self._wakeup_fd = -1
    self._sockets: tuple[socket.socket, socket.socket] | None = None
    self._watcher: threading.Thread | None = None
    self._timer: threading.Timer | None = None
    self._abort_after_s: float | None = None

  @property
  def installed(self) -> bool:
    return self._sockets is not None

  def install(self, signals, abort_after_s: float | None) -> None:
    if self.installed:
      return
    if threading.current_thread() is not threading.main_thread():
      return
    self._signals = tuple(signal.Signals(s) for s in signals)
    self._abort_after_s = abort_after_s
    reader, writer = socket.socketpair()
    writer.setblocking(False)  # set_wakeup_fd requires it.
    self._sockets = (reader, writer)
    self._wakeup_fd = signal.set_wakeup_fd(writer.fileno(),
                                           warn_on_full_buffer=False)
    for s in self._signals:
      self._handlers[s] = signal.signal(s, signal_rules.ignore)
    self._watcher = threading.Thread(target=self._watch, daemon=True,
                                     name="EarlySignals")
    self._watcher.start()

  def first_received(self) -> signal.Signals | None:
    with self._lock:
      return self._received[0] if self._received else None

  def reclaim(self) -> None:
    """Puts this object's handler back where something replaced it (XLA's
    SIGTERM notifier in ``jax.distributed.initialize``)."""
    if self.installed and threading.current_thread() is threading.main_thread():
      for s in self._signals:
        signal.signal(s, signal_rules.ignore)

  def hand_over(self):
    """Ends this handler; returns (signals received, the handlers and
    wakeup fd it replaced), or None if it was not installed.

    Called once the caller's own handlers and wakeup fd are in place:
    bytes already written to this object's socket are read to the end
    before it closes, so no signal is lost between the two.
    """
    if not self.installed:
      return None
    reader, writer = self._sockets
    try:
      writer.send(b"\0")  # Ends the watcher after what is already queued.
    except OSError:
      pass
    self._watcher.join(timeout=5)
    reader.close()
    writer.close()
    with self._lock:
      timer, self._timer = self._timer, None
      received = list(self._received)
    if timer is not None:
      timer.cancel()
    result = (received, dict(self._handlers), self._wakeup_fd)
    self.__init__()  # pylint: disable=unnecessary-dunder-call
    return result

  def _watch(self) -> None:
    signal_rules.watch_wakeup_socket(self._sockets[0], self._signals,
                                     self._on_signal)

  def _on_signal(self, signum: signal.Signals) -> None:
    with self._lock:
      kind, self._first_at = signal_rules.record(self._received,
                                                 self._first_at, signum,
                                                 time.monotonic())
    if kind == "repeat":
      logging.info("%s again: the scheduler repeating itself, not an "
                   "abort.", signum.name)
      return
    if kind == "again":
      signal_rules.abort(signum,
                         f"second signal ({signum.name}) during start-up")
      return
    logging.warning(
        "%s received during start-up: the run stops before its first step "
        "(nothing new to save). %s", signum.name, signal_rules.how_to_abort())
    if self._abort_after_s is not None:
      timer = threading.Timer(
          self._abort_after_s, signal_rules.abort,
          (signum, f"start-up did not finish within {self._abort_after_s:g} s "
           f"of {signum.name}"))
      timer.daemon = True
      with self._lock:
        self._timer = timer
      timer.start()


_EARLY = _EarlySignals()


def catch_signals_early(signals=(signal.SIGTERM, signal.SIGINT), *,
                        abort_after_s: float | None = 300.0) -> None:
  """Records SIGTERM/SIGINT from now until a ``StopRequest`` takes over.

  For a run's first moment (``affectjax.main``, before importing JAX); see
  the module doc. Main thread only (elsewhere it does nothing); idempotent.
  """
  _EARLY.install(signals, abort_after_s)


def reclaim_sigterm() -> None:
  """After ``jax.distributed.initialize``: SIGTERM is handled by us again.

  ``jax.distributed.initialize`` installs a C++ SIGTERM handler (XLA's
  notifier) that only records the signal for ``reached_preemption_sync_point``;
  outside a ``StopRequest`` nobody asks, so SIGTERM would be swallowed. The
  early handler comes back if ``catch_signals_early`` installed one, else
  the default (SIGTERM ends the process). Main thread only.
  """
  if threading.current_thread() is not threading.main_thread():
    return
  if _EARLY.installed:
    _EARLY.reclaim()
  else:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def hand_over():
  """Ends the early handler (for ``StopRequest``, once its own handlers and
  wakeup fd are in place); returns (signals received, the handlers and
  wakeup fd it replaced), or None if it was not installed."""
  return _EARLY.hand_over()

"""SIGTERM/SIGINT: stop at a step boundary that every process agrees on.

``train.train_and_evaluate`` runs its loop inside a ``StopRequest``::

  with preemption.StopRequest() as stop:
    while step < total_steps:
      ...one step...
      if stop.should_stop(step):
        ...save synchronously, close, return {"preempted": True, ...}

The first SIGTERM or SIGINT asks the run to stop; the loop finishes the step it
is in, saves and returns, and ``main`` exits 75 (EX_TEMPFAIL, so schedulers
requeue it) saying how to resume. A second signal aborts at once (exit 128 +
signal number), so a user is never stuck behind a slow save or a hung peer:
a second SIGINT whenever it comes, a SIGTERM only ``SCHEDULER_REPEAT_S``
(2 s) or more after the first (one sooner is SLURM repeating itself, not a
second request, and is ignored). So does a run that reaches no step boundary
within ``abort_after_s`` of the first signal (a hung collective).

Why not Python's ``signal.signal`` alone: a handler registered that way runs
only when the main thread is back in Python, which a hung collective never
does. The C-level handler that Python installs writes the signal number into
``signal.set_wakeup_fd`` immediately, so a watcher thread reacts even then.

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
``distributed.initialize`` takes SIGTERM back (``reclaim_sigterm``: the early
handler below, or the default), and ``StopRequest`` publishes the notice itself,
for SIGINT too, then asks the sync manager at every step.

Start-up. ``affectjax.main`` calls ``catch_signals_early`` before anything
slow (importing JAX, ``jax.distributed``, building and compiling the
model), so a scheduler's warning during start-up is not fatal: the signal is
recorded (a second one still aborts at once, by the same 2-second rule as
during training, and so does a start-up that reaches no ``StopRequest``
within ``abort_after_s``). ``jax.distributed``
replaces the SIGTERM handler with its notifier; ``distributed.initialize``
puts the early one back (``reclaim_sigterm``). The ``StopRequest`` then
takes over: it installs its own handlers first (no gap), collects what the
early handler recorded, and the processes agree (through the coordination
service) whether any of them was signalled. If so, every process's
``__enter__`` raises ``StoppedBeforeStart``: the run stops before its first
step, with nothing new to save, and ``main`` exits with the preemption status
(75) like any other stop. ``StopRequest`` cannot come first because it
starts the JAX backend (``jax.process_count``), which must wait for
``jax.distributed``.
"""
from __future__ import annotations

import datetime
import itertools
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

# No module-level JAX import: ``catch_signals_early`` runs before JAX is
# imported (which takes seconds).
from absl import logging

# The coordination-service key JAX's preemption sync manager watches
# (xla/pjrt/distributed/preemption/preemption_sync_manager.cc); its value is
# the expected time of death in RFC 3339.
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
# Which signal reached which process, for the message on the other processes.
_SIGNAL_KEY = "affectjax/stop_signal"
# How long the processes wait for each other to agree, at a StopRequest's
# start, whether one was signalled during start-up (they are at the same
# point of start-up by then, so this is a dead peer's bound, not a pace).
_START_BARRIER_S = 600
# A SIGTERM this soon after the first is the scheduler repeating itself, not
# a person asking to abort: SLURM sends SIGTERM, SIGCONT and SIGTERM within a
# few milliseconds when a job reaches its time limit or is preempted without
# a grace time, and the run must still save. A second SIGINT (Ctrl-C) aborts
# at once whatever the interval.
SCHEDULER_REPEAT_S = 2.0


def _under_slurm() -> bool:
  """Whether SLURM runs this process (``SLURM_JOB_ID``). Then a later SIGTERM
  never aborts either: SLURM and the batch script may pass on one request
  seconds apart (examples/slurm/train.sbatch forwards a SIGTERM its shell
  gets, which SLURM may also have sent to the tasks), and SLURM itself
  ends a run that does not stop in time (SIGKILL after KillWait or the
  preemption's grace time). A second SIGINT still aborts."""
  return bool(os.environ.get("SLURM_JOB_ID"))


def _how_to_abort() -> str:
  """What the first signal's log line tells a person who wants out now."""
  if _under_slurm():
    return ("To abort without saving: Ctrl-C again, or `scancel "
            "--signal=KILL` (under SLURM a repeated SIGTERM does not abort).")
  return (f"To abort without saving: Ctrl-C again, or SIGTERM again "
          f"{SCHEDULER_REPEAT_S:g} s or more after the first.")


def _watch_wakeup_socket(reader: socket.socket, signals, on_signal) -> None:
  """A watcher thread's loop: each signal number Python's C handler wrote to
  the wakeup socket goes to ``on_signal``, until a 0 byte (the owner's
  sentinel on hand-over or exit) or the socket closes."""
  while True:
    try:
      data = reader.recv(64)
    except OSError:
      return
    if not data:
      return
    for b in data:
      if b == 0:
        return
      if b in signals:
        on_signal(signal.Signals(b))


def _record(received: list, first_at: float, signum: signal.Signals,
            now: float) -> tuple[str, float]:
  """Appends ``signum`` to ``received`` unless it is the scheduler repeating
  the first SIGTERM (within ``SCHEDULER_REPEAT_S``, or at any time under
  SLURM: ``_under_slurm``); returns ('first' | 'again' | 'repeat', the time
  of the first signal). Called under the handler's lock."""
  if (received and received[0] == signum == signal.SIGTERM
      and (now - first_at < SCHEDULER_REPEAT_S or _under_slurm())):
    return "repeat", first_at
  received.append(signum)
  return ("first", now) if len(received) == 1 else ("again", first_at)
_entries = itertools.count()  # StopRequests entered, for unique barrier ids.
_loop_entered = False


def loop_entered() -> bool:
  """Whether a ``StopRequest`` was entered in this process: start-up is over
  and the training loop runs (or ran). ``affectjax.main`` tells a file
  missing at start (the command's input, exit 2) from one that vanished
  during the run (exit 1) by it."""
  return _loop_entered


class StoppedBeforeStart(Exception):
  """Raised by ``StopRequest.__enter__`` when a process was signalled during
  start-up: the run stops before its first step (every process raises it).

  ``signal_name``: 'SIGTERM', or 'SIGTERM on process 1' on the others.
  """

  def __init__(self, signal_name: str):
    super().__init__(f"stopped by {signal_name} before the first step")
    self.signal_name = signal_name


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
      self._old_handlers[s] = signal.signal(s, _ignore)
    self._watcher = threading.Thread(target=self._watch, name="StopRequest",
                                     daemon=True)
    self._watcher.start()
    self._installed = True
    # From here on this object's handlers catch every signal; take over what
    # the early handler recorded (and the handlers it replaced, which
    # __exit__ puts back).
    early = _EARLY.hand_over()
    if early is not None:
      received, handlers, wakeup_fd = early
      self._old_handlers.update(
          {s: h for s, h in handlers.items() if s in self._old_handlers})
      self._old_wakeup_fd = wakeup_fd
    else:
      received = []
    try:
      before = _agree_on_start(self._client, received[0] if received else None)
    except BaseException:
      self.__exit__(*sys.exc_info())
      raise
    if before is not None:
      logging.warning("Stopping before the first step (%s during start-up): "
                      "nothing new to save.", before)
      self.__exit__(None, None, None)
      raise StoppedBeforeStart(before)
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
    _watch_wakeup_socket(self._sockets[0], self._signals, self._on_signal)

  def _on_signal(self, signum: signal.Signals) -> None:
    now = time.monotonic()
    with self._lock:
      kind, self._first_at = _record(self._received, self._first_at, signum,
                                     now)
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
        "and stopping. %s", signum.name, _how_to_abort())
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
    _abort(signum, reason)


def _abort(signum: signal.Signals, reason: str) -> None:
  """Ends the process now: kills its worker processes, exits 128 + signum."""
  code = 128 + int(signum)
  sys.stderr.write(f"affectjax: {reason}: aborting without saving (exit "
                   f"{code}). The last completed checkpoint is kept; rerun "
                   "the same command to resume from it.\n")
  sys.stderr.flush()
  for child in multiprocessing.active_children():
    child.kill()
  os._exit(code)  # pylint: disable=protected-access


def _ignore(signum, frame) -> None:  # pylint: disable=unused-argument
  """The Python-level handler; the watcher thread does the work (see module doc)."""


def _agree_on_start(client, received: signal.Signals | None) -> str | None:
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
  before = _agree_on_start(client, received)
  if before is not None:
    logging.warning("Stopping before the first step (%s during start-up): "
                    "nothing new to save.", before)
    raise StoppedBeforeStart(before)


class _EarlySignals:
  """SIGTERM/SIGINT from a run's first moment until a ``StopRequest`` exists.

  Records the signals (a watcher thread reads them from Python's wakeup fd,
  so it reacts even while the main thread is inside a long C call: an
  import, a compile, ``jax.distributed`` waiting for its peers). A second
  one aborts at once (a second SIGINT; a SIGTERM ``SCHEDULER_REPEAT_S`` or
  more after the first: one sooner is the scheduler repeating itself), as
  does a start-up that reaches no ``StopRequest`` within ``abort_after_s``
  of the first. See the module doc.
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
      self._handlers[s] = signal.signal(s, _ignore)
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
        signal.signal(s, _ignore)

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
    _watch_wakeup_socket(self._sockets[0], self._signals, self._on_signal)

  def _on_signal(self, signum: signal.Signals) -> None:
    with self._lock:
      kind, self._first_at = _record(self._received, self._first_at, signum,
                                     time.monotonic())
    if kind == "repeat":
      logging.info("%s again: the scheduler repeating itself, not an "
                   "abort.", signum.name)
      return
    if kind == "again":
      _abort(signum, f"second signal ({signum.name}) during start-up")
      return
    logging.warning(
        "%s received during start-up: the run stops before its first step "
        "(nothing new to save). %s", signum.name, _how_to_abort())
    if self._abort_after_s is not None:
      timer = threading.Timer(
          self._abort_after_s, _abort,
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

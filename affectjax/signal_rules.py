"""What SIGTERM and SIGINT mean to a run, and how a handler sees them in time.

Shared by the two phases that catch them: a run's start-up
(``affectjax.early_signals``) and its training loop
(``affectjax.preemption.StopRequest``).

* The first signal asks the run to stop. A second one aborts at once (exit
  128 + signal number, ``abort``), so a user is never stuck behind a slow
  save or a hung peer: a second SIGINT whenever it comes, a SIGTERM only
  ``SCHEDULER_REPEAT_S`` (2 s) or more after the first, and never under
  SLURM (``under_slurm``): a repeated SIGTERM is then the same request
  (``record`` applies the rule).
* Why not Python's ``signal.signal`` alone: a handler registered that way
  runs only when the main thread is back in Python, which a hung collective
  or a long import never is. The C-level handler that Python installs writes
  the signal number into ``signal.set_wakeup_fd`` immediately, so a watcher
  thread (``watch_wakeup_socket``) reacts even then; the Python-level
  handler (``ignore``) does nothing.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys

# A SIGTERM this soon after the first is the scheduler repeating itself, not
# a person asking to abort: SLURM sends SIGTERM, SIGCONT and SIGTERM within a
# few milliseconds when a job reaches its time limit or is preempted without
# a grace time, and the run must still save. A second SIGINT (Ctrl-C) aborts
# at once whatever the interval.
SCHEDULER_REPEAT_S = 2.0


def under_slurm() -> bool:
  """Whether SLURM runs this process (``SLURM_JOB_ID``). Then a later SIGTERM
  never aborts either: SLURM and the batch script may pass on one request
  seconds apart (examples/slurm/train.sbatch forwards a SIGTERM its shell
  gets, which SLURM may also have sent to the tasks), and SLURM itself
  ends a run that does not stop in time (SIGKILL after KillWait or the
  preemption's grace time). A second SIGINT still aborts."""
  return bool(os.environ.get("SLURM_JOB_ID"))


def how_to_abort() -> str:
  """What the first signal's log line tells a person who wants out now."""
  if under_slurm():
    return ("To abort without saving: Ctrl-C again, or `scancel "
            "--signal=KILL` (under SLURM a repeated SIGTERM does not abort).")
  return (f"To abort without saving: Ctrl-C again, or SIGTERM again "
          f"{SCHEDULER_REPEAT_S:g} s or more after the first.")


def watch_wakeup_socket(reader: socket.socket, signals, on_signal) -> None:
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


def record(received: list, first_at: float, signum: signal.Signals,
           now: float) -> tuple[str, float]:
  """Appends ``signum`` to ``received`` unless it is the scheduler repeating
  the first SIGTERM (within ``SCHEDULER_REPEAT_S``, or at any time under
  SLURM: ``under_slurm``); returns ('first' | 'again' | 'repeat', the time
  of the first signal). Called under the handler's lock."""
  if (received and received[0] == signum == signal.SIGTERM
      and (now - first_at < SCHEDULER_REPEAT_S or under_slurm())):
    return "repeat", first_at
  received.append(signum)
  return ("first", now) if len(received) == 1 else ("again", first_at)


def abort(signum: signal.Signals, reason: str) -> None:
  """Ends the process now: kills its worker processes, exits 128 + signum."""
  code = 128 + int(signum)
  sys.stderr.write(f"affectjax: {reason}: aborting without saving (exit "
                   f"{code}). The last completed checkpoint is kept; rerun "
                   "the same command to resume from it.\n")
  sys.stderr.flush()
  for child in multiprocessing.active_children():
    child.kill()
  os._exit(code)  # pylint: disable=protected-access


def ignore(signum, frame) -> None:  # pylint: disable=unused-argument
  """The Python-level handler; the watcher thread does the work (module doc)."""

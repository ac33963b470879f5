"""A local Google Cloud Storage emulator for tests, in its own process.

``Emulator`` starts ``gcp-storage-emulator``'s HTTP JSON API (from PyPI; the
``test`` extra installs it) in a child process bound to 127.0.0.1 on a free
port, with in-memory storage, and creates the buckets asked for. The child
stops by itself when its parent exits or when its deadline passes, so a
killed test run leaves no server behind; ``stop()`` (or leaving the ``with``
block) ends it at once.

``env()`` is what points every GCS client affectjax uses at it:
- ``STORAGE_EMULATOR_HOST``: gcsfs (etils.epath's ``gs://`` backend through
  fsspec) and google-cloud-storage (Orbax asks it whether a bucket has a
  hierarchical namespace before deleting an old checkpoint). Both send no
  credentials when it is set.
- ``TENSORSTORE_GCS_HTTP_URL``: tensorstore's ``gcs`` kvstore (Orbax's array
  data). It still looks for Google credentials and sends any it finds, so
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` gives it a fixed dummy token: the test
  neither depends on nor sends the machine's own (an ADC file, a VM's
  metadata server).
- ``CLOUD_STORAGE_EMULATOR_ENDPOINT``: google-cloud-cpp, which ArrayRecord's
  reader links for ``gs://`` shards.
- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs's plain filesystem.
  Its default asks the Storage Control gRPC API (which the emulator lacks)
  for each bucket's layout and, failing, asks again on every call.

Run as a script (``python tests/gcs_emulator.py --deadline_s=N``) it is the
child: it prints ``{"port": P}`` on one line once the server listens.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http
import http.server
import json
import os
import select
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"


def _generation(storage, bucket: str, name: str) -> str | None:
  """The live object's generation, or None when there is none."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return None


def _conditional(handler, *, read: bool):
  """``handler`` with GCS's generation preconditions, which the emulator
  ignores: ``ifGenerationMatch`` (0: the object must not exist) fails with
  412; on reads ``ifGenerationNotMatch`` answers 304, and a served object
  carries ``x-goog-generation``, the header tensorstore takes a read's
  generation from (without it every read looks like generation 0, and the
  OCDBT manifest's next conditional write fails as "Malformed
  StorageGeneration"). The server is single-threaded, so check and write
  are atomic, as on GCS."""
  def wrapped(request, response, storage, *args, **kwargs):
    query, params = request.query, request.params
    bucket = params["bucket_name"]
    name = params.get("object_id") or (query.get("name") or [None])[0]
    if name is None and not read and isinstance(request.data, dict):
      # A multipart upload (google-cloud-storage's upload_from_string) names
      # its object in the metadata part; a resumable one in the body.
      name = (request.data.get("meta") or {}).get("name") or request.data.get(
          "name")
    if name is not None:
      current = _generation(storage, bucket, name)
      match = (query.get("ifGenerationMatch") or [None])[0]
      not_match = (query.get("ifGenerationNotMatch") or [None])[0]
      if match is not None and not (read and current is None) and (
          match != (current or "0")):
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        return
      if read and not_match is not None and not_match == current:
        response.status = http.HTTPStatus.NOT_MODIFIED
        response["x-goog-generation"] = current
        return
    handler(request, response, storage, *args, **kwargs)
    if read and name is not None and response.status in (
        http.HTTPStatus.OK, http.HTTPStatus.PARTIAL_CONTENT):
      response["x-goog-generation"] = _generation(storage, bucket, name)
      response["x-goog-metageneration"] = "1"
  return wrapped


def _complete_emulator(emu_server, emu_objects) -> None:
  """Adds the parts of the GCS JSON API that our clients use and the
  emulator lacks (real GCS has all of them):

  - generation preconditions and the ``x-goog-generation`` read header
    (``_conditional``), which tensorstore's ``gcs`` driver needs;
  - ``objects.moveTo`` (same-bucket move): gcsfs renames with it, and falls
    back to copy + delete only after retrying the emulator's 501 six times
    with backoff (about half a minute per rename). Here it is the emulator's
    own copy, then its own delete.
  """
  def move(request, response, storage, *args, **kwargs):
    request.params["dest_bucket_name"] = request.params["bucket_name"]
    emu_objects.copy(request, response, storage)
    if response.status == http.HTTPStatus.OK:
      emu_objects.delete(request, response, storage)

  # ``get`` (``alt=media``) calls the module's ``download`` by name.
  original_download = emu_objects.download
  emu_objects.download = _conditional(original_download, read=True)
  wrap = {original_download: emu_objects.download,
          emu_objects.insert: _conditional(emu_objects.insert, read=False),
          emu_objects.delete: _conditional(emu_objects.delete, read=False)}
  move_route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/"
                r"(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
                {"POST": move})
  emu_server.HANDLERS = (move_route,) + tuple(
      (regex, {m: wrap.get(f, f) for m, f in handlers.items()})
      for regex, handlers in emu_server.HANDLERS)


class _HTTPServer(http.server.HTTPServer):
  """One request at a time (the emulator's storage is not thread-safe), but a
  deep accept queue: tensorstore opens dozens of connections at once, and
  the default backlog of 5 would make the rest wait for SYN retries."""
  request_queue_size = 256

  def handle_error(self, request, client_address):
    # A client that stops reading once it has the bytes it wanted (a ranged
    # read of a shard) is normal, not an error worth a traceback in the log.
    if not isinstance(sys.exc_info()[1], (BrokenPipeError,
                                          ConnectionResetError)):
      super().handle_error(request, client_address)


def _serve(deadline_s: float, buckets: list[str]) -> None:
  """Child process: serve until the parent is gone or the deadline passes."""
  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server as emu_server
  from gcp_storage_emulator.handlers import buckets as emu_buckets
  from gcp_storage_emulator.handlers import objects as emu_objects
  from gcp_storage_emulator.storage import Storage

  _complete_emulator(emu_server, emu_objects)
  parent = os.getppid()
  storage = Storage(use_memory_fs=True, data_dir=os.getcwd())
  for name in buckets:
    emu_buckets.create_bucket(name, storage)
  httpd = _HTTPServer(
      (HOST, 0), functools.partial(emu_server.RequestHandler, storage))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  print(json.dumps({"port": httpd.server_address[1]}), flush=True)
  end = time.monotonic() + deadline_s
  while time.monotonic() < end and os.getppid() == parent:
    time.sleep(0.2)
  httpd.shutdown()
  httpd.server_close()


class Emulator:
  """The emulator child process; ``url`` and ``env()`` once started."""

  def __init__(self, log_path, buckets=("bucket",), deadline_s: float = 600.0,
               start_timeout_s: float = 30.0):
    self.log_path = os.fspath(log_path)
    self.buckets = list(buckets)
    self.deadline_s = deadline_s
    self.start_timeout_s = start_timeout_s
    self.proc: subprocess.Popen | None = None
    self.url = ""

  def start(self) -> "Emulator":
    # The child's errors go to a file, not a pipe nobody drains (a full pipe
    # would block the server).
    with open(self.log_path, "ab") as log:
      self.proc = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__),
           f"--deadline_s={self.deadline_s}",
           *(f"--bucket={b}" for b in self.buckets)],
          stdout=subprocess.PIPE, stderr=log, text=True,
          cwd=os.path.dirname(os.path.abspath(self.log_path)))
    ready, _, _ = select.select([self.proc.stdout], [], [],
                                self.start_timeout_s)
    line = self.proc.stdout.readline() if ready else ""
    if not line:
      self.stop()
      raise RuntimeError("the GCS emulator did not start within "
                         f"{self.start_timeout_s} s (is gcp-storage-emulator "
                         f"installed? pip install -e '.[test]'):\n"
                         f"{self.log()}")
    self.url = f"http://{HOST}:{json.loads(line)['port']}"
    return self

  def env(self) -> dict[str, str]:
    """Environment variables that send every GCS client here."""
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def log(self) -> str:
    """The child's stderr so far (for failure messages)."""
    try:
      with open(self.log_path, errors="replace") as f:
        return f.read()[-5000:]
    except OSError:
      return ""

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(timeout=10)
    if self.proc is not None:
      with contextlib.suppress(Exception):
        self.proc.stdout.close()

  def __enter__(self) -> "Emulator":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--deadline_s", type=float, default=600.0)
  parser.add_argument("--bucket", action="append", default=[])
  args = parser.parse_args()
  _serve(args.deadline_s, args.bucket)


if __name__ == "__main__":
  main()

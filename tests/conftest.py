"""Test-wide environment: 8 fake CPU devices for sharding tests, Keras on JAX.

These must be set before jax (or keras) is first imported, which is why they
live at module top level of the root conftest rather than in a fixture.
"""
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "jax")
# 8 fake CPU devices; LLVM at -O0: the suite's time is mostly XLA compiling
# tiny models, which -O0 cuts by about a quarter (convolutions run in Eigen,
# unaffected; float semantics are IEEE at every level). Subprocesses that
# copy os.environ inherit both.
for _flag in ("--xla_force_host_platform_device_count=8",
              "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# Eigen convolutions, as every entry point runs them (affectjax/xla_cpu.py).
# (Importing affectjax also sets malloc as every entry point has it:
# affectjax/host_malloc.py.)
from affectjax import xla_cpu  # noqa: E402
xla_cpu.configure()

# The decoded-image cache goes to a directory of this test run, never the
# user's ~/.cache: set here, in the process that starts the xdist workers, so
# every worker and every subprocess a test starts shares it.
if "AFFECTJAX_CACHE_DIR" not in os.environ:
  os.environ["AFFECTJAX_CACHE_DIR"] = _OWN_CACHE = tempfile.mkdtemp(
      prefix="affectjax-test-cache-")
else:
  _OWN_CACHE = None

import pytest  # noqa: E402


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def procs():
  """Subprocesses a test started (append them); any still running at
  teardown are killed, so no trainer outlives its test."""
  started = []
  yield started
  for p in started:
    if p.poll() is None:
      p.kill()
      p.wait()


@pytest.fixture(scope="session")
def synthetic_arrayrecord(tmp_path_factory):
  """A small synthetic AffectNet, generated and prepared once per session.

  Returns the prepared directory (ArrayRecord shards + manifest.json).
  """
  from data_prep import affectnet, synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(root / "raw"), num_train=160, num_val=52, seed=0)
  affectnet.prepare(str(root / "raw"), str(root / "prepared"), image_size=24,
                    num_workers=1)
  return str(root / "prepared")


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session (never the user's).

  Many tests train the same tiny configs more than once (a run, its resume,
  the evaluate tool reopening it); programs that take over a second to
  compile are then compiled once. Subprocess runs get their own cache flag.
  """
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    str(tmp_path_factory.mktemp("jax_cache")))
  yield

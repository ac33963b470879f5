"""affectjax.xla_cpu: Eigen convolutions on XLA:CPU, the user's XLA_FLAGS first."""
import os
import subprocess
import sys

from affectjax import xla_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles a convolution large enough for XLA:CPU's YNNPACK heuristics and
# prints which library runs it, after doing what argv[1] says.
_PROBE = r"""
import sys
from affectjax import cli, xla_cpu
if sys.argv[1] == "configure":
  xla_cpu.configure()
elif sys.argv[1] == "tool":
  from absl import flags
  flags.FLAGS(["probe"])
  cli.tool(lambda argv: None, "probe")([])
import jax, jax.numpy as jnp
x, w = jnp.ones((8, 48, 48, 32)), jnp.ones((3, 3, 32, 32))
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(x, w).compile().as_text()
conv_lines = [l for l in hlo.splitlines() if "conv_general_dilated" in l
              and " = " in l]
print("ynn" if any("__ynn_fusion" in l for l in conv_lines) else "eigen")
"""


def _env_without_flag(extra=""):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  kept = [f for f in env.get("XLA_FLAGS", "").split()
          if not f.startswith(xla_cpu.YNN_FUSION_FLAG)]
  env["XLA_FLAGS"] = " ".join(kept + ([extra] if extra else []))
  return env


def _probe(mode, env):
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env,
                       capture_output=True, text=True, timeout=120, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()[-1]


def test_configure_adds_the_flag_once():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_cpu.configure(env)
  assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                              + xla_cpu.EIGEN_CONVOLUTIONS)
  assert not xla_cpu.configure(env)  # Already there: unchanged.
  assert env["XLA_FLAGS"].count(xla_cpu.YNN_FUSION_FLAG) == 1
  empty = {}
  assert xla_cpu.configure(empty)
  assert empty["XLA_FLAGS"] == xla_cpu.EIGEN_CONVOLUTIONS


def test_the_users_setting_wins():
  mine = f"{xla_cpu.YNN_FUSION_FLAG}=+individual_convolution"
  env = {"XLA_FLAGS": mine}
  assert not xla_cpu.configure(env)
  assert env["XLA_FLAGS"] == mine


def test_convolutions_leave_ynnpack_only_when_configured():
  """XLA's default runs this convolution in YNNPACK; configure() and every
  tool (cli.tool) move it to Eigen; the user's flag keeps YNNPACK."""
  assert _probe("none", _env_without_flag()) == "ynn"
  assert _probe("configure", _env_without_flag()) == "eigen"
  assert _probe("tool", _env_without_flag()) == "eigen"
  keep = f"{xla_cpu.YNN_FUSION_FLAG}=+individual_convolution"
  assert _probe("tool", _env_without_flag(keep)) == "ynn"

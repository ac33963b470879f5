"""The XLA:CPU setting affectjax's processes run with: Eigen's convolutions.

jax 0.10.2's XLA:CPU hands large convolutions to YNNPACK (``ynn_fusion``
ops). On the 2-core Intel Xeon VM (lscpu family 6, model 207) XLA's other
convolution path, Eigen's spatial convolution, was about twice as fast for a
3x3 convolution's forward and backward at 48-56 px (docs/BENCHMARKS.md,
"Eigen convolutions"): VGG16's train step went from 0.57x to 0.95x PyTorch's,
the custom CNN's from 0.63x to 0.83x on one device (+5% on the trainer's two
CPU devices). EfficientNet-B3 under ``impl='fused'`` computes its
depthwise and 1x1 convolutions without lax convolutions, so it is unchanged.
On the AMD EPYC VM an earlier session measured the custom CNN within 5% either
way (loaded machine); no CPU measured slower.

``configure()`` removes YNNPACK from convolutions only
(``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``: dots,
reductions and elementwise fusions keep XLA's defaults) by adding the flag to
``XLA_FLAGS``, unless ``XLA_FLAGS`` already names that flag: the user's
setting wins, and ``--xla_cpu_experimental_ynn_fusion_type=+individual_convolution``
keeps XLA's default. The flag only concerns the CPU backend, so GPU and TPU
runs are unaffected. XLA reads ``XLA_FLAGS`` when it compiles, so this must
run before the first compile; every entry point does it through
``cli.tool``, the tests through their conftest, the benchmarks in their
workers.
"""
from __future__ import annotations

import os

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS = f"{YNN_FUSION_FLAG}=-individual_convolution"


def configure(environ=None) -> bool:
  """Adds EIGEN_CONVOLUTIONS to ``XLA_FLAGS`` unless the user set the flag.

  Returns whether it added the flag. `environ` defaults to ``os.environ``
  (subprocesses started afterwards inherit the setting).
  """
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FUSION_FLAG in flags:
    return False
  environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS}".strip()
  return True

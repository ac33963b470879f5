"""The fused 2x2 max-pool of custom_cnn (``max_pool_2x2``) at odd widths.

An odd trailing row or column is outside every 2x2 window: reduce_window
drops it, so its gradient is exactly zero, and the fused pool's custom VJP
must pad its gradient back to the input's full height *and* width.
(tests/test_models.py checks ties and an odd height with an even width.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from affectjax.models import custom_cnn


def _reference(x):
  return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


@pytest.mark.parametrize("shape", [(2, 6, 5, 3), (2, 7, 5, 3), (1, 5, 7, 2),
                                   (1, 3, 3, 1)],
                         ids=lambda s: f"{s[1]}x{s[2]}")
def test_gradient_at_odd_widths_is_reduce_windows(shape):
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  # The odd last column holds each row's largest values: a pool that read
  # it (or a gradient shifted onto it) would differ from reduce_window's.
  x = x.at[:, :, -1, :].set(10.0)
  pooled = _reference(x)
  np.testing.assert_array_equal(custom_cnn.max_pool_2x2(x), pooled)
  g = jnp.asarray(rng.normal(size=pooled.shape), jnp.float32)

  def grad(pool):
    return jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * g)))(x)

  ours, ref = grad(custom_cnn.max_pool_2x2), grad(_reference)
  assert ours.shape == x.shape
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(ours[:, :, -1, :], 0.0)  # Outside every window.
  if shape[1] % 2:
    np.testing.assert_array_equal(ours[:, -1, :, :], 0.0)
  # Each window passes its whole gradient to one pixel.
  np.testing.assert_allclose(float(jnp.sum(ours)), float(jnp.sum(g)),
                             rtol=1e-5)

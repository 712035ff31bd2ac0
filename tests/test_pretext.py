"""The pretext's physics: a ray that leaves the volume without a return meets the learned
background colour instead of driving density into the volume's top slab."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsmae_jax.render import RadianceField, box_near_far, render_rays

BOX = ((-8.0, -8.0, -3.0), (8.0, 8.0, 3.0))
SKY = jnp.array([0.4, 0.6, 0.9])


def _train_on_sky(learned_background: bool, steps: int = 200) -> tuple[float, float, float]:
  """Fits a tiny field to 64 upward rays from z = 1 that meet nothing inside the box and see a
  constant sky colour. Returns the mean top-slab density (1/m, z in [1.5, 3]) before and after,
  and the final colour loss."""
  field = RadianceField(width=16, depth=1, pos_freqs=2, dir_freqs=1, box_min=BOX[0],
                        box_max=BOX[1])
  rng = np.random.default_rng(0)
  d = rng.normal(size=(1, 64, 3))
  d[..., 2] = np.abs(d[..., 2]) + 0.5
  dirs = jnp.asarray(d / np.linalg.norm(d, axis=-1, keepdims=True), jnp.float32)
  origins = jnp.zeros((1, 64, 3)).at[..., 2].set(1.0)
  near, far, _ = box_near_far(origins, dirs, *BOX, 0.1)
  volume = jnp.zeros((1, 4, 4, 2, 4))
  params = {'field': jax.jit(field.init)(jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 3)),
                                         jnp.zeros((1, 3)))['params'],
            'background': jnp.zeros((3,))}
  top = jnp.asarray(np.concatenate([rng.uniform(-6, 6, (256, 2)), rng.uniform(1.5, 3, (256, 1))],
                                   -1), jnp.float32)
  up = jnp.zeros((256, 3)).at[:, 2].set(1.0)
  density = jax.jit(lambda p: jnp.mean(field.apply({'params': p['field']}, jnp.zeros((256, 4)),
                                                   top, up)[0]))

  def loss(p, key):
    fn = lambda f, x, v: field.apply({'params': p['field']}, f, x, v)
    bg = jax.nn.sigmoid(p['background']) if learned_background else None
    out = render_rays(fn, volume, origins, dirs, near, far, 16, *BOX, key, bg)
    return jnp.mean((out['color'] - SKY) ** 2)

  tx = optax.adam(1e-2)

  @jax.jit
  def step(p, state, key):
    value, grads = jax.value_and_grad(loss)(p, key)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, value

  p, state = params, tx.init(params)
  for i in range(steps):
    p, state, value = step(p, state, jax.random.key(i))
  return float(density(params)), float(density(p)), float(value)


@pytest.mark.slow  # trains a small field (fast tier: < 2 min)
def test_a_learned_background_keeps_sky_out_of_the_top_slab():
  before, with_bg, loss_bg = _train_on_sky(True)
  _, black, loss_black = _train_on_sky(False)
  assert loss_bg < 1e-3 and loss_black < 1e-3    # both fit the sky colour ...
  # ... but against black the field paints it into the volume (density grows several-fold from
  # the field's initial ~0.3 / m), while with the background it does not grow.
  assert black > 3.0 * before, (before, black)
  assert with_bg < 1.1 * before, (before, with_bg)

r"""The embedded demo's training run (`pixart_jax.demo`: a tiny PixArt on the handwritten digits) as a config file,
for sweeps and plain `pixart_jax.train` runs over a digits dataset that `python -m pixart_jax.demo` prepared
(WORKDIR/data).

  python -m pixart_jax.train --config configs/demo.py --workdir /tmp/digits --config.data.dir workdir_demo/data
Sweep (lr, 3 trials x 12 steps, about a minute on a CPU; what tests/test_sweep.py and scripts/demo_sweep.sh run):
  python -m pixart_jax.sweep --config configs/demo.py:smoke --workdir /tmp/demo_sweep \
      --config.data.dir workdir_demo/data
Arguments: `smoke` (1 block, 12 steps, batch 16, logged every step, a checkpoint at the end), `steps=N`.
"""
from pixart_jax import demo_config, sweeps
from pixart_jax.train import config_defaults as common


def _arg(arg):
  return common.parse_arg(arg, smoke=False, steps=0)


def get_config(arg=None):
  a = _arg(arg)
  c = demo_config.train_config("", steps=4000, batch=64, seed=0)
  if a.smoke:  # one of the four blocks, 12 steps, one checkpoint at the end: a trial compiles and runs in seconds
    c.model.overrides.depth = 1
    c.steps, c.data.batch_size, c.log_every, c.ckpt_every, c.keep = 12, 16, 1, 12, 1
    c.optimizer.warmup = 0
  if a.steps:
    c.steps = a.steps
  return c


def get_sweep(arg=None):
  """smoke: the learning rate over 3 values; otherwise lr x warmup (6 trials)."""
  lrs = sweeps.values("optimizer.lr", [2e-3, 5e-4, 1e-4])
  if _arg(arg).smoke:
    return lrs
  return sweeps.product(lrs, sweeps.values("optimizer.warmup", [0, 100]))

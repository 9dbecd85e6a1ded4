"""The kinds of training (`train.trainable.Trainable`), one file each. A new kind is a new file here plus its entry
in `KINDS`; `select` gives the first kind the experiment config asks for (full fine-tuning when none does)."""
from __future__ import annotations

from pixart_jax.models.spec import ModelSpec
from pixart_jax.train.trainable import Trainable
from pixart_jax.train.trainables.controlnet import ControlNetTrainable
from pixart_jax.train.trainables.distill import DistillTrainable
from pixart_jax.train.trainables.full import FullTrainable
from pixart_jax.train.trainables.lora import LoraTrainable

KINDS: tuple[type[Trainable], ...] = (ControlNetTrainable, DistillTrainable, LoraTrainable,
                                      FullTrainable)  # the first wanted one is used


def select(config, spec: ModelSpec) -> Trainable:
  """The Trainable of `config` (validated: a bad block of the chosen kind raises naming the field)."""
  for kind in KINDS:
    if kind.wanted(config):
      return kind(config, spec)
  raise ValueError("no kind of training fits the config")  # unreachable: FullTrainable is always wanted

"""`train_and_evaluate(config, workdir)`: wires config -> mesh -> data -> state -> compiled steps -> checkpoints.

Order of events (big_vision trainer shape):
  1. Typed boundary: the ConfigDict becomes a ModelSpec (DiTConfig + how it runs, `config.model.attention`
     included), OptimizerConfig, StepConfig, rules, mesh, and the kind of training (`train.trainables.select`:
     full fine-tuning, or LoRA with `config.lora` set).
  2. Data: the Grain pipeline over `data.dir` (or a synthetic dataset written into the workdir), its abstract
     batches per bucket and the null caption.
  3. Abstract state (`jax.eval_shape`) -> shardings -> state, by the documented resume order
     (`Trainable.initial_state`): a checkpoint in `<workdir>/checkpoints` (newest restorable; onto the CURRENT
     mesh) -> the kind's start: `init_from` (released / converted weights via `convert.dit.load_transformer`;
     weak-to-strong rules: new KV-compression layers keep their average init (`convert.ours.kv_compress_missing`);
     PE interpolation and sample size changes are config changes (the PE is recomputed); `init_from` may also be
     a training workdir of ours or an Orbax dir from `convert`, read by `convert.ours`, which drops the csize/ar
     micro-condition weights of a PixArt-alpha checkpoint when the new model has none) -> fresh init
     (`jax.jit(init, out_shardings=...)`). LoRA trains adapters on the frozen `init_from` weights.
  4. AOT: the one train step (`train.step.jit_train_step`, with the kind's frozen inputs and params function),
     one `lower().compile()` per bucket, `memory_analysis()` logged before step 1.
  5. Loop: step (at most `config.max_in_flight` dispatched ahead of the device: `train.in_flight`), metrics (JSONL +
     TensorBoard on process 0), async checkpoints every `ckpt_every`, the sampling hook, the evaluation hook (FID /
     CLIP score every `eval.every` steps, `train.eval_hook`; the best state by `eval.best_metric` kept in
     `<workdir>/best/`), SIGTERM / preemption -> save at the current step and return; a non-finite loss raises
     `NonFiniteLossError` naming the step without saving the bad state. At the end the kind exports what it
     produced beyond the checkpoints (LoRA: the adapters in `<workdir>/lora/`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pixart_jax.models.attention_backends import AttentionOptions
from pixart_jax.models.config import DiTConfig, from_preset
from pixart_jax.models.spec import ModelSpec
from pixart_jax.outputs import claim_output
from pixart_jax.parallel.mesh import make_mesh
from pixart_jax.parallel.sharding import LOGICAL_RULES
from pixart_jax.train import flops as flops_lib
from pixart_jax.train import state as state_lib
from pixart_jax.train import trainables
from pixart_jax.train.checkpoint import Checkpointer
from pixart_jax.train.config_defaults import check_config
from pixart_jax.train.eval_hook import BestCheckpoint, EvalFn, make_eval_fn
from pixart_jax.train.in_flight import StepsInFlight
from pixart_jax.train.metrics import MetricWriter, first_nonfinite
from pixart_jax.train.optimizers import OptimizerConfig, make_optimizer
from pixart_jax.train.sample_hook import SampleFn, make_sample_fn
from pixart_jax.train.step import StepConfig, jit_train_step, make_train_step
from pixart_jax.train.trainable import Context

log = logging.getLogger(__name__)
BATCH_KEYS = ("latents", "caption", "mask")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the run stopped without saving that state."""


@dataclasses.dataclass
class RunResult:
  state: state_lib.TrainState
  step: int
  preempted: bool
  last_metrics: dict


# ---------------------------------------------------------------------------------------------------------------
# Typed boundary
# ---------------------------------------------------------------------------------------------------------------
def model_spec(cfg_model) -> ModelSpec:
  """config.model -> ModelSpec (DiTConfig from the preset + non-None overrides; `attention` -> AttentionOptions)."""
  return ModelSpec(from_preset(cfg_model.preset, cfg_model.overrides),
                   dtype=jnp.dtype(cfg_model.dtype), param_dtype=jnp.dtype(cfg_model.param_dtype),
                   remat=cfg_model.remat, scan=bool(cfg_model.scan),
                   attention=AttentionOptions.parse(cfg_model.get("attention")))


def merged_rules(overrides) -> tuple:
  """LOGICAL_RULES with the entries named in `overrides` replaced (new names appended)."""
  table = dict(LOGICAL_RULES)
  for name, axes in overrides or ():
    table[name] = tuple(axes) if isinstance(axes, list) else axes
  return tuple(table.items())


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def _synthetic_dir(config, dit: DiTConfig, workdir: epath.Path) -> str:
  """Writes (process 0, once) a synthetic dataset with the model's shapes into the workdir."""
  from pixart_jax.data import synthetic

  out = workdir / "synthetic_data"
  sizes = [tuple(s) for s in config.data.synthetic_buckets]
  if not sizes:
    from pixart_jax.data.buckets import get_table
    sizes = [tuple(get_table(config.data.table)["1.0"])] if config.data.table else [(dit.image_size,) * 2]
  table = {f"{h / w:.2f}": (int(h), int(w)) for h, w in sizes}
  if jax.process_index() == 0 and not (out / "manifest.json").exists():
    s = dit.max_caption_len
    synthetic.write_synthetic_dataset(
        str(out), {k: config.data.synthetic_examples for k in table}, table=table, text_dim=dit.caption_channels,
        latent_channels=dit.in_channels, caption_tokens=(1, max(1, s // 2)), long_caption_tokens=(max(1, s // 2), s),
        max_length=s, seed=config.seed)
  _barrier("synthetic_data")
  return str(out)


def make_data(config, dit: DiTConfig, mesh, rules, workdir: epath.Path):
  """(iterator, {bucket: abstract batch}, null caption (S, Dc) f32) for `config.data`."""
  from pixart_jax.data import pipeline

  if config.data.dir:
    data_dir = config.data.dir
  elif config.data.synthetic:
    data_dir = _synthetic_dir(config, dit, workdir)
  else:
    raise ValueError("no training data: set --config.data.dir (a dataset written by `pixart_jax.prepare`) or "
                     "--config.data.synthetic=True")
  manifest = pipeline.load_manifest(data_dir)
  if config.data.dir and config.data.table and manifest.get("table_name") not in (None, config.data.table):
    raise ValueError(f"dataset {data_dir} was prepared with the bucket table {manifest['table_name']!r}, the config "
                     f"says data.table={config.data.table!r}")
  enc = manifest["encoders"]
  if enc["text_dim"] != dit.caption_channels or enc["latent_channels"] != dit.in_channels:
    raise ValueError(f"dataset {data_dir} has text_dim {enc['text_dim']} / latent_channels {enc['latent_channels']}"
                     f", the model expects {dit.caption_channels} / {dit.in_channels}")
  seed = config.seed if config.data.shuffle_seed is None else config.data.shuffle_seed
  kw = dict(global_batch_size=config.data.batch_size, mesh=mesh, rules=rules)
  it = pipeline.make_train_iterator(data_dir, seed=seed, caption_ratio=config.data.real_prompt_ratio,
                                    workers=config.data.num_workers, **kw)
  abstract = pipeline.abstract_batches(manifest, **kw)
  return it, abstract, np.asarray(pipeline.null_caption(data_dir), np.float32)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"pixart_jax_{name}")


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
class _StopFlag:
  """Set by SIGTERM (installed only from the main thread; the previous handler is restored on exit)."""

  def __init__(self):
    self.set, self._prev = False, None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._prev = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: saving a checkpoint at the current step and stopping")
    self.set = True

  def __exit__(self, *exc):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


def _memory(compiled) -> str:
  """`memory_analysis()` of a compiled step in MiB (arguments, outputs, aliased = donated, temporaries)."""
  m = compiled.memory_analysis()
  if m is None:
    return "no memory analysis on this backend"
  mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
  return (f"arguments {mib(m.argument_size_in_bytes)}, outputs {mib(m.output_size_in_bytes)}, aliased "
          f"{mib(m.alias_size_in_bytes)}, temporaries {mib(m.temp_size_in_bytes)}, code "
          f"{mib(m.generated_code_size_in_bytes)}")


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


@dataclasses.dataclass
class _Run:
  """Everything the step loop uses: compiled[bucket](state, batch, null, frozen) -> (state, metrics)."""
  config: Any
  workdir: epath.Path
  state: state_lib.TrainState
  iterator: Any
  compiled: dict
  step_flops: dict
  null: jax.Array
  frozen: Any
  ckpt: Checkpointer
  peak: float | None
  sample_fn: SampleFn | None
  eval_fn: EvalFn | None
  best: BestCheckpoint | None
  primary: bool
  in_flight: StepsInFlight
  batch_keys: tuple[str, ...] = BATCH_KEYS


def train_and_evaluate(config, workdir: str, *, sample_fn: SampleFn | None = None,
                       eval_fn: EvalFn | None = None) -> RunResult:
  """Trains `config` in `workdir` (resuming from its checkpoints). See the module docstring.

  sample_fn / eval_fn replace the hooks `sample.every` / `eval.every` would build (tests, custom metrics)."""
  check_config(config)  # bad numbers fail before the workdir is touched
  primary = jax.process_index() == 0
  # the trainer's own folder (a rerun resumes there); a folder holding anything else is refused before any write
  workdir = epath.Path(claim_output(workdir, tool="train", resume=True, flag="--workdir", write_marker=primary))
  if primary:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  log.info("process %d/%d, %d devices (%d local): %s", jax.process_index(), jax.process_count(),
           jax.device_count(), jax.local_device_count(), jax.devices()[0].device_kind)

  spec = model_spec(config.model)
  trainable = trainables.select(config, spec)
  opt_cfg = OptimizerConfig.from_dict(config.optimizer)
  step_cfg = StepConfig(class_dropout_prob=config.class_dropout_prob, grad_accum=config.grad_accum,
                        ema_rate=config.ema.rate, learn_sigma=spec.cfg.learn_sigma)
  rules = merged_rules(config.sharding_rules)
  mesh = make_mesh(config.mesh)
  in_flight = StepsInFlight(config.max_in_flight)
  batch = config.data.batch_size
  if batch % config.grad_accum:
    raise ValueError(f"data.batch_size {batch} is not divisible by grad_accum {config.grad_accum}")
  log.info("mesh %s; model %s (%s compute, %s params, remat %s)", dict(mesh.shape), config.model.preset,
           spec.dtype, spec.param_dtype, spec.remat)

  peak = flops_lib.device_peak_flops()
  if peak is None and jax.devices()[0].platform == "cpu":
    peak = flops_lib.measure_matmul_peak(seconds=0.5)
    log.info("CPU: measured matmul peak %.1f GFLOP/s per device", peak / 1e9)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    iterator, abstract_batches, null = make_data(config, spec.cfg, mesh, rules, workdir)
    tx, lr_schedule = make_optimizer(opt_cfg, batch)
    graphdef = trainable.graphdef()
    batch_keys = BATCH_KEYS + trainable.model_inputs
    missing = sorted({k for ab in abstract_batches.values() for k in batch_keys if k not in ab})
    if missing:
      if hasattr(iterator, "close"):
        iterator.close()
      raise ValueError(f"data.dir {config.data.dir}: the dataset has no {', '.join(missing)} per example, which "
                       f"this kind of training needs (prepare it with --control canny|blur|image)")
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep)
    try:
      initial = trainable.initial_state(Context(config=config, spec=spec, tx=tx, mesh=mesh, rules=rules, ckpt=ckpt,
                                                iterator=iterator))
    except BaseException:
      ckpt.close()  # e.g. every checkpoint corrupt: the one clear error, not a later one from a dangling manager
      if hasattr(iterator, "close"):
        iterator.close()
      raise
    state, shardings = initial.state, initial.shardings
    frozen, frozen_shardings = trainable.frozen()
    log.info("train state from %s at step %d\n%s", initial.source, int(state.step),
             state_lib.parameter_overview(state.params))
    if int(state.step) >= config.steps:
      log.info("nothing to do: the state is at step %d, config.steps is %d", int(state.step), config.steps)
      ckpt.close()
      return RunResult(state=state, step=int(state.step), preempted=False, last_metrics={})
    null = jax.device_put(null, NamedSharding(mesh, PartitionSpec()))

    if sample_fn is None and config.sample.every:
      sample_fn = make_sample_fn(config.sample, spec, graphdef, mesh, rules, caption_len=null.shape[0])
    eval_cfg = config.get("eval")
    eval_every = eval_cfg.every if eval_cfg is not None else 0
    if eval_fn is None and eval_every:
      eval_fn = make_eval_fn(eval_cfg, spec, graphdef, mesh, rules, caption_len=null.shape[0],
                             pipeline=config.sample.pipeline)
    best = None
    if eval_fn is not None and eval_every and eval_cfg.best_metric:
      best = BestCheckpoint(workdir / "best", eval_cfg.best_metric, primary=primary,
                            config_json=config.to_json_best_effort(indent=2))
    fn = make_train_step(graphdef=graphdef, tx=tx, lr_schedule=lr_schedule, cfg=step_cfg,
                         params_fn=trainable.params_fn, objective=trainable.objective)
    compiled, step_flops = {}, {}
    for key, ab in abstract_batches.items():
      ab = {k: ab[k] for k in batch_keys}
      t0 = time.perf_counter()
      jitted = jit_train_step(fn, shardings, {k: v.sharding for k, v in ab.items()}, mesh, frozen_shardings)
      compiled[key] = jitted.lower(state, ab, null, frozen).compile()
      _, h, w, _ = ab["latents"].shape
      step_flops[key] = trainable.forward_passes / 3 * flops_lib.train_step_flops(spec.cfg, batch, h, w,
                                                                                  ab["caption"].shape[1])
      log.info("compiled bucket %s (latent %dx%d) in %.1fs; per device: %s", key, h, w, time.perf_counter() - t0,
               _memory(compiled[key]))

    result = _run(_Run(config=config, workdir=workdir, state=state, iterator=iterator, compiled=compiled,
                       step_flops=step_flops, null=null, frozen=frozen, ckpt=ckpt, peak=peak, sample_fn=sample_fn,
                       eval_fn=eval_fn if eval_every else None, best=best, primary=primary,
                       in_flight=in_flight, batch_keys=batch_keys))
    if primary:
      exported = trainable.export(result.state, workdir)
      if exported is not None:
        log.info("exported %s", exported)
    return result


def _run(run: _Run) -> RunResult:
  from tqdm import tqdm

  config, workdir, state, iterator, ckpt = run.config, run.workdir, run.state, run.iterator, run.ckpt
  step = int(state.step)
  last_saved = ckpt.latest_step()
  config_json = json.loads(config.to_json_best_effort())
  writer = MetricWriter(workdir, enabled=run.primary)
  pending: list[tuple[int, dict, str]] = []
  window_start, last = time.perf_counter(), {}
  preempted = False
  bar = tqdm(total=config.steps, initial=step, disable=not run.primary, desc="train", dynamic_ncols=True)

  def flush() -> None:
    nonlocal window_start, last
    if not pending:
      return
    history = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m, _ in pending]
    bad = first_nonfinite(history)
    if bad is not None:
      ckpt.wait()
      raise NonFiniteLossError(
          f"loss is {history[[s for s, _ in history].index(bad)][1]['loss']} at step {bad}: stopping without "
          f"saving this state; the newest checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
    elapsed = time.perf_counter() - window_start
    n, fl = len(pending), sum(run.step_flops[b] for _, _, b in pending)
    per_dev = fl / elapsed / jax.device_count()
    for s, m in history[:-1]:
      writer.write_scalars(s, m)
    s, m = history[-1]
    extra = {"step_time": elapsed / n, "examples_per_sec": n * config.data.batch_size / elapsed,
             "tflops_per_device": per_dev / 1e12}
    if run.peak:
      extra["mfu"] = per_dev / run.peak
    last = dict(m, **extra)
    writer.write_scalars(s, last)
    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", s_per_step=f"{elapsed / n:.3f}")
    log.info("step %d: %s", s, " ".join(f"{k}={v:.5g}" for k, v in last.items()))
    pending.clear()
    window_start = time.perf_counter()

  def evaluate(at: int) -> None:
    """FID / CLIP score of the EMA (eval.use_ema) or current weights -> metrics; the best state is kept."""
    nonlocal window_start
    use_ema = config.eval.use_ema and state.ema is not None
    scores = run.eval_fn(state.ema if use_ema else state.params, at)
    writer.write_scalars(at, scores)
    if run.best is not None:
      run.best.update(at, scores, lambda best_ckpt: best_ckpt.save(
          at, dataclasses.replace(state, ema=None), ema=state.ema, config=config_json))
    window_start = time.perf_counter()  # step_time / throughput exclude the evaluation

  def save(at: int) -> None:
    nonlocal last_saved, window_start
    if at != last_saved and ckpt.save(at, dataclasses.replace(state, ema=None), ema=state.ema,
                                      data=iterator.get_state(), config=config_json):
      last_saved = at
    window_start = time.perf_counter()  # step_time / throughput exclude the (blocking part of the) save

  try:
    with _StopFlag() as stop:
      while step < config.steps:
        batch = next(iterator)
        if "step" in batch and int(batch["step"]) != step:
          raise RuntimeError(f"the data iterator is at step {batch['step']} but the train state at {step}: "
                             "restore both from the same checkpoint")
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = run.compiled[batch["bucket"]](state, {k: batch[k] for k in run.batch_keys}, run.null,
                                                         run.frozen)
        run.in_flight.add(metrics["loss"])
        step += 1
        bar.update(1)
        pending.append((step, metrics, batch["bucket"]))
        # Preemption: JAX's sync point (all hosts agree), or SIGTERM. With several processes a local SIGTERM flag
        # is agreed on (all-gather) at log / checkpoint boundaries only, so every host stops at the same step.
        stopping = ckpt.reached_preemption(step) or (stop.set and jax.process_count() == 1)
        boundary = step % config.log_every == 0 or step % config.ckpt_every == 0 or step == config.steps
        if boundary and jax.process_count() > 1:
          stopping = stopping or _any_process(stop.set)
        if boundary or stopping:
          flush()
        if step % config.ckpt_every == 0 or step == config.steps or stopping:
          save(step)
        if stopping:
          preempted = True
          log.warning("stopping at step %d (preemption): checkpoint saved", step)
          break
        if run.sample_fn is not None and config.sample.every and step % config.sample.every == 0:
          images = run.sample_fn(state.ema if state.ema is not None else state.params, step)
          writer.write_images(step, images)
          window_start = time.perf_counter()
        if run.eval_fn is not None and step % config.eval.every == 0:
          evaluate(step)
      flush()
  finally:
    bar.close()
    if hasattr(iterator, "close"):
      iterator.close()
    ckpt.wait()
    ckpt.close()
    if run.best is not None:
      run.best.close()
    writer.close()
  return RunResult(state=state, step=step, preempted=preempted, last_metrics=last)

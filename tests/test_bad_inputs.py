"""Bad arguments, one row each: every command line refuses them with ONE line `error: <message>` naming the input,
the value and what is valid, exit code 1 and no traceback; the Python API refuses the same values with a
ValueError saying the same.

CLI rows run in-process, one worker process per entry point (tests/cli_table_worker.py: flags parsed afresh,
`main` under `cli_errors` as its console entry runs it); a few rows run the real `python -m` command to prove the
contract end to end (and that `--verbosity 1` adds the traceback).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).with_name("cli_table_worker.py")
SMOKE = "configs/pixart_sigma_512_ms.py:smoke"
PROMPT = ["--prompt", "a cat"]

# (id, entry point module, argv with {placeholders} from the `files` fixture, expected message substring)
def _train_row(name: str, override: str, message: str) -> tuple:
  """A `python -m pixart_jax.train` row: the smoke recipe with one bad `--config.FIELD=VALUE`."""
  return name, "pixart_jax.train.__main__", ["--config", SMOKE, "--workdir", "{tmp}/t", override], message


CLI_ROWS = [
    # --- sample: flags (refused before any model loads)
    ("sample-foreign-out", "pixart_jax.sample", ["--model", "{pipe}", "--prompt", "a cat", "--out", "{pipe}"],
     "entries sample did not write"),
    ("sample-steps-0", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--steps", "0"],
     "--steps must be a positive integer (>= 1), got 0"),
    ("sample-steps-negative", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--steps=-3"],
     "--steps must be a positive integer (>= 1), got -3"),
    ("sample-guidance-inf", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--guidance", "inf"],
     "--guidance must be a finite number, got inf"),
    ("sample-guidance-nan", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--guidance", "nan"],
     "--guidance must be a finite number, got nan"),
    ("sample-size-0x0", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--size", "0x0"],
     "--size 0x0: width and height must be positive"),
    ("sample-size-0-wide", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--size", "0x256"],
     "--size 0x256: width and height must be positive"),
    ("sample-size-garbage", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--size", "big"],
     "--size must look like 1024x768"),
    ("sample-images-per-prompt-0", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--images_per_prompt", "0"],
     "--images_per_prompt must be a positive integer (>= 1), got 0"),
    ("sample-images-per-prompt-negative", "pixart_jax.sample",
     ["--model", "{pipe}", *PROMPT, "--images_per_prompt=-2"], "--images_per_prompt must be a positive integer"),
    ("sample-batch-0", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--batch_size", "0"],
     "--batch_size must be a positive integer (>= 1), got 0"),
    ("sample-seed-2**64", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--seed", str(2**64)],
     f"--seed must be an integer in [0, 2**32 - 1], got {2**64}"),
    ("sample-seed-negative", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--seed=-1"],
     "--seed must be an integer in [0, 2**32 - 1], got -1"),
    ("sample-seed-2**32", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--seed", str(2**32)],
     "--seed must be an integer in [0, 2**32 - 1]"),
    ("sample-no-prompt", "pixart_jax.sample", ["--model", "{pipe}"], "no prompt: give --prompt"),
    ("sample-mesh-too-big", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--mesh", "data=3"],
     "--mesh data=3: mesh [('data', 3)] does not divide 8 devices (this host has 8 devices)"),
    ("sample-offload-on-8-devices", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--offload_text_encoder"],
     "--offload_text_encoder keeps T5 on the host for one device, but --mesh data=-1 spans 8 devices: add --mesh "
     "data=1"),
    ("sample-mesh-axis", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--mesh", "rows=2"],
     "--mesh 'rows=2': unknown mesh axes ['rows']"),
    ("sample-mesh-garbage", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--mesh", "data"],
     "--mesh 'data': bad entry 'data'; expected AXIS=SIZE"),
    ("sample-processes-half", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--num_processes", "2"],
     "--coordinator_address, --num_processes and --process_id go together"),
    ("sample-prompts-not-utf8", "pixart_jax.sample", ["--model", "{pipe}", "--prompts_file", "{latin1}"],
     "prompts_latin1.txt: not UTF-8 text (byte offset 12"),
    ("sample-prompts-blank", "pixart_jax.sample", ["--model", "{pipe}", "--prompts_file", "{blank}"],
     "prompts_blank.txt holds no prompt"),
    ("sample-prompts-missing", "pixart_jax.sample", ["--model", "{pipe}", "--prompts_file", "{tmp}/nope.txt"],
     "nope.txt: No such file or directory"),
    ("sample-prompts-is-dir", "pixart_jax.sample", ["--model", "{pipe}", "--prompts_file", "{tmp}"],
     "Is a directory"),
    # --- sample: image-to-image / inpainting flags (refused before any model loads)
    ("sample-strength-without-image", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--strength", "0.5"],
     "--strength needs --init_image (the image to edit)"),
    ("sample-mask-without-image", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--mask", "{tmp}/m.png"],
     "--mask needs --init_image (the image to edit)"),
    ("sample-strength-1.5", "pixart_jax.sample",
     ["--model", "{pipe}", *PROMPT, "--init_image", "{tmp}/nope.png", "--strength", "1.5"],
     "--strength must be a finite number > 0 and <= 1, got 1.5"),
    ("sample-init-image-missing", "pixart_jax.sample", ["--model", "{pipe}", *PROMPT, "--init_image", "{tmp}/nope.png"],
     "nope.png: FileNotFoundError"),
    ("sample-init-image-not-an-image", "pixart_jax.sample",
     ["--model", "{pipe}", *PROMPT, "--init_image", "{blank}"], "in no known image format"),
    # --- sample: models
    ("sample-model-empty-dir", "pixart_jax.sample", ["--model", "{empty}", *PROMPT],
     "holds neither a transformer config.json"),
    ("sample-config-not-json", "pixart_jax.sample", ["--model", "{pipe_badjson}", *PROMPT],
     "transformer/config.json is not a valid model config: not JSON"),
    ("sample-config-array", "pixart_jax.sample", ["--model", "{pipe_array}", *PROMPT],
     "transformer/config.json is not a valid model config: a JSON list, expected a JSON object"),
    ("sample-config-wrong-type", "pixart_jax.sample", ["--model", "{pipe_badtype}", *PROMPT],
     "transformer/config.json: DiTConfig.depth must be a positive integer (>= 1), got 'two'"),
    ("sample-nan-weights", "pixart_jax.sample", ["--model", "{pipe_nan}", *PROMPT, "--out", "{tmp}/out_nan"],
     "1 tensor(s) hold NaN or inf values: "),
    ("sample-caption-width", "pixart_jax.sample",
     ["--model", "{pipe}", "--transformer", "{wide}", *PROMPT, "--out", "{tmp}/out_wide"],
     "the transformer takes 24-wide caption features (caption_channels) but the text encoder gives 32-wide"),
    ("sample-no-binning-odd-size", "pixart_jax.sample",
     ["--model", "{pipe}", *PROMPT, "--size", "200x200", "--no_binning", "--out", "{tmp}/out_odd"],
     "height and width must be multiples of 16 without resolution binning; got 200x200"),
    # --- convert
    ("convert-shard-0", "pixart_jax.convert.__main__", ["--source", "{pipe}", "--out", "{tmp}/c0",
                                                        "--max_shard_mb", "0"],
     "--max_shard_mb must be a positive integer (>= 1), got 0"),
    ("convert-unknown-pth", "pixart_jax.convert.__main__", ["--source", "{fake_pth}", "--out", "{tmp}/c1"],
     "cannot tell which PixArt checkpoint mystery.pth is"),
    ("convert-config-not-json", "pixart_jax.convert.__main__", ["--source", "{pipe_badjson}", "--out", "{tmp}/c2"],
     "transformer/config.json is not a valid model config: not JSON"),
    ("convert-base-needs-diffusers", "pixart_jax.convert.__main__",
     ["--source", "{pipe}", "--out", "{tmp}/c3", "--to", "orbax", "--base", "{pipe}"],
     "--base completes a diffusers pipeline: it needs --to=diffusers"),
    ("convert-nan-weights", "pixart_jax.convert.__main__", ["--source", "{pipe_nan}", "--out", "{tmp}/c4"],
     "hold NaN or inf values"),
    # --- prepare (refused before the encoders load)
    ("prepare-shard-0", "pixart_jax.prepare", ["--source", "{tmp}", "--encoders", "{pipe}", "--out", "{tmp}/p",
                                               "--shard_size", "0"],
     "PrepareOptions.shard_size must be a positive int, got 0"),
    ("prepare-batch-0", "pixart_jax.prepare", ["--source", "{tmp}", "--encoders", "{pipe}", "--out", "{tmp}/p",
                                               "--batch_size", "0"],
     "PrepareOptions.batch_size must be a positive int, got 0"),
    ("prepare-threads-0", "pixart_jax.prepare", ["--source", "{tmp}", "--encoders", "{pipe}", "--out", "{tmp}/p",
                                                 "--num_threads", "0"],
     "PrepareOptions.num_threads must be a positive int, got 0"),
    ("prepare-min-side-negative", "pixart_jax.prepare", ["--source", "{tmp}", "--encoders", "{pipe}", "--out",
                                                         "{tmp}/p", "--min_side=-5"],
     "PrepareOptions.min_side must be a positive int, got -5"),
    ("prepare-aspect-below-1", "pixart_jax.prepare", ["--source", "{tmp}", "--encoders", "{pipe}", "--out",
                                                      "{tmp}/p", "--max_aspect", "0.5"],
     "PrepareOptions.max_aspect must be >= 1, got 0.5"),
    # --- train (config fields, checked before the workdir is touched)
    _train_row("train-ckpt-every-0", "--config.ckpt_every=0", "ckpt_every must be a positive integer (>= 1), got 0"),
    _train_row("train-log-every-0", "--config.log_every=0", "log_every must be a positive integer"),
    _train_row("train-steps-negative", "--config.steps=-5", "steps must be an integer >= 0, got -5"),
    _train_row("train-lr-negative", "--config.optimizer.lr=-1.0", "optimizer.lr must be a finite number > 0, got -1.0"),
    _train_row("train-lr-inf", "--config.optimizer.lr=inf", "optimizer.lr must be a finite number > 0, got inf"),
    _train_row("train-batch-0", "--config.data.batch_size=0", "data.batch_size must be a positive integer"),
    _train_row("train-seed-negative", "--config.seed=-1", "seed must be an integer in [0, 2**32 - 1]"),
    _train_row("train-dropout-above-1", "--config.class_dropout_prob=1.5",
               "class_dropout_prob must be a finite number >= 0 and <= 1, got 1.5"),
    _train_row("train-ema-above-1", "--config.ema.rate=2.0", "ema.rate must be a finite number"),
    _train_row("train-sample-every-negative", "--config.sample.every=-1", "sample.every must be an integer >= 0"),
    _train_row("train-grad-accum-0", "--config.grad_accum=0", "grad_accum must be a positive integer"),
    _train_row("train-warmup-negative", "--config.optimizer.warmup=-10",
               "optimizer.warmup must be an integer >= 0, got -10"),
    _train_row("train-weight-decay-nan", "--config.optimizer.weight_decay=nan",
               "optimizer.weight_decay must be a finite number >= 0, got nan"),
    ("train-foreign-workdir", "pixart_jax.train.__main__", ["--config", SMOKE, "--workdir", "{pipe}"],
     "entries train did not write"),
    # --- demo
    ("demo-foreign-workdir", "pixart_jax.demo", ["--workdir", "{pipe}", "--steps", "1"], "entries demo did not write"),
    ("demo-steps-0", "pixart_jax.demo", ["--workdir", "{tmp}/d", "--steps", "0"],
     "--steps must be a positive integer (>= 1), got 0"),
    ("demo-batch-0", "pixart_jax.demo", ["--workdir", "{tmp}/d", "--batch_size", "0"],
     "--batch_size must be a positive integer"),
    ("demo-per-digit-0", "pixart_jax.demo", ["--workdir", "{tmp}/d", "--per_digit", "0"],
     "--per_digit must be a positive integer"),
    ("demo-guidance-inf", "pixart_jax.demo", ["--workdir", "{tmp}/d", "--guidance", "inf"],
     "--guidance must be a finite number, got inf"),
    # --- plan
    ("plan-devices-0", "pixart_jax.plan", ["--preset", "tiny", "--mesh", "fsdp=8", "--devices", "0"],
     "--devices must be a positive integer (>= 1), got 0"),
    ("plan-batch-0", "pixart_jax.plan", ["--preset", "tiny", "--mesh", "fsdp=8", "--batch", "0"],
     "--batch must be a positive integer (>= 1), got 0"),
    ("plan-steps-0", "pixart_jax.plan", ["--preset", "tiny", "--mesh", "fsdp=8", "--steps", "0"],
     "--steps must be a positive integer (>= 1), got 0"),
    ("plan-grad-accum-0", "pixart_jax.plan", ["--preset", "tiny", "--mesh", "fsdp=8", "--grad-accum", "0"],
     "--grad-accum must be a positive integer"),
    ("plan-no-mesh", "pixart_jax.plan", ["--preset", "tiny"], "--mesh is required"),
    # --- evaluate
    ("evaluate-no-model", "pixart_jax.evaluate", ["--prompts", "{latin1}"], "--model is required"),
    ("evaluate-latin1-prompts", "pixart_jax.evaluate",
     ["--model", "{pipe}", "--prompts", "{latin1}", "--ref-stats", "{fake_pth}", "--inception", "x.pth", "--clip",
      "y"], "not UTF-8 text (byte offset"),
    ("evaluate-batch-0", "pixart_jax.evaluate",
     ["--model", "{pipe}", "--prompts", "{latin1}", "--ref-stats", "r.npz", "--inception", "x.pth", "--clip", "y",
      "--batch-size", "0"], "--batch-size must be a positive integer (>= 1), got 0"),
    ("evaluate-stats-no-images", "pixart_jax.evaluate",
     ["stats", "--images", "{empty}", "--inception", "{fake_pth}", "--out", "{tmp}/s.npz"], "holds no images"),
    ("evaluate-stats-not-prepared", "pixart_jax.evaluate",
     ["stats", "--prepared", "{empty}", "--inception", "{fake_pth}", "--out", "{tmp}/s.npz"], "not found: is"),
]
assert len({r[0] for r in CLI_ROWS}) == len(CLI_ROWS)

# A few rows as real commands (the one-line / exit 1 contract end to end).
SUBPROCESS_ROWS = ["sample-steps-0", "plan-devices-0", "train-ckpt-every-0", "convert-shard-0", "evaluate-batch-0"]


# ---------------------------------------------------------------------------------------------------------------
# Files the rows point at
# ---------------------------------------------------------------------------------------------------------------
def _variant(base: pathlib.Path, out: pathlib.Path, config_text: str | None = None, nan: bool = False):
  import shutil

  shutil.copytree(base, out)
  tdir = out / "transformer"
  if config_text is not None:
    (tdir / "config.json").write_text(config_text)
  if nan:
    from safetensors.numpy import load_file, save_file

    (f,) = tdir.glob("*.safetensors")
    tensors = load_file(f)
    key = sorted(k for k in tensors if k.endswith("proj_out.weight") or k.endswith("weight"))[0]
    tensors[key] = tensors[key].copy()
    tensors[key].reshape(-1)[0] = np.nan
    save_file(tensors, f)
  return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
  from dit_reference import tiny_diffusers_transformer
  from pixart_jax.testing import make_tiny_pipeline

  tmp = tmp_path_factory.mktemp("bad")
  pipe = make_tiny_pipeline(tmp / "pipe")
  raw = json.loads((pipe / "transformer" / "config.json").read_text())
  wide = tmp / "wide"
  tiny_diffusers_transformer(caption_channels=24, sample_size=32).save_pretrained(wide)
  (tmp / "prompts_latin1.txt").write_bytes("a cat\nun caf\u00e9\n".encode("latin-1"))
  (tmp / "prompts_blank.txt").write_text("\n   \n\n")
  (tmp / "empty").mkdir()
  (tmp / "mystery.pth").write_bytes(b"not a checkpoint")
  return dict(
      tmp=str(tmp), pipe=str(pipe), wide=str(wide), empty=str(tmp / "empty"),
      latin1=str(tmp / "prompts_latin1.txt"), blank=str(tmp / "prompts_blank.txt"), fake_pth=str(tmp / "mystery.pth"),
      pipe_badjson=str(_variant(pipe, tmp / "pipe_badjson", "{\"num_layers\": 2,, }")),
      pipe_array=str(_variant(pipe, tmp / "pipe_array", "[1, 2, 3]")),
      pipe_badtype=str(_variant(pipe, tmp / "pipe_badtype", json.dumps(dict(raw, num_layers="two")))),
      pipe_nan=str(_variant(pipe, tmp / "pipe_nan", nan=True)),
  )


def _env() -> dict[str, str]:
  env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
      [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


_RESULTS: dict[str, dict] = {}


def _cli_result(row_id: str, files) -> dict:
  """Runs every row of the row's entry point in one worker (once per module) and returns this row's result."""
  if row_id not in _RESULTS:
    module = next(r[1] for r in CLI_ROWS if r[0] == row_id)
    rows = [r for r in CLI_ROWS if r[1] == module]
    argvs = [[a.format(**files) for a in r[2]] for r in rows]
    proc = subprocess.run([sys.executable, str(WORKER), module], input=json.dumps(argvs), capture_output=True,
                          text=True, cwd=ROOT, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    _RESULTS.update({r[0]: res for r, res in zip(rows, results)})
  return _RESULTS[row_id]


def _assert_contract(rc: int, stderr: str, message: str) -> None:
  assert "Traceback" not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, stderr[-3000:]
  assert message in errors[0], (message, errors[0])
  assert rc == 1, (rc, stderr[-2000:])


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_cli_refuses(row, files):
  res = _cli_result(row[0], files)
  _assert_contract(res["rc"], res["stderr"], row[3])


@pytest.mark.parametrize("row_id", SUBPROCESS_ROWS)
def test_cli_refuses_as_real_command(row_id, files):
  _, module, argv, message = next(r for r in CLI_ROWS if r[0] == row_id)
  module = module.removesuffix(".__main__")
  proc = subprocess.run([sys.executable, "-m", module, *[a.format(**files) for a in argv]], capture_output=True,
                        text=True, cwd=ROOT, env=_env(), timeout=300)
  _assert_contract(proc.returncode, proc.stderr, message)
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_verbosity_shows_the_traceback(files):
  """--verbosity 1 (absl) / -v 1 (plan) asks for the traceback; the error line still ends the output."""
  for cmd in (["pixart_jax.sample", "--model", files["pipe"], *PROMPT, "--steps", "0", "--verbosity", "1"],
              ["pixart_jax.plan", "--preset", "tiny", "--mesh", "fsdp=8", "--devices", "0", "-v", "1"]):
    proc = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, cwd=ROOT, env=_env(),
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# The same refusals through the Python API
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(files):
  import jax.numpy as jnp

  from pixart_jax.pipeline import Pipeline

  return Pipeline.from_pretrained(files["pipe"], dtype=jnp.float32)


PIPE_ROWS = [
    ("empty-prompts", dict(prompts=[]), "prompts is empty"),
    ("prompt-not-str", dict(prompts=[None]), "prompts must be strings, got None"),
    ("guidance-inf", dict(guidance_scale=math.inf), "guidance_scale must be a finite number, got inf"),
    ("guidance-nan", dict(guidance_scale=math.nan), "guidance_scale must be a finite number, got nan"),
    ("steps-0", dict(steps=0), "steps must be a positive integer (>= 1), got 0"),
    ("steps-float", dict(steps=2.5), "steps must be a positive integer (>= 1), got 2.5"),
    ("height-0", dict(height=0, width=256), "height (pixels) must be a positive integer (>= 1), got 0"),
    ("width-negative", dict(height=256, width=-8), "width (pixels) must be a positive integer (>= 1), got -8"),
    ("seed-2**64", dict(seed=2**64), "seed must be an integer in [0, 2**32 - 1]"),
    ("seed-negative", dict(seed=-3), "seed must be an integer in [0, 2**32 - 1], got -3"),
]


@pytest.mark.parametrize("row", PIPE_ROWS, ids=[r[0] for r in PIPE_ROWS])
def test_pipeline_refuses(row, pipe):
  _, kw, message = row
  kw = dict(dict(prompts=["a cat"]), **kw)
  with pytest.raises(ValueError) as e:
    pipe(kw.pop("prompts"), **kw)
  assert message in str(e.value)


def test_pipeline_refuses_a_transformer_of_another_caption_width(pipe, files):
  from pixart_jax.convert.dit import load_transformer
  from pixart_jax.pipeline import Pipeline

  with pytest.raises(ValueError, match=r"takes 24-wide caption features .* gives 32-wide"):
    Pipeline(pipe.text_encoder, load_transformer(files["wide"]), pipe.vae)


def _smoke_config(**changes):
  from pixart_jax.train.config_defaults import base_config, smoke

  c = smoke(base_config(preset="tiny", table=None, batch_size=8, warmup=0))
  c.update_from_flattened_dict(changes)
  return c


CONFIG_ROWS = [
    ("ckpt_every", 0, "ckpt_every must be a positive integer"),
    ("keep", 0, "keep must be a positive integer"),
    ("sample.num_steps", 0, "sample.num_steps must be a positive integer"),
    ("sample.guidance", math.inf, "sample.guidance must be a finite number"),
    ("data.real_prompt_ratio", -0.1, "data.real_prompt_ratio must be a finite number >= 0 and <= 1"),
    ("data.num_workers", -1, "data.num_workers must be an integer >= 0"),
    ("optimizer.clip_threshold", 0.0, "optimizer.clip_threshold must be a finite number > 0"),
    ("optimizer.betas", (0.9, 1.5, 0.99), "optimizer.betas entry"),
]


@pytest.mark.parametrize("row", CONFIG_ROWS, ids=[r[0] for r in CONFIG_ROWS])
def test_train_config_refuses(row):
  from pixart_jax.train.config_defaults import check_config

  path, value, message = row
  with pytest.raises(ValueError) as e:
    check_config(_smoke_config(**{path: value}))
  assert message in str(e.value)


def test_train_config_recipes_pass():
  """Every shipped recipe (and its smoke shrink) passes the checks."""
  import importlib.util

  from pixart_jax.train.config_defaults import check_config

  sys.path.insert(0, str(ROOT / "configs"))
  try:
    for f in sorted((ROOT / "configs").glob("**/*.py")):
      if f.name.startswith("_"):
        continue
      spec = importlib.util.spec_from_file_location(f"_cfg_{f.parent.name}_{f.stem}", f)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      check_config(module.get_config())
      if f.parent.name == "configs":
        check_config(module.get_config("smoke"))
  finally:
    sys.path.remove(str(ROOT / "configs"))


@pytest.mark.parametrize("field, value, message", [
    ("depth", "28", "DiTConfig.depth must be a positive integer (>= 1), got '28'"),
    ("hidden_size", 0, "DiTConfig.hidden_size must be a positive integer"),
    ("interpolation_scale", math.nan, "DiTConfig.interpolation_scale must be a finite number > 0"),
    ("learn_sigma", "yes", "DiTConfig.learn_sigma must be true or false, got 'yes'"),
    ("kv_compress_layers", 3, "DiTConfig.kv_compress_layers must be a list of layer indices, got 3"),
])
def test_dit_config_refuses_wrong_types(field, value, message):
  from pixart_jax.models.config import DiTConfig

  with pytest.raises(ValueError) as e:
    DiTConfig(**{field: value})
  assert message in str(e.value)


def test_guard_turns_user_errors_into_one_line_and_keeps_bugs(capsys):
  """cli_errors.guard: ValueError / OSError -> `error: ...` and SystemExit(1); any other exception propagates."""
  from pixart_jax import cli_errors

  def fails(exc):
    def main(argv):
      raise exc
    return main

  cases = [(ValueError("--steps must be >= 1, got 0\nsecond line"), "error: --steps must be >= 1, got 0 second line"),
           (FileNotFoundError(2, "No such file or directory", "/x/y"), "error: /x/y: No such file or directory")]
  for exc, line in cases:
    with pytest.raises(SystemExit) as e:
      cli_errors.guard(fails(exc), verbose=lambda: False)([])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == line
  with pytest.raises(KeyError):  # a bug keeps its traceback
    cli_errors.guard(fails(KeyError("k")), verbose=lambda: False)([])
  assert cli_errors.verbosity_in(["--verbosity=2"]) == 2 and cli_errors.verbosity_in(["-v", "1"]) == 1
  assert cli_errors.verbosity_in(["--steps", "3"]) == 0

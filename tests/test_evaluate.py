"""`python -m pixart_jax.evaluate`: sample with a tiny random pipeline, FID with a tiny random pytorch-fid Inception
(legacy torch .pth) and CLIP score with a tiny random transformers CLIPModel directory, checked against the
PyTorch references (pytorch-fid's network, numpy/scipy statistics, transformers' CLIP with torchmetrics' formula);
resume, the claimed output folder, `stats` of image folders and prepared datasets, bad arguments."""
import json
import pathlib
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from inception_reference import Inception3, pytorch_fid_features, randomize_
from pixart_jax import cli_errors
from pixart_jax.evaluate import main
from train_testlib import fast_compiles
from test_clip import IMAGE, _hf_config, _random_clip, _tiny_tokenizer, _torch_embeds

WIDTH = 0.125  # the Inception at 1/8 of its channels: 256-d features


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  """Every `main` call builds its networks anew: the persistent cache turns their recompiles into disk reads."""
  with fast_compiles(tmp_path_factory.getbasetemp() / "xla_cache"):
    yield


def write_tiny_inception(path):
  """A random pytorch-fid Inception (FID blocks, 1/8 width) saved like the released .pth (legacy torch format)."""
  inception = randomize_(Inception3(num_classes=1008, aux_logits=False, fid=True, width=WIDTH), seed=0)
  torch.save(inception.state_dict(), path, _use_new_zipfile_serialization=False)
  return inception


def write_tiny_clip(clip_dir):
  """A random transformers CLIPModel directory: weights, config, CLIP BPE tokenizer, image processor config."""
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  tok = _tiny_tokenizer(clip_dir)
  clip = _random_clip(_hf_config(len(tok), tok.eos_token_id), seed=1)
  clip.save_pretrained(clip_dir)
  CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
                        ).save_pretrained(clip_dir)
  return clip, tok


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A tiny diffusers pipeline (64 px), a random pytorch-fid Inception .pth, a CLIPModel dir, 8 reference PNGs."""
  from pixart_jax.testing import make_tiny_pipeline

  root = tmp_path_factory.mktemp("evaluate")
  pipe = make_tiny_pipeline(root / "pipe", t5_dim=32, sample_size=8)
  pth = root / "pt_inception-random.pth"
  inception = write_tiny_inception(pth)
  clip_dir = root / "clip"
  clip, tok = write_tiny_clip(clip_dir)
  ref = root / "ref"
  ref.mkdir()
  rng = np.random.default_rng(0)
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ref / f"{i}.png")
  prompts = root / "prompts.txt"
  prompts.write_text("a cat\n\nthe cat at the mat\na red car\n")
  return dict(root=root, pipe=pipe, pth=pth, inception=inception, clip_dir=clip_dir, clip=clip, tok=tok, ref=ref,
              prompts=prompts)


def _torch_features(inception, images_u8: np.ndarray) -> np.ndarray:
  x = torch.from_numpy(images_u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
  return pytorch_fid_features(inception, x).numpy().astype(np.float64)


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
  """pytorch-fid's calculate_activation_statistics + calculate_frechet_distance, on all activations at once."""
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    off = np.eye(s1.shape[0]) * 1e-6
    covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
  covmean = covmean.real
  return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _read_pngs(folder, names) -> np.ndarray:
  return np.stack([np.asarray(Image.open(pathlib.Path(folder) / n).convert("RGB")) for n in names])


def _eval_args(a, out, *extra, ref=("--ref-images", "ref")):
  return ["--model", str(a["pipe"]), "--prompts", str(a["prompts"]), ref[0], str(a["root"] / ref[1]),
          "--inception", str(a["pth"]), "--clip", str(a["clip_dir"]), "--num", "6", "--batch-size", "4",
          "--steps", "2", "--size", "64x64", "--no-binning", "--dtype", "float32", "--guidance", "3",
          "--out", str(out), *extra]


@pytest.mark.slow
def test_stats_evaluate_resume(assets, tmp_path):
  a = assets
  # reference statistics of the image folder, in pytorch-fid's .npz
  main(["stats", "--images", str(a["ref"]), "--inception", str(a["pth"]), "--out", str(a["root"] / "ref.npz")])
  ref_imgs = _read_pngs(a["ref"], [f"{i}.png" for i in range(8)])
  ref_feats = _torch_features(a["inception"], ref_imgs)
  with np.load(a["root"] / "ref.npz") as f:
    np.testing.assert_allclose(f["mu"], ref_feats.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f["sigma"], np.cov(ref_feats, rowvar=False), rtol=1e-3, atol=1e-5)

  out = tmp_path / "eval"
  report = main(_eval_args(a, out))  # the reference from its images, cached in the output folder
  assert len(list(out.glob("ref_stats_*.npz"))) == 1
  names = [f"{i:05d}.png" for i in range(6)]
  assert sorted(p.name for p in (out / "images").glob("*.png")) == names
  assert sorted(p.name for p in (out / "batches").glob("*.npz")) == ["00000.npz", "00001.npz"]
  assert json.loads((out / "report.json").read_text())["fid"] == report["fid"] and report["num_images"] == 6
  sheet = Image.open(out / "contact_sheet.png")
  assert sheet.size == (3 * 64 + 2 * 2, 2 * 64 + 2)
  assert Image.open(out / "images" / "00003.png").text["prompt"] == "a cat"  # the 3 prompts cycled to 6 images

  # FID: pytorch-fid's network on the written PNGs, numpy statistics, scipy's sqrtm
  gen = _read_pngs(out / "images", names)
  want_fid = _scipy_fid(_torch_features(a["inception"], gen), ref_feats)
  assert report["fid"] == pytest.approx(want_fid, rel=1e-3)
  # CLIP score: transformers' CLIPModel + CLIP image processor, torchmetrics' formula (mean of 100 cos, >= 0)
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  captions = ["a cat", "the cat at the mat", "a red car"] * 2
  pixels = CLIPImageProcessorPil.from_pretrained(a["clip_dir"])(images=list(gen), return_tensors="np")["pixel_values"]
  enc = a["tok"](captions, padding=True, return_tensors="np")
  img, txt = _torch_embeds(a["clip"], pixels, enc["input_ids"], enc["attention_mask"])
  cos = (img / np.linalg.norm(img, axis=-1, keepdims=True) * txt / np.linalg.norm(txt, axis=-1, keepdims=True)).sum(-1)
  assert report["clip_score"] == pytest.approx(max(100 * cos.mean(), 0.0), rel=1e-4, abs=1e-4)

  # resume: a lost batch (its marker and images) is sampled again, the finished one is only read back
  (out / "batches" / "00001.npz").unlink()
  for n in names[4:]:
    (out / "images" / n).unlink()
  again = main(_eval_args(a, out))
  assert again["sampled_this_run"] == 2 and again["num_images"] == 6
  assert again["fid"] == pytest.approx(report["fid"], rel=1e-6)
  assert again["clip_score"] == pytest.approx(report["clip_score"], rel=1e-6)
  # nothing left to sample: rescored against the `stats` file of the same images, the same FID
  done = main(_eval_args(a, out, ref=("--ref-stats", "ref.npz")))
  assert done["sampled_this_run"] == 0 and done["fid"] == pytest.approx(report["fid"], rel=1e-6)

  # other settings into the same folder, and a folder this tool did not write, are refused
  with pytest.raises(ValueError, match="other settings.*seed"):
    main(_eval_args(a, out, "--seed", "1"))
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="did not write"):
    main(_eval_args(a, foreign))
  assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1


@pytest.mark.slow
def test_stats_of_a_prepared_dataset(tmp_path, assets):
  """`stats --prepared` decodes the dataset's latents (here the demo's pixel space-to-depth) and gives the
  statistics of the images it was prepared from (up to the bfloat16 storage of the latents)."""
  from pixart_jax.data.prepare_lib import PrepareOptions, prepare
  from pixart_jax.data.sources import resolve_source
  from pixart_jax.demo import build_encoders

  src = tmp_path / "images"
  src.mkdir()
  rng = np.random.default_rng(1)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / f"{i}.png")
    (src / f"{i}.txt").write_text(f"image number {i}")
  enc = build_encoders(tmp_path, 0)
  prepare(resolve_source(str(src)), enc, str(tmp_path / "data"), options=PrepareOptions(
      table={"1.00": (16, 16)}, shard_size=4, batch_size=4, min_side=8, resample="nearest", num_threads=1),
      source_id="test", progress=False)
  common = ["--inception", str(assets["pth"]), "--batch-size", "4"]
  main(["stats", "--prepared", str(tmp_path / "data"), "--out", str(tmp_path / "prepared.npz"), *common])
  main(["stats", "--images", str(src), "--out", str(tmp_path / "images.npz"), *common])
  with np.load(tmp_path / "prepared.npz") as p, np.load(tmp_path / "images.npz") as q:
    assert int(p["num_samples"]) == int(q["num_samples"]) == 6
    np.testing.assert_allclose(p["mu"], q["mu"], rtol=2e-2, atol=2e-2 * np.abs(q["mu"]).max())
  with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
    main(["stats", "--images", str(src), "--out", str(tmp_path / "images.npz"), *common])


@pytest.mark.parametrize("argv,message", [
    (["--prompts", "p.txt"], "--model is required"),
    (["stats", "--images", "."], "--inception is required"),
    (["stats", "--images", ".", "--inception", "/nonexistent/pt_inception.pth", "--out", "s.npz"],
     "--inception /nonexistent/pt_inception.pth: no such file"),
    (["stats", "--images", ".", "--inception", "x.pth", "--out", "s.txt"], "must end|ending in .npz"),
    (["stats", "--images", ".", "--prepared", "."], "not allowed with argument"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["stats", "--images", ".", "--inception", "x.pth", "--out", "s.npz", "--mesh", "data:4"], "bad entry 'data:4'"),
    (["stats", "--images", ".", "--inception", "x.pth", "--out", "s.npz", "--batch-size", "0"], "--batch-size"),
])
def test_bad_arguments_are_one_error_line(argv, message, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    cli_errors.run(main, argv)
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert re.search(message, err[0]), err[0]


def test_missing_reference_and_clip_are_refused(assets, capsys, tmp_path):
  a = assets
  base = ["--model", str(a["pipe"]), "--prompts", str(a["prompts"]), "--inception", str(a["pth"]),
          "--out", str(tmp_path / "o")]
  for argv, message in ((base + ["--clip", str(a["clip_dir"])], "give the reference"),
                        (base + ["--ref-stats", "r.npz"], "--clip is required"),
                        (base + ["--clip", str(tmp_path / "no_clip"), "--ref-stats", str(a["prompts"])],
                         "--clip .*no_clip: no such file")):
    with pytest.raises(SystemExit):
      cli_errors.run(main, argv)
    err = capsys.readouterr().err
    assert re.search(message, err), err
  assert not (tmp_path / "o").exists()  # refused before the output folder is touched


def test_claimed_output_is_resumed_only_by_the_same_tool(tmp_path):
  from pixart_jax.outputs import claim_output

  out = claim_output(tmp_path / "o", tool="evaluate", resume=True)
  (out / "kept.txt").write_text("1")
  assert claim_output(out, tool="evaluate", resume=True) == out and (out / "kept.txt").read_text() == "1"
  with pytest.raises(FileExistsError, match="holds the output of `evaluate`, not of `convert`"):
    claim_output(out, tool="convert", overwrite=True)
  with pytest.raises(FileExistsError, match="earlier evaluate output"):  # without resume: refused
    claim_output(out, tool="evaluate")
  assert (out / "kept.txt").read_text() == "1"
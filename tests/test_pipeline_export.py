"""Export round trip: our (modified) transformer -> a complete diffusers directory -> diffusers pipeline output
equals ours with the same initial latents."""
import os
import jax
import numpy as np
import pytest
from flax import nnx

import pixart_jax as pj
from pixart_jax.convert.pipeline_export import export_pipeline
from pixart_jax.testing import make_tiny_pipeline
from train_testlib import assert_matches_diffusers


def test_export_pipeline_round_trip(tmp_path):
  base = make_tiny_pipeline(tmp_path / "base", seed=3)
  ours = pj.Pipeline.from_pretrained(base, dtype=np.float32)
  # Stand-in for a fine-tune: perturb every DiT parameter.
  for _, v in nnx.to_flat_state(nnx.state(ours.transformer, nnx.Param)):
    v.set_value(v.get_value() + 0.02 * jax.random.normal(jax.random.key(v.get_value().size), v.get_value().shape))
  ours = pj.Pipeline(ours.text_encoder, ours.transformer, ours.vae)
  out = export_pipeline(ours.transformer, base, tmp_path / "export")
  got, lat = assert_matches_diffusers(ours, out)
  base_img = pj.Pipeline.from_pretrained(base, dtype=np.float32)(["a cat on a sofa"], height=256, width=256, steps=5,
                                                                  guidance_scale=4.5, latents=lat)
  assert np.abs(base_img.astype(int) - got.astype(int)).mean() > 0.5  # the export carries the modified weights


def test_failed_re_export_keeps_the_earlier_one(tmp_path, monkeypatch):
  """Re-export over an earlier export (overwrite=True) that fails while writing the transformer leaves the
  earlier export whole (it is built aside and swapped in only when complete); a re-export that works replaces it."""
  import pixart_jax.convert.pipeline_export as pe

  base = make_tiny_pipeline(tmp_path / "base", seed=3)
  ours = pj.Pipeline.from_pretrained(base, dtype=np.float32)
  out = export_pipeline(ours.transformer, base, tmp_path / "export")

  def snapshot():
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

  before = snapshot()
  assert any(k.startswith("transformer/") for k in before)

  def fail(*a, **k):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(pe, "write_transformer_files", fail)
  with pytest.raises(OSError, match="No space"):
    export_pipeline(ours.transformer, base, out, overwrite=True)
  assert snapshot() == before
  # a swap interrupted after moving the earlier transformer aside: the next export (failing too) puts it back
  (out / ".export-previous").mkdir()
  os.replace(out / "transformer", out / ".export-previous" / "transformer")
  with pytest.raises(OSError, match="No space"):
    export_pipeline(ours.transformer, base, out, overwrite=True)
  assert snapshot() == before
  monkeypatch.undo()
  export_pipeline(ours.transformer, base, out, overwrite=True)
  assert snapshot() == before  # same weights: the same files, and no staging leftovers


def test_export_never_deletes_what_it_did_not_write(tmp_path):
  """The staging / previous folders are cleared only in our own marked export and only when they hold what an
  export puts there: a user's folder with such names is refused before anything is written (even with
  overwrite=True), and a stranger's file inside our leftovers is refused, not deleted."""
  base = make_tiny_pipeline(tmp_path / "base", seed=3)
  ours = pj.Pipeline.from_pretrained(base, dtype=np.float32)

  def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

  user = tmp_path / "user"
  (user / ".export-previous").mkdir(parents=True)
  (user / ".export-previous" / "thesis.tex").write_text("years of work")
  (user / ".export-staging").mkdir()
  (user / ".export-staging" / "vae").write_text("not ours either")
  before = tree(user)
  with pytest.raises(FileExistsError, match="did not write"):
    export_pipeline(ours.transformer, base, user, overwrite=True)
  assert tree(user) == before
  out = export_pipeline(ours.transformer, base, tmp_path / "export")
  (out / ".export-previous").mkdir()
  (out / ".export-previous" / "notes.txt").write_text("mine")
  before = tree(out)
  with pytest.raises(FileExistsError, match=r"holds entries no export wrote \(\['notes.txt'\]\)"):
    export_pipeline(ours.transformer, base, out, overwrite=True)
  assert tree(out) == before


"""Image utilities: uint8 conversion and contact-sheet layout."""
import numpy as np
import pytest

from pixart_jax.images import contact_sheet, to_uint8


def test_to_uint8_matches_diffusers_postprocess():
  x = np.array([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(to_uint8(x), [0, 0, 64, 128, 255, 255, 255])


@pytest.mark.parametrize("gap", [0, 3])
def test_contact_sheet_places_images_row_major_with_gaps(gap):
  imgs = np.stack([np.full((4, 5, 3), 10 * (i + 1), np.uint8) for i in range(5)])
  sheet = np.asarray(contact_sheet(imgs, cols=2, gap=gap))
  assert sheet.shape == (3 * 4 + 2 * gap, 2 * 5 + gap, 3)
  for i in range(5):
    r, c = divmod(i, 2)
    cell = sheet[r * (4 + gap):r * (4 + gap) + 4, c * (5 + gap):c * (5 + gap) + 5]
    assert (cell == 10 * (i + 1)).all(), i
  assert (sheet[2 * (4 + gap):, 5 + gap:] == 255).all()  # the unused last cell stays white
  if gap:
    assert (sheet[4:4 + gap] == 255).all() and (sheet[:, 5:5 + gap] == 255).all()
  with pytest.raises(ValueError, match="gap"):
    contact_sheet(imgs, gap=-1)

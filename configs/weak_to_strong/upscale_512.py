"""Weak-to-strong stage `upscale_512`: its documentation and config come from the stage table in `_stage.py`."""
import pathlib
import runpy

__doc__, get_config = runpy.run_path(str(pathlib.Path(__file__).with_name("_stage.py")))["recipe"]("upscale_512")

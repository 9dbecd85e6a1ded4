"""Weak-to-strong stage `kv_compress_1024`: its documentation and config come from the stage table in `_stage.py`."""
import pathlib
import runpy

__doc__, get_config = runpy.run_path(str(pathlib.Path(__file__).with_name("_stage.py")))["recipe"]("kv_compress_1024")

"""vtoken.demos (installed from the repository folder ``demos/``): ``demos/app.py`` is the Gradio
side-by-side demo (``vtoken demo``). Under the bare name ``demos`` this folder is not importable
(``vtoken/_folder_guard.py``).
"""

if "." not in __name__:  # imported under its bare folder name: the name goes to its real owner
    import importlib.util as _util, pathlib as _pathlib
    _spec = _util.spec_from_file_location("_vtoken_folder_guard", _pathlib.Path(__file__).resolve().parents[1] / "vtoken" / "_folder_guard.py")
    _guard = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_guard)
    _guard.hand_over(__name__, __file__)

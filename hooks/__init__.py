"""vtoken.hooks (installed from the repository folder ``hooks/``): the objects that attach to a model.

May import vtoken.*, vtoken.scorers, vtoken.kernels; never imported by scorers/ or kernels/.
``import hooks`` never runs this folder (``vtoken/_folder_guard.py``).
"""

if "." not in __name__:  # imported under its bare folder name: the name goes to its real owner
    import pathlib, runpy
    runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "vtoken" / "_folder_guard.py"))["hand_over"](__name__, __file__)

"""vtoken.hooks (installed from the repository folder ``hooks/``): the objects that attach to a model.

May import vtoken.adapters, vtoken.scorers, vtoken.kernels and the registry / contract modules;
never imported by scorers/, kernels/ or adapters (docs/ARCHITECTURE.md). ``import hooks`` never runs
this folder (``vtoken/_folder_guard.py``).

The names below are the public surface that engines and plugins use (``from vtoken.hooks import
...``); everything else in the package is internal.
"""

if "." not in __name__:  # imported under its bare folder name: the name goes to its real owner
    import pathlib, runpy
    runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "vtoken" / "_folder_guard.py"))["hand_over"](__name__, __file__)
else:
    from vtoken.hooks.decode_cache import held_bytes
    from vtoken.hooks.generation_check import cached_generation_check
    from vtoken.hooks.handle import PruningHandle, handle_of
    from vtoken.hooks.probe import private_attention_config, register_attention_implementation

    __all__ = ["PruningHandle", "handle_of", "held_bytes", "private_attention_config", "register_attention_implementation",
               "cached_generation_check"]

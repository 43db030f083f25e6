"""emu_mc: pretraining stack for Emu-style multimodal models."""
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """Installed, kernels/ is `emu_mc.kernels` (pyproject package-dir mapping). Imported straight from
    a source checkout (cwd on sys.path), apply the same mapping by hand."""
    if importlib.util.find_spec(__name__ + ".kernels") is not None:
        return
    kernels_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(kernels_dir, "__init__.py")
    if not os.path.exists(init):
        return
    spec = importlib.util.spec_from_file_location(
        __name__ + ".kernels", init, submodule_search_locations=[kernels_dir]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[__name__], "kernels", module)


_map_source_kernels()

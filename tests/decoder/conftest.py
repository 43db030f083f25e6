"""The generation tests' fixtures (a random tiny Emu, image files, a tiny pretraining checkpoint)."""
from tests.inference.conftest import image_files, tiny_emu, tiny_run  # noqa: F401  (pytest fixtures)

"""The generation tests' fixtures (a random tiny Emu, image files, a tiny pretraining checkpoint) and a
tiny random decoder directory whose UNet reads the tiny LLM's width (64)."""
import pytest

from tests.inference.conftest import image_files, tiny_emu, tiny_run  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="session")
def decoder_init(tmp_path_factory):
    from emu_mc.inference.tiny_decoder import write_tiny_decoder

    return write_tiny_decoder(str(tmp_path_factory.mktemp("init") / "decoder"), cross_attention_dim=64, sample_size=8)

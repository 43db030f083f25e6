"""Generation from a trained Emu: captions and answers (text) and images.

    from emu_mc.inference import Request, TextSettings, generate_text, load_emu
    emu = load_emu("runs/tiny")                                       # a pretraining run or checkpoint
    [out] = generate_text(emu, [Request("{image} a photo of", images=["cat.jpg"])], TextSettings(num_beams=5))

    from emu_mc.inference import ImageSettings, VisualDecoder, generate_images
    decoder = VisualDecoder.load("sd-emu/", llm_width=emu.cfg.model.llm.hidden_size, device=emu.device)
    images, nsfw = generate_images(emu, decoder, [Request("a cat on a table")], ImageSettings(seed=0))

CLI: `python -m emu_mc.generate --help`. The diffusers import happens only when a decoder is loaded.
"""
from emu_mc.inference.decoder import VisualDecoder
from emu_mc.inference.image import generate_images, regress_embeddings
from emu_mc.inference.loading import LoadedEmu, load_emu
from emu_mc.inference.prompts import Request
from emu_mc.inference.settings import GenerationInputError, ImageSettings, TextSettings
from emu_mc.inference.text import TextResult, generate_text

__all__ = ["VisualDecoder", "generate_images", "regress_embeddings", "LoadedEmu", "load_emu", "Request",
           "GenerationInputError", "ImageSettings", "TextSettings", "TextResult", "generate_text"]

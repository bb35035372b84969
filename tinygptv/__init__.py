"""tinygptv: TinyGPT-V (arXiv 2312.16862) in plain PyTorch.

Public API (kept stable)::

    model = tinygptv.load("path/to/checkpoint" | "tiny" | "tinygptv-phi2")
    model.generate(image, "What is in the picture?")
    model.loglikelihood(image, "<Img><ImageHere></Img> Is it red?", " yes")
"""

from tinygptv.checkpoint import build_empty, load, save
from tinygptv.config import ModelConfig, PRESETS, preset
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.templates import ChatTemplate, TEMPLATES
from tinygptv.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["load", "save", "build_empty", "ModelConfig", "PRESETS", "preset", "TinyGPTV", "ChatTemplate",
           "TEMPLATES", "Tokenizer", "__version__"]

"""CLIP text side: the BPE tokenizer and the text transformer of Stable Diffusion v1."""
from clip.tokenizer import Tokenizer
from clip.model import CLIPTextModel

__all__ = ["Tokenizer", "CLIPTextModel"]

"""Configuration of the CLIP text transformer."""
from dataclasses import dataclass


@dataclass
class CLIPTextConfig:
    """CLIP ViT-L/14 text tower (`openai/clip-vit-large-patch14`)."""
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-5

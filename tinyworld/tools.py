"""What the tiny world's result commands (evaluate, ti_results, neti_results, hiper_eval) share:
loading the model they score, refused in one line before any work when it cannot be scored,
and the advice they give when memory runs out."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

# The analyzer reads the world's 32-px images: a model that draws at more than this is not a
# tiny-world model (an SD file would sample for hours and be read at a fraction of its size).
MAX_IMAGE_SIZE = 64

# They sample 64 tiny images at a time and train one word at a time: well under 1 GiB.
MEMORY_ADVICE = "the tiny world's commands need well under 1 GiB; close other programs and run it again"


def load_tiny_model(ckpt: Path, device="cpu", sample_steps: Optional[Dict[str, int]] = None):
    """The tiny-world model at `ckpt` on `device`. `sample_steps` maps each option that sets a
    number of DDIM steps to its value ({"--steps": 50}): more than the schedule's training
    timesteps is refused here, not after the training that comes before the sampling."""
    import ldm
    from ldm.cli import CLIError
    model = ldm.load(ckpt, device=device)  # a missing or unreadable file: one line (ldm.cli.run)
    if model.config.image_size > MAX_IMAGE_SIZE:
        raise CLIError(f"{ckpt} is a {model.config.image_size}-px model; the tiny world needs the tiny model "
                       f"(at most {MAX_IMAGE_SIZE} px)")
    most = model.schedule.num_timesteps
    for flag, steps in (sample_steps or {}).items():
        if steps > most:
            raise CLIError(f"{flag} {steps}: at most {most}, the model's training timesteps")
    return model

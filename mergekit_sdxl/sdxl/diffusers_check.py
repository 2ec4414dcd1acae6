"""Load a single-file SDXL checkpoint in diffusers and run two denoising steps.

The proof that a merged file is a usable model: used by ``mergekit-sdxl demo`` and the tests.
diffusers is a test extra, imported here only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

PathLike = Union[str, Path]


def load_pipeline(checkpoint: PathLike, config_dir: PathLike):
    """``StableDiffusionXLPipeline`` from one file, offline: configs from ``config_dir``, no tokenizers."""
    import diffusers

    return diffusers.StableDiffusionXLPipeline.from_single_file(
        str(checkpoint),
        config=str(config_dir),
        tokenizer=None,
        tokenizer_2=None,
        local_files_only=True,
        torch_dtype=torch.float32,
    )


def denoise_two_steps(checkpoint: PathLike, config_dir: PathLike, size: int = 64, seed: int = 0):
    """Image array [1, size, size, 3] from 2 steps, with random prompt embeddings (no tokenizer)."""
    pipe = load_pipeline(checkpoint, config_dir)
    generator = torch.Generator().manual_seed(seed)
    context = pipe.unet.config.cross_attention_dim
    pooled = pipe.text_encoder_2.config.projection_dim
    return pipe(
        prompt_embeds=torch.randn(1, 77, context, generator=generator),
        pooled_prompt_embeds=torch.randn(1, pooled, generator=generator),
        negative_prompt_embeds=torch.zeros(1, 77, context),
        negative_pooled_prompt_embeds=torch.zeros(1, pooled),
        num_inference_steps=2,
        height=size,
        width=size,
        output_type="np",
        generator=generator,
    ).images

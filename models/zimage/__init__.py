"""Z-Image (diffusers ZImagePipeline) as stages: text encoding, denoising, decode."""

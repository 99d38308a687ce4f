"""GLM-Image (diffusers GlmImagePipeline) as stages: AR, before denoising, denoising, decode."""

"""Image-quality metrics in JAX: FID (pytorch-fid's InceptionV3, streamed statistics, Frechet distance) and
CLIP score (transformers' CLIPModel towers, torchmetrics' definition)."""

"""Vision conditioning through cross-attention: encoders, projectors, LLaVA data, fine-tuning and eval.

Needs the `vision` extra (timm, pillow) for images; see docs/vision.md.
"""

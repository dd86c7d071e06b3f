"""Training: fast graphs (fused branches), distributed helpers, the HF Trainer, the
``lorafx train`` loop."""

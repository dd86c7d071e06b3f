"""The LoRA model operations the API exposes: plan, inject, merge, parameters,
adapters in and out."""

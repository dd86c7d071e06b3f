"""LoRA variants as small separate pieces: PiSSA / OLoRA init (``init``), DoRA (``dora``),
LoRA+ optimizer groups (``loraplus``). rsLoRA and rank/alpha patterns live in LoraConfig."""

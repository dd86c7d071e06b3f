"""Graph helpers shared by the passes: copies that share tensors, get_attr walking,
copy-on-write attribute setting, and the LoRA state the passes record on a GraphModule
(``state``), which branches, variants, passes and everything after them read."""

"""Graph helpers shared by the passes: copies that share tensors, get_attr walking,
copy-on-write attribute setting."""

"""The synthetic vision-language world: procedurally rendered tasks, a reference pool, and a tiny
pretrained CLIP, so that zscl's science runs end to end on a CPU with no downloads."""

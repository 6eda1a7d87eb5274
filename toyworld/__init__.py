"""The toy world: a procedural, captioned image world with exact ground truth, its
subjects, a small pretrained text-to-image base (models/toyworld-base) and metrics.

See docs/toyworld.md. Modules: world (renderer, captions), split (what the base trains
on and what is held out), subjects (novel objects, examples/), metrics (prompt and
subject fidelity from pixels), embeddings (DINO / CLIP scorers), vae (the base's
hand-set VAE), base (the base's other components and training), train_base (its
command line).
"""

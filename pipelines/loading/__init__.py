"""Loading and I/O: weights folders and their components (text encoder, VAE, fast decoder, prompt extender),
LoRA files, and video files."""

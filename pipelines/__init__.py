"""Streaming causal (Self-Forcing) video generation on the Wan2.1-T2V-1.3B architecture."""
import os

# Growable allocator segments keep the streamed (low-VRAM) profile from fragmenting the cache;
# only a default, and it must be set before CUDA is first used.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

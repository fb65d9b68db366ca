import os
import tempfile

# Tests never touch the user's cache and never reach for a model hub.
os.environ.setdefault("FLUXLAB_CACHE", tempfile.mkdtemp(prefix="fluxlab-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

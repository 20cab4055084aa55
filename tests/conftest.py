import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hub_server import hub_server  # noqa: E402, F401


def pytest_collection_finish(session):
    """Keep what the collected test modules imported (Transformers, torch) out of every later `gc.collect` (the
    engines call it between layers): each call would scan it all, about 0.2 s a call."""
    import gc

    gc.freeze()

import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))


def tiny_config(mod, **kw):
    """A copy of module `mod`'s tiny preset with the toy world's vocabulary and the fields in kw, checked."""
    import copy
    from data.toyworld import VOCAB
    cfg = copy.deepcopy(mod.CONFIGS["tiny"])
    cfg.vocab = tuple(VOCAB)
    for k, v in kw.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    return cfg


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A small toy-world dataset written once per test session: (folder, arrays, meta)."""
    from data.toyworld import generate, load_dataset, write_dataset
    folder = str(tmp_path_factory.mktemp("toydata"))
    arrays, meta = generate(24, "train", seed0=0)
    write_dataset(folder, arrays, meta)
    arrays, meta = load_dataset(folder)
    return folder, arrays, meta


def need(module: str):
    """Import an optional extra (requirements-extra.txt): under CI (CI=true) a missing one fails the
    test, elsewhere the test is skipped with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip(f"{module} is not installed: pip install -r requirements-extra.txt", allow_module_level=True)

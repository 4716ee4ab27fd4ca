import importlib
import os
import sys

import numpy as np
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


def read_png(path) -> np.ndarray:
    """Read back an 8-bit RGB PNG as common.save_png writes it (one IDAT, every row filter 0) -> (H, W, 3) uint8."""
    import struct
    import zlib
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    W, H, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (depth, colour) == (8, 2), (depth, colour)
    raw = zlib.decompress(data[data.index(b"IDAT") + 4: data.index(b"IEND") - 8])
    rows = np.frombuffer(raw, np.uint8).reshape(H, 1 + 3 * W)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(H, W, 3).copy()


def decode_gif(data: bytes) -> np.ndarray:
    """A minimal GIF decoder (global palette, 8-bit LZW) to check save_gif's pixels."""
    import struct
    assert data[:6] == b"GIF89a" and data[-1:] == b"\x3b"
    W, H = struct.unpack("<HH", data[6:10])
    pal = np.frombuffer(data[13:13 + 768], np.uint8).reshape(256, 3)
    i, frames = 13 + 768, []
    while data[i] != 0x3B:
        if data[i] == 0x21:                                   # extension: skip its sub-blocks
            i += 2
            while data[i]:
                i += data[i] + 1
            i += 1
            continue
        assert data[i] == 0x2C
        i += 10
        min_size = data[i]
        i += 1
        raw = bytearray()
        while data[i]:
            raw += data[i + 1: i + 1 + data[i]]
            i += data[i] + 1
        i += 1
        bits = int.from_bytes(bytes(raw), "little")
        clear, end = 1 << min_size, (1 << min_size) + 1
        pos, size, table, prev, out = 0, min_size + 1, None, None, []
        while True:
            code = (bits >> pos) & ((1 << size) - 1)
            pos += size
            if code == clear:
                table, size, prev = {k: [k] for k in range(clear)}, min_size + 1, None
                continue
            if code == end:
                break
            entry = table[code] if code in table else table[prev] + table[prev][:1]
            out += entry
            if prev is not None:
                table[len(table) + 2] = table[prev] + entry[:1]
                if len(table) + 2 == (1 << size) and size < 12:
                    size += 1
            prev = code
        frames.append(pal[np.array(out)].reshape(H, W, 3))
    return np.stack(frames)


def noise_policy(draws: list):
    """A sample.Policy whose chunks are the sampling noise itself (each call's draws appended to `draws`) and
    whose value never drops: two passes that start from the same generator state draw the same sequence, and
    any pass that starts elsewhere does not, so `draws` tells which noise each pass of sample.py read."""
    import torch
    import sample

    class NoisePolicy(sample.Policy):
        def act(self, frames, states, texts, generator):
            z = torch.rand(len(frames), 4, 4, generator=generator, dtype=torch.float64).numpy()
            draws.append(z)
            return {"actions": (z - 0.5) * 0.3, "value": np.full(len(frames), 0.5)}

    return NoisePolicy

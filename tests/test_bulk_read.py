"""The bulk safetensors reader gives what safetensors' own loader gives, tensor for tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from tryon_lab.bulk_read import read_header, read_safetensors, tensor_views


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)  # byte-exact comparison for every dtype, FP8 included


@pytest.fixture
def mixed_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.qdata": torch.randn(33, 17, generator=g).to(torch.float8_e4m3fn),
        "w.scale": torch.rand(33, 1, generator=g),
        "bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 5, generator=g).half(),
        "steps": torch.arange(5, dtype=torch.int64),
        "mask": torch.rand(9, generator=g) > 0.5,
        "odd_bytes": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    return path


def test_cpu_read_equals_load_file(mixed_file):
    expected = load_file(str(mixed_file))
    got, metadata = read_safetensors(mixed_file, "cpu", workers=3)
    assert metadata == {"format": "pt", "note": "x"}
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(_raw(got[name]), _raw(t)), name
        assert got[name].data_ptr() % 16 == 0 or got[name].numel() == 0  # own allocation, not a view at an offset


def test_views_of_the_data_block_equal_load_file(mixed_file):
    """What the GPU path does after its chunked copy: every tensor a view of the one data block."""
    header, start = read_header(mixed_file)
    data = torch.frombuffer(bytearray(mixed_file.read_bytes()[start:]), dtype=torch.uint8)
    views = tensor_views(header, data)
    for name, t in load_file(str(mixed_file)).items():
        assert views[name].dtype == t.dtype and torch.equal(_raw(views[name]), _raw(t)), name
    for name, v in views.items():  # views where the offset allows, own copies elsewhere: all 16-byte aligned
        offset = header[name]["data_offsets"][0]
        shares = v.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()
        assert shares == (offset % 16 == 0), name
        assert (v.data_ptr() - data.data_ptr()) % 16 == 0 or not shares


def test_misaligned_offset_gets_its_own_copy():
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    data = torch.tensor(list(b"\x07" + struct.pack("<2f", 1.5, -3.0)), dtype=torch.uint8)
    views = tensor_views(header, data)
    assert views["a"].tolist() == [7] and views["b"].tolist() == [1.5, -3.0]
    assert views["b"].data_ptr() % 16 == 0  # a view at offset 1 would be misaligned: its own allocation


def test_truncated_file_names_the_problem(mixed_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(mixed_file.read_bytes()[:-40])
    with pytest.raises(OSError, match="truncated"):
        read_safetensors(cut, "cpu")


def test_unknown_dtype_points_to_load_file(tmp_path):
    header = json.dumps({"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path = tmp_path / "f4.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(ValueError, match="load_file"):
        read_safetensors(path, "cpu")


def test_the_gil_switch_interval_is_shortened_while_any_read_asks_and_put_back_after_the_last():
    import sys

    from tryon_lab.bulk_read import SWITCH_INTERVAL

    before = sys.getswitchinterval()
    with SWITCH_INTERVAL.shortened(0.5):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        with SWITCH_INTERVAL.shortened(1.0):  # a second read asking for longer keeps the shorter one
            assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert sys.getswitchinterval() == pytest.approx(0.0005)  # the first read still runs
    assert sys.getswitchinterval() == before
    with SWITCH_INTERVAL.shortened(None):  # None: left alone
        assert sys.getswitchinterval() == before


def test_a_prefetch_with_a_switch_interval_reads_the_same_tensors_and_puts_the_interval_back(tmp_path):
    import sys

    from tryon_lab.bulk_read import prefetch

    tensors = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    before = sys.getswitchinterval()
    got = prefetch([tmp_path / "t.safetensors"], "cpu", "test-read", switch_ms=0.2).result()
    assert all(torch.equal(got["tensors"][k], v) for k, v in tensors.items())
    assert got["thread"].startswith("test-read") and sys.getswitchinterval() == before

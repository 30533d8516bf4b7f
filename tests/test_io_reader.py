"""SafetensorsFile, Checkpoint and check_compatible: strict validation, zero-copy reads, HF folders."""
import gc
import json
import os
import re
import struct
import textwrap
import sys

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from pymerge.errors import CheckpointError, InputError
from pymerge.io import SAFETENSORS_DTYPES, Checkpoint, SafetensorsFile, TensorInfo, check_compatible
from pymerge.io.checkpoint import read_model_config
from io_helpers import bits, random_tensor


# ---- helpers ------------------------------------------------------------------------------------
def write_raw(path, header, data=b"", header_len=None):
    """A hand-built safetensors file: header (dict, str or bytes), then data."""
    raw = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header)).encode("utf-8")
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path




def mmap_base(f: SafetensorsFile) -> int:
    return np.frombuffer(f._mm, dtype=np.uint8).ctypes.data


def check_error(excinfo, path, tensor=None):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    if tensor is not None:
        assert repr(tensor) in msg, msg
    return msg


def safetensors_rejects(path) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:
        return True
    return False


# ---- strict validation --------------------------------------------------------------------------
F16x4 = {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}

# (id, header, data, header_len override, tensor named in the error, words in the error,
#  whether the safetensors library rejects it too)
CORRUPT = [
    ("header_len_beyond_file", {"w": F16x4}, b"\0" * 8, 10_000, None, "past the end of the file", True),
    ("header_len_over_limit", {"w": F16x4}, b"\0" * 8, 100_000_001, None, "limit", True),
    ("not_json", "{not json", b"", None, None, "not valid JSON", True),
    ("deep_nesting", '{"w": ' + "[" * 100_000 + "]" * 100_000 + "}", b"", None, None, "nested too deeply", True),
    ("not_object", "[1, 2]", b"", None, None, "not a JSON object", True),
    ("not_utf8", b'{"w\xff\xfe": 1}', b"", None, None, "not valid UTF-8", True),
    ("duplicate_key", '{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                      '"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"\0\0", None, None,
     "duplicate key", False),
    ("unknown_dtype", {"w": {"dtype": "F12", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, None, "w",
     "unknown dtype", True),
    ("subbyte_dtype", {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2, None, "w",
     "not supported", False),
    ("span_mismatch", {"lm_head.weight": {"dtype": "F16", "shape": [4, 4], "data_offsets": [10, 20]}},
     b"\0" * 20, None, "lm_head.weight",
     "data_offsets [10, 20] hold 10 bytes but dtype F16 x shape [4, 4] needs 32", True),
    ("begin_after_end", {"w": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8, None, "w",
     "end before they begin", True),
    ("negative_dim", {"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b"", None, "w",
     "non-negative", True),
    ("float_dim", {"w": {"dtype": "U8", "shape": [2.0], "data_offsets": [0, 2]}}, b"\0\0", None, "w",
     "non-negative", True),
    ("offsets_not_pair", {"w": {"dtype": "U8", "shape": [2], "data_offsets": [0]}}, b"\0\0", None, "w",
     "pair", True),
    ("missing_key", {"w": {"dtype": "U8", "shape": [2]}}, b"\0\0", None, "w", "missing ['data_offsets']", True),
    ("extra_key", {"w": {**F16x4, "stride": [1]}}, b"\0" * 8, None, "w", "unexpected ['stride']", False),
    ("entry_not_object", {"w": [1, 2]}, b"", None, "w", "not an object", True),
    ("overlap", {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                 "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}, b"\0" * 12, None, "b",
     "overlap tensor 'a'", True),
    ("hole", {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
              "b": {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]}}, b"\0" * 10, None, "b",
     "hole of 2 bytes", True),
    ("hole_at_start", {"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8, None, "a",
     "hole of 4 bytes at 0", True),
    ("out_of_bounds", {"w": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}, b"\0" * 8, None, "w",
     "past the end of the data region (8 bytes)", True),
    ("trailing_bytes", {"w": F16x4}, b"\0" * 11, None, None, "3 trailing bytes after tensor 'w'", True),
    ("metadata_not_string", {"__metadata__": {"format": "pt", "step": 3}, "w": F16x4}, b"\0" * 8, None,
     None, "__metadata__ value of 'step'", True),
    ("metadata_not_map", {"__metadata__": ["pt"], "w": F16x4}, b"\0" * 8, None, None, "__metadata__", True),
    # a lone surrogate escape: Python's json decodes it, the format's library refuses it (not text)
    ("lone_surrogate_name", '{"x\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0", None,
     "x\ud800", "lone surrogate", True),
    ("lone_surrogate_metadata", '{"__metadata__": {"k": "\\udc00"}, "w": {"dtype": "U8", "shape": [1], '
                                '"data_offsets": [0, 1]}}', b"\0", None, None, "lone surrogate", True),
    ("dim_past_int64", {"w": {"dtype": "U8", "shape": [0, 2**64 + 5], "data_offsets": [0, 0]}}, b"", None, "w",
     "below 2**63", True),
    # a product past 2**64 before a 0: accepted (0 bytes) and written, a file the library refuses (an audit)
    ("product_overflows_before_a_zero", {"w": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}},
     b"", None, "w", "overflows: the product of its sizes passes 2**64", True),
    # torch's reductions raised "only tensors with up to 64 dims are supported" mid-merge (arcee_fusion)
    ("too_many_dims", {"w": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4, None, "w",
     "shape has 65 dimensions; pymerge supports at most 64", False),
]


@pytest.mark.parametrize("case", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_file_is_rejected_in_one_line(tmp_path, case):
    _, header, data, header_len, tensor, words, lib_rejects = case
    path = write_raw(tmp_path / "model-00001.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsFile(path)
    msg = check_error(excinfo, path, tensor)
    assert words in msg, msg
    if lib_rejects:  # we are at least as strict as the format's own library
        assert safetensors_rejects(path)


def test_a_file_that_cannot_be_mapped_is_named(tmp_path, monkeypatch):
    """mmap's ENOMEM (an address-space limit) carries no file name: the CLI said 'output: Cannot allocate memory'."""
    import errno
    import pymerge.io.safetensors_file as st_module

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    path = write_raw(tmp_path / "model.safetensors", {"w": F16x4}, b"\0" * 8)
    monkeypatch.setattr(st_module.mmap, "mmap", no_room)
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsFile(path)
    assert "cannot map the file into memory: Cannot allocate memory" in check_error(excinfo, path)


def test_span_mismatch_message_is_exact(tmp_path):
    path = write_raw(tmp_path / "model-00001.safetensors",
                     {"lm_head.weight": {"dtype": "F16", "shape": [4, 4], "data_offsets": [10, 20]}}, b"\0" * 20)
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsFile(path)
    assert str(excinfo.value) == (f"{path}: tensor 'lm_head.weight': data_offsets [10, 20] hold 10 bytes "
                                  f"but dtype F16 x shape [4, 4] needs 32")


@pytest.mark.parametrize("size", [0, 5])
def test_truncated_file(tmp_path, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x08" * size)
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsFile(path)
    assert "too short" in check_error(excinfo, path)


def test_truncated_data_region(tmp_path):
    src = tmp_path / "ok.safetensors"
    safetensors.torch.save_file({"w": torch.ones(16)}, str(src))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[:-4])
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsFile(cut)
    check_error(excinfo, cut, "w")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsFile(tmp_path / "nope.safetensors")
    check_error(excinfo, tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError):
        SafetensorsFile(tmp_path)


def test_checkpoint_error_is_an_input_error():
    assert issubclass(CheckpointError, InputError)


def test_empty_and_header_only_files_are_valid(tmp_path):
    path = write_raw(tmp_path / "empty.safetensors", "{}")
    with SafetensorsFile(path) as f:
        assert f.names() == [] and f.metadata is None
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": {"format": "pt"}})
    with SafetensorsFile(path) as f:
        assert f.names() == [] and f.metadata == {"format": "pt"}


# ---- reading ------------------------------------------------------------------------------------
def every_dtype_tensors():
    out = {}
    for i, (code, dtype) in enumerate(sorted(SAFETENSORS_DTYPES.items())):
        out[f"t.{code}"] = random_tensor(dtype, (3, 5), seed=i)  # 15 elements: odd, misaligns what follows
        out[f"s.{code}"] = random_tensor(dtype, (), seed=100 + i)
        out[f"z.{code}"] = torch.empty((0, 7), dtype=dtype)
    return out


def test_reads_files_saved_by_safetensors_identically(tmp_path):
    tensors = every_dtype_tensors()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "note": "hi"})
    with SafetensorsFile(path) as f, safetensors.safe_open(str(path), framework="pt") as ref:
        assert sorted(f.names()) == sorted(ref.keys())
        assert f.metadata == ref.metadata() == {"format": "pt", "note": "hi"}
        for name in f.names():
            t, r = f.tensor(name), ref.get_tensor(name)
            assert t.dtype == r.dtype == tensors[name].dtype, name
            assert t.shape == r.shape == tensors[name].shape, name
            assert bits(t) == bits(r) == bits(tensors[name]), name
            info = f.info(name)
            assert isinstance(info, TensorInfo) and info.name == name
            assert info.dtype == t.dtype and info.shape == tuple(t.shape)
            assert info.nbytes == t.numel() * t.element_size()


def test_names_are_in_offset_order(tmp_path):
    header = {"b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
              "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "c": {"dtype": "U8", "shape": [0], "data_offsets": [4, 4]}}
    path = write_raw(tmp_path / "x.safetensors", header, b"\1\2\3\4")
    with SafetensorsFile(path) as f:
        assert f.names() == ["a", "b", "c"]
        assert f.tensor("b").tolist() == [3, 4]
        assert f.tensor("c").shape == (0,)
        n = len(path.read_bytes()) - 4
        assert [f.info(k).file_offset for k in "abc"] == [n, n + 2, n + 4]


def test_a_copy_or_pickle_of_an_open_file_or_checkpoint_names_the_file(tmp_path):
    """The refusal was the mmap's own ("cannot pickle 'mmap.mmap' object", or memoryview's), naming neither the
    object nor the file (an audit)."""
    import copy
    import pickle
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.randn(4)}, str(path))
    with SafetensorsFile(path) as f, Checkpoint(tmp_path) as ck:
        for obj, hows in ((f, (copy.copy, copy.deepcopy, pickle.dumps)), (ck, (copy.deepcopy, pickle.dumps))):
            for how in hows:
                with pytest.raises(TypeError, match=rf"^{re.escape(str(path))}: an open safetensors file .* cannot "
                                                    r"be copied or pickled"):
                    how(obj)


def test_views_are_zero_copy_and_outlive_close(tmp_path):
    path = tmp_path / "model.safetensors"
    w = torch.randn(64, 32)
    safetensors.torch.save_file({"w": w, "b": torch.randn(32)}, str(path))
    f = SafetensorsFile(path)
    base, size = mmap_base(f), len(f._mm)
    t = f.tensor("w")
    assert base <= t.data_ptr() and t.data_ptr() + t.numel() * 4 <= base + size
    assert t.data_ptr() == base + f.info("w").file_offset
    assert f.tensor("w").data_ptr() == t.data_ptr()  # the same bytes, not a fresh copy
    f.close()
    with pytest.raises(ValueError):
        f.tensor("w")
    gc.collect()
    assert torch.equal(t, w)  # the mapping lives as long as a view does


def test_misaligned_tensor_is_copied_aligned(tmp_path):
    # U8 x 3 then F32 x 2: with the header padded to 8 bytes, the F32 data starts at an odd offset.
    header = {"u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "f": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = write_raw(tmp_path / "odd.safetensors", raw, bytes([7, 8, 9]) + struct.pack("<2f", 1.5, -2.0))
    with SafetensorsFile(path) as f:
        assert f.info("f").file_offset % 4 == 3
        t = f.tensor("f")
        assert t.tolist() == [1.5, -2.0]
        assert t.data_ptr() % 4 == 0
        base = mmap_base(f)
        assert not base <= t.data_ptr() < base + len(f._mm)  # a copy
        u = f.tensor("u")
        assert u.data_ptr() == base + f.info("u").file_offset  # aligned: still a view


def test_prefetch_and_release(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {"big": torch.randn(5000), "empty": torch.empty(0), "s": torch.tensor(1.0)}
    safetensors.torch.save_file(tensors, str(path))
    with SafetensorsFile(path) as f:
        for name in f.names():
            f.prefetch(name)
            f.release(name)
            assert bits(f.tensor(name)) == bits(tensors[name])


def test_unknown_tensor_name(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
    with SafetensorsFile(path) as f:
        assert "w" in f and "x" not in f and len(f) == 1
        with pytest.raises(CheckpointError) as excinfo:
            f.info("x")
        check_error(excinfo, path, "x")


# ---- Checkpoint ---------------------------------------------------------------------------------
def make_sharded(folder, shards, index_map=None, name="model"):
    """shards: {file name: {tensor: value}}; writes the files and an index (index_map overrides)."""
    folder.mkdir(exist_ok=True)
    weight_map = {}
    for fname, tensors in shards.items():
        if fname.endswith(".bin"):
            torch.save(tensors, folder / fname)
        else:
            safetensors.torch.save_file(tensors, str(folder / fname))
        weight_map.update({k: fname for k in tensors})
    index_name = "pytorch_model.bin.index.json" if name == "bin" else "model.safetensors.index.json"
    (folder / index_name).write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map if index_map is None else index_map}))
    return folder


def two_shards():
    return {"model-00001-of-00002.safetensors": {"embed": torch.randn(4, 3), "l0.w": torch.randn(3, 3)},
            "model-00002-of-00002.safetensors": {"l1.w": torch.randn(3, 3).half(), "head": torch.randn(3, 4)}}


def test_sharded_folder(tmp_path):
    shards = two_shards()
    folder = make_sharded(tmp_path / "m", shards)
    with Checkpoint(folder) as ck:
        assert ck.path == folder and ck.folder == folder
        # shard order, then each file's order (safetensors sorts by dtype, then name)
        assert ck.names() == [n for f in sorted(shards) for n in SafetensorsFile(folder / f).names()]
        assert set(ck.names()) == {"embed", "l0.w", "l1.w", "head"}
        for fname, tensors in shards.items():
            for k, v in tensors.items():
                assert ck.file_of(k) == folder / fname
                assert torch.equal(ck.tensor(k), v)
                assert ck.info(k).shape == tuple(v.shape)
                ck.prefetch(k)
        assert ck.total_bytes == sum(v.numel() * v.element_size() for s in shards.values() for v in s.values())
        assert ck.files == [folder / f for f in sorted(shards)]


def test_single_file_and_single_file_folder(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
    with Checkpoint(path) as ck:
        assert ck.folder == tmp_path and ck.names() == ["w"] and ck.file_of("w") == path
    folder = tmp_path / "m"
    folder.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    torch.save({"other": torch.ones(1)}, folder / "pytorch_model.bin")
    with Checkpoint(str(folder)) as ck:  # safetensors wins over the pickle, like transformers
        assert ck.folder == folder and ck.names() == ["w"]


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(tmp_path / "nope")
    check_error(excinfo, tmp_path / "nope")
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(tmp_path)
    assert "model.safetensors" in check_error(excinfo, tmp_path)


def test_index_missing_shard(tmp_path):
    shards = two_shards()
    folder = make_sharded(tmp_path / "m", shards)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    msg = check_error(excinfo, folder / "model.safetensors.index.json")
    assert "'model-00002-of-00002.safetensors'" in msg and "missing" in msg


@pytest.mark.parametrize("name", ["ghost", "head"])
def test_index_lists_tensor_the_shard_lacks(tmp_path, name):
    """A tensor no shard holds, or one shard 2 holds: an index listing "head" in shard 1 was read as if it agreed
    (a mutation audit). The index and the shards must name the same file for every tensor."""
    shards = two_shards()
    wm = {k: f for f, t in shards.items() for k in t}
    wm[name] = "model-00001-of-00002.safetensors"
    folder = make_sharded(tmp_path / "m", shards, wm)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    msg = check_error(excinfo, folder / "model-00001-of-00002.safetensors", name)
    if name == "head":
        assert "not in this shard" in msg


def test_shard_tensor_absent_from_index(tmp_path):
    shards = two_shards()
    wm = {k: f for f, t in shards.items() for k in t}
    del wm["head"]
    folder = make_sharded(tmp_path / "m", shards, wm)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    assert "not listed" in check_error(excinfo, folder / "model-00002-of-00002.safetensors", "head")


def test_tensor_in_two_shards(tmp_path):
    shards = two_shards()
    shards["model-00002-of-00002.safetensors"]["l0.w"] = torch.zeros(3, 3)
    folder = make_sharded(tmp_path / "m", shards)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    msg = check_error(excinfo, folder / "model-00002-of-00002.safetensors", "l0.w")
    assert "model-00001-of-00002.safetensors" in msg


def test_index_listing_a_tensor_twice_is_refused(tmp_path):
    """json keeps a key's last entry: the index's second "head" won, silently, or a shard that lacks it was
    reported missing in the tensor's name (an audit). Now the duplicate itself, in one line."""
    shards = two_shards()
    folder = make_sharded(tmp_path / "m", shards)
    index = folder / "model.safetensors.index.json"
    text = index.read_text()
    assert text.count('"head": "model-00002-of-00002.safetensors"') == 1
    index.write_text(text.replace('"head": "model-00002-of-00002.safetensors"',
                                  '"head": "model-00001-of-00002.safetensors", "head": "model-00002-of-00002.safetensors"'))
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    assert "key 'head' appears twice in one object" in check_error(excinfo, index)


@pytest.mark.parametrize("shard", ["../evil.safetensors", "./../evil.safetensors", "sub/../x.safetensors", ".", "./",
                                   "/abs.safetensors"])
def test_index_shard_outside_folder(tmp_path, shard):
    shards = two_shards()
    wm = {k: f for f, t in shards.items() for k in t}
    wm["head"] = shard
    folder = make_sharded(tmp_path / "m", shards, wm)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    assert "not a plain file name" in check_error(excinfo, folder / "model.safetensors.index.json", "head")


def test_index_shard_names_spelled_with_dot_slash(tmp_path):
    """"./model-00001-of-00002.safetensors" loads in transformers and mergekit (os.path.join); it was refused
    as "listed in model.safetensors.index.json but not in this shard"."""
    shards = two_shards()
    wm = {k: ("./" if k != "embed" else "") + f for f, t in shards.items() for k in t}  # both spellings of shard 1
    folder = make_sharded(tmp_path / "m", shards, wm)
    with Checkpoint(folder) as ck:
        assert ck.files == [folder / f for f in sorted(shards)]
        assert torch.equal(ck.tensor("head"), shards["model-00002-of-00002.safetensors"]["head"])


def _a_model_and_its_next_version(tmp_path):
    """Two-shard model folders m and other (every value + 1): (shards, m, other)."""
    shards = two_shards()
    return (shards, make_sharded(tmp_path / "m", shards),
            make_sharded(tmp_path / "other", {f: {k: v + 1 for k, v in t.items()} for f, t in shards.items()}))


def test_a_folder_replaced_while_its_shards_open_is_refused(tmp_path, monkeypatch):
    """Shards are opened by path: a model written over the folder meanwhile (pymerge merge --force of
    another run) gave a checkpoint of some shards from each model, merged without a word."""
    import pymerge.io.checkpoint as ck_mod
    shards, folder, other = _a_model_and_its_next_version(tmp_path)
    real = ck_mod.open_tensor_file

    def swap_after_first(path):
        shard = real(path)
        if not (tmp_path / "old").exists():
            os.rename(folder, tmp_path / "old")
            os.rename(other, folder)
        return shard

    monkeypatch.setattr(ck_mod, "open_tensor_file", swap_after_first)
    with pytest.raises(CheckpointError, match=r"m: the folder was replaced while its shards were being opened"):
        Checkpoint(folder)


def test_check_unchanged_names_a_folder_replaced_after_opening(tmp_path):
    """The open shards keep reading the old files; config.json and the tokenizer are read by path later.
    check_unchanged (called by the merge after reading them) tells a folder replaced meanwhile, opened as a
    folder or through one of its files."""
    folder = make_sharded(tmp_path / "m", two_shards())
    make_sharded(tmp_path / "other", two_shards())
    with Checkpoint(folder) as ck, Checkpoint(folder / "model-00001-of-00002.safetensors") as one:
        ck.check_unchanged()
        one.check_unchanged()
        os.rename(folder, tmp_path / "old")
        os.rename(tmp_path / "other", folder)
        for c in (ck, one):
            with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder))} was replaced while it was being "
                                                      r"merged .*; run the merge again$"):
                c.check_unchanged()


def test_check_unchanged_names_a_shard_renamed_over_while_the_shards_were_opened(tmp_path, monkeypatch):
    """A download or save_pretrained renames new shards over the old ones, the folder staying: after the first
    shard was opened, both were replaced, and the merge read one shard of each version, exit 0 (an audit)."""
    import pymerge.io.checkpoint as ck_mod
    shards, folder, other = _a_model_and_its_next_version(tmp_path)
    real = ck_mod.open_tensor_file

    def replace_after_first(path):
        shard = real(path)
        for f in shards:
            if not (tmp_path / "done").exists():
                os.replace(other / f, folder / f)
        (tmp_path / "done").touch()
        return shard

    monkeypatch.setattr(ck_mod, "open_tensor_file", replace_after_first)
    with Checkpoint(folder) as ck:
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder / sorted(shards)[0]))}: was replaced or "
                                                  r"rewritten while it was being merged .*; run the merge again$"):
            ck.check_unchanged()


@pytest.mark.parametrize("opened", ["folder", "file"])
@pytest.mark.parametrize("change", ["renamed over", "rewritten", "removed", "made"])
def test_check_unchanged_names_a_file_read_that_changed_after_opening(tmp_path, opened, change):
    """config.json once read and the files a merge says it read (its copies) are compared with what they were when
    the model was opened; a file it did not read may change."""
    folder = make_sharded(tmp_path / "m", two_shards())
    (folder / "config.json").write_text('{"vocab_size": 32}')
    (folder / "notes.txt").write_text("unread")
    with Checkpoint(folder if opened == "folder" else folder / "model-00001-of-00002.safetensors") as ck:
        assert read_model_config(ck) == {"vocab_size": 32}
        ck.check_unchanged([folder / "tokenizer.json"])
        (folder / "notes.txt").write_text("changed, never read")
        ck.check_unchanged()
        target = folder / ("tokenizer.json" if change == "made" else "config.json")
        if change == "renamed over":
            (tmp_path / "new.json").write_text('{"vocab_size": 48}')
            os.replace(tmp_path / "new.json", target)
        elif change == "rewritten":
            os.utime(target, ns=(0, 0))  # its ctime moves, whatever its mtime says
        elif change == "removed":
            target.unlink()
        else:
            target.write_text("{}")
        if change == "made":
            ck.check_unchanged()  # not read: config.json alone is compared
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(target))}: was replaced or rewritten while "):
            ck.check_unchanged([folder / "tokenizer.json"])


@pytest.mark.parametrize("why", ["not listable", "too many entries"])
def test_a_folder_not_scanned_compares_the_files_it_names(tmp_path, monkeypatch, why):
    """A shared folder of mode 711 cannot be listed: the snapshot held nothing, so every file read looked new and
    every merge from it was refused (a review); a busy folder is not scanned either. The shards, index and
    config.json are stamped by name then (a shard by the file opened), and the files never stamped are not compared."""
    import pymerge.io.checkpoint as ck_mod
    if why == "not listable":
        def refused(path):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(ck_mod.os, "scandir", refused)
    else:
        monkeypatch.setattr(ck_mod, "_SCAN_LIMIT", 2)
    shards, folder, other = _a_model_and_its_next_version(tmp_path)
    (folder / "config.json").write_text('{"vocab_size": 32}')
    (folder / "tokenizer.json").write_text("{}")
    with Checkpoint(folder) as ck:
        assert not ck.snapshot.complete
        read_model_config(ck)
        ck.check_unchanged([folder / "tokenizer.json"])
        (folder / "tokenizer.json").write_text('{"new": 1}')  # never stamped: not compared
        ck.check_unchanged([folder / "tokenizer.json"])
        os.utime(folder / "config.json", ns=(0, 0))
        with pytest.raises(CheckpointError, match=r"config.json: was replaced or rewritten while it was being merged"):
            ck.check_unchanged()
    real = ck_mod.open_tensor_file

    def replace_the_second_before_it_opens(path):  # its name stamped after: the opened file tells
        if path.name == sorted(shards)[1]:
            os.replace(other / path.name, path)
        return real(path)
    monkeypatch.setattr(ck_mod, "open_tensor_file", replace_the_second_before_it_opens)
    with Checkpoint(folder) as ck:
        ck.check_unchanged()  # a consistent file was opened and is still there
    monkeypatch.setattr(ck_mod, "open_tensor_file", real)
    with Checkpoint(folder) as ck:
        os.replace(tmp_path / "other" / sorted(shards)[0], folder / sorted(shards)[0])
        with pytest.raises(CheckpointError, match=rf"{re.escape(sorted(shards)[0])}: was replaced"):
            ck.check_unchanged()


def test_index_not_json(tmp_path):
    folder = make_sharded(tmp_path / "m", two_shards())
    (folder / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    check_error(excinfo, folder / "model.safetensors.index.json")
    (folder / "model.safetensors.index.json").write_bytes(LFS)  # said "cannot read as JSON"
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    assert "is a git-lfs pointer" in check_error(excinfo, folder / "model.safetensors.index.json")


@pytest.mark.parametrize("kind", ["a FIFO", "a folder"])
def test_index_shard_that_is_no_file_says_what_it_is(tmp_path, kind):
    """Both were reported as "shard ... is missing"."""
    shards = two_shards()
    wm = {k: f for f, t in shards.items() for k in t}
    wm["head"] = "odd.safetensors"
    folder = make_sharded(tmp_path / "m", shards, wm)
    os.mkfifo(folder / "odd.safetensors") if kind == "a FIFO" else (folder / "odd.safetensors").mkdir()
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    assert f"is {kind}, not a regular file" in check_error(excinfo, folder / "odd.safetensors")


@pytest.mark.parametrize("kind", ["a FIFO", "a folder", "a character device"])
def test_single_file_that_is_no_file_says_what_it_is(tmp_path, kind):
    """A FIFO or folder named model.safetensors was reported as "no model.safetensors ... in this folder", a link
    to /dev/zero as "a broken link"; an index beside it still loads (Hugging Face's order skips non-files)."""
    folder = tmp_path / "m"
    folder.mkdir()
    single = folder / "model.safetensors"
    {"a FIFO": lambda: os.mkfifo(single), "a folder": single.mkdir,
     "a character device": lambda: single.symlink_to("/dev/zero")}[kind]()
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    assert check_error(excinfo, single).endswith(f"is {kind}, not a regular file")
    sharded = make_sharded(tmp_path / "s", two_shards())
    os.mkfifo(sharded / "model.safetensors")
    assert set(Checkpoint(sharded).names()) == {k for t in two_shards().values() for k in t}


def test_corrupt_shard_names_the_shard(tmp_path):
    folder = make_sharded(tmp_path / "m", two_shards())
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    check_error(excinfo, folder / "model-00002-of-00002.safetensors")


def test_bin_fallback(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    w = torch.randn(4, 6)
    state = {"w": w, "wt": w.t(), "b": torch.randn(6).bfloat16()}  # wt: a non-contiguous view
    torch.save(state, folder / "pytorch_model.bin")
    with Checkpoint(folder) as ck:
        assert ck.names() == ["w", "wt", "b"]
        for k, v in state.items():
            t = ck.tensor(k)
            assert t.is_contiguous() and torch.equal(t, v) and t.dtype == v.dtype
            assert ck.info(k).shape == tuple(v.shape) and ck.info(k).file_offset == -1
            ck.prefetch(k)
        assert ck.file_of("w") == folder / "pytorch_model.bin"


def test_an_expanded_bin_tensor_is_refused_and_views_of_shared_storage_still_merge(tmp_path):
    """A 1.6 KB .bin holding one value expanded to "1 GiB" was copied out whole on every read (2.4 GB RSS, a
    traceback where memory ran out). Views of one storage that do not overlap (transposed, sliced, strided,
    HF's position_ids expanded along a size-1 axis) are ordinary .bin contents and merge as before, and so do
    small expanded tensors (up to 16 MiB claimed: a review found arange(8).expand(4, 8) refused)."""
    from pymerge.merge import run_merge
    path = tmp_path / "pytorch_model.bin"
    torch.save({"ok": torch.ones(3), "w": torch.tensor([1.0]).expand(16384, 16384)}, path)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(path)
    assert "expanded tensor" in check_error(excinfo, path, "w")
    models = []
    for i in range(2):
        w = torch.randn(6, 8, generator=torch.Generator().manual_seed(i))
        state = {"w": w, "wt": w.t(), "rows": w[2:5], "cols": w[:, ::2], "pos": torch.arange(8).expand(1, -1),
                 "grid": torch.arange(8.0).expand(4, 8)}  # a small expanded buffer loads as torch loads it
        (tmp_path / f"m{i}").mkdir()
        torch.save(state, tmp_path / f"m{i}" / "pytorch_model.bin")
        models.append(state)
    run_merge({"merge_method": "linear", "models": [{"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 1.0}}
                                                     for i in range(2)]}, tmp_path / "out", quiet=True, device="cpu")
    got = safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in models[0]:
        want = (models[0][k].double() + models[1][k].double()) / 2
        assert torch.allclose(got[k].double(), want, atol=1e-6) and got[k].shape == models[0][k].shape, k


def test_legacy_bin_without_zip_is_read_whole(tmp_path):
    path = tmp_path / "old.bin"
    torch.save({"a": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    with Checkpoint(path) as ck:  # a .bin file given directly works too
        assert ck.names() == ["a"] and ck.tensor("a").tolist() == [0.0, 1.0, 2.0]
        assert ck.shards[0].mapped_range() is None  # in memory: nothing for the SIGBUS guard


def test_a_bin_rezipped_with_compression_is_read_inflated(tmp_path):
    """A .bin re-packed by a zip tool with DEFLATE loads in plain torch.load; mapped, torch read the compressed
    bytes as the tensor's: 'Trying to resize storage that is not resizable', or garbage without an error."""
    import zipfile
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(4, 4, generator=g), "b": torch.arange(4096.0)}
    torch.save(state, tmp_path / "plain.bin")
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(tmp_path / "plain.bin") as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with Checkpoint(path) as ck:
        assert all(torch.equal(ck.tensor(k), v) for k, v in state.items())
        assert ck.shards[0].mapped_range() is None  # in memory: nothing for the SIGBUS guard


def test_a_bin_whose_compressed_records_inflate_past_memory_is_refused(tmp_path, monkeypatch):
    """A 500 KB DEFLATE-repacked .bin inflated to 512 MiB at open (any ratio: a zip bomb): its records' inflated
    sizes are summed from the zip directory first."""
    import zipfile
    import pymerge.sizes
    torch.save({"w": torch.zeros(1 << 16)}, tmp_path / "plain.bin")
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(tmp_path / "plain.bin") as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert os.path.getsize(path) < 4096
    monkeypatch.setattr(pymerge.sizes, "host_available", lambda: 100_000)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: its compressed records inflate to \d+ bytes, more "
                                              r"than the 100000 bytes of memory available"):
        Checkpoint(path)
    monkeypatch.setattr(pymerge.sizes, "host_available", lambda: 1 << 30)
    with Checkpoint(path) as ck:
        assert torch.equal(ck.tensor("w"), torch.zeros(1 << 16))


def test_a_bin_saved_in_the_other_byte_order_is_read_unmapped(tmp_path, monkeypatch):
    """torch.save on a big-endian machine (s390x): torch.load(mmap=True) swaps each storage in its map's private
    pages, and releasing a tensor's pages (the streaming merge does, MADV_DONTNEED) brought back the file's
    unswapped bytes: a tied head read after its embedding's release was garbage, the merge NaN, exit 0."""
    import types
    import torch.serialization as ser
    from pymerge.io.checkpoint import TorchFile
    other = "big" if sys.byteorder == "little" else "little"
    values = torch.arange(1, 4097, dtype=torch.float32)  # 4 pages
    swapped = torch.from_numpy(values.numpy().byteswap())  # the file holds the other order's bytes
    fake_sys = types.SimpleNamespace(**{k: getattr(sys, k) for k in dir(sys) if not k.startswith("__")})
    fake_sys.byteorder = other
    monkeypatch.setattr(ser, "sys", fake_sys)
    torch.save({"embed.weight": swapped, "lm_head.weight": swapped}, tmp_path / "pytorch_model.bin")  # one storage
    monkeypatch.undo()
    f = TorchFile(tmp_path / "pytorch_model.bin")
    assert torch.equal(f.tensor("embed.weight"), values)
    f.release("embed.weight")
    assert torch.equal(f.tensor("lm_head.weight"), values)
    assert f.mapped_range() is None  # read whole: nothing for the SIGBUS guard, nothing advised away


@pytest.mark.parametrize("name, words", [("__metadata__", "the name is reserved by safetensors"),
                                         ("x\ud800", "not text (a lone surrogate)")], ids=["reserved", "surrogate"])
def test_a_bin_tensor_name_safetensors_cannot_store_is_refused(tmp_path, name, words):
    """'__metadata__' reached the writer (a ValueError traceback, exit 1); a lone surrogate was written into a
    file neither safetensors nor pymerge reads back (exit 0)."""
    torch.save({name: torch.zeros(2), "w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=re.escape(words)):
        Checkpoint(tmp_path / "pytorch_model.bin")


def test_a_bin_tensor_of_a_dtype_safetensors_lacks_is_refused_at_open(tmp_path):
    """complex128 reached the pool as a KeyError traceback (the CLI already refused it, later)."""
    torch.save({"c": torch.zeros(2, dtype=torch.complex128), "w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tensor 'c' has dtype complex128, which safetensors cannot store"):
        Checkpoint(tmp_path / "pytorch_model.bin")


@pytest.mark.parametrize("sizes", [(4099, 1, 0, 17), (1, 1), (0, 16), (0, 16, 16)])  # an empty storage first: no address
def test_bin_map_is_located_for_the_sigbus_guard(tmp_path, sizes):
    """torch maps a .bin file once; mapped_range must be that map: it starts with the file's bytes and
    holds every tensor's (was: no range, so a .bin truncated mid-merge killed the process)."""
    import ctypes
    g = torch.Generator().manual_seed(len(sizes))
    state = {f"t{i}": torch.randn(n, generator=g).to(dt)
             for i, (n, dt) in enumerate(zip(sizes, (torch.bfloat16, torch.float32, torch.float16, torch.int8)))}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    raw = path.read_bytes()
    with Checkpoint(path) as ck:
        begin, length = ck.shards[0].mapped_range()
        assert length == len(raw) and ctypes.string_at(begin, len(raw)) == raw
        for name in state:
            t = ck.tensor(name)
            if t.numel():
                assert begin <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= begin + length


def test_sharded_bin_fallback(tmp_path):
    shards = {"pytorch_model-00001-of-00002.bin": {"a": torch.randn(2)},
              "pytorch_model-00002-of-00002.bin": {"b": torch.randn(3)}}
    folder = make_sharded(tmp_path / "m", shards, name="bin")
    with Checkpoint(folder) as ck:
        assert ck.names() == ["a", "b"]
        assert torch.equal(ck.tensor("b"), shards["pytorch_model-00002-of-00002.bin"]["b"])


def test_bin_that_is_not_a_state_dict(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save([torch.ones(1)], folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    check_error(excinfo, folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    check_error(excinfo, folder / "pytorch_model.bin")


LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 1234\n"


@pytest.mark.parametrize("name, data, says", [
    ("pytorch_model.bin", LFS, "is a git-lfs pointer"), ("model.safetensors", LFS, "is a git-lfs pointer"),
    ("pytorch_model.bin", bytes(range(256)) * 20, "is not a PyTorch checkpoint (neither"),
    ("pytorch_model.bin", b"", "is empty"), ("pytorch_model.bin", "date", "it holds more than tensors"),
    ("pytorch_model.bin", "os.system", "unsupported GLOBAL posix.system")])
def test_files_that_are_no_checkpoint_say_what_they_are(tmp_path, name, data, says):
    """torch's own error advised weights_only=False (no such option here) and never said the file was
    not a checkpoint; a git-lfs pointer is the common case (bug hunt). For a pickle that runs a command
    the advice was all the line said, and following it would have run the command (torch 2.13)."""
    import datetime
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    folder = tmp_path / "m"
    folder.mkdir()
    if data == "date":
        torch.save({"w": torch.ones(2), "when": datetime.date(2020, 1, 1)}, folder / name)
    elif data == "os.system":
        torch.save({"w": torch.ones(2), "x": Payload()}, folder / name)
    else:
        (folder / name).write_bytes(data)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    check_error(excinfo, folder / name)
    message = str(excinfo.value)
    assert says in message and "set to `False`" not in message and "weights_only set to" not in message, message
    assert "add_safe_globals" not in message and "trust" not in message and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("cut", [22, 100, 1000])
def test_a_bin_cut_short_says_its_archive_is_damaged(tmp_path, cut):
    """Cut within its zip directory (the file's end), torch's error was "[Errno 22] Invalid argument"."""
    state = {f"layer{i}.weight": torch.randn(16, 8) for i in range(6)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(path)
    assert "is not a complete PyTorch checkpoint: its zip archive is damaged (truncated" in check_error(excinfo, path)


def _short_record(state: dict, victim: str, keep: int) -> bytes:
    """torch.save(state) with the zip record of storage `victim` cut to its first `keep` bytes."""
    import io
    import zipfile
    buf = io.BytesIO()
    torch.save(state, buf)
    src, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, data[:keep] if info.filename.endswith(f"/data/{victim}") else data)
    return out.getvalue()


@pytest.mark.parametrize("keep", [8, 0])
@pytest.mark.parametrize("victim", ["0", "1"])
def test_a_bin_whose_storage_record_is_short_is_refused(tmp_path, victim, keep):
    """Mapped (mmap=True), torch does not check a record's size against the pickle's: the tensor read the
    zip records after its own and merged garbage (-1e22) with exit 0."""
    state = {"a": torch.randn(4, 4), "b": torch.randn(64)}
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(_short_record(state, victim, keep=keep))
    with pytest.raises(CheckpointError, match=rf"tensor '(a|b)': its data record holds {keep} bytes where the file says"):
        Checkpoint(path)
    path.write_bytes(_short_record(state, victim, keep=10**6))  # whole: fine
    with Checkpoint(path) as ck:
        assert all(torch.equal(ck.tensor(k), v) for k, v in state.items())


@pytest.mark.parametrize("kind", ["sparse", "csr", "meta", "quantized", "int key"])
def test_a_bin_or_state_dict_of_tensors_without_dense_data_is_refused_in_one_line(tmp_path, kind):
    """Sparse .bin entries raised NotImplementedError outside the load's try, meta ones a TypeError later, an
    integer key read 'entry 3 is a Tensor, not a tensor'."""
    import warnings
    from pymerge.errors import InputError
    from pymerge.pool import CheckpointPool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of quantized tensors
        odd = {"sparse": torch.eye(3).to_sparse(), "csr": torch.eye(3).to_sparse_csr(),
               "meta": torch.ones(3, device="meta"),
               "quantized": torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8),
               "int key": torch.ones(3)}[kind]
    state = {"w": torch.ones(3), **({3: odd} if kind == "int key" else {"x": odd})}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    want = "entry key 3 is not a string" if kind == "int key" else "tensor 'x' is (a|on the meta)"
    with pytest.raises(CheckpointError, match=want) as excinfo:
        Checkpoint(path)
    assert len(str(excinfo.value).splitlines()) == 1
    if kind != "int key":
        with pytest.raises(InputError, match=r"source 0: tensor 'x' is (a|on the meta)"):
            CheckpointPool([state, state])


def test_a_bin_tensor_of_more_than_64_dimensions_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"ok": torch.ones([1] * 64), "w": torch.ones([1] * 65)}, path)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(path)
    assert "shape has 65 dimensions; pymerge supports at most 64" in check_error(excinfo, path, "w")
    write_raw(tmp_path / "m.safetensors", {"ok": {"dtype": "F32", "shape": [1] * 64, "data_offsets": [0, 4]}}, b"\0" * 4)
    with Checkpoint(tmp_path / "m.safetensors") as ck:
        assert ck.info("ok").shape == (1,) * 64


def test_checkpoint_unknown_tensor(tmp_path):
    folder = make_sharded(tmp_path / "m", two_shards())
    with Checkpoint(folder) as ck:
        with pytest.raises(CheckpointError) as excinfo:
            ck.tensor("nope")
        check_error(excinfo, folder, "nope")


# ---- check_compatible ---------------------------------------------------------------------------
def ckpt(tmp_path, name, tensors):
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return Checkpoint(path)


def test_check_compatible_ok_with_mixed_dtypes(tmp_path):
    a = ckpt(tmp_path, "a", {"x": torch.ones(2, 3), "y": torch.ones(4)})
    b = ckpt(tmp_path, "b", {"x": torch.ones(2, 3).half(), "y": torch.ones(4).bfloat16()})
    assert check_compatible([a, b]) == a.names()
    assert check_compatible([a]) == a.names()
    assert check_compatible([]) == []


def test_check_compatible_names_a_prefix_more_or_less(tmp_path):
    """GPT-2's own checkpoint (h.0.attn...) with a fine-tune transformers saved (transformer.h.0.attn...): the bare
    "missing tensor" did not say that the other model holds it under a prefix more (an audit)."""
    a = ckpt(tmp_path, "a", {"transformer.h.0.w": torch.ones(2), "transformer.wte.weight": torch.ones(2)})
    b = ckpt(tmp_path, "b", {"h.0.w": torch.ones(2), "wte.weight": torch.ones(2)})
    for pair, name, other in (([a, b], "transformer.h.0.w", "h.0.w"), ([b, a], "h.0.w", "transformer.h.0.w")):
        with pytest.raises(CheckpointError, match=rf"missing tensor '{name}' that .* has \(and 1 more\) "
                           rf"\(it names that tensor '{other}': the two name their tensors with and without the "
                           r"prefix 'transformer\.'"):
            check_compatible(pair)
    c = ckpt(tmp_path, "c", {"transformer.h.0.w": torch.ones(2)})
    with pytest.raises(CheckpointError) as info:
        check_compatible([a, c])
    assert "prefix" not in str(info.value)


def test_check_compatible_missing_and_extra(tmp_path):
    a = ckpt(tmp_path, "a", {"x": torch.ones(2), "y": torch.ones(2)})
    b = ckpt(tmp_path, "b", {"x": torch.ones(2)})
    c = ckpt(tmp_path, "c", {"x": torch.ones(2), "y": torch.ones(2), "z": torch.ones(2)})
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible([a, b], labels=["base", "chat"])
    msg = str(excinfo.value)
    assert msg.startswith("chat:") and "'y'" in msg and "base" in msg and "\n" not in msg
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible([a, c])
    msg = str(excinfo.value)
    assert str(c.path) in msg and "'z'" in msg
    # a subset of names: extra tensors elsewhere don't matter, missing ones do
    assert check_compatible([a, c], names=["y", "x"]) == ["x", "y"]
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible([a, b, c], labels=["A", "B", "C"], names=["y"])
    assert str(excinfo.value).startswith("B:") and "'y'" in str(excinfo.value)


def test_check_compatible_shape_mismatch(tmp_path):
    a = ckpt(tmp_path, "a", {"x": torch.ones(2, 3)})
    b = ckpt(tmp_path, "b", {"x": torch.ones(3, 2)})
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible([a, b], labels=["A", "B"])
    msg = str(excinfo.value)
    assert "'x'" in msg and "[2, 3]" in msg and "[3, 2]" in msg and "A" in msg and "B" in msg
    with pytest.raises(ValueError):
        check_compatible([a, b], labels=["A"])


def test_read_small_reads_in_pieces_and_keeps_its_limit(tmp_path):
    """read(limit + 1) allocated the whole limit up front: a search state (8 GiB limit) failed with
    MemoryError under an address-space cap. Run capped in a child process."""
    import subprocess
    import sys
    from pymerge.errors import InputError
    from pymerge.io.files import read_small
    path = tmp_path / "s.json"
    path.write_bytes(b"x" * 100)
    assert read_small(path, InputError, limit=100) == b"x" * 100
    with pytest.raises(InputError, match="is 100 bytes; more than the 99-byte limit"):
        read_small(path, InputError, limit=99)
    capped = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
              "from pymerge.io.files import read_small; from pymerge.errors import InputError; "
              "print(len(read_small(sys.argv[1], InputError, limit=1 << 33)))")
    p = subprocess.run([sys.executable, "-c", capped, str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "100", p.stderr[-1000:]


_MANY_SHARDS = r"""
import json, os, sys
import torch
from safetensors.torch import save_file
import pymerge
from pymerge.errors import CheckpointError
root, hard = sys.argv[1], sys.argv[2] == "hard"
for d, v in (("a", 1.0), ("b", 3.0)):
    os.makedirs(f"{root}/{d}")
    weights = {}
    for k in range(150):  # one tensor per shard: 300 shards in all, past the soft limit of 64
        save_file({f"t{k}": torch.full((4,), v + k)}, f"{root}/{d}/s{k}.safetensors")
        weights[f"t{k}"] = f"s{k}.safetensors"
    json.dump({"metadata": {}, "weight_map": weights}, open(f"{root}/{d}/model.safetensors.index.json", "w"))
before = len(os.listdir("/proc/self/fd"))
pool = pymerge.CheckpointPool([f"{root}/a", f"{root}/b"], residency="mmap")
out = {f"t{k}": torch.empty(4) for k in range(150)}
pool.materialize([0.5, 0.5], into=out)
assert all(torch.equal(out[f"t{k}"], torch.full((4,), 2.0 + k)) for k in range(150))
print("merged with", len(os.listdir("/proc/self/fd")) - before, "more descriptors open")
if hard:  # the CLI's merge too, and a shard cut under a map that keeps no descriptor is still told apart
    from pymerge.cli import main
    cfg = f"{root}/m.yml"
    open(cfg, "w").write(f"merge_method: linear\nmodels:\n- model: {root}/a\n  parameters: {{weight: 1}}\n"
                         f"- model: {root}/b\n  parameters: {{weight: 3}}\ndtype: float32\n")
    assert main(["merge", cfg, f"{root}/out", "--quiet"]) == 0
    from safetensors.torch import load_file
    merged = {}
    for f in os.listdir(f"{root}/out"):
        if f.endswith(".safetensors"):
            merged.update(load_file(f"{root}/out/{f}"))
    assert all(torch.equal(merged[f"t{k}"], torch.full((4,), 2.5 + k)) for k in range(150)), "merge"
    from pymerge.io import Checkpoint
    ck = Checkpoint(f"{root}/a")
    from pymerge.io.sigbus import MappingGuard
    with MappingGuard([ck]) as guard:
        os.truncate(f"{root}/a/s7.safetensors", 8)  # inside the map's one page: no fault, zeros read
        try:
            guard.check(sizes=True)
        except CheckpointError as e:
            print("cut:", e)
"""


@pytest.mark.parametrize("limit", ["soft", "hard"])
def test_more_shards_than_the_open_file_limit_are_read(tmp_path, limit):
    """Every shard is held open (an mmap keeps a descriptor of its own), so a model of more shards than
    the soft limit (1024 is common; pymerge writes such models) could not be read: the soft limit is
    raised to the hard one when descriptors run out, and past the hard one the files are mapped by libc's mmap,
    which keeps no descriptor (4 x 265 shards under a hard limit of 1024 were refused, where mergekit, which opens
    them lazily, merged them: an audit)."""
    import resource
    import subprocess
    import sys
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if limit == "soft" and hard != resource.RLIM_INFINITY and hard < 400:
        pytest.skip(f"the hard open-file limit here is {hard}")

    def lower():  # in the child before it starts: its script must not import resource itself (the fix's
        # own import of it used to fail once descriptors had run out)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64 if limit == "hard" else hard))
    p = subprocess.run([sys.executable, "-c", _MANY_SHARDS, str(tmp_path), limit], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), preexec_fn=lower)
    assert p.returncode == 0, p.stderr[-2000:]
    opened = int(p.stdout.split("merged with ")[1].split()[0])
    if limit == "hard":
        assert opened <= 32, p.stdout  # half the limit of 64: the rest left to the writer and the rest
        assert "s7.safetensors: the file shrank while being merged" in p.stdout, p.stdout
    else:
        assert opened >= 300, p.stdout  # the soft limit raised: each map keeps a descriptor (a cut is told by it)


def _resident_kb(address: int) -> int:
    """Resident kB of the mapping holding address, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and not line[0].isupper():
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps")
def test_a_bin_files_released_tensors_leave_the_process(tmp_path):
    """TorchFile.release did nothing (torch's map 'gives no handle'), so a merge of pytorch_model.bin checkpoints
    held every page it had read: its memory grew with the whole model (3 x 120 MB: 591 MB, safetensors 46 MB; a
    bug hunt). The pages of torch's map are advised away, and read back from the file if touched again."""
    from pymerge.io.checkpoint import TorchFile
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(1 << 19, generator=g) for i in range(6)}  # 6 x 2 MiB
    state["tied"] = state["t0"]  # one storage under two names
    torch.save(state, tmp_path / "pytorch_model.bin")
    f = TorchFile(tmp_path / "pytorch_model.bin")
    base, _ = f.mapped_range()
    for n in f.names():
        f.prefetch(n)
        assert torch.isfinite(f.tensor(n)).all()
    assert _resident_kb(base) >= 6 * 2048
    for n in f.names():
        f.release(n)
    assert _resident_kb(base) < 2048, _resident_kb(base)
    assert all(torch.equal(f.tensor(n), state[n]) for n in state)  # read back from the file
    f.close()


def test_a_link_loop_is_named_a_loop(tmp_path):
    """model.safetensors linking to itself was reported "a broken link to ... (an incomplete download?)"."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to("model.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint(folder)
    assert check_error(excinfo, folder / "model.safetensors").endswith(
        "is a link that leads back to itself (through model.safetensors)")


@pytest.mark.parametrize("suffix", [".BIN", ".ckpt", ".Safetensors"])
def test_shards_are_read_by_their_kind_whatever_their_suffix_case(tmp_path, suffix):
    """An index naming pickled shards *.BIN (or *.ckpt) had them opened as safetensors ("header length exceeds the
    limit"); transformers and mergekit open everything not named .safetensors (any case) with torch.load."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    name = f"shard-00001-of-00001{suffix}"
    if suffix.lower() == ".safetensors":
        safetensors.torch.save_file(state, tmp_path / name)
        index = "model.safetensors.index.json"
    else:
        torch.save(state, tmp_path / name)
        index = "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"weight_map": {k: name for k in state}}))
    with Checkpoint(tmp_path) as ck:
        assert all(torch.equal(ck.tensor(k), v) for k, v in state.items())


def test_a_shard_of_an_unknown_suffix_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """Read by its first bytes, a FIFO shard named without a known suffix blocked the open forever (a review)."""
    os.mkfifo(tmp_path / "shard-1")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1"}}))
    with pytest.raises(CheckpointError, match="FIFO"):
        Checkpoint(tmp_path)


def test_head_reads_a_tensors_first_bytes_without_readahead(tmp_path, monkeypatch):
    """The ranks' sample of 64 bytes of 64 tensors per checkpoint read through the map, whose page faults read
    the disk's readahead window around each (8 MiB on an audit's machine: most of every file on every rank).
    head() preads them with POSIX_FADV_RANDOM: the same bytes as the map's, misaligned or empty tensors too."""
    tensors = {"a": torch.randn(100, 100), "b": torch.randn(3).bfloat16(), "c": torch.randn(5).half(),
               "z": torch.empty(0)}
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    advice = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: advice.append(how) or real(fd, off, n, how))
    with Checkpoint(path) as ck:
        for name in tensors:
            for n in (1, 6, 64, 10**6):
                assert ck.head(name, n) == bytes(ck.array(name)[:n]), (name, n)
    assert advice and set(advice) == {os.POSIX_FADV_RANDOM}


def test_mixed_expert_layouts_are_named_as_such(tmp_path):
    """One Mixtral fine-tune stored per expert (save_pretrained), one fused (a transformers 5 state dict): the
    error named a 'missing tensor' that was there in another layout (an audit; mergekit converts them)."""
    from pymerge.io import check_compatible
    per_expert = {f"model.layers.0.mlp.experts.{e}.{w}.weight": torch.zeros(2, 2) for e in range(2) for w in ("w1", "w2")}
    fused = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 4, 2),
             "model.layers.0.mlp.experts.down_proj": torch.zeros(2, 2, 2)}
    for name, tensors in (("a", per_expert), ("b", fused)):
        safetensors.torch.save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    for first, second in (("a", "b"), ("b", "a")):
        with Checkpoint(tmp_path / f"{first}.safetensors") as x, Checkpoint(tmp_path / f"{second}.safetensors") as y:
            with pytest.raises(CheckpointError, match=r"missing tensor .* \(the two store their experts in different "
                                                      r"layouts, one per expert \(experts\.N\.\*\) and one fused"):
                check_compatible([x, y])
    plain = {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}
    safetensors.torch.save_file(plain, str(tmp_path / "c.safetensors"))
    with Checkpoint(tmp_path / "a.safetensors") as x, Checkpoint(tmp_path / "c.safetensors") as y:
        with pytest.raises(CheckpointError) as e:
            check_compatible([x, y])
    assert "store their experts" not in str(e.value)


def test_head_reads_the_mapped_file_when_another_is_at_its_path(tmp_path):
    """head() reopened the path: a file renamed over it after the checkpoint was opened gave the new file's
    bytes while the merge reads the mapped old one, so a rank with a stale copy looked like the others (a review)."""
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(8)}, str(path))
    with Checkpoint(path) as ck:
        safetensors.torch.save_file({"a": torch.ones(8)}, str(tmp_path / "new.safetensors"))
        os.replace(tmp_path / "new.safetensors", path)
        assert ck.head("a", 16) == bytes(ck.array("a")[:16]) == bytes(16)
        os.unlink(path)  # deleted: open_regular's error is a CheckpointError, which head() once let through
        assert ck.head("a", 16) == bytes(16)


@pytest.mark.parametrize("stored, refused", [
    # DeepSeek-V3's float8 blocks with their inverse scales; compressed-tensors' and ModelOpt's weight_scale
    ({"l.weight": torch.float8_e4m3fn, "l.weight_scale_inv": torch.float32}, "is float8_e4m3fn with its scales in "
                                                                              "'l.weight_scale_inv'"),
    ({"l.weight": torch.float8_e5m2, "l.weight_scale": torch.float32, "l.input_scale": torch.float32},
     "is float8_e5m2 with its scales in 'l.weight_scale'"),
    ({"l.qweight": torch.int32, "l.qzeros": torch.int32, "l.scales": torch.float16}, "is int32, packed"),
    ({"l.weight": torch.uint8, "l.weight.absmax": torch.float32}, "is uint8 with its scales in 'l.weight.absmax'"),
    ({"l.weight": torch.uint8, "l.weight.absmax": torch.uint8}, "is uint8 with its scales in 'l.weight.absmax'"),
    ({"l.weight": torch.int8, "l.SCB": torch.float32}, "is int8 with its scales in 'l.SCB'"),
    # compressed-tensors' int8 and packed int4, HQQ's (a review)
    ({"l.weight": torch.int8, "l.weight_scale": torch.float16}, "is int8 with its scales in 'l.weight_scale'"),
    ({"l.weight_packed": torch.int32, "l.weight_scale": torch.float16}, "is int32, packed"),
    ({"l.W_q": torch.uint8, "l.scale": torch.float16, "l.zero": torch.float16}, "is uint8, packed"),
    ({"l.weight": torch.float8_e4m3fn, "l.bias": torch.float32}, None),  # plain float8: merged as any float
    ({"l.weight": torch.bfloat16, "l.weight_scale": torch.float32}, None),  # a float weight beside a float scale
    ({"l.qweight": torch.float16}, None),  # a float tensor that happens to be called so
    ({"step": torch.int64, "position_ids": torch.int64, "ls1.scale": torch.float32}, None),
])
def test_quantized_checkpoints_are_refused_when_opened(tmp_path, stored, refused):
    """Merged as they were, a float8 checkpoint's values without their scales gave a model off by up to 55 % once
    dequantized, and a GPTQ pool merged the scales and left the integers, exit 0 (an audit)."""
    from pymerge.pool import CheckpointPool
    tensors = {n: torch.ones(4, 4).to(dtype) for n, dtype in stored.items()}
    safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    state = {n: t.clone() for n, t in tensors.items()}
    if refused is None:
        Checkpoint(tmp_path).close()
        return
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: tensor") + ".*" + re.escape(refused)
                       + ".*: a quantized checkpoint, whose stored values are not the weights; dequantize it first$"):
        Checkpoint(tmp_path)
    for source in (str(tmp_path), state):  # a pool of state dicts too
        with pytest.raises(CheckpointError, match=re.escape(refused)):
            CheckpointPool([source, source] if isinstance(source, str) else [state, state])


def test_an_index_naming_a_shard_the_locale_cannot_encode_says_so(tmp_path):
    """Under LC_ALL=C without UTF-8 mode an index naming a shard 模型-1.safetensors, which is there, said the shard was
    missing (lexists is False for a name it cannot encode); model paths said the locale was why (an audit)."""
    import subprocess

    import torch
    from safetensors.torch import save_file
    folder = tmp_path / "B"
    folder.mkdir()
    save_file({"w": torch.ones(3)}, str(folder / "\u6a21\u578b-1.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w": "\u6a21\u578b-1.safetensors"}}), encoding="utf-8")
    (tmp_path / "c.yml").write_text("merge_method: linear\nmodels:\n- model: B\n  parameters: {weight: 1.0}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k not in ("LANG", "PYTHONUTF8")}
    for extra, words in (({"LC_ALL": "C", "PYTHONUTF8": "0"}, "cannot name a file under this locale"), ({}, None)):
        p = subprocess.run([sys.executable, "-m", "pymerge", "merge", "c.yml", "o" + str(len(extra))], cwd=tmp_path,
                           capture_output=True, text=True, env={**env, **extra}, timeout=120)
        if words is None:  # the same folder in Python's UTF-8 mode merges
            assert p.returncode == 0, p.stderr
            continue
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and words in err[0] and "missing" not in err[0], p.stderr


def test_opening_a_bin_checkpoint_in_a_thread_silences_no_other_warning(tmp_path):
    """Opening a pytorch_model.bin ignored every warning while torch loaded it, through Python's filters, which are
    one list for the process: the application's own warnings raised meanwhile in other threads were dropped (38 of
    200 shown), and two such blocks in two threads could leave "ignore everything" installed for good (an audit).
    Now a block ignores only torch's and pymerge's own, under one lock."""
    import subprocess
    code = textwrap.dedent("""
        import sys, threading, time, warnings
        import torch
        from pymerge.io import Checkpoint
        torch.save({f"w{i}": torch.ones(64) for i in range(300)}, sys.argv[1] + "/pytorch_model.bin")
        warnings.simplefilter("always")
        before = list(warnings.filters)
        shown = []
        warnings.showwarning = lambda message, *a, **k: shown.append(str(message))
        stop = threading.Event()
        loads = [0]
        def load():
            while not stop.is_set():
                Checkpoint(sys.argv[1]).close()
                loads[0] += 1
        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        while loads[0] < 3:
            time.sleep(0.01)
        for i in range(200):
            warnings.warn(f"the application's warning {i}")
            time.sleep(0.002)
        stop.set()
        for t in threads:
            t.join()
        print(len(shown), loads[0], warnings.filters == before)
    """)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    shown, loads, restored = p.stdout.split()
    assert int(loads) > 3 and (shown, restored) == ("200", "True"), p.stdout


def test_reads_of_proc_files_need_no_locale(tmp_path):
    """/proc/self/maps (read for every pytorch_model.bin) and /proc/meminfo were opened in the locale's encoding:
    under LC_ALL=C a mapped file whose path is not ASCII failed to decode (a traceback), and under
    -X warn_default_encoding with EncodingWarning an error (a user's CI) a .bin merge or any pool failed (an audit)."""
    import subprocess
    import torch
    torch.save({"w": torch.ones(8)}, str(tmp_path / "pytorch_model.bin"))
    code = textwrap.dedent("""
        import mmap, os, sys, warnings
        warnings.filterwarnings("error", category=EncodingWarning, module="pymerge")
        from pymerge.io import Checkpoint
        from pymerge.sizes import host_available
        folder = sys.argv[1]
        with open(os.path.join(os.fsencode(folder), "caf\\xc3\\xa9".encode("latin-1")), "wb+") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            kept = mmap.mmap(fh.fileno(), 4096)  # a mapping whose path is not ASCII, in /proc/self/maps
            with Checkpoint(folder) as ck:
                assert ck.names() == ["w"], ck.names()
        assert host_available() > 0
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k not in ("LANG", "PYTHONUTF8")}
    p = subprocess.run([sys.executable, "-X", "warn_default_encoding", "-c", code, str(tmp_path)], capture_output=True,
                       text=True, env={**env, "LC_ALL": "C", "PYTHONUTF8": "0"}, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


@pytest.mark.parametrize("where", ["start", "stop"])
def test_a_ctrl_c_as_the_mapping_guard_starts_or_stops_leaves_no_slot(tmp_path, monkeypatch, ctrl_c, where):
    """A SIGINT just after the native guard took a slot (before the guard kept it), or between two removals, left
    slots in the native table for good: its SIGBUS handler then turned a read past the end of a file that later
    reused the address into zeros, exit 0 (an audit). A slot taken is kept, and stop removes all or none."""
    from pymerge import _native
    from pymerge.io.sigbus import MappingGuard
    if not hasattr(_native.cpu, "sigbus_guard_add"):
        pytest.skip("no C++ extension: no guard")
    import time
    import llama_factory as lf
    ck = Checkpoint(str(lf.make_llama(tmp_path / "m", shards=3)))
    real_add, real_remove, added, removed = _native.cpu.sigbus_guard_add, _native.cpu.sigbus_guard_remove, [], []

    def add(begin, length):
        added.append(real_add(begin, length))
        if where == "start" and len(added) == 1:
            ctrl_c()
            time.sleep(0.01)  # (delivered here, between bytecodes, before the guard kept the slot)
        return added[-1]

    def remove(slot):
        real_remove(slot)
        removed.append(slot)
        if where == "stop" and len(removed) == 1:
            ctrl_c()
            time.sleep(0.01)

    monkeypatch.setattr(_native.cpu, "sigbus_guard_add", add)
    monkeypatch.setattr(_native.cpu, "sigbus_guard_remove", remove)
    guard = MappingGuard([ck])
    with pytest.raises(KeyboardInterrupt):
        guard.start()
        guard.stop()
    assert len(added) == (1 if where == "start" else 3) and sorted(removed) == sorted(added)
    ck.close()


@pytest.mark.parametrize("reader", ["read_small", "SafetensorsFile", "Checkpoint"])
def test_a_ctrl_c_as_a_file_is_opened_leaks_no_descriptor(tmp_path, monkeypatch, ctrl_c, reader):
    """A SIGINT just as a source's file was opened, before the caller's try that closes it: one descriptor leaked
    per interrupt (an audit's Ctrl-C storm: a source's config.json, a checkpoint shard)."""
    import time
    from pymerge.io import files
    import llama_factory as lf
    folder = lf.make_llama(tmp_path / "m")
    real = files.open_regular

    def opened(path, *args, **kwargs):
        fd = real(path, *args, **kwargs)
        ctrl_c()
        time.sleep(0.01)  # (delivered here, between bytecodes, before the caller kept fd)
        return fd

    read = {"read_small": lambda: files.read_small(folder / "config.json"),
            "SafetensorsFile": lambda: SafetensorsFile(folder / "model.safetensors"),
            "Checkpoint": lambda: Checkpoint(str(folder))}[reader]
    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(files, "open_regular", opened)
    with pytest.raises(KeyboardInterrupt):
        read()
    monkeypatch.undo()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_interrupted_opens_leave_the_count_of_maps_holding_a_descriptor_true(tmp_path, monkeypatch, ctrl_c):
    """Maps keeping a descriptor of their own were counted up before mmap and down in a finalizer: a Ctrl-C in
    between (or inside the finalizer) skipped the count down, and after enough of them every file was mapped
    without a descriptor, as if half the open-file limit were in use (an audit). What is counted is what lives."""
    import mmap
    import time
    from pymerge.io import safetensors_file as sf
    import llama_factory as lf
    path = lf.make_llama(tmp_path / "m") / "model.safetensors"
    gc.collect()
    before = len(sf._KEPT)
    real_mmap = mmap.mmap

    def mapped(*args, **kwargs):
        mm = real_mmap(*args, **kwargs)
        ctrl_c()
        time.sleep(0.01)  # (delivered here, between bytecodes)
        return mm

    monkeypatch.setattr(mmap, "mmap", mapped)
    for _ in range(5):
        with pytest.raises(KeyboardInterrupt):
            SafetensorsFile(path)
    monkeypatch.undo()
    gc.collect()
    assert len(sf._KEPT) == before
    f = SafetensorsFile(path)
    assert len(sf._KEPT) == before + 1 and f.mapped_size() is not None
    f.close()
    del f
    gc.collect()
    assert len(sf._KEPT) == before

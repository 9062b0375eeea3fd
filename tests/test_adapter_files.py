"""Adapter files as untrusted input: every way an adapter_config.json or a safetensors file can
poison other tenants, hang a thread, escape its folder or crash a caller is refused with an
AdapterError naming the file and field, in bounded time; a folder changed after registration is
not read as the registered adapter; real PEFT pattern keys still work."""

import json
import os
import struct
import time

import numpy as np
import pytest

from plora_jax.config import tiny
from plora_jax.limits import MAX_LORA_WEIGHT
from plora_jax.lora.adapter_files import AdapterFolder
from plora_jax.lora.peft import AdapterError, inspect_adapter, load_adapter, read_adapter, save_random_adapter

CFG = tiny(num_layers=2)


def adapter(tmp_path, name="a", rank=4, **config):
    return save_random_adapter(tmp_path / name, CFG, rank, ("q_proj", "v_proj"), **config)


def rewrite_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    # allow_nan: Python's json writes Infinity and NaN, and reads them back, as PEFT's files may
    (path / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))


def refused(path, match, load=True):
    with pytest.raises(AdapterError, match=match) as err:
        (load_adapter("x", path, CFG, 64) if load else inspect_adapter(path, CFG, 64))
    assert str(path.parent) not in str(err.value)  # no absolute path: the folder's own name
    return err.value


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"lora_alpha": 1e300}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_alpha": "8"}, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern"),
        ({"alpha_pattern": {"q_proj": 1e300}}, "alpha_pattern"),
        ({"alpha_pattern": {"q_proj": True}}, "alpha_pattern"),
        ({"alpha_pattern": "q_proj"}, "alpha_pattern"),
        ({"rank_pattern": "x"}, "rank_pattern"),
        ({"rank_pattern": [1]}, "rank_pattern"),
        ({"rank_pattern": {"(": 8}}, "rank_pattern"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
        ({"rank_pattern": {"q" * 300: 4}}, "rank_pattern"),
        ({"target_modules": [1]}, "target_modules"),
        ({"target_modules": {"q_proj": 1}}, "target_modules"),
        ({"r": 0}, "field r="),
        ({"r": "4"}, "field r="),
        ({"use_dora": "yes"}, "use_dora"),
        ({"use_rslora": 1}, "use_rslora"),
        ({"peft_type": ["LORA"]}, "peft_type"),
        ({"lora_alpha": 10**400}, "lora_alpha"),  # an int JSON reads whole: float() of it overflows
    ],
)
def test_malformed_and_poisoning_configs_are_refused_by_field(tmp_path, changes, field):
    path = adapter(tmp_path)
    rewrite_config(path, **changes)
    error = refused(path, field, load=False)
    assert "adapter_config.json" in str(error)


def test_a_backtracking_pattern_key_is_refused_at_once(tmp_path):
    """PEFT's keys are regexes; one that backtracks took hours per module when compiled. Here no
    key is compiled: it is refused as not a module-path suffix, in microseconds."""
    path = adapter(tmp_path)
    for key in ("([a-z_.0-9]+)+z", "(a|aa)*$", "model.layers.*"):
        rewrite_config(path, rank_pattern={key: 4})
        start = time.perf_counter()
        refused(path, "rank_pattern", load=False)
        assert time.perf_counter() - start < 0.5


def test_real_peft_pattern_keys_still_match(tmp_path):
    """Plain, dotted, escaped and anchored keys (as PEFT writes them) set per-module ranks and
    alphas: the q_proj of layer 1 gets rank 4 at alpha 32, the others alpha 8."""
    path = adapter(tmp_path, rank=4, alpha=8)
    for key in ("layers.1.self_attn.q_proj", r"layers\.1\.self_attn\.q_proj", "^model.layers.1.self_attn.q_proj$"):
        rewrite_config(path, alpha_pattern={key: 32}, rank_pattern={"q_proj": 4})
        loaded = load_adapter("x", path, CFG, 64)
        plain = load_adapter("y", adapter(tmp_path, "plain", rank=4, alpha=8), CFG, 64)
        np.testing.assert_allclose(loaded.weights[(1, "q_proj")][1], plain.weights[(1, "q_proj")][1] * 4, rtol=1e-6)
        np.testing.assert_allclose(loaded.weights[(0, "q_proj")][1], plain.weights[(0, "q_proj")][1], rtol=1e-6)


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _save(path, tensors):
    from safetensors.numpy import save_file

    save_file(tensors, str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("poison", "match"),
    [
        ("nan_b", "NaN or Inf"),
        ("inf_a", "NaN or Inf"),
        ("huge_b", "magnitude"),
        ("huge_after_scaling", "magnitude"),
        ("overflow_after_scaling", "NaN or Inf"),
    ],
)
def test_weights_are_checked_after_scaling(tmp_path, poison, match):
    path = adapter(tmp_path, alpha=8)
    tensors = _tensors(path)
    a_key = next(k for k in tensors if "lora_A" in k)
    b_key = next(k for k in tensors if "lora_B" in k)
    if poison == "nan_b":
        tensors[b_key][0, 0] = np.nan
    elif poison == "inf_a":
        tensors[a_key][0, 0] = np.inf
    elif poison == "huge_b":
        tensors[b_key][0, 0] = 1e30
    elif poison == "huge_after_scaling":  # below the bound before scaling, above after it
        tensors[b_key][0, 0] = MAX_LORA_WEIGHT * 0.9
        rewrite_config(path, lora_alpha=64.0)
    else:  # finite in float32 before scaling, Inf after it
        tensors[b_key][0, 0] = 3e38
        rewrite_config(path, lora_alpha=65536.0, r=4)
    _save(path, tensors)
    inspect_adapter(path, CFG, 64)  # the header is fine: registration from the header succeeds
    refused(path, match)


def test_a_symlinked_file_is_refused_wherever_it_points(tmp_path):
    """The folder is confined by its caller; its files are opened without following a symlink,
    so a weights or config file linked elsewhere (even to a valid adapter) is never read."""
    elsewhere = adapter(tmp_path, "elsewhere")
    path = adapter(tmp_path / "root", "a")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        original = (path / name).read_bytes()
        (path / name).unlink()
        (path / name).symlink_to(elsewhere / name)
        refused(path, "symlink", load=False)
        (path / name).unlink()
        (path / name).write_bytes(original)
    inspect_adapter(path, CFG, 64)


def test_a_folder_changed_after_registration_is_not_read_as_the_registered_adapter(tmp_path):
    path = adapter(tmp_path, rank=4)
    info, _ = read_adapter("x", path, CFG, 64, weights=False)
    load_adapter("x", path, CFG, 64, expect=info.identity)  # unchanged: read
    other = adapter(tmp_path, "other", rank=4, seed=3)
    os.replace(other / "adapter_model.safetensors", path / "adapter_model.safetensors")  # same rank, new file
    with pytest.raises(AdapterError, match="changed since the adapter was registered"):
        load_adapter("x", path, CFG, 64, expect=info.identity)
    # Rewritten in place, same size, its modification time put back: still another file.
    info, _ = read_adapter("x", path, CFG, 64, weights=False)
    weights = path / "adapter_model.safetensors"
    st, data = weights.stat(), bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(AdapterError, match="changed since the adapter was registered"):
        load_adapter("x", path, CFG, 64, expect=info.identity)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "header_past_end", "huge_header", "offsets_past_end", "shape_mismatch", "trailing", "int_dtype"],
)
def test_safetensors_files_are_checked_against_their_header(tmp_path, damage):
    path = adapter(tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    key = next(k for k in header if k != "__metadata__")
    if damage == "truncated":
        data = data[:-10]
    elif damage == "header_past_end":
        data = struct.pack("<Q", len(data)) + data[8:]
    elif damage == "huge_header":
        data = struct.pack("<Q", 1 << 40) + data[8:]
    else:
        if damage == "offsets_past_end":
            header[key]["data_offsets"][1] += 1 << 30
        elif damage == "shape_mismatch":
            header[key]["shape"][0] += 1
        elif damage == "int_dtype":
            header[key]["dtype"] = "I32"
        elif damage == "trailing":
            body += b"\0" * 64
        encoded = json.dumps(header).encode()
        data = struct.pack("<Q", len(encoded)) + encoded + body
    weights.write_bytes(data)
    refused(path, "adapter_model.safetensors: cannot be read", load=False)


def test_registration_reads_no_weight_and_a_load_reads_each_once(tmp_path, monkeypatch):
    path = adapter(tmp_path)
    reads = []
    original = AdapterFolder.read

    def counting(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(AdapterFolder, "read", counting)
    load_adapter("x", path, CFG, 64)
    assert sorted(reads) == sorted(_tensors(path))  # 2 layers x 2 modules x (A, B), each once
    inspect_adapter(path, CFG, 64)
    assert len(reads) == 8  # registration reads the header only


def test_a_pickled_weights_file_is_refused(tmp_path):
    path = adapter(tmp_path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    refused(path, "pickled weights are refused", load=False)


def test_a_tensor_name_with_a_huge_layer_index_is_refused_not_crashed(tmp_path):
    """int() of 4,301 or more digits raises in CPython: the key is refused by the name rule."""
    path = adapter(tmp_path)
    tensors = _tensors(path)
    key = next(iter(tensors))
    tensors[key.replace("layers.0.", "layers." + "9" * 5000 + ".")] = tensors.pop(key)
    _save(path, tensors)
    refused(path, "is not a LoRA A/B weight", load=False)

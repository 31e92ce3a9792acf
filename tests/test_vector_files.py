"""Steering vector files: llama.cpp's GGUF control vectors written by the `gguf` package, safetensors
written by safetensors, and what the workbench writes, read by the server's loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.core.vectors import VectorFileError, load_vector
from sae_factory import write_gguf
from steer_workbench.vectors import parse_layers, read_texts, write_vector


def test_a_gguf_control_vector_is_read_by_layer(tmp_path):
    rng = np.random.default_rng(0)
    d1, d3 = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    vector = load_vector("calm", write_gguf(tmp_path / "calm.gguf", {"direction.1": d1, "direction.3": d3}))
    assert vector.layers == (1, 3) and vector.d_model == 16
    np.testing.assert_array_equal(vector.directions[1], d1)
    np.testing.assert_array_equal(vector.directions[3], d3)


def test_safetensors_take_any_float_dtype_and_layer_zero(tmp_path):
    direction = torch.randn(16)
    save_file({"direction.0": direction.to(torch.bfloat16), "direction.2": direction}, str(tmp_path / "v.safetensors"))
    vector = load_vector("v", tmp_path / "v.safetensors")
    assert vector.layers == (0, 2)
    np.testing.assert_array_equal(vector.directions[0], direction.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("tensors, words", [
    ({"direction.0": np.ones(8, np.float32)}, "layers start at 1"),
    ({"direction.1": np.ones(8, np.float16)}, "F16; control vectors are F32"),
    ({"direction.1": np.ones((2, 8), np.float32)}, "not [hidden size]"),
    ({"bias.1": np.ones(8, np.float32)}, "not direction.<layer>"),
    ({"direction.1": np.ones(8, np.float32), "direction.2": np.ones(9, np.float32)}, "differ in size"),
    ({"direction.1": np.full(8, np.nan, np.float32)}, "not finite"),
])
def test_files_llama_cpp_would_refuse_stop_the_start_with_the_reason(tmp_path, tensors, words):
    with pytest.raises(VectorFileError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_vector("bad", write_gguf(tmp_path / "bad.gguf", tensors))


def test_unreadable_and_unknown_files(tmp_path):
    (tmp_path / "v.gguf").write_bytes(b"not a gguf")
    with pytest.raises(VectorFileError, match="not a readable GGUF"):
        load_vector("v", tmp_path / "v.gguf")
    (tmp_path / "v.npy").write_bytes(b"")
    with pytest.raises(VectorFileError, match="neither .gguf nor .safetensors"):
        load_vector("v", tmp_path / "v.npy")
    with pytest.raises(VectorFileError, match="no file at"):
        load_vector("v", tmp_path / "missing.gguf")


@pytest.mark.parametrize("suffix", [".gguf", ".safetensors"])
def test_what_the_workbench_writes_the_server_reads(tmp_path, suffix):
    directions = {2: np.arange(6, dtype=np.float32), 4: -np.ones(6, dtype=np.float32)}
    write_vector(tmp_path / f"v{suffix}", directions, "llama")
    vector = load_vector("v", tmp_path / f"v{suffix}")
    assert vector.layers == (2, 4)
    np.testing.assert_array_equal(vector.directions[4], directions[4])


def test_layers_and_texts_arguments(tmp_path):
    assert parse_layers("middle", 30, 1) == [15]
    assert parse_layers("all", 4, 1) == [1, 2, 3]
    assert parse_layers("3,5-7", 30, 0) == [3, 5, 6, 7]
    with pytest.raises(ValueError, match="0 is outside 1..29"):
        parse_layers("0", 30, 1)
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n')
    assert read_texts(tmp_path / "a.txt") == ["one", "two"]
    assert read_texts(tmp_path / "b.jsonl") == ["three"]

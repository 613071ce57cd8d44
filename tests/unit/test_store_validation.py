"""adapters_store rejects hostile or unfit uploads with the right error class, a message naming the
problem, and a store left exactly as it was."""

from __future__ import annotations

import io
import pickle
import struct

import pytest
import torch

from adapters_store import (
    AdapterError,
    AdapterTooLargeError,
    AdapterValidationError,
    InvalidAdapterNameError,
    parse_adapter,
)
from tests.unit.store_helpers import (
    SPEC,
    edit_config,
    make_store,
    peft_adapter,
    raw_safetensors,
    save_tensors,
    snapshot,
)

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def good():
    return peft_adapter(targets=("q_proj", "v_proj"))


def with_tensors(**changes):
    """Good config, safetensors with some tensors replaced (value) or dropped (None)."""
    tensors = good().tensors()
    for key, value in changes.items():
        key = {"q_a": Q_A, "q_b": Q_B}.get(key, key)
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return good().config_bytes, save_tensors(tensors)


def one_value(tensor, value):
    """`tensor` with one element, away from the ends, set to `value`."""
    changed = tensor.clone()
    changed.view(-1)[changed.numel() // 2 + 1] = value
    return changed


def with_extra(key, value):
    tensors = good().tensors()
    tensors[key] = value
    return good().config_bytes, save_tensors(tensors)


def with_config(**changes):
    return edit_config(good(), **changes), good().safetensors_bytes


def whole(**kwargs):
    """Both files of another real PEFT adapter."""
    adapter = peft_adapter(**kwargs)
    return adapter.config_bytes, adapter.safetensors_bytes


def with_weights(blob):
    return good().config_bytes, blob


def torch_save_bytes():
    buffer = io.BytesIO()
    torch.save({Q_A: torch.zeros(4, 64)}, buffer)
    return buffer.getvalue()


def header(entries):
    return {"t": entries}


BAD_INPUTS = {
    # safetensors framing
    "pickle posing as safetensors": (
        lambda: with_weights(pickle.dumps({"weights": list(range(100))}, protocol=4)),
        "adapter_model.safetensors is not a safetensors file",
    ),
    "torch.save zip posing as safetensors": (
        lambda: with_weights(torch_save_bytes()),
        "adapter_model.safetensors is not a safetensors file",
    ),
    "huge header length": (
        lambda: with_weights(struct.pack("<Q", 1 << 40) + b"{}"),
        "header length 1099511627776 exceeds the 16777216-byte limit",
    ),
    "header length beyond file": (
        lambda: with_weights(struct.pack("<Q", 4096) + b"{}" + b" " * 100),
        "header length 4096 exceeds the file size",
    ),
    "too short": (lambda: with_weights(b"\x01\x00"), "not a safetensors file (only 2 bytes)"),
    "malformed JSON header": (
        lambda: with_weights(struct.pack("<Q", 9) + b'{"a": [1,'),
        "malformed JSON header",
    ),
    "offsets outside file": (
        lambda: with_weights(raw_safetensors(header({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}))),
        "data_offsets [0, 16] outside the 0-byte data area",
    ),
    "offsets disagree with shape": (
        lambda: with_weights(
            raw_safetensors(header({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}), b"\0" * 8)
        ),
        "spans 8 bytes, but shape [4] of F32 needs 16",
    ),
    "overlapping tensors": (
        lambda: with_weights(
            raw_safetensors(
                {
                    "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            )
        ),
        "overlap",
    ),
    "int64 dtype": (
        lambda: with_tensors(q_a=torch.zeros(4, 64, dtype=torch.int64)),
        "dtype 'I64'; only F32, F16 and BF16",
    ),
    "float64 dtype": (lambda: with_tensors(q_a=torch.zeros(4, 64, dtype=torch.float64)), "dtype 'F64'"),
    "no tensors": (lambda: with_weights(save_tensors({})), "contains no LoRA tensors"),
    # shapes and structure vs the base model
    "wrong A shape": (
        lambda: with_tensors(q_a=torch.randn(4, 100)),
        "layer 0 q_proj lora_A has shape [4, 100], expected [4, 64]",
    ),
    "wrong B shape": (
        lambda: with_tensors(q_b=torch.randn(32, 4)),
        "layer 0 q_proj lora_B has shape [32, 4], expected [64, 4]",
    ),
    "A without B": (lambda: with_tensors(q_b=None), "layer 0 q_proj has lora_A but no lora_B"),
    "rank over limit": (
        lambda: whole(r=32, targets=("q_proj",)),
        "rank 32 exceeds the server's max_rank 16",
    ),
    "too many layers": (
        lambda: whole(targets=("q_proj",), num_layers=3),
        "is for layer 2, but the base model has 2 layers",
    ),
    "NaN weights": (
        lambda: with_tensors(q_a=torch.full((4, 64), float("nan"))),
        "layer 0 q_proj lora_A contains NaN or Inf",
    ),
    "one +Inf weight": (
        lambda: with_tensors(q_b=one_value(good().tensors()[Q_B], float("inf"))),
        "layer 0 q_proj lora_B contains NaN or Inf",
    ),
    "one -Inf weight": (
        lambda: with_tensors(q_a=one_value(good().tensors()[Q_A], float("-inf"))),
        "layer 0 q_proj lora_A contains NaN or Inf",
    ),
    "one NaN weight": (
        lambda: with_tensors(q_a=one_value(good().tensors()[Q_A], float("nan"))),
        "layer 0 q_proj lora_A contains NaN or Inf",
    ),
    "duplicate via adapter name": (
        lambda: with_extra(Q_A.replace(".weight", ".default.weight"), torch.randn(4, 64)),
        "layer 0 q_proj lora_A appears twice",
    ),
    "unknown module tensor": (
        lambda: with_extra(Q_A.replace("q_proj", "foo_proj"), torch.randn(4, 64)),
        "targets unknown module 'foo_proj'",
    ),
    "module not in target_modules": (
        lambda: (edit_config(good(), target_modules=["q_proj"]), good().safetensors_bytes),
        "is for v_proj, which target_modules does not list",
    ),
    "DoRA magnitude tensor": (
        lambda: with_extra(Q_A.replace("lora_A.weight", "lora_magnitude_vector"), torch.ones(64)),
        "DoRA",
    ),
    "lm_head tensor": (
        lambda: with_extra("base_model.model.lm_head.lora_A.weight", torch.randn(4, 64)),
        "targets embeddings or lm_head",
    ),
    "embedding tensor": (
        lambda: with_extra("base_model.model.model.embed_tokens.lora_embedding_A", torch.randn(4, 128)),
        "targets embeddings or lm_head",
    ),
    "bias tensor": (
        lambda: with_extra("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", torch.randn(64)),
        "is a bias",
    ),
    # adapter_config.json
    "config not JSON": (
        lambda: (b"{nope", good().safetensors_bytes),
        "adapter_config.json is not valid JSON",
    ),
    "config is a list": (lambda: (b"[]", good().safetensors_bytes), "must be a JSON object"),
    "not LoRA": (lambda: with_config(peft_type="IA3"), "peft_type is 'IA3'; only 'LORA'"),
    "rank not int": (lambda: with_config(r="4"), "r must be a positive integer, got '4'"),
    "alpha not finite": (
        lambda: with_config(lora_alpha=float("inf")),
        "lora_alpha must be a positive number",
    ),
    "DoRA adapter": (lambda: whole(targets=("q_proj",), use_dora=True), "DoRA adapters (use_dora: true)"),
    "modules_to_save": (lambda: with_config(modules_to_save=["lm_head"]), "modules_to_save ['lm_head']"),
    "bias all": (lambda: with_config(bias="all"), "bias 'all' is not supported"),
    "rank_pattern": (lambda: with_config(rank_pattern={"q_proj": 8}), "rank_pattern {'q_proj': 8}"),
    "alpha_pattern": (lambda: with_config(alpha_pattern={"q_proj": 8}), "alpha_pattern"),
    "activated LoRA": (
        lambda: with_config(alora_invocation_tokens=[1, 2]),
        "alora_invocation_tokens [1, 2] is not supported",
    ),
    "trainable tokens": (lambda: with_config(trainable_token_indices=[3]), "trainable_token_indices [3]"),
    "unknown target module": (lambda: with_config(target_modules=["foo_proj"]), "'foo_proj' is unknown"),
    "embedding target": (lambda: with_config(target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    "lm_head target": (lambda: with_config(target_modules=["lm_head"]), "'lm_head' is not supported"),
    "bad regex target": (lambda: with_config(target_modules="(q_proj"), "regex '(q_proj' is invalid"),
    "layers_to_transform out of range": (
        lambda: with_config(layers_to_transform=[0, 5]),
        "layers_to_transform has layer 5, but the base model has 2 layers",
    ),
    "other architecture": (
        lambda: with_config(auto_mapping={"base_model_class": "Qwen2ForCausalLM"}),
        "trained for Qwen2ForCausalLM, but the base model is LlamaForCausalLM",
    ),
}


@pytest.fixture
def seeded_store(tmp_path):
    store = make_store(tmp_path)
    adapter = good()
    record = store.put("prod", adapter.config_bytes, adapter.safetensors_bytes)
    return store, record, tmp_path


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_adapter_is_rejected_and_store_unchanged(seeded_store, case):
    store, record, root = seeded_store
    build, message = BAD_INPUTS[case]
    config_bytes, safetensors_bytes = build()
    before = snapshot(root)
    with pytest.raises(AdapterValidationError) as caught:
        store.put("prod", config_bytes, safetensors_bytes)
    assert message in str(caught.value)
    assert caught.value.status_code == 422
    assert snapshot(root) == before
    assert store.list() == [record]


def test_server_base_model_name_and_unknown_fields_do_not_matter():
    config_bytes = edit_config(good(), base_model_name_or_path="some/other-mirror", task_type="CAUSAL_LM", x=1)
    config, weights = parse_adapter(config_bytes, good().safetensors_bytes, SPEC, max_rank=16)
    assert config["base_model_name_or_path"] == "some/other-mirror"
    assert len(weights.tensors) == 4


@pytest.mark.parametrize(
    "name", ["../x", "/abs", "a/b", ".hidden", "", "x" * 129, "..", "a\\b", "a b", "-lead", "ünï", "a\x00"]
)
def test_invalid_names_are_rejected_everywhere(seeded_store, name):
    store, record, root = seeded_store
    adapter = good()
    before = snapshot(root)
    calls = [
        lambda: store.put(name, adapter.config_bytes, adapter.safetensors_bytes),
        lambda: store.put_archive(name, b"PK\x03\x04"),
        lambda: store.put_dir(name, adapter.path),
        lambda: store.get(name),
        lambda: store.delete(name),
    ]
    for call in calls:
        with pytest.raises(InvalidAdapterNameError, match="invalid adapter name") as caught:
            call()
        assert caught.value.status_code == 400
    assert snapshot(root) == before
    assert store.list() == [record]


def test_longest_valid_name_is_accepted(tmp_path):
    store = make_store(tmp_path)
    name = "A" + "b._-" * 31 + "xyz"
    assert len(name) == 128
    assert store.put(name, good().config_bytes, good().safetensors_bytes).name == name


def test_oversize_upload_is_413_and_store_unchanged(tmp_path):
    adapter = good()
    limit = len(adapter.config_bytes) + len(adapter.safetensors_bytes) - 1
    store = make_store(tmp_path, max_bytes=limit)
    before = snapshot(tmp_path)
    with pytest.raises(AdapterTooLargeError, match=f"more than the {limit}-byte limit") as caught:
        store.put("big", adapter.config_bytes, adapter.safetensors_bytes)
    assert caught.value.status_code == 413
    with pytest.raises(AdapterTooLargeError):
        store.put_dir("big", adapter.path)
    assert snapshot(tmp_path) == before
    assert store.list() == []


def test_put_dir_refuses_pickle_checkpoints_and_symlinks(tmp_path):
    adapter = good()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes(adapter.config_bytes)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({}))
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").write_bytes(adapter.config_bytes)
    (linked / "adapter_model.safetensors").symlink_to(adapter.path / "adapter_model.safetensors")
    store = make_store(tmp_path / "store")
    with pytest.raises(AdapterValidationError, match="adapter_model.bin is a pickle checkpoint"):
        store.put_dir("a", pickled)
    with pytest.raises(AdapterValidationError, match="adapter_model.safetensors is a symlink"):
        store.put_dir("a", linked)
    with pytest.raises(AdapterError, match="does not exist"):
        store.put_dir("a", tmp_path / "missing")
    assert store.list() == []

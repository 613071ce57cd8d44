"""adapters_store happy paths: PEFT adapters round-trip bit-exactly and versions behave."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from transformers import LlamaForCausalLM

from adapters_store import (
    AdapterNotFoundError,
    BaseModelSpec,
    load_adapter_dir,
    parse_adapter,
    weights_nbytes,
)
from tests.unit.store_helpers import (
    ALL_MODULES,
    SPEC,
    adapter_members,
    edit_config,
    llama_config,
    make_store,
    make_tar_gz,
    make_zip,
    peft_adapter,
    save_tensors,
)


def assert_matches_peft(weights, adapter, layers=range(2), modules=ALL_MODULES):
    assert set(weights.tensors) == {(layer, module) for layer in layers for module in modules}
    for (layer, module), (a, b) in weights.tensors.items():
        peft_a, peft_b = adapter.lora_pair(layer, module)
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, peft_a), (layer, module)
        assert torch.equal(b, peft_b), (layer, module)


def test_spec_from_hf_config_matches_real_linear_shapes():
    model = LlamaForCausalLM(llama_config())
    layer = model.model.layers[0]
    for module in ALL_MODULES:
        linear = getattr(layer.self_attn if module in ALL_MODULES[:4] else layer.mlp, module)
        assert SPEC.module_shapes[module] == (linear.in_features, linear.out_features)
    assert (SPEC.architecture, SPEC.model_type, SPEC.num_layers) == ("LlamaForCausalLM", "llama", 2)
    as_dict = llama_config().to_dict() | {"architectures": ["LlamaForCausalLM"]}
    assert BaseModelSpec.from_hf_config(as_dict) == SPEC


def test_put_get_list_delete_load_weights_round_trip(tmp_path):
    adapter = peft_adapter()
    store = make_store(tmp_path)
    record = store.put("support-bot", adapter.config_bytes, adapter.safetensors_bytes)
    assert (record.name, record.version, record.rank, record.alpha) == ("support-bot", 1, 4, 8.0)
    assert record.target_modules == sorted(ALL_MODULES)
    assert record.size_bytes == len(adapter.config_bytes) + len(adapter.safetensors_bytes)
    assert record.path == tmp_path.resolve() / "support-bot" / "v1"
    assert sorted(p.name for p in record.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    assert store.get("support-bot") == record
    assert store.list() == [record]
    weights = store.load_weights(record)
    assert_matches_peft(weights, adapter)
    assert weights.scaling == 2.0
    assert weights_nbytes(weights) == sum(a.numel() * 4 + b.numel() * 4 for a, b in weights.tensors.values())
    public = record.to_public()
    assert set(public) == {"name", "version", "sha256", "rank", "alpha", "target_modules"} | {
        "size_bytes",
        "created",
    }
    store.delete("support-bot")
    assert store.list() == []
    assert not (tmp_path / "support-bot").exists()
    with pytest.raises(AdapterNotFoundError, match="support-bot"):
        store.get("support-bot")
    with pytest.raises(AdapterNotFoundError):
        store.delete("support-bot")


def test_versions_increment_and_old_versions_stay_readable(tmp_path):
    first, second = peft_adapter(seed=0), peft_adapter(seed=1)
    store = make_store(tmp_path)
    v1 = store.put("a", first.config_bytes, first.safetensors_bytes)
    v2 = store.put("a", second.config_bytes, second.safetensors_bytes)
    v3 = store.put("a", first.config_bytes, first.safetensors_bytes)
    assert [v1.version, v2.version, v3.version] == [1, 2, 3]
    assert v1.sha256 == v3.sha256 != v2.sha256
    assert store.get("a") == v3
    assert store.get("a", 2) == v2
    assert store.list() == [v3]
    assert_matches_peft(store.load_weights(store.get("a", 2)), second)
    assert_matches_peft(store.load_weights(v1), first)
    with pytest.raises(AdapterNotFoundError, match="no version 7"):
        store.get("a", 7)
    # Reopening sees the same versions; versions never repeat, even after a delete.
    assert make_store(tmp_path).get("a") == v3
    store.delete("a")
    assert store.put("a", second.config_bytes, second.safetensors_bytes).version == 4
    store.delete("a")
    assert make_store(tmp_path).put("a", first.config_bytes, first.safetensors_bytes).version == 5


def test_list_is_sorted_latest_per_name(tmp_path):
    adapter = peft_adapter()
    store = make_store(tmp_path)
    for name in ("zeta", "Alpha", "mid.v2", "alpha_1"):
        store.put(name, adapter.config_bytes, adapter.safetensors_bytes)
    store.put("mid.v2", adapter.config_bytes, adapter.safetensors_bytes)
    listed = store.list()
    assert [r.name for r in listed] == ["Alpha", "alpha_1", "mid.v2", "zeta"]
    assert [r.version for r in listed] == [1, 1, 2, 1]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_matches_peft_forward(use_rslora):
    adapter = peft_adapter(r=4, alpha=6, targets=("q_proj", "down_proj"), use_rslora=use_rslora)
    _, weights = parse_adapter(adapter.config_bytes, adapter.safetensors_bytes, SPEC, max_rank=16)
    assert weights.use_rslora is use_rslora
    assert weights.scaling == pytest.approx(6 / math.sqrt(4) if use_rslora else 6 / 4)
    torch.manual_seed(3)
    for (layer, module), (a, b) in weights.tensors.items():
        linear = adapter.linear(layer, module)
        x = torch.randn(5, a.shape[1])  # [tokens, in]
        with torch.no_grad():
            peft_delta = linear(x) - linear.base_layer(x)
        ours = weights.scaling * (x @ a.T) @ b.T  # [tokens, out]
        torch.testing.assert_close(ours, peft_delta, rtol=1e-5, atol=1e-5)


def test_archives_and_dir_round_trip(tmp_path):
    adapter = peft_adapter(targets=("q_proj", "v_proj"))
    store = make_store(tmp_path / "store")
    readme = {"README.md": b"ignored", "tokenizer.json": b"{}"}
    uploads = [
        store.put_archive("a", make_tar_gz(adapter_members(adapter) | readme)),
        store.put_archive("a", make_zip(adapter_members(adapter) | readme)),
        store.put_archive("a", make_tar_gz(adapter_members(adapter, "./"))),
        store.put_archive("a", make_tar_gz(adapter_members(adapter, "my-adapter/"))),
        store.put_archive("a", make_zip(adapter_members(adapter, "my-adapter/"))),
        store.put_dir("a", adapter.path),
    ]
    assert [r.version for r in uploads] == [1, 2, 3, 4, 5, 6]
    assert {r.sha256 for r in uploads} == {uploads[0].sha256}
    assert_matches_peft(store.load_weights(store.get("a", 4)), adapter, modules=("q_proj", "v_proj"))
    assert_matches_peft(load_adapter_dir(adapter.path, SPEC, 16), adapter, modules=("q_proj", "v_proj"))


def test_key_spellings_dtypes_and_target_forms_are_accepted():
    adapter = peft_adapter(targets=("q_proj", "up_proj"))
    tensors = adapter.tensors()
    spellings = {
        "with adapter name": {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
        "without base_model prefix": {k.removeprefix("base_model.model."): v for k, v in tensors.items()},
        "bare layers.": {k.removeprefix("base_model.model.model."): v for k, v in tensors.items()},
        "fp16": {k: v.half() for k, v in tensors.items()},
        "bf16": {k: v.bfloat16() for k, v in tensors.items()},
    }
    for label, renamed in spellings.items():
        _, weights = parse_adapter(adapter.config_bytes, save_tensors(renamed), SPEC, max_rank=16)
        assert len(weights.tensors) == 4, label
        a, _ = weights.tensors[1, "up_proj"]
        assert a.dtype == renamed[next(iter(renamed))].dtype, label  # the file's dtype, cast on the device
        torch.testing.assert_close(a.float(), adapter.lora_pair(1, "up_proj")[0], rtol=1e-2, atol=1e-2)
    for targets in (r".*\.(q_proj|up_proj)", "all-linear", ["self_attn.q_proj", "mlp.up_proj", "v_proj"]):
        config_bytes = edit_config(adapter, target_modules=targets)
        config, _ = parse_adapter(config_bytes, adapter.safetensors_bytes, SPEC, max_rank=16)
        assert config["target_modules"] == ["q_proj", "up_proj"], targets


def test_layers_to_transform_subset(tmp_path):
    adapter = peft_adapter(targets=("k_proj",))
    only_layer_1 = {k: v for k, v in adapter.tensors().items() if ".layers.1." in k}
    config, weights = parse_adapter(
        edit_config(adapter, layers_to_transform=[1]), save_tensors(only_layer_1), SPEC, max_rank=16
    )
    assert list(weights.tensors) == [(1, "k_proj")]
    assert config["layers"] == [1]


def test_concurrent_puts_get_distinct_versions(tmp_path):
    adapter = peft_adapter()
    store = make_store(tmp_path)
    errors = []

    def upload():
        try:
            store.put("shared", adapter.config_bytes, adapter.safetensors_bytes)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [store.get("shared", v).version for v in range(1, 9)] == list(range(1, 9))
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == sorted(f"v{v}" for v in range(1, 9))

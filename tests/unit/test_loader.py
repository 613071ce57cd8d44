"""Loader round trips: HF dir (safetensors), GGUF, pickle refusal, NF4 layer types and memory."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from server.model.loader import ModelLoadError, convert_gguf, load_hf_dir, load_model
from server.model.quant import DenseLinear, NF4Linear
from tests.unit.engine_helpers import attach_cache, prefill_logits


def test_hf_dir_loads_quantized_and_dense(tiny_llama_dir):
    nf4 = load_hf_dir(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32, quantize=True)
    dense = load_hf_dir(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32, quantize=False)
    assert all(isinstance(lin.base, NF4Linear) for _, lin in nf4.model.lora_linears())
    assert all(isinstance(lin.base, DenseLinear) for _, lin in dense.model.lora_linears())
    nf4_bytes = sum(lin.base.nbytes for _, lin in nf4.model.lora_linears())
    dense_bytes = sum(lin.base.weight.numel() * 4 for _, lin in dense.model.lora_linears())
    assert nf4_bytes < dense_bytes / 6
    assert nf4.tokenizer.decode(nf4.tokenizer.encode("Paris")) == "Paris"
    assert nf4.config.num_layers == 2 and nf4.model_id == tiny_llama_dir.name


def test_pickle_checkpoints_are_refused(tiny_llama_dir, tmp_path):
    target = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, target)
    for f in target.glob("*.safetensors"):
        f.unlink()
    (target / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_hf_dir(target, device=torch.device("cpu"), dtype=torch.float32, quantize=False)


def test_gguf_round_trip(tiny_llama_dir, tmp_path):
    """Write the tiny model as GGUF with the gguf package, convert it back, compare logits."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(gguf, hf, tiny_llama_dir, path)
    converted = convert_gguf(path, tmp_path / "cache")
    assert convert_gguf(path, tmp_path / "cache") == converted  # second call reuses the conversion
    loaded = load_model(str(path), cache_dir=tmp_path / "cache", device="cpu", quantization="none")
    original = load_hf_dir(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32, quantize=False)
    ids = [5, 6, 7, 8, 9, 10]
    a, _ = prefill_logits(loaded.model, attach_cache(loaded.model), ids)
    b, _ = prefill_logits(original.model, attach_cache(original.model), ids)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_concurrent_conversions_of_one_gguf_convert_once(tiny_llama_dir, tmp_path, monkeypatch):
    """Two servers starting on an empty cache: both ask for the conversion at once; neither fails,
    one converts, the other waits for it and uses the result (issue 9 defect 6)."""
    gguf = pytest.importorskip("gguf")
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(gguf, AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                     tiny_llama_dir, path)
    real_save, num_saves = safetensors.torch.save_file, []

    def slow_save(*args, **kwargs):  # keeps the first conversion running while the second starts
        num_saves.append(1)
        time.sleep(0.5)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", slow_save)
    start = threading.Barrier(2)

    def convert() -> Path:
        start.wait()
        return convert_gguf(path, tmp_path / "cache")

    with ThreadPoolExecutor(2) as pool:
        results = [future.result() for future in [pool.submit(convert), pool.submit(convert)]]
    assert results[0] == results[1] and (results[0] / "config.json").is_file()
    assert len(num_saves) == 1
    models = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models.iterdir()) == sorted([results[0].name, results[0].name + ".lock"])
    loaded = load_model(str(path), cache_dir=tmp_path / "cache", device="cpu", quantization="none")
    assert loaded.config.num_layers == 2


def write_llama_gguf(gguf, hf, tokenizer_dir, path):
    """Minimal llama GGUF writer (F32 tensors, llama.cpp names, q/k permuted as llama.cpp expects)."""
    from transformers import AutoTokenizer

    cfg = hf.config
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else 10000.0)
    w.add_tokenizer_model("gpt2")
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.eos_token_id)

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = hf.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf_name, g_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                t = permute(t, cfg.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g_name}.weight", t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

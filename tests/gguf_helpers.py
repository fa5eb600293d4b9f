"""A tiny Llama model written as a GGUF file by the `gguf` package, as llama.cpp's converter would.

The tests read it back through transformers' GGUF loader (moa_search.models) with no network.
Vocabulary and merges: the embedded demo model's byte-level BPE, so the tokenizer that
transformers rebuilds from the file's metadata is a real one; weights: a random tiny Llama.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moa_search.demo import embedded_model_dir

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rotary layout (convert_hf_to_gguf.py's
    permute); transformers undoes it on load, so the file must hold the permuted rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write `model` (a LlamaForCausalLM whose vocab_size is the demo tokenizer's) to `path` (F32)."""
    import gguf

    tj = json.loads((Path(embedded_model_dir()) / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    c = model.config
    assert c.vocab_size == len(tokens), "the model's vocabulary must be the demo tokenizer's"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control token
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    if chat_template:
        w.add_chat_template(chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        w.add_tensor(f"blk.{layer}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{layer}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{layer}.{gg}.weight", sd[p + hf + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(seed: int = 0, layers: int = 2):
    """A random tiny Llama over the demo tokenizer's 4096 tokens (positions up to 2048)."""
    from helpers import tiny_model

    m = tiny_model("llama", layers=layers, heads=4, kv_heads=2, head_dim=16, vocab=4096, seed=seed)
    m.config.max_position_embeddings = 2048
    return m

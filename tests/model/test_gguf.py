"""`unitrain import-gguf`: a tiny llama GGUF written here with the `gguf` package becomes a checkpoint whose logits
equal those of the transformers model it was written from, with its tokenizer and chat template."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unitrain.cli import main

from .conftest import TINY

gguf = pytest.importorskip("gguf")

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MERGES = ["h e", "l l", "Ġ t", "Ġt he", "o r"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocabulary() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())  # the 256 single-byte tokens, in GPT-2's byte alphabet
    return tokens + [merge.replace(" ", "") for merge in MERGES] + SPECIAL


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp stores q/k projections in (interleaved rotary halves); transformers undoes it."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path, architecture: str = "llama") -> None:
    """`model` (a transformers Llama) as a GGUF file with fp32 tensors and a byte-level BPE tokenizer."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    tokens = byte_level_vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL else 1 for token in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(TEMPLATE)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for layer in range(config.num_hidden_layers):
        for ours, theirs in per_layer.items():
            names[f"model.layers.{layer}.{ours}.weight"] = f"blk.{layer}.{theirs}.weight"
    for name, tensor in model.state_dict().items():
        if name.endswith("q_proj.weight"):
            tensor = llama_cpp_permute(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, kv_heads)
        writer.add_tensor(names[name], tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        **{**TINY, "vocab_size": len(byte_level_vocabulary())}, rms_norm_eps=1e-5, rope_theta=50000.0
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, path)
    return model, path


def test_an_imported_gguf_has_the_logits_and_tokenizer_of_its_model(tiny_gguf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unitrain.model import from_pretrained

    model, path = tiny_gguf
    assert main(["import-gguf", str(path), "--output", str(tmp_path / "hf")]) == 0
    assert "imported" in capsys.readouterr().out
    input_ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = model(input_ids).logits
        imported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        torch.testing.assert_close(imported(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            from_pretrained(tmp_path / "hf")(input_ids), expected, rtol=1e-5, atol=1e-5
        )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "hello the world <|im_end|>"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    messages = [{"role": "user", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == byte_level_vocabulary().index("<|im_end|>")


def test_an_architecture_transformers_cannot_read_is_one_line(tiny_gguf, tmp_path, capsys):
    model, _ = tiny_gguf
    write_gguf(model, tmp_path / "odd.gguf", architecture="nosuchnet")
    assert main(["import-gguf", str(tmp_path / "odd.gguf"), "--output", str(tmp_path / "hf")]) == 2
    assert "transformers cannot read GGUF architecture 'nosuchnet'" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    (tmp_path / "text.gguf").write_text("not a gguf")
    assert main(["import-gguf", str(tmp_path / "text.gguf"), "--output", str(tmp_path / "hf")]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err

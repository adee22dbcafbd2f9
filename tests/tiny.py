"""The tiny random Llama the unit tests and the distributed workers build (one factory, so that they agree).

    from tests.tiny import tiny_llama
    model = tiny_llama(vocab=101, attn="sdpa_packed", tied=True)     # 2 layers, hidden 32, 4 heads / 2 KV heads

Same seed, same arguments -> the same weights in every process (the 2-process tests rely on it).
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    vocab: int = 101,
    *,
    attn: str = "sdpa",
    tied: bool = False,
    hidden: int = 32,
    layers: int = 2,
    positions: int = 64,
    use_cache: bool = False,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A LlamaForCausalLM with random weights from ``seed``, in fp32; ``attn`` is set as the attention
    implementation (register a custom one, e.g. backend.modeling.register_attention, before calling)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=tied,
        use_cache=use_cache,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).float()

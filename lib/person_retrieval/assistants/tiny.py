"""Tiny, randomly initialised models of the real classes, with tokenizers built in code: the transformers
backend's real loading and generation code runs on them here (tests, benchmarks) with nothing downloaded.
Their answers are noise, which is the point for the parsers: unparsable answers must be counted, not crash.
"""
from __future__ import annotations

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer():
    """A word-level tokenizer over the world's lexicon, the prompts' words, digits and punctuation."""
    import re

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..world.language import LEXICON
    from . import prompts

    words = set()
    for forms in LEXICON.values():
        for fs in forms.values():
            for f in fs:
                words.update(f.split())
    for p in prompts.PROMPTS.values():
        words.update(re.findall(r"[a-z]+", p.template.lower()))
    words.update(["yes", "no", "user", "assistant", "system", *map(str, range(11)), *list(".,;:!?'\"()[]-/")])
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(r"<\|[a-z_]+\|>", "isolated"), pre_tokenizers.Whitespace()])
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  additional_special_tokens=SPECIALS[1:7])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama_lm(seed: int = 0):
    """(model, tokenizer): a 2-layer Llama with the in-code tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"))
    return LlamaForCausalLM(cfg).eval(), tok


def qwen2_vl(seed: int = 0, hidden: int = 32):
    """(model, processor): a Qwen2-VL of the real class, two text layers and one vision block, with the
    real processor class around the in-code tokenizer."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    heads = 4
    half = hidden // heads // 2
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half // 4, half // 4, half - 2 * (half // 4)]},
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=ids["<|im_start|>"]),
        vision_config=dict(depth=1, embed_dim=hidden, hidden_size=hidden, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=ids["<|im_start|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    ip = Qwen2VLImageProcessor(min_pixels=28 * 28 * 2, max_pixels=56 * 56 * 2, patch_size=14, merge_size=2, temporal_patch_size=2)
    vp = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=CHAT_TEMPLATE)
    return model, proc

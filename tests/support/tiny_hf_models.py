"""Tiny random transformers models for the data-construction tests (no downloads, no weights).

All three share a word-level tokenizer whose vocabulary is a handful of caption words plus a
comma: random weights then generate random sequences of real words and commas, so captions and
entity answers are garbage but parseable, which exercises the filters honestly (most tags are not
in the caption, some are).
"""

from __future__ import annotations

import os

import torch

NOUNS = ["dog", "cat", "mat", "ball", "tree", "grass", "car", "hat"]
# nouns also come with a trailing comma as one token, so random text is often a comma-separated list
WORDS = ["a", "on", "the", "red", "and", "with", "blue"] + NOUNS + [noun + "," for noun in NOUNS]
SPECIALS = ["<pad>", "</s>", "<unk>", "<image>"]
IMAGE_TOKEN_ID = 3


def word_tokenizer(words: list[str] = WORDS):
    """PreTrainedTokenizerFast over a WordLevel vocabulary split on whitespace only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   bos_token="</s>", unk_token="<unk>")


def _quiet():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def save_tiny_blip2(path: str, seed: int = 0, image_size: int = 32) -> str:
    """Blip2ForConditionalGeneration (ViT 1 layer, Q-Former 1 layer, OPT 1 layer) + processor."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    _quiet()
    tokenizer = word_tokenizer()
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, num_query_tokens=4)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=16),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                            encoder_hidden_size=32, vocab_size=64),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32, ffn_dim=37,
                         num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=32,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        num_query_tokens=4, image_token_index=IMAGE_TOKEN_ID)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    # random weights make greedy decoding stop at once; a few forced words give a (garbage) caption
    model.generation_config.suppress_tokens = list(range(len(SPECIALS)))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_causal_lm(path: str, seed: int = 0) -> str:
    """LlamaForCausalLM, 1 layer, width 32, with the word tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    tokenizer = word_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_clipseg(path: str, seed: int = 0, image_size: int = 32) -> str:
    """CLIPSegForImageSegmentation (2-layer text and vision towers, width 32) + processor."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    _quiet()
    tokenizer = word_tokenizer()
    processor = CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": image_size, "width": image_size},
                                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3),
                                 tokenizer=tokenizer)
    config = CLIPSegConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16, reduce_dim=16, extract_layers=[1], decoder_num_attention_heads=2,
        decoder_intermediate_size=37)
    torch.manual_seed(seed)
    CLIPSegForImageSegmentation(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_all(root: str, seed: int = 0) -> dict[str, str]:
    """All three under `root`; returns {"captioner", "entity_model", "segmenter"} paths."""
    return {"captioner": save_tiny_blip2(os.path.join(root, "blip2"), seed),
            "entity_model": save_tiny_causal_lm(os.path.join(root, "llm"), seed),
            "segmenter": save_tiny_clipseg(os.path.join(root, "clipseg"), seed)}

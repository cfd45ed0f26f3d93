"""The three labelling models, each any compatible transformers checkpoint given by path.

- `Captioner`: BLIP-2 (`Blip2ForConditionalGeneration` + `Blip2Processor`); official: OPT-2.7B
  weights with the 6.7B processor, so the processor path can differ from the model path.
- `EntityExtractor`: an instruction-tuned causal LM (official: MPT-7B-Instruct, sampling with
  temperature 1.0, top-k 50, top-p 0.95, 10 new tokens).
- `Segmenter`: CLIPSeg (`CLIPSegForImageSegmentation`; official `CIDAS/clipseg-rd64-refined`),
  one probability map per entity word at the image's resolution.

transformers is imported lazily so `python -m train.data --help` stays fast.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image

from kosmosg_core.devices import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


def _quiet_transformers():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _check_dir(path: str | None, what: str, flag: str) -> str:
    if not path:
        raise ValueError(f"{what} model path is not set: pass {flag} DIR (a transformers save_pretrained folder)")
    if not os.path.isdir(path):
        raise ValueError(f"{what} model path {path!r} is not a directory: pass {flag} a save_pretrained folder")
    return path


class Captioner:
    """BLIP-2 captioner: image -> one caption (greedy unless configured otherwise)."""

    def __init__(self, path: str, processor_path: str | None = None, device: str = "auto",
                 dtype: str = "float32", max_new_tokens: int = 30, prompt: str | None = None):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        _quiet_transformers()
        _check_dir(path, "captioner", "--captioner")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.processor = Blip2Processor.from_pretrained(processor_path or path)
        self.model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> str:
        inputs = self.processor(images=image, text=self.prompt, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        # BLIP-2 hands generation to its inner language model, which would ignore the checkpoint's
        # generation_config.json; pass it on explicitly
        out = self.model.generate(**inputs, generation_config=self.model.generation_config,
                                  max_new_tokens=self.max_new_tokens)
        # decoder-only generate returns prompt + new tokens; keep the new ones only
        new_tokens = out[0, prompt_length:] if out.shape[1] > prompt_length else out[0]
        return self.processor.batch_decode(new_tokens[None], skip_special_tokens=True)[0]


class EntityExtractor:
    """Instruction LLM: caption -> raw answer text (parsed by `entities.parse_entity_answer`)."""

    def __init__(self, path: str, prompt: str, device: str = "auto", dtype: str = "float32",
                 max_new_tokens: int = 10, do_sample: bool = True, temperature: float = 1.0,
                 top_k: int = 50, top_p: float = 0.95):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        _check_dir(path, "entity LLM", "--entity-model")
        if "{caption}" not in prompt:
            raise ValueError("models.entity_prompt must contain {caption}: it is filled with the caption")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.prompt = prompt
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample and temperature > 0,
                                    pad_token_id=self.tokenizer.pad_token_id,
                                    eos_token_id=self.tokenizer.eos_token_id)
        if self.generate_kwargs["do_sample"]:
            self.generate_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)

    @torch.no_grad()
    def __call__(self, caption: str) -> str:
        inputs = self.tokenizer(self.prompt.format(caption=caption), return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, **self.generate_kwargs)
        # decode only what the model added (the official slices the decoded string by prompt length,
        # which breaks when decoding does not reproduce the prompt exactly)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class Segmenter:
    """CLIPSeg: (image, entity words) -> probabilities [E, H, W] float32 at the image's size."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "float32"):
        from transformers import AutoProcessor, CLIPSegForImageSegmentation

        _quiet_transformers()
        _check_dir(path, "segmenter", "--segmenter")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = CLIPSegForImageSegmentation.from_pretrained(path, dtype=self.dtype).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, image: Image.Image, words: list[str]) -> np.ndarray:
        inputs = self.processor(text=words, images=[image] * len(words), padding=True, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        logits = self.model(**inputs).logits
        logits = logits.reshape(len(words), 1, *logits.shape[-2:]).float()  # [E, 1, h, w] (E=1 comes squeezed)
        width, height = image.size
        logits = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear")
        return torch.sigmoid(logits[:, 0]).cpu().numpy()  # [E, H, W]

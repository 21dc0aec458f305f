"""Text encoder stage: CLIP tokenizer + CLIPTextModelWithProjection, once per prompt (and once for '')."""

from __future__ import annotations

import numpy as np
import torch

from actors.base import StageActor


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device):
    """Tokenize as UnCLIPPipeline does (pad to max length, truncate) and encode without an attention mask."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    output = text_encoder(tokens.input_ids.to(device))
    return output.text_embeds, output.last_hidden_state, tokens.attention_mask.bool()


class TextEncoderActor(StageActor):
    name = "text_encoder"
    row_inputs = ("prompt",)
    per_row = True

    def load(self) -> None:
        path = self.checkpoint("unclip")
        self.tokenizer = self.load_component(path, "unclip", "tokenizer")
        self.text_encoder = self.load_component(path, "unclip", "text_encoder")
        with torch.inference_mode():
            embeds, hidden, mask = encode_prompts(self.tokenizer, self.text_encoder, [""], self.device)
        # The unconditional ('') encoding is the same for every row; computed once, carried per row for CFG.
        self.uncond = {"uncond_embeds": embeds[0].float().cpu().numpy(),
                       "uncond_hidden": hidden[0].float().cpu().numpy(),
                       "uncond_mask": mask[0].numpy()}
        self.output_spec = {
            "text_embeds": (self.uncond["uncond_embeds"].shape, np.dtype(np.float32)),
            "text_hidden": (self.uncond["uncond_hidden"].shape, np.dtype(np.float32)),
            "text_mask": (self.uncond["uncond_mask"].shape, np.dtype(bool)),
            "uncond_embeds": (self.uncond["uncond_embeds"].shape, np.dtype(np.float32)),
            "uncond_hidden": (self.uncond["uncond_hidden"].shape, np.dtype(np.float32)),
            "uncond_mask": (self.uncond["uncond_mask"].shape, np.dtype(bool)),
            "truncated": ((), np.dtype(bool)),
        }

    def run(self, inputs, generators):
        prompts = [str(p) for p in inputs["prompt"]]
        embeds, hidden, mask = encode_prompts(self.tokenizer, self.text_encoder, prompts, self.device)
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        n = len(prompts)
        return {
            "text_embeds": embeds.float().cpu().numpy(),
            "text_hidden": hidden.float().cpu().numpy(),
            "text_mask": mask.numpy(),
            **{k: np.repeat(v[None], n, axis=0) for k, v in self.uncond.items()},
            "truncated": np.array([length > self.tokenizer.model_max_length for length in lengths]),
        }

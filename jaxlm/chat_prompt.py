"""A chat prompt for lm-evaluation-harness: the run's chat template (jaxlm.data.sft) as text and
back. The harness builds prompts as strings, so the template's special tokens are written as
their text ("<s>", "<|eot_id|>") and read back as their ids when the prompt is tokenized, the
text between them tokenized as the template's text segments are in training (sft.Encoder)."""

from __future__ import annotations

import re

from jaxlm.data import sft

# What the template puts before the assistant's answer, after the last user turn.
GENERATION_PROMPT = {
    "llama2": [],  # the user turn ends with [/INST]
    "llama3": [
        sft.Special("<|start_header_id|>"),
        "assistant",
        sft.Special("<|end_header_id|>"),
        "\n\n",
    ],
    "chatml": ["\n", sft.Special("<|im_start|>"), "assistant\n"],
    "plain": [],
}


class ChatPrompt:
    def __init__(self, tokenizer, template: str):
        self.encoder = sft.Encoder(tokenizer, template, "the run's data.chat_template")
        self.template, self.tokenizer = template, tokenizer
        self.text = {name: self._text(name) for name in self.encoder.ids}
        by_text = sorted(self.text.values(), key=len, reverse=True)
        self.ids = {self.text[name]: token for name, token in self.encoder.ids.items()}
        self.pattern = re.compile("(" + "|".join(map(re.escape, by_text)) + ")")

    def _text(self, name: str) -> str:
        if name in (sft.BOS, sft.EOS):
            token = self.tokenizer.bos_id() if name == sft.BOS else self.tokenizer.eos_id()
            return self.tokenizer.id_to_piece(token)
        return name

    def render(self, messages: list, add_generation_prompt: bool = True) -> str:
        segments = [s for s, _ in self.encoder.template(list(messages))]
        if add_generation_prompt:
            segments += GENERATION_PROMPT[self.template]
        return "".join(self.text[s.name] if isinstance(s, sft.Special) else s for s in segments)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Ids of a rendered prompt (and what follows it): specials by their ids, text as the
        template's text segments; a BOS only where the template writes one."""
        tokens, after_text = [], False
        for piece in self.pattern.split(text):
            if piece in self.ids:
                tokens.append(self.ids[piece])
                after_text = False
            elif piece:
                tokens += (self.encoder._continue if after_text else self.encoder._start)(piece)
                after_text = True
        return tokens

"""onnxruntime-genai's ``Generator`` on a decoder folder, as a user of the promoted folder runs it."""

from __future__ import annotations

from pathlib import Path

import onnxruntime_genai as og


def genai_generate_all(folder: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """``steps`` greedy tokens from every prompt (the model loaded once), end-of-sequence held off by min_length."""
    model = og.Model(str(folder))
    generated = []
    for prompt in prompts:
        params = og.GeneratorParams(model)
        length = len(prompt) + steps
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.append_tokens(list(prompt))
        while not generator.is_done():
            generator.generate_next_token()
        generated.append([int(t) for t in generator.get_sequence(0)[len(prompt) :]])
    return generated

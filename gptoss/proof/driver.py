"""One comparison, whatever the candidate: the JAX side runs first, in a process of its own, and spills its outputs
to a temporary folder; then the candidate (ONNX Runtime, onnxruntime-genai, transformers) runs and compares
against them. The two sides never hold their weights at the same time, and what JAX keeps after a run (compiled
programs, its allocator's buffers) goes back to the system with its process before the candidate starts.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gptoss.files import sha256
from gptoss.graphs.names import data_path
from gptoss.model.gpt_oss import forward, run_segment
from gptoss.model.outputs import output_names, segment_output_names
from gptoss.model.params import Params
from gptoss.proof.compare import Results
from gptoss.proof.prompts import Prompt, padded
from gptoss.proof.segment_carry import Carry
from gptoss.runtimes.generation import Generation
from gptoss.runtimes.jax_model import StreamedModel, jax_generate
from gptoss.runtimes.process import in_fresh_process

log = logging.getLogger("gptoss.proof")


@dataclasses.dataclass(frozen=True)
class JaxRequest:
    """What the JAX side computes for every prompt: the forward pass over the prompt right-padded to
    ``sequence_length`` (none if None; hidden states and block taps on request), and ``generate_tokens`` greedy
    steps with the KV cache, ``suppress`` ids (end of sequence) never chosen. With ``segment``, the forward pass
    runs the segment's pieces only, from the JAX state that ``entering`` (the previous segment's carry) holds."""

    prompts: list[Prompt]
    sequence_length: int | None = None
    hidden_states: bool = False
    block_debug: bool = False
    generate_tokens: int = 0
    suppress: tuple[int, ...] = ()
    segment: tuple[int, int] | None = None  # ranks (first, last) of a segment's pieces
    entering: Path | None = None  # the carry (.carry.npz) of the segment before it; None for the embedding


@dataclasses.dataclass(frozen=True)
class JaxOutputs:
    """What the JAX side spilled, read back one prompt at a time."""

    folder: Path

    def forward(self, prompt: Prompt) -> np.lib.npyio.NpzFile:
        """The forward pass's outputs by name (open it in a ``with``)."""
        return np.load(self.folder / f"{prompt.prompt_id}.npz")

    def generation(self, prompt: Prompt) -> Generation:
        return Generation.load(self.folder / f"{prompt.prompt_id}.generation.npz")


def run_jax_side(params: Params, request: JaxRequest, folder: Path) -> None:
    """The JAX side of :func:`compare`, in its own process: every prompt's outputs to ``folder``."""
    model = StreamedModel(params)
    names = output_names(model.cfg, request.hidden_states, request.block_debug)
    carried = Carry.load(request.entering) if request.entering is not None else None
    if request.segment is not None:
        names = segment_output_names(model.cfg, *request.segment, request.block_debug)
    for prompt in request.prompts:
        if request.sequence_length is not None:
            ids = jnp.asarray(padded(prompt, request.sequence_length))
            if request.segment is not None:
                hidden = carried.state("jax", prompt, request.entering) if carried else None
                outputs = run_segment(model, ids, hidden, *request.segment, request.block_debug)
            else:
                outputs = forward(model, ids, request.hidden_states, request.block_debug)
            np.savez(folder / f"{prompt.prompt_id}.npz", **{n: np.asarray(outputs[n]) for n in names})
            del outputs
        if request.generate_tokens:
            generation = jax_generate(model, prompt.ids, request.generate_tokens, request.suppress)
            generation.save(folder / f"{prompt.prompt_id}.generation.npz")


Candidate = Callable[[JaxOutputs], tuple[list[dict], dict[str, np.ndarray]]]


def compare(
    stage: str,
    params: Params,
    request: JaxRequest,
    candidate: Candidate,
    results: Results,
    graph: Path | None = None,
    provenance: dict[str, str] | None = None,
) -> list[dict]:
    """Run the JAX side, then ``candidate`` (which returns its rows and its logits |diff| per prompt); write the
    ``results`` and return the rows. ``graph``: the ONNX graph the candidate ran, whose sha256 and its weights
    file's every row records (``provenance``: those two columns as given)."""
    with tempfile.TemporaryDirectory(prefix=f"gptoss-{stage}-") as folder:
        steps = f", {request.generate_tokens} greedy steps each" if request.generate_tokens else ""
        log.info("JAX side: %d prompt(s)%s", len(request.prompts), steps)
        in_fresh_process(run_jax_side, params, request, Path(folder))
        rows, diffs = candidate(JaxOutputs(Path(folder)))
    if provenance is None and graph is not None:
        provenance = dict(onnx_sha256=sha256(graph), data_sha256=sha256(data_path(graph)))
    if provenance is not None:
        rows = [{**row, **provenance} for row in rows]
    results.write(rows, diffs)
    return rows

"""The stages: what each exported graph holds and what each parity run compares, in one table.

Read by the CLI (the choices of ``export --stage`` and ``parity --stage``), the workflow (its export and parity
rules, their wildcards and messages) and the export spec (which outputs a stage's graph has). Pure Python: the
workflow imports it while it parses the Snakefile, without JAX.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the proof: a graph to export (unless ``graph`` is None) and a parity run."""

    name: str
    graph: str | None  # the exported graph, in words; None: parity only, against the checkpoint
    parity: str  # what its parity run compares, in words
    hidden_states: bool = False  # the graph also outputs every hidden state
    block_taps: bool = False  # the graph also outputs the per-block taps
    decoder: bool = False  # the KV-cache decoder graph (genai_config.json and tokenizer files beside it)

    @property
    def exported(self) -> bool:
        """Exported as an ONNX graph (every stage but reference)."""
        return self.graph is not None


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "debug",
            graph="the debug ONNX graph (hidden states + block taps)",
            parity="parity of the debug graph (logits, hidden states, block taps)",
            hidden_states=True,
            block_taps=True,
        ),
        Stage(
            "canonical",
            graph="the canonical ONNX graph (logits only)",
            parity="parity of the canonical graph (logits)",
        ),
        Stage(
            "decoder",
            graph="the KV-cache decoder graph for onnxruntime-genai",
            parity="generation parity of the decoder graph (JAX, ONNX Runtime, onnxruntime-genai)",
            decoder=True,
        ),
        Stage(
            "reference",
            graph=None,
            parity="transformers reference vs JAX (logits, hidden states, greedy generation)",
        ),
    )
}

# The quantized variants of the decoder graph (gptoss.graphs.variants): bits per weight, beside the exact graph.
VARIANT_BITS: dict[str, int] = {"q8": 8, "q4": 4}

# The choices of `gptoss export --stage` and `gptoss parity --stage`, in DAG order.
EXPORT_STAGES: tuple[str, ...] = tuple(name for name, stage in STAGES.items() if stage.exported)
PARITY_STAGES: tuple[str, ...] = tuple(STAGES)

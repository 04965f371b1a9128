# gpt-oss -> ONNX as one reproducible DAG (workflow/README.md; keys: config/README.md):
#
#   checkpoint (download | synth | local) -> convert_params -> export_weights -> export_onnx (one graph per stage)
#       -> parity (per stage) -> parity_gate -> promote (baseline2 and every promote_as tag)
#   parity in segments (parity_segment_blocks: N): export_segment (embed, N blocks at a time, head) and
#       tensor_manifest per graph -> parity_segment (one job per segment) -> parity_gate
#   variants (q8, q4): convert_params -> export_variant, export_variant_probe -> quality (vs the exact decoder;
#       the probe: top-1 agreement per block depth) -> quality_gate -> promote_variant ({tag}-{variant})
#   stages: debug (hidden states + block taps), canonical (logits), decoder (KV cache, for onnxruntime-genai);
#   reference (transformers) is parity only.
#
#   snakemake --cores 4 promote_baseline2                                 # gpt-oss-20b, 2 layers, from the hub
#   snakemake --cores 4 promote_baseline2 --configfile config/toy.yaml    # synthetic toy, offline, about a minute
#
# (Name the target before --configfile: `--configfile` takes several files and would swallow it.)

from snakemake.utils import min_version

min_version("9.0")


# config/config.yaml is the default. A --configfile replaces it rather than being merged into it (a toy run
# must not inherit the hub checkpoint); --config KEY=VALUE overrides either.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# Rules run the `gptoss` installed next to this Snakemake (or the conda environment's with --sdm conda).
find_gptoss_next_to_snakemake()


# Defaults filled in, unknown keys rejected (workflow/schemas/config.schema.yaml), plus cross-key checks.
validate_config(config, "workflow/schemas/config.schema.yaml")


wildcard_constraints:
    checkpoint=one_of(checkpoints()),
    layers=r"\d+",


include: "workflow/rules/checkpoint.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/parity.smk"
include: "workflow/rules/segments.smk"
include: "workflow/rules/gate.smk"
include: "workflow/rules/promote.smk"
include: "workflow/rules/variants.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


localrules:
    all,
    report_baseline2,
    gate_all,
    promote_all,
    promote_baseline2,


# Default target: every configured checkpoint through the gate, and every promotion.
rule all:
    default_target: True
    input:
        [verdict_path(name) for name in checkpoints()],
        [promoted_path(tag) for tag in promotions()],
        [promoted_path(tag) for tag in variant_promotions()],


# Every configured checkpoint through the gate; nothing promoted.
rule gate_all:
    input:
        [verdict_path(name) for name in checkpoints()],


# baseline2 and every `promote_as` tag, with their variants.
rule promote_all:
    input:
        [promoted_path(tag) for tag in promotions()],
        [promoted_path(tag) for tag in variant_promotions()],

# Helpers shared by the rules: config checks the schema cannot express, the stages, output paths, the
# command-line flags built from the config, and the resource functions: each looks up its job's checkpoint and
# asks the package's model (gptoss.resources: memory, wall time, threads).

import dataclasses
import functools
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake_interface_executor_plugins.settings import DeploymentMethod
from snakemake.utils import validate

from gptoss.resources import (
    estimate_config,
    estimate_mem_mb,
    estimate_runtime_min,
    estimate_segment_mem_mb,
    estimate_segment_runtime_min,
    estimate_threads,
    parity_step,
)
import gptoss.segment_plan as segment_files
from gptoss.segment_plan import parse_segment, plan_segments
from gptoss.stages import STAGES

RESULTS = "results"
# The software of the rules with `--sdm conda` (they then run the `gptoss` of that environment).
CONDA_ENV = "../../environment.yml"
BASELINE_TAG = "baseline2"
# Keys that only mean something for one source (the schema accepts each of them on any entry).
SOURCE_KEYS = {"hub": {"repo_id", "revision", "retries", "layout"}, "synthetic": {"preset", "seed"}, "local": {"path"}}
# Checkpoint keys read under their former name: old -> new.
RENAMED_KEYS = {"dtype": "weight_format"}


def find_gptoss_next_to_snakemake():
    """Rules run `gptoss`. With `--sdm conda` the conda environment provides it; otherwise the bin folder of the
    running Snakemake's Python goes first on PATH, so the venv's snakemake started by its path runs that venv's
    gptoss whatever PATH says (a job on a cluster node runs the same interpreter, on the shared filesystem)."""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return
    bin_folder = shlex.quote(str(Path(sys.executable).parent))
    shell.prefix(f'set -euo pipefail; export PATH={bin_folder}:"$PATH"; ')


# --- the config -----------------------------------------------------------------------------------------------


def numbers_from_strings(cfg):
    """Make numbers (and booleans) of the values that arrive as strings: `--config KEY={...}` hands nested
    values over as strings, and YAML reads a float without a dot (1e-4) as one. Anything else is left to the
    schema."""

    def number(value, kind):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        try:
            return kind(value) if isinstance(value, str) else value
        except ValueError:
            return value

    if isinstance(cfg.get("tolerances"), dict):
        cfg["tolerances"] = {key: number(value, float) for key, value in cfg["tolerances"].items()}
    for key in ("quality", "quantization"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = {name: number(value, int) for name, value in cfg[key].items()}
    for variant, budgets in (cfg.get("quality_budgets") or {}).items():
        if isinstance(budgets, dict):
            cfg["quality_budgets"][variant] = {key: number(value, float) for key, value in budgets.items()}
    for entry in (cfg.get("checkpoints") or {}).values():
        if isinstance(entry, dict):
            entry.update({key: number(entry[key], int) for key in ("layers", "seed", "retries") if key in entry})


def renamed_keys(cfg):
    """The checkpoint entries' keys under a former name (RENAMED_KEYS), as [(name, old, new)]; an entry that sets
    both names is an error."""
    renamed = []
    for name, entry in (cfg.get("checkpoints") or {}).items():
        for old, new in RENAMED_KEYS.items():
            if isinstance(entry, dict) and old in entry:
                if new in entry:
                    raise WorkflowError(
                        f"invalid config: checkpoints.{name} sets both {new} and {old} ({old} is the former name "
                        f"of {new}: keep {new})"
                    )
                renamed.append((name, old, new))
    return renamed


def validate_config(cfg, schema):
    """Fill in the schema's defaults and reject unknown keys, with one line naming the offending key; then
    the checks a schema cannot express. A key under its former name (RENAMED_KEYS) is validated as written, then
    renamed, with one deprecation line."""
    import jsonschema

    numbers_from_strings(cfg)
    renamed = renamed_keys(cfg)
    try:
        validate(cfg, schema)
    except WorkflowError as exc:
        error = exc.__context__  # snakemake raises its error while handling jsonschema's
        if not isinstance(error, jsonschema.ValidationError):
            raise
        raise WorkflowError(
            f"invalid config at {error.json_path}: {error.message} (keys and defaults: config/README.md)"
        ) from None
    for name, old, new in renamed:  # the schema filled in the new key's default: the old key's value wins
        cfg["checkpoints"][name][new] = cfg["checkpoints"][name].pop(old)
        logger.warning(f"config: checkpoints.{name}.{old} is deprecated: use {new}")
    for name, entry in cfg["checkpoints"].items():
        for other, keys in SOURCE_KEYS.items():
            stray = sorted(keys & set(entry)) if other != entry["source"] else []
            if stray:
                raise WorkflowError(
                    f"invalid config: checkpoints.{name} has source: {entry['source']} but sets "
                    f"{', '.join(stray)} (only used with source: {other})"
                )
    if cfg["baseline"] not in cfg["checkpoints"]:
        raise WorkflowError(
            f"invalid config: baseline {cfg['baseline']!r} is not one of the checkpoints {sorted(cfg['checkpoints'])}"
        )
    if cfg["variants"] and not cfg["generate_tokens"]:
        raise WorkflowError("invalid config: variants are quantized decoder graphs, but generate_tokens: 0 exports none")
    if stray := sorted(set(cfg["quality_budgets"]) - set(cfg["variants"])):
        raise WorkflowError(f"invalid config: quality_budgets for {', '.join(stray)}, not in variants {cfg['variants']}")
    tags = [entry["promote_as"] for entry in cfg["checkpoints"].values() if "promote_as" in entry]
    if len(tags) != len(set(tags)):
        raise WorkflowError(f"invalid config: two checkpoints have the same promote_as tag ({sorted(tags)})")


def checkpoints():
    """name -> entry of every configured checkpoint."""
    return config["checkpoints"]


def baseline():
    """The checkpoint promote_baseline2 promotes."""
    return config["baseline"]


def names_with_source(source):
    return [name for name, entry in checkpoints().items() if entry["source"] == source]


def promotions():
    """tag -> checkpoint promoted under it: baseline2, plus the `promote_as` tags."""
    extra = {entry["promote_as"]: name for name, entry in checkpoints().items() if "promote_as" in entry}
    return {BASELINE_TAG: baseline()} | extra


def one_of(names):
    """A wildcard regex matching exactly ``names`` (and nothing when there are none)."""
    names = sorted(names)
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


# --- stages ---------------------------------------------------------------------------------------------------
# One export rule and one parity rule serve every stage; `gptoss export/parity --stage S` decides what the
# graph holds and what is compared. The stages and their words (the rules' messages) are gptoss.stages.STAGES.

EXPORT_STAGES = {name: stage.graph for name, stage in STAGES.items() if stage.exported}
PARITY_STAGES = {name: stage.parity for name, stage in STAGES.items()}


def export_stages():
    """The graphs: debug and canonical, plus the decoder unless `generate_tokens: 0`."""
    return ["debug", "canonical"] + (["decoder"] if config["generate_tokens"] else [])


def parity_stages():
    """The CSVs the gate reads: one per graph, plus reference when `reference: transformers`."""
    return export_stages() + (["reference"] if config["reference"] == "transformers" else [])


def segmented_stages():
    """The stages whose parity runs in segments (`parity_segment_blocks` > 0): the debug and canonical graphs."""
    return ["debug", "canonical"] if config["parity_segment_blocks"] else []


def segment_names(name):
    """The segments of checkpoint ``name``'s parity: embed, blocksA-B every `parity_segment_blocks`, head."""
    return [s.name for s in plan_segments(checkpoints()[name]["layers"], config["parity_segment_blocks"])]


def export_flags(wildcards):
    """The decoder's context length (genai_config.json), when the config sets one."""
    length = config["context_length"]
    return f"--context-length {length}" if wildcards.stage == "decoder" and length else ""


def parity_flags(wildcards):
    """The greedy steps of the decoder and reference stages."""
    steps = config["generate_tokens"]
    return f"--generate-tokens {steps}" if steps and wildcards.stage in ("decoder", "reference") else ""


# --- paths -------------------------------------------------------------------------------------------------


def checkpoint_folder(name):
    """The checkpoint folder `gptoss convert` reads."""
    entry = checkpoints()[name]
    return entry["path"] if entry["source"] == "local" else f"{RESULTS}/{name}/checkpoint"


def checkpoint_target(name):
    """What convert_params depends on: the synth folder, the download marker, or the local folder itself."""
    entry = checkpoints()[name]
    if entry["source"] == "hub":
        return f"{RESULTS}/{name}/checkpoint/download.json"
    return checkpoint_folder(name)


def params_path(name):
    return f"{RESULTS}/{name}/flax_params_{checkpoints()[name]['layers']}layers.msgpack"


def params_config_path(name):
    return f"{RESULTS}/{name}/flax_params_{checkpoints()[name]['layers']}layers.config.json"


def graph_path(name, stage):
    """An exported graph; every graph of a checkpoint reads the one weights file beside it."""
    return f"{RESULTS}/{name}/onnx/{stage}.onnx"


def weights_path(name):
    return f"{RESULTS}/{name}/onnx/model.onnx.data"


def parity_csv(name, stage):
    return f"{RESULTS}/{name}/parity/{stage}.csv"


def segment_graph_path(name, stage, segment):
    """A segment's graph, beside the whole graph whose weights file it reads."""
    return str(segment_files.segment_path(graph_path(name, stage), segment))


def manifest_path(name, stage):
    """The sha256 of every tensor of the whole graph, which the gate holds the segments to."""
    return str(segment_files.manifest_path(graph_path(name, stage)))


def segment_csv(name, stage, segment):
    """A segment's parity CSV (with its .tensors.json and .carry.npz beside it)."""
    return f"{RESULTS}/{name}/parity/{stage}/{segment}.csv"


def segment_tensors(name, stage, segment):
    """The sha256 of every weight the segment's parity read."""
    return str(segment_files.tensors_path(segment_csv(name, stage, segment)))


def segment_carry(name, stage, segment):
    """The states a segment's parity leaves for the next segment."""
    return str(segment_files.carry_path(segment_csv(name, stage, segment)))


def entering_carry(wildcards):
    """The carry a segment's parity starts from: the one the segment before it left (none for the embedding)."""
    names = segment_names(wildcards.checkpoint)
    index = names.index(wildcards.segment)
    return [segment_carry(wildcards.checkpoint, wildcards.stage, names[index - 1])] if index else []


def gate_csvs(name):
    """The CSVs the gate reads: one per stage, or one per segment of a segmented stage."""
    csvs = []
    for stage in parity_stages():
        if stage in segmented_stages():
            csvs += [segment_csv(name, stage, segment) for segment in segment_names(name)]
        else:
            csvs.append(parity_csv(name, stage))
    return csvs


def logits_diff_paths(name):
    """The logits |diff| of the debug and canonical runs (the head segment's, when segmented)."""
    folder = f"{RESULTS}/{name}/parity"
    return [
        f"{folder}/{stage}/head_logits_diff.npz" if stage in segmented_stages() else f"{folder}/{stage}_logits_diff.npz"
        for stage in ("debug", "canonical")
    ]


def verdict_path(name):
    return f"{RESULTS}/{name}/gate/verdict.json"


def promote_dir():
    return config["promote"]["dir"].rstrip("/")


def promoted_path(tag):
    return f"{promote_dir()}/{tag}"


def params_inputs(wildcards):
    return {"params": params_path(wildcards.checkpoint), "config": params_config_path(wildcards.checkpoint)}


def graph_inputs(wildcards):
    """The params, and the weights file every graph of the checkpoint shares."""
    return params_inputs(wildcards) | {"weights": weights_path(wildcards.checkpoint)}


def parity_inputs(wildcards):
    """The params, and what they are compared with: the stage's graph and weights, or the checkpoint (reference)."""
    name, stage = wildcards.checkpoint, wildcards.stage
    if stage == "reference":
        return params_inputs(wildcards) | {"other": checkpoint_target(name)}
    return graph_inputs(wildcards) | {"other": graph_path(name, stage)}


def parity_source(wildcards, input):
    """The flag naming the other side of the comparison."""
    if wildcards.stage == "reference":
        return f"--checkpoint {shlex.quote(checkpoint_folder(wildcards.checkpoint))}"
    return f"--onnx {input.other}"


def promote_inputs(wildcards):
    name = promotions()[wildcards.tag]
    graphs = {stage: graph_path(name, stage) for stage in export_stages() if stage != "debug"}
    return graphs | {"weights": weights_path(name), "verdict": verdict_path(name), "config": params_config_path(name)}


def promote_decoder(wildcards, input):
    return f"--decoder {input.decoder}" if "decoder" in input.keys() else ""


def entry_value(key):
    """A params function: ``key`` of the checkpoint entry of the job's ``{checkpoint}`` wildcard."""
    return lambda wildcards: checkpoints()[wildcards.checkpoint][key]


def baseline_benchmarks():
    """The baseline's benchmark files in DAG order (what the benchmark figure shows)."""
    name, entry = baseline(), checkpoints()[baseline()]
    first = {"hub": ["download_checkpoint"], "synthetic": ["synth_checkpoint"], "local": []}[entry["source"]]
    rules = [*first, f"convert_params_{entry['layers']}layers", "export_weights"]
    rules += [f"export_onnx_{stage}" for stage in export_stages()]
    for stage in parity_stages():
        if stage in segmented_stages():
            rules += [f"{rule}_{stage}_{s}" for rule in ("export_segment", "parity") for s in segment_names(name)]
            rules.append(f"tensor_manifest_{stage}")
        else:
            rules.append(f"parity_{stage}")
    rules.append("parity_gate")
    return [f"{RESULTS}/{name}/benchmarks/{rule}.tsv" for rule in rules] + [promote_benchmark(BASELINE_TAG)]


def promote_benchmark(tag):
    return f"{RESULTS}/benchmarks/promote_{tag}.tsv"


REPORT_DIR = f"{RESULTS}/report/{BASELINE_TAG}"


# --- quantized variants ---------------------------------------------------------------------------------------
# Budgets of the quality gate per variant when `quality_budgets` does not set them (gptoss.proof.quality_gate:
# kld_* at most, agreements at least): a few times what the synthetic gpt-oss-20b shapes measure
# (docs/gpt_oss/README.md); set them from a first run of a real checkpoint.
DEFAULT_BUDGETS = {
    "q8": {"kld_mean": 0.01, "kld_p99": 0.1, "top1_agreement": 0.9, "greedy_agreement": 0.5},
    "q4": {"kld_mean": 0.1, "kld_p99": 1.0, "top1_agreement": 0.7, "greedy_agreement": 0.25},
}


def variants():
    """The configured quantized variants of the decoder graph (q8, q4)."""
    return config["variants"]


def variant_folder(name, variant):
    """A variant's folder: its graph, weights, genai_config.json and tokenizer files."""
    return f"{RESULTS}/{name}/variants/{variant}"


def variant_probe_folder(name, variant):
    """A variant's probe: its whole-sequence graph with hidden-state outputs, for the top-1 per block depth."""
    return f"{RESULTS}/{name}/probes/{variant}"


def quality_csv(name, variant):
    return f"{RESULTS}/{name}/quality/{variant}.csv"


def quality_verdict_path(name, variant):
    return f"{RESULTS}/{name}/gate/quality_{variant}.json"


def variant_promotions():
    """tag-variant -> (checkpoint, variant): each promotion's variants, promoted beside it."""
    return {f"{tag}-{v}": (name, v) for tag, name in promotions().items() for v in variants()}


def quantization_flags():
    q = config["quantization"]
    return f"--block-size {q['block_size']} --accuracy-level {q['accuracy_level']} --expert-scales {q['expert_scales']}"


def variant_export_flags(wildcards):
    length = config["context_length"]
    return quantization_flags() + (f" --context-length {length}" if length else "")


def probe_length():
    """The probe's fixed sequence length: the quality stage's chunk length (shortened, as there, to the scored
    text's first max_tokens - 1 tokens)."""
    q = config["quality"]
    return min(q["chunk_length"], q["max_tokens"] - 1) if q["max_tokens"] else q["chunk_length"]


def depth_agreement():
    """Whether the quality stage measures the top-1 agreement per block depth (each variant's probe)."""
    return config["quality"]["depth_agreement"]


def probe_inputs(wildcards):
    """The variant's probe, when the quality stage measures the top-1 agreement per block depth."""
    return {"probe": variant_probe_folder(wildcards.checkpoint, wildcards.variant)} if depth_agreement() else {}


def probe_flags(wildcards, input):
    """The probe and the exact params whose hidden states it is compared with (the logit lens)."""
    return f"--probe {input.probe} --params {input.params} --config {input.config}" if depth_agreement() else ""


def quality_gate_figures():
    """The quality gate's figures: the KLD histogram, and the per-depth figure when measured."""
    figures = {"plot": f"{RESULTS}/{{checkpoint}}/gate/quality_{{variant}}_kld.png"}
    if depth_agreement():
        figures["depth_plot"] = f"{RESULTS}/{{checkpoint}}/gate/quality_{{variant}}_depth.png"
    return figures


def depth_plot_flag(wildcards, output):
    return f"--depth-plot {output.depth_plot}" if depth_agreement() else ""


def quality_flags():
    """The evaluation's settings, and the near-tie margin of the greedy comparison (the tolerances')."""
    q = config["quality"]
    flags = f"--chunk-length {q['chunk_length']} --steps {q['steps']}"
    flags += f" --near-tie-margin {configured_tolerances().near_tie_margin}"
    return flags + (f" --max-tokens {q['max_tokens']}" if q["max_tokens"] else "")


def budgets(variant):
    return DEFAULT_BUDGETS[variant] | config["quality_budgets"].get(variant, {})


def budget_args(variant):
    return " ".join(f"--budget {variant}:{key}={value:g}" for key, value in budgets(variant).items())


def promote_variant_inputs(wildcards):
    name, variant = variant_promotions()[wildcards.vtag]
    return {
        "folder": variant_folder(name, variant),
        "quality": quality_verdict_path(name, variant),
        "verdict": verdict_path(name),
        "config": params_config_path(name),
    }


# --- command-line flags from the config -----------------------------------------------------------------------


def prompt_args():
    return " ".join(f"--prompt {shlex.quote(p)}" for p in config["prompts"])


def configured_tolerances():
    from gptoss.proof.tolerances import Tolerances

    return Tolerances(**config["tolerances"])


def tolerance_args():
    """`--atol-logits X ... --near-tie-margin Y`: the flags of `gptoss parity` and `gptoss gate`."""
    return " ".join(configured_tolerances().to_args())


def tolerance_summary():
    values = dataclasses.asdict(configured_tolerances())
    return ", ".join(f"{key.replace('_', ' ')} {value:g}" for key, value in values.items())


# --- resources ------------------------------------------------------------------------------------------------
# The models (memory, wall time, threads) live in gptoss.resources, tested against the measured peaks; these
# functions find a job's checkpoint and hand its architecture and weight format over. Snakemake passes
# `attempt` (1, then 2, ... on a retry): a retried job asks for more memory and time.


@functools.cache
def model_config(name):
    """The converted model's architecture: from the checkpoint's config.json once it is on disk, else from the
    synthetic preset, else (a hub repo not yet downloaded) from the gpt-oss-20b/120b shapes its name suggests."""
    entry = checkpoints()[name]
    hint = entry.get("repo_id") or entry.get("path") or ""
    return estimate_config(entry["layers"], Path(checkpoint_folder(name)), entry.get("preset"), hint)


def job_checkpoint(wildcards):
    """A job's checkpoint: its {checkpoint} wildcard, the checkpoint promoted as its {tag}, or the baseline."""
    if "checkpoint" in wildcards.keys():
        return wildcards.checkpoint
    if "vtag" in wildcards.keys():
        return variant_promotions()[wildcards.vtag][0]
    return promotions()[wildcards.tag] if "tag" in wildcards.keys() else baseline()


def job_step(step, wildcards):
    """The model's step of a job: parity's follows its {stage} (parity, parity_decoder, parity_reference)."""
    return parity_step(wildcards.stage) if step == "parity" else step


def job_estimate(estimate, step):
    """A resources function: ``estimate`` (gptoss.resources) of ``step`` for the job's checkpoint."""

    def resource(wildcards, attempt):
        name = job_checkpoint(wildcards)
        cfg, weight_format = model_config(name), checkpoints()[name]["weight_format"]
        return estimate(cfg, weight_format, job_step(step, wildcards), attempt)

    return resource


def mem_mb(step):
    """The job's memory in MB (Snakemake's budget locally, sbatch --mem on a cluster)."""
    return job_estimate(estimate_mem_mb, step)


def runtime(step):
    """The job's wall-time limit in minutes (sbatch -t on a cluster)."""
    return job_estimate(estimate_runtime_min, step)


def segment_estimate(estimate, step, **extra):
    """A resources function of a segment's job: ``estimate`` of ``step`` for its {segment} of its checkpoint
    (``extra``: more keyword arguments of ``estimate``)."""

    def resource(wildcards, attempt):
        name = job_checkpoint(wildcards)
        cfg, weight_format = model_config(name), checkpoints()[name]["weight_format"]
        segment = parse_segment(wildcards.segment, cfg.num_hidden_layers) if "segment" in wildcards.keys() else None
        first, last = (segment.first, segment.last) if segment else (0, cfg.num_hidden_layers + 1)
        debug = step == "parity_segment" and "stage" in wildcards.keys() and wildcards.stage == "debug"  # its taps
        return estimate(cfg, weight_format, f"{step}_debug" if debug else step, first, last, attempt, **extra)

    return resource


def segment_mem_mb(step):
    """The experts that the parity's tokens (prompts × sequence length) are routed to stay resident."""
    tokens = len(config["prompts"]) * config["sequence_length"]
    return segment_estimate(estimate_segment_mem_mb, step, tokens=tokens)


def segment_runtime(step):
    return segment_estimate(estimate_segment_runtime_min, step)


def model_threads(wildcards):
    """A threads function for the model-sized rules (capped by --cores): 1 for a toy, more for a big model."""
    name = job_checkpoint(wildcards)
    return estimate_threads(model_config(name), checkpoints()[name]["weight_format"])

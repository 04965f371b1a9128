# Helpers shared by the rules: config checks the schema cannot express, the stages, output paths, the
# command-line flags built from the config, and memory estimates scaled to the parameter size.

import dataclasses
import functools
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import DeploymentMethod
from snakemake.utils import validate

RESULTS = "results"
# The software of the rules with `--sdm conda` (they then run the `gptoss` of that environment).
CONDA_ENV = "../../environment.yml"
BASELINE_TAG = "baseline2"
# Keys that only mean something for one source (the schema accepts each of them on any entry).
SOURCE_KEYS = {"hub": {"repo_id", "revision", "retries", "layout"}, "synthetic": {"preset", "seed"}, "local": {"path"}}


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
    """Make numbers of the numeric values that arrive as strings: `--config KEY={...}` hands nested values
    over as strings, and YAML reads a float without a dot (1e-4) as one. Anything else is left to the schema."""

    def number(value, kind):
        try:
            return kind(value) if isinstance(value, str) else value
        except ValueError:
            return value

    if isinstance(cfg.get("tolerances"), dict):
        cfg["tolerances"] = {key: number(value, float) for key, value in cfg["tolerances"].items()}
    for entry in (cfg.get("checkpoints") or {}).values():
        if isinstance(entry, dict):
            entry.update({key: number(entry[key], int) for key in ("layers", "seed", "retries") if key in entry})


def validate_config(cfg, schema):
    """Fill in the schema's defaults and reject unknown keys, with one line naming the offending key; then
    the checks a schema cannot express."""
    import jsonschema

    numbers_from_strings(cfg)
    try:
        validate(cfg, schema)
    except WorkflowError as exc:
        error = exc.__context__  # snakemake raises its error while handling jsonschema's
        if not isinstance(error, jsonschema.ValidationError):
            raise
        raise WorkflowError(
            f"invalid config at {error.json_path}: {error.message} (keys and defaults: config/README.md)"
        ) from None
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
# graph holds and what is compared. The messages say it in words.

EXPORT_STAGES = {
    "debug": "the debug ONNX graph (hidden states + block taps)",
    "canonical": "the canonical ONNX graph (logits only)",
    "decoder": "the KV-cache decoder graph for onnxruntime-genai",
}
PARITY_STAGES = {
    "debug": "parity of the debug graph (logits, hidden states, block taps)",
    "canonical": "parity of the canonical graph (logits)",
    "decoder": "generation parity of the decoder graph (JAX, ONNX Runtime, onnxruntime-genai)",
    "reference": "transformers reference vs JAX (logits, hidden states, greedy generation)",
}


def export_stages():
    """The graphs: debug and canonical, plus the decoder unless `generate_tokens: 0`."""
    return ["debug", "canonical"] + (["decoder"] if config["generate_tokens"] else [])


def parity_stages():
    """The CSVs the gate reads: one per graph, plus reference when `reference: transformers`."""
    return export_stages() + (["reference"] if config["reference"] == "transformers" else [])


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
    rules += [f"parity_{stage}" for stage in parity_stages()] + ["parity_gate"]
    return [f"{RESULTS}/{name}/benchmarks/{rule}.tsv" for rule in rules] + [promote_benchmark(BASELINE_TAG)]


def promote_benchmark(tag):
    return f"{RESULTS}/benchmarks/promote_{tag}.tsv"


REPORT_DIR = f"{RESULTS}/report/{BASELINE_TAG}"


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

# Resident memory per stage (calibrated on the 2-layer gpt-oss-20b in float32 and mxfp4, the 24-layer one in
# mxfp4 and the 2-layer gpt-oss-120b in mxfp4: docs/performance.md), in MB:
#   fixed + per_params × the params' MB (float32, bfloat16 or mxfp4 bytes)
#         + per_embedding × the embedding's MB (the largest single tensor; float32 where the stage decodes the
#           checkpoint through float32, else in the params' dtype) + per_layer × layers.
# Streaming keeps most stages independent of depth: synth and convert hold a tensor or a shard at a time, the
# weights export one tensor, the JAX side of parity one block; ONNX Runtime maps the whole weights file.
MEMORY_MODEL = {
    #                      fixed, per_params, per_embedding, per_layer
    "synth": (800, 0.0, 2.0, 0),  # 5.6 GB at 2 layers of 20b, 4.7 GB at 24
    "download": (1000, 0.0, 0.0, 0),
    "convert": (800, 0.0, 2.0, 0),  # mxfp4: the experts copied, the rest read as bf16 (3.1 GB)
    "convert_decoded": (800, 0.0, 1.5, 0),  # float32/bfloat16: the experts decoded (4.3 GB float32)
    "weights": (300, 0.0, 1.0, 0),  # one tensor at a time (2.6 GB float32, 1.4 GB mxfp4)
    "export": (500, 0.0, 0.0, 20),  # tracing only (0.5 GB at 2 layers, 0.9-1.2 GB at 24)
    "parity": (300, 1.07, 0.0, 0),  # ONNX Runtime's session, the JAX side streamed in its own process
    "parity_float32": (300, 0.8, 0.0, 0),
    "parity_decoder": (1900, 1.0, 0.0, 0),  # + the KV caches and genai, each runtime in turn
    "parity_decoder_float32": (1900, 0.73, 0.0, 0),
    "parity_reference": (1500, 0.0, 0.0, 0),  # + transformers' model, float32 whatever the params: see below
    "gate": (300, 0.0, 0.0, 0),
    "promote": (300, 0.0, 0.0, 0),
    "report": (1000, 0.0, 0.0, 0),
}


@functools.cache
def model_config(name):
    """The converted model's architecture: from the checkpoint's config.json when it is already on disk, else
    from the synthetic preset, else (a hub repo not yet downloaded) from the gpt-oss-20b/120b shapes."""
    from gptoss.config import load_checkpoint_config
    from gptoss.errors import GptOssError
    from gptoss.formats.synth import preset_config

    entry = checkpoints()[name]
    layers = entry["layers"]
    folder = Path(checkpoint_folder(name))
    if (folder / "config.json").is_file() or (folder / "original" / "config.json").is_file():
        try:
            full = load_checkpoint_config(folder)
            return full.truncated(min(layers, full.num_hidden_layers))
        except GptOssError:
            pass  # the convert rule reports a broken checkpoint properly
    preset = entry.get("preset")
    if preset is None:
        where = (entry.get("repo_id") or entry.get("path") or "").lower()
        preset = "gpt-oss-120b" if "120b" in where else "gpt-oss-20b"
    return preset_config(preset, layers)


def params_mb(name):
    return model_config(name).weight_bytes(checkpoints()[name]["dtype"]) / 1e6


def estimate_mem_mb(name, stage):
    cfg, dtype = model_config(name), checkpoints()[name]["dtype"]
    decodes = stage == "synth" or (stage == "convert" and dtype != "mxfp4")
    if stage == "convert" and decodes:
        stage = "convert_decoded"
    elif stage.startswith("parity") and dtype == "float32" and f"{stage}_float32" in MEMORY_MODEL:
        stage = f"{stage}_float32"
    fixed, per_params, per_embedding, per_layer = MEMORY_MODEL[stage]
    embedding_mb = cfg.vocab_size * cfg.hidden_size * (4 if decodes or dtype == "float32" else 2) / 1e6
    estimate = fixed + per_params * params_mb(name) + per_embedding * embedding_mb + per_layer * cfg.num_hidden_layers
    if stage == "parity_reference":  # transformers holds the model in float32
        estimate += 1.1 * cfg.weight_bytes("float32") / 1e6
    return int(estimate)


def parity_mem_mb(wildcards):
    """The parity rule's resources function: its stage decides the model."""
    stage = {"decoder": "parity_decoder", "reference": "parity_reference"}.get(wildcards.stage, "parity")
    return estimate_mem_mb(wildcards.checkpoint, stage)


def mem_mb(stage):
    """A resources function for rules with a ``{checkpoint}`` wildcard."""
    return lambda wildcards: estimate_mem_mb(wildcards.checkpoint, stage)


# The model-sized stages use several cores once the model is big (XLA compilation, ONNX Runtime); a toy model
# gains more from running the stages' branches side by side.
BIG_MODEL_MB = 1000


def model_threads(wildcards):
    """A threads function for rules with a ``{checkpoint}`` wildcard (capped by --cores)."""
    return 4 if params_mb(wildcards.checkpoint) >= BIG_MODEL_MB else 1

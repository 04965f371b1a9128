"""The ``gptoss`` command line: one subcommand per stage of the workflow."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gptoss.config import WEIGHT_FORMAT_NAMES
from gptoss.errors import GptOssError
from gptoss.proof.tolerances import Tolerances
from gptoss.stages import EXPORT_STAGES, PARITY_STAGES, STAGES, VARIANT_BITS

log = logging.getLogger("gptoss")
LAYOUTS = ["hf", "original"]


def _synth(args: argparse.Namespace) -> None:
    from gptoss.formats.synth import synthesize

    cfg = synthesize(args.output, args.preset, args.layers, args.seed, args.layout)
    size = f"{cfg.num_hidden_layers} layers, {cfg.param_count() / 1e9:.3f} B params"
    log.info("wrote %s checkpoint (%s) to %s", args.preset, size, args.output)


def _download(args: argparse.Namespace) -> None:
    from gptoss.formats.hub import download

    download(args.repo_id, args.revision, args.output, args.retries, args.layout)


def _convert(args: argparse.Namespace) -> None:
    from gptoss.model.convert import convert

    if args.dtype:
        log.warning("--dtype is deprecated: use --weight-format %s", args.dtype)
    convert(args.checkpoint, args.output, args.layers, args.weight_format or args.dtype or "float32")


def _export(args: argparse.Namespace) -> None:
    from gptoss.graphs.export import export, export_weights
    from gptoss.graphs.trace import ExportSpec
    from gptoss.model.params import Params

    params = Params.open(args.params, args.config)
    if args.weights_only:
        export_weights(params, args.output)
        return
    stage = STAGES[args.stage or "canonical"]
    hidden = stage.hidden_states or args.emit_hidden_states
    taps = (stage.block_taps and not args.variant) or args.emit_block_debug  # a variant's debug graph: its probe
    spec = ExportSpec(args.sequence_length, hidden, taps, args.opset, stage.decoder, args.context_length)
    if args.segment:
        from gptoss.graphs.export import export_segment
        from gptoss.segment_plan import parse_segment

        export_segment(params, args.output, spec, parse_segment(args.segment, params.model_config.num_hidden_layers))
        return
    if args.variant:
        from gptoss.graphs.export import export_variant
        from gptoss.graphs.variants import variant

        chosen = variant(args.variant, args.block_size, args.accuracy_level, args.expert_scales)
        export_variant(params, args.output, spec, chosen)
        return
    export(params, args.output, spec, args.reuse_weights)
    if not (args.skip_validation or spec.decoder):  # the decoder's proof is `gptoss parity --stage decoder`
        from gptoss.proof.export_check import check_export

        diff = check_export(params, args.output, spec.sequence_length, threads=args.threads)
        log.info("validation: logits max |diff| JAX vs ONNX Runtime = %.3g", diff)


def _parity(args: argparse.Namespace) -> None:
    from gptoss.model.params import Params
    from gptoss.proof.compare import Results
    from gptoss.proof.prompts import prompt_inputs

    stage = args.stage or ("debug" if args.compare_hidden_states or args.compare_block_debug else "canonical")
    if stage == "reference" and args.checkpoint is None:
        raise GptOssError("--stage reference compares with transformers on a checkpoint: pass --checkpoint DIR")
    if stage != "reference" and args.onnx is None:
        raise GptOssError(f"--stage {stage} compares with an ONNX graph: pass --onnx M.onnx")
    params = Params.open(args.params, args.config)
    length = None if stage == "decoder" else args.sequence_length  # the decoder checks its context length
    prompts = prompt_inputs(params, args.prompt, args.token_ids, args.tokenizer, length)
    results = Results(args.csv, Tolerances.from_args(args), args.logits_diffs)
    if stage == "reference":
        from gptoss.proof.reference import reference

        rows = reference(args.checkpoint, params, results, prompts, args.sequence_length, args.generate_tokens or 0)
    elif stage == "decoder":
        from gptoss.proof.parity import parity_decoder

        rows = parity_decoder(params, args.onnx, results, prompts, args.generate_tokens or 16, args.threads)
    else:
        from gptoss.graphs.segments import is_segment
        from gptoss.proof.driver import JaxRequest
        from gptoss.proof.parity import parity

        hidden = args.compare_hidden_states or STAGES[stage].hidden_states
        debug = args.compare_block_debug or STAGES[stage].block_taps
        request = JaxRequest(prompts, args.sequence_length, hidden, debug)
        if is_segment(args.onnx):  # the sha256 of every weight it reads goes beside the CSV (.tensors.json)
            from gptoss.proof.parity import parity_segment

            rows = parity_segment(params, args.onnx, results, request, args.threads, args.entering, args.leaving)
        else:
            if args.entering or args.leaving:
                raise GptOssError(f"--entering and --leaving are for a segment graph; {args.onnx} is a whole graph")
            rows = parity(params, args.onnx, results, request, args.threads)
    if failed := sum(not r["passed"] for r in rows):
        log.warning("%d of %d rows exceed their tolerance (the gate decides)", failed, len(rows))


def _manifest(args: argparse.Namespace) -> None:
    from gptoss.graphs.segments import write_manifest

    if not args.onnx.is_file():
        raise GptOssError(f"{args.onnx}: ONNX file not found")
    manifest = write_manifest(args.onnx, args.segments, args.output)
    log.info("%d tensors of %s hashed", len(manifest["tensors"]), args.onnx)


def _gate(args: argparse.Namespace) -> int:
    from gptoss.proof.gate import gate

    manifests = {}
    for item in args.manifest:
        stage, found, path = item.partition("=")
        if not found or stage not in STAGES:
            raise GptOssError(f"--manifest {item!r}: expected STAGE=PATH with a stage of {', '.join(STAGES)}")
        manifests[stage] = Path(path)
    return gate(args.csv, Tolerances.from_args(args), args.verdict, args.summary, args.expect_stage, manifests)


def _promote(args: argparse.Namespace) -> None:
    from gptoss.promote import promote, promote_variant

    if args.variant:
        if not (args.variant_folder and args.quality_verdict):
            raise GptOssError("promote --variant needs --variant-folder and --quality-verdict")
        promote_variant(
            args.variant_folder, args.variant, args.quality_verdict, args.verdict, args.dest, args.tag, args.config
        )
        return
    if args.onnx is None:
        raise GptOssError("promote needs --onnx (or --variant)")
    promote(args.onnx, args.verdict, args.dest, args.tag, args.config, args.sequence_length, args.decoder)


def _plots(args: argparse.Namespace) -> None:
    from gptoss.plots import plots

    tol = Tolerances.from_args(args)
    plots(args.csv, args.logits_diffs, args.benchmarks, args.outdir, tol, args.verdict, args.manifest)


# --- quality of quantized variants (gptoss.proof.quality, gptoss.proof.quality_gate) ---


def _quality(args: argparse.Namespace) -> None:
    from gptoss.proof.quality import DEFAULT_PROMPTS, quality

    if (args.probe is None) != (args.params is None):
        raise GptOssError("--probe and --params go together (the per-depth top-1 needs both)")
    params = None
    if args.params is not None:
        from gptoss.model.params import Params

        params = Params.open(args.params, args.config)
    quality(
        args.exact, args.variant, args.variant_name, args.csv, text=args.text, max_tokens=args.max_tokens,
        chunk_length=args.chunk_length, prompts=args.prompt or DEFAULT_PROMPTS, steps=args.steps,
        threads=args.threads, near_tie_margin=args.near_tie_margin, kld_values=args.kld_values, probe=args.probe,
        params=params,
    )  # fmt: skip


def _quality_gate(args: argparse.Namespace) -> None:
    from gptoss.plots import depth_agreement_plot, kld_histogram
    from gptoss.proof.quality import read_rows
    from gptoss.proof.quality_gate import parse_budgets, quality_gate

    budgets = parse_budgets(args.budget)
    values = dict(item.partition("=")[::2] for item in args.kld_values)
    if any(not name or not path for name, path in values.items()) or (values and not args.plot):
        raise GptOssError("--kld-values takes VARIANT=FILE.npy items and needs --plot PNG")
    if args.plot:
        kld_histogram({name: Path(path) for name, path in values.items()}, args.plot)
    if args.depth_plot:
        depth_agreement_plot(read_rows(args.csv), args.depth_plot)
    quality_gate(args.csv, budgets, args.verdict, args.summary, args.depth_plot)


def _quality_parsers(sub) -> None:
    p = sub.add_parser("quality", help="a quantized decoder folder vs the exact one: KL divergence, top-1, PPL -> CSV")
    p.set_defaults(run=_quality)
    p.add_argument("--exact", type=Path, required=True, help="the exact decoder folder (export --stage decoder)")
    p.add_argument("--variant", type=Path, required=True, help="the quantized decoder folder (same contract)")
    p.add_argument("--variant-name", required=True, help="e.g. q4 (the CSV's variant column)")
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--text", type=Path, help="evaluation text (default: the packaged gptoss/eval_text/eval_text.txt)")
    p.add_argument("--max-tokens", type=int, help="use the first N tokens of the text (default: all)")
    p.add_argument("--chunk-length", type=int, default=512, help="tokens per prefill; the second half is scored")
    p.add_argument("--prompt", action="append", default=[], help="greedy prompt (repeatable; default: parity's)")
    p.add_argument("--steps", type=int, default=8, help="greedy steps per prompt")
    p.add_argument("--near-tie-margin", type=float, default=1e-4, help="a greedy difference at a near tie agrees")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--kld-values", type=Path, help="also save every scored position's KLD (float32 .npy)")
    probe = (
        "the variant's probe folder (export --stage debug --variant V --sequence-length CHUNK): adds the top-1 "
        "agreement per block depth, a logit lens with the exact head on both models (needs --params)"
    )
    p.add_argument("--probe", type=Path, help=probe)
    p.add_argument("--params", type=Path, help="--probe: the exact params (X.msgpack; the lens's head, the JAX side)")
    p.add_argument("--config", type=Path, help="--probe: the params config (default: X.config.json beside --params)")

    p = sub.add_parser("quality-gate", help="quality CSVs + budgets -> verdict JSON + summary; exit 1 on any breach")
    p.set_defaults(run=_quality_gate)
    p.add_argument("--csv", type=Path, nargs="+", required=True)
    budget = "VARIANT:STAT=VALUE (repeatable): kld_mean, kld_p99 at most; top1_agreement, greedy_agreement at least"
    p.add_argument("--budget", action="append", default=[], required=True, help=budget)
    p.add_argument("--verdict", type=Path, required=True, help="verdict JSON to write")
    p.add_argument("--summary", type=Path, help="Markdown summary (default: next to the verdict)")
    p.add_argument("--plot", type=Path, help="KLD histogram PNG of the --kld-values files")
    p.add_argument("--kld-values", nargs="*", default=[], help="VARIANT=FILE.npy from gptoss quality --kld-values")
    depth = "PNG of the top-1 agreement per block depth (rows of gptoss quality --probe), linked from the summary"
    p.add_argument("--depth-plot", type=Path, help=depth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic HF-layout checkpoint (MXFP4 experts, tokenizer.json)")
    p.set_defaults(run=_synth)
    p.add_argument("--preset", default="toy", choices=["toy", "gpt-oss-20b", "gpt-oss-120b"])
    p.add_argument("--layers", type=int, help="number of layers (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="hf", choices=LAYOUTS, help="tensor naming to write")
    p.add_argument("--output", type=Path, required=True, help="checkpoint folder to create")

    p = sub.add_parser("download", help="snapshot a checkpoint from the Hugging Face Hub")
    p.set_defaults(run=_download)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--revision", default="main", help="branch, tag or commit (pin a commit for reproducibility)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--retries", type=int, default=3)
    layout = "which copy of the weights: hf (model*.safetensors) or original (OpenAI's original/); never both"
    p.add_argument("--layout", default="hf", choices=LAYOUTS, help=layout)

    p = sub.add_parser("convert", help="checkpoint folder -> Flax params msgpack + .config.json")
    p.set_defaults(run=_convert)
    p.add_argument("--checkpoint", type=Path, required=True, help="HF or original/ layout checkpoint folder")
    p.add_argument("--output", type=Path, required=True, help="X.msgpack (X.config.json is written next to it)")
    p.add_argument("--layers", type=int, help="keep only the first N layers")
    weight_format = (
        "how the weights are stored (default float32); mxfp4 keeps the experts as the checkpoint's MXFP4 "
        "blocks/scales, the rest bfloat16"
    )
    p.add_argument("--weight-format", choices=WEIGHT_FORMAT_NAMES, help=weight_format)
    p.add_argument("--dtype", choices=WEIGHT_FORMAT_NAMES, help=argparse.SUPPRESS)  # deprecated

    p = sub.add_parser("export", help="Flax params -> ONNX graph of a stage (debug, canonical, decoder)")
    p.set_defaults(run=_export)
    stage = (
        "debug: every --emit-* output; decoder: the KV-cache graph for onnxruntime-genai, with genai_config.json "
        "and the tokenizer files beside it (default: debug if an --emit-* flag is given)"
    )
    _params_arguments(p, EXPORT_STAGES, stage)
    p.add_argument("--context-length", type=int, help="decoder: longest prompt + generation")
    weights = "write only the weights file (--output DIR/model.onnx.data) that every graph of these params shares"
    p.add_argument("--weights-only", action="store_true", help=weights)
    reuse = "model.onnx.data beside --output holds these params' weights already: share it, do not rewrite it"
    p.add_argument("--reuse-weights", action="store_true", help=reuse)
    p.add_argument("--output", type=Path, required=True, help="model.onnx (model.onnx.data is written next to it)")
    p.add_argument("--sequence-length", type=int, default=32, help="validation length; fixed in debug graphs")
    p.add_argument("--emit-hidden-states", action="store_true", help="add hidden_state_{i} outputs")
    p.add_argument("--emit-block-debug", action="store_true", help="add block_{i}_{tap} outputs")
    p.add_argument("--skip-validation", action="store_true", help="skip the JAX vs ONNX Runtime check")
    p.add_argument("--opset", type=int, default=21)
    quantized = (
        "a quantized variant in a folder of its own (QMoE experts, MatMulNBits dense layers). decoder: the variant "
        "itself; debug: its probe for `gptoss quality --probe` (hidden states, no block taps, --sequence-length "
        "the quality stage's chunk length)"
    )
    p.add_argument("--variant", choices=sorted(VARIANT_BITS), help=quantized)
    p.add_argument("--block-size", type=int, default=32, help="--variant: weights per quantization block")
    p.add_argument("--accuracy-level", type=int, default=4, help="--variant: kernels' accuracy_level (4: int8)")
    segment = "debug/canonical: only this segment of the graph (embed, blocksA-B or head; parity in segments), "
    segment += "written to --output beside the whole graph's weights file"
    p.add_argument("--segment", metavar="NAME", help=segment)
    p.add_argument("--expert-scales", choices=["float16", "float32"], default="float16", help="--variant: QMoE scales")

    p = sub.add_parser("parity", help="JAX vs ONNX Runtime (or transformers: --stage reference) -> CSV")
    p.set_defaults(run=_parity)
    stage = (
        "debug: hidden states and block taps too; decoder: greedy generation on the KV-cache graph (JAX, ONNX "
        "Runtime, onnxruntime-genai); reference: transformers on --checkpoint instead of a graph (default: debug "
        "if a --compare-* flag is given, else canonical)"
    )
    _params_arguments(p, PARITY_STAGES, stage)
    steps = (
        "greedy steps after each prompt (decoder: default 16; reference: also compare transformers' generate(), "
        "end-of-sequence suppressed)"
    )
    p.add_argument("--generate-tokens", type=int, help=steps)
    p.add_argument("--onnx", type=Path, help="the graph to compare (every stage but reference)")
    p.add_argument("--checkpoint", type=Path, help="(reference) the checkpoint the params came from")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--token-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--tokenizer", type=Path, help="default: the one recorded in the params config")
    p.add_argument("--sequence-length", type=int, default=32)
    p.add_argument("--compare-hidden-states", action="store_true")
    p.add_argument("--compare-block-debug", action="store_true")
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--logits-diffs", type=Path, help="also save every logits |diff| (.npz)")
    carry = "(a segment graph) the .carry.npz the segment before it left: ONNX Runtime continues from ONNX "
    carry += "Runtime's state, JAX from JAX's"
    p.add_argument("--entering", type=Path, metavar="CARRY", help=carry)
    p.add_argument("--leaving", type=Path, metavar="CARRY", help="(a segment graph) default: beside --csv")
    Tolerances.add_arguments(p)

    p = sub.add_parser("manifest", help="the sha256 of every tensor of a whole graph, for the gate of its segments")
    p.set_defaults(run=_manifest)
    p.add_argument("--onnx", type=Path, required=True, help="the whole debug or canonical graph")
    p.add_argument("--segments", nargs="+", required=True, help="the segments its parity runs in (the gate's list)")
    p.add_argument("--output", type=Path, help="default: {graph}.tensors.json beside it")

    p = sub.add_parser("gate", help="parity CSVs + tolerances -> verdict JSON + summary; exit 1 on any breach")
    p.set_defaults(run=_gate)
    p.add_argument("--csv", type=Path, nargs="+", required=True)
    p.add_argument("--expect-stage", nargs="*", default=[], help="stages that must have rows")
    manifests = "STAGE=JSON: that stage's CSVs are segments (each with its .tensors.json), checked against the "
    manifests += "whole graph's tensor manifest: every tensor covered, by the same bytes"
    p.add_argument("--manifest", nargs="*", default=[], metavar="STAGE=JSON", help=manifests)
    p.add_argument("--verdict", type=Path, required=True, help="verdict JSON to write")
    p.add_argument("--summary", type=Path, help="Markdown summary (default: next to the verdict)")
    Tolerances.add_arguments(p)

    p = sub.add_parser("plots", help="report figures: tap heatmap, logits histogram, routing, benchmarks (PNG)")
    p.set_defaults(run=_plots)
    p.add_argument("--csv", type=Path, nargs="+", required=True, help="parity CSVs (the debug one for the taps)")
    p.add_argument("--logits-diffs", type=Path, nargs="*", default=[], help=".npz files from parity --logits-diffs")
    p.add_argument("--benchmarks", type=Path, nargs="*", default=[], help="Snakemake benchmark .tsv files")
    p.add_argument("--verdict", type=Path, help="gate verdict JSON -> gate.html")
    p.add_argument("--manifest", type=Path, help="promoted manifest.json -> manifest.html")
    p.add_argument("--outdir", type=Path, required=True)
    Tolerances.add_arguments(p)

    p = sub.add_parser("promote", help="copy a gated graph with a manifest; refuses without a passing verdict")
    p.set_defaults(run=_promote)
    p.add_argument("--onnx", type=Path, help="the canonical graph (required unless --variant)")
    p.add_argument("--verdict", type=Path, required=True, help="the parity gate's verdict")
    p.add_argument("--dest", type=Path, required=True, help="folder to create (replaced if it exists)")
    p.add_argument("--tag", required=True, help="e.g. baseline2")
    p.add_argument("--config", type=Path, help="params config (.config.json) to describe in the manifest")
    p.add_argument("--sequence-length", type=int, help="recorded in the manifest")
    p.add_argument("--decoder", type=Path, help="a decoder folder (export --stage decoder) to promote too")
    p.add_argument("--variant", choices=sorted(VARIANT_BITS), help="promote this quantized variant's folder instead")
    p.add_argument("--variant-folder", type=Path, help="--variant: its folder (export --variant)")
    p.add_argument("--quality-verdict", type=Path, help="--variant: the quality gate's verdict that passed it")

    _quality_parsers(sub)
    return parser


def _params_arguments(p: argparse.ArgumentParser, stages: Sequence[str], stage_help: str) -> None:
    """The flags export and parity share: the stage, the params, ONNX Runtime's threads."""
    p.add_argument("--stage", choices=stages, help=stage_help)
    p.add_argument("--params", type=Path, required=True, help="X.msgpack from `gptoss convert`")
    p.add_argument("--config", type=Path, help="default: X.config.json next to --params")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a ``GptOssError`` becomes one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # Our progress at INFO; third-party libraries only when they warn (the root logger's default).
    logging.getLogger("gptoss").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    start = time.perf_counter()
    try:
        status = args.run(args) or 0
    except GptOssError as exc:
        print(f"gptoss {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gptoss {args.command}: interrupted", file=sys.stderr)
        return 130
    # The kernel's high-water mark (Snakemake's benchmark samples RSS and can miss short peaks) of this process or of
    # its largest child (the JAX side of parity runs in one), in GB of 10^9 bytes like every size we print.
    peak_kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    peak_gb = peak_kib * 1024 / 1e9
    log.info("%s finished in %.1f s, peak RSS %.2f GB", args.command, time.perf_counter() - start, peak_gb)
    return status


if __name__ == "__main__":
    sys.exit(main())

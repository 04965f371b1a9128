# Stage 6: copy the gated canonical graph (as model.onnx, with model.onnx.data) and the decoder graph with its
# genai_config.json and tokenizer files (sharing those weights: onnxruntime_genai.Model opens the folder) into
# {promote.dir}/{tag}/ with manifest.json and README.md: baseline2 for the baseline checkpoint, and every
# `promote_as` tag. `gptoss promote` refuses unless the verdict passed, the files are the ones parity verified
# and the decoder's genai_config.json agrees with its graph.


rule promote:
    input:
        unpack(promote_inputs),
    output:
        directory(promoted_path("{tag}")),
    log:
        f"{RESULTS}/logs/promote_{{tag}}.log",
    benchmark:
        promote_benchmark("{tag}")
    wildcard_constraints:
        tag=one_of(promotions()),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("promote"),
        runtime=runtime("promote"),
    params:
        checkpoint=lambda wildcards: promotions()[wildcards.tag],
        sequence_length=config["sequence_length"],
        decoder=promote_decoder,
    message:
        "{params.checkpoint}: promoting the gated graphs as {wildcards.tag} into {output}"
    shell:
        "gptoss promote --onnx {input.canonical} {params.decoder} --verdict {input.verdict} "
        "--dest {output} --tag {wildcards.tag} --config {input.config} --sequence-length {params.sequence_length} "
        "> {log} 2>&1"


# The user's target: the baseline checkpoint promoted as baseline2, and its variants as baseline2-{variant}.
rule promote_baseline2:
    input:
        promoted_path(BASELINE_TAG),
        [promoted_path(f"{BASELINE_TAG}-{variant}") for variant in variants()],

# Stage 6: copy the gated canonical graph (model.onnx + model.onnx.data) with manifest.json and README.md.
# `gptoss promote` refuses unless the verdict passed and the files are the ones parity verified.


rule promote_baseline2:
    input:
        **promote_inputs(baseline()),
    output:
        directory(promoted_path(BASELINE_TAG)),
    log:
        f"{RESULTS}/{baseline()}/logs/promote_baseline2.log",
    benchmark:
        f"{RESULTS}/{baseline()}/benchmarks/promote_baseline2.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=estimate_mem_mb(baseline(), "promote"),
    params:
        sequence_length=config["sequence_length"],
    message:
        f"{baseline()}: promoting the canonical graph as baseline2 into {{output}}"
    shell:
        "gptoss promote --onnx {input.onnx} --verdict {input.verdict} --dest {output} --tag baseline2 "
        "--config {input.config} --sequence-length {params.sequence_length} "
        "> {log} 2>&1"


# Further tags: a checkpoint entry with `promote_as: TAG` is promoted into {promote.dir}/TAG.
rule promote_tag:
    input:
        unpack(lambda wildcards: promote_inputs(promotions()[wildcards.tag])),
    output:
        directory(f"{promote_dir()}/{{tag}}"),
    log:
        f"{RESULTS}/logs/promote_{{tag}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/promote_{{tag}}.tsv"
    wildcard_constraints:
        tag=one_of(extra_tags()),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=lambda wildcards: estimate_mem_mb(promotions()[wildcards.tag], "promote"),
    params:
        checkpoint=lambda wildcards: promotions()[wildcards.tag],
        sequence_length=config["sequence_length"],
    message:
        "{params.checkpoint}: promoting the canonical graph as {wildcards.tag} into {output}"
    shell:
        "gptoss promote --onnx {input.onnx} --verdict {input.verdict} --dest {output} --tag {wildcards.tag} "
        "--config {input.config} --sequence-length {params.sequence_length} "
        "> {log} 2>&1"

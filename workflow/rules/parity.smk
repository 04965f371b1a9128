# Stage 4: JAX vs ONNX Runtime on the configured prompts, one CSV per graph (columns: gptoss.parity.COLUMNS).
# Parity never fails on a difference (the gate decides); the tolerances only fill the atol/passed columns.


rule parity_debug:
    input:
        unpack(parity_inputs("debug")),
    output:
        csv=f"{RESULTS}/{{checkpoint}}/parity/debug.csv",
        diffs=f"{RESULTS}/{{checkpoint}}/parity/debug_logits_diff.npz",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/parity_debug.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/parity_debug.tsv"
    conda:
        CONDA_ENV
    threads: threads_for("parity")
    resources:
        mem_mb=mem_mb("parity"),
    params:
        sequence_length=config["sequence_length"],
        prompts=prompt_args(),
        tolerances=tolerance_args(),
    message:
        "{wildcards.checkpoint}: parity of the debug graph (logits, hidden states, block taps)"
    shell:
        "gptoss parity --params {input.params} --config {input.config} --onnx {input.onnx} "
        "--sequence-length {params.sequence_length} {params.prompts} --compare-hidden-states --compare-block-debug "
        "--stage debug {params.tolerances} --csv {output.csv} --logits-diffs {output.diffs} > {log} 2>&1"


rule parity_canonical:
    input:
        unpack(parity_inputs("canonical")),
    output:
        csv=f"{RESULTS}/{{checkpoint}}/parity/canonical.csv",
        diffs=f"{RESULTS}/{{checkpoint}}/parity/canonical_logits_diff.npz",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/parity_canonical.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/parity_canonical.tsv"
    conda:
        CONDA_ENV
    threads: threads_for("parity")
    resources:
        mem_mb=mem_mb("parity"),
    params:
        sequence_length=config["sequence_length"],
        prompts=prompt_args(),
        tolerances=tolerance_args(),
    message:
        "{wildcards.checkpoint}: parity of the canonical graph (logits)"
    shell:
        "gptoss parity --params {input.params} --config {input.config} --onnx {input.onnx} "
        "--sequence-length {params.sequence_length} {params.prompts} "
        "--stage canonical {params.tolerances} --csv {output.csv} --logits-diffs {output.diffs} > {log} 2>&1"


# Optional (config `reference: transformers`): Hugging Face GptOssForCausalLM on the same checkpoint and layers
# vs the Flax model -> stage=reference rows (logits, hidden states), which the gate then covers too.
rule parity_reference:
    input:
        unpack(params_inputs),
        checkpoint=lambda wildcards: checkpoint_target(wildcards.checkpoint),
    output:
        f"{RESULTS}/{{checkpoint}}/parity/reference.csv",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/parity_reference.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/parity_reference.tsv"
    conda:
        CONDA_ENV
    threads: threads_for("parity")
    resources:
        mem_mb=mem_mb("parity"),
    params:
        folder=lambda wildcards: checkpoint_folder(wildcards.checkpoint),
        sequence_length=config["sequence_length"],
        prompts=prompt_args(),
        tolerances=tolerance_args(),
    message:
        "{wildcards.checkpoint}: transformers reference vs JAX (logits, hidden states)"
    shell:
        "gptoss reference --checkpoint {params.folder} --params {input.params} --config {input.config} "
        "--sequence-length {params.sequence_length} {params.prompts} {params.tolerances} --csv {output} > {log} 2>&1"

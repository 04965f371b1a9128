# Stage 4: one CSV per stage (PARITY_STAGES; columns: gptoss.proof.compare.COLUMNS): JAX vs ONNX Runtime on the
# stage's graph (decoder: greedy generation by JAX, ONNX Runtime and onnxruntime-genai), or (reference, with
# `reference: transformers`) JAX vs Hugging Face GptOssForCausalLM on the same checkpoint and layers. Parity
# never fails on a difference (the gate decides); the tolerances only fill the atol/passed columns.


rule parity:
    input:
        unpack(parity_inputs),
    output:
        csv=parity_csv("{checkpoint}", "{stage}"),
        diffs=f"{RESULTS}/{{checkpoint}}/parity/{{stage}}_logits_diff.npz",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/parity_{{stage}}.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/parity_{{stage}}.tsv"
    wildcard_constraints:
        stage=one_of(PARITY_STAGES),
    conda:
        CONDA_ENV
    threads: model_threads
    resources:
        mem_mb=mem_mb("parity"),
        runtime=runtime("parity"),
    params:
        source=parity_source,
        sequence_length=config["sequence_length"],
        prompts=prompt_args(),
        tolerances=tolerance_args(),
        what=lambda wildcards: PARITY_STAGES[wildcards.stage],
        flags=parity_flags,
    message:
        "{wildcards.checkpoint}: {params.what}"
    shell:
        "gptoss parity --stage {wildcards.stage} --params {input.params} --config {input.config} "
        "{params.source} --sequence-length {params.sequence_length} {params.prompts} {params.tolerances} "
        "--threads {threads} {params.flags} --csv {output.csv} --logits-diffs {output.diffs} > {log} 2>&1"

# Stage 3: Flax params -> the weights file every graph of the checkpoint shares (export_weights, streamed one
# tensor at a time), then one ONNX graph per stage (EXPORT_STAGES) beside it: the debug graph (fixed sequence
# length) also outputs every hidden state and the per-block taps; the canonical graph (symbolic batch and
# sequence) outputs logits only; the decoder graph takes and returns the KV cache, with genai_config.json and
# the tokenizer files beside it. One weights file on disk, whatever the number of graphs.
# --skip-validation: the export's own JAX vs ONNX Runtime spot check would hold the model twice (JAX weights and
# an ONNX Runtime session) at the export's peak; the parity rule that follows checks each graph in full, one
# side at a time, against the configured tolerances.


rule export_weights:
    input:
        unpack(params_inputs),
    output:
        weights_path("{checkpoint}"),
    log:
        f"{RESULTS}/{{checkpoint}}/logs/export_weights.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/export_weights.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("weights"),
        runtime=runtime("weights"),
    message:
        "{wildcards.checkpoint}: writing the ONNX weights file"
    shell:
        "gptoss export --weights-only --params {input.params} --config {input.config} --output {output} > {log} 2>&1"


rule export_onnx:
    input:
        unpack(graph_inputs),
    output:
        graph_path("{checkpoint}", "{stage}"),
    log:
        f"{RESULTS}/{{checkpoint}}/logs/export_onnx_{{stage}}.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/export_onnx_{{stage}}.tsv"
    wildcard_constraints:
        stage=one_of(EXPORT_STAGES),
    conda:
        CONDA_ENV
    threads: model_threads
    resources:
        mem_mb=mem_mb("export"),
        runtime=runtime("export"),
    params:
        sequence_length=config["sequence_length"],
        opset=config["opset"],
        what=lambda wildcards: EXPORT_STAGES[wildcards.stage],
        flags=export_flags,
    message:
        "{wildcards.checkpoint}: exporting {params.what}"
    shell:
        "gptoss export --stage {wildcards.stage} --params {input.params} --config {input.config} --output {output} "
        "--reuse-weights --sequence-length {params.sequence_length} --opset {params.opset} --skip-validation "
        "--threads {threads} {params.flags} > {log} 2>&1"

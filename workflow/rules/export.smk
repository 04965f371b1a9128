# Stage 3: Flax params -> one ONNX graph per stage (EXPORT_STAGES), each a folder with model.onnx and
# model.onnx.data written together. The debug graph (fixed sequence length) also outputs every hidden state
# and the per-block taps; the canonical graph (symbolic batch and sequence) outputs logits only; the decoder
# graph takes and returns the KV cache, with genai_config.json and the tokenizer files beside it. The weights
# file is the same for every graph of a checkpoint: the canonical export writes it, the others hard-link it.
# --skip-validation: the export's own JAX vs ONNX Runtime spot check would hold the model twice (JAX weights and
# an ONNX Runtime session) at the export's peak; the parity rule that follows checks each graph in full, one
# side at a time, against the configured tolerances.


rule export_onnx:
    input:
        unpack(export_inputs),
    output:
        directory(graph_folder("{checkpoint}", "{stage}")),
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
    params:
        sequence_length=config["sequence_length"],
        opset=config["opset"],
        what=lambda wildcards: EXPORT_STAGES[wildcards.stage],
        flags=export_flags,
    message:
        "{wildcards.checkpoint}: exporting {params.what}"
    shell:
        "gptoss export --stage {wildcards.stage} --params {input.params} --config {input.config} "
        "--output {output}/model.onnx --sequence-length {params.sequence_length} --opset {params.opset} "
        "--skip-validation --threads {threads} {params.flags} > {log} 2>&1"

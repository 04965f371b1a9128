# Stage 3: Flax params -> two ONNX graphs. The debug graph (fixed sequence length) also outputs every
# hidden state and the per-block taps; the canonical graph (symbolic batch and sequence) outputs logits only.
# Both write model.onnx + model.onnx.data; the data file is a declared output, so a changed one re-runs parity.
# --skip-validation: the export's own JAX vs ONNX Runtime spot check would hold the model twice (JAX weights and
# an ONNX Runtime session) at the export's peak; the parity rules that follow check both graphs in full, one
# side at a time, against the configured tolerances.


rule export_onnx_debug:
    input:
        unpack(params_inputs),
    output:
        onnx=f"{RESULTS}/{{checkpoint}}/onnx/debug/model.onnx",
        data=f"{RESULTS}/{{checkpoint}}/onnx/debug/model.onnx.data",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/export_onnx_debug.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/export_onnx_debug.tsv"
    conda:
        CONDA_ENV
    threads: threads_for("export")
    resources:
        mem_mb=mem_mb("export"),
    params:
        sequence_length=config["sequence_length"],
        opset=config["opset"],
    message:
        "{wildcards.checkpoint}: exporting the debug ONNX graph (hidden states + block taps)"
    shell:
        "gptoss export --params {input.params} --config {input.config} --output {output.onnx} "
        "--sequence-length {params.sequence_length} --opset {params.opset} --emit-hidden-states --emit-block-debug "
        "--skip-validation > {log} 2>&1"


rule export_onnx_canonical:
    input:
        unpack(params_inputs),
    output:
        onnx=f"{RESULTS}/{{checkpoint}}/onnx/canonical/model.onnx",
        data=f"{RESULTS}/{{checkpoint}}/onnx/canonical/model.onnx.data",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/export_onnx_canonical.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/export_onnx_canonical.tsv"
    conda:
        CONDA_ENV
    threads: threads_for("export")
    resources:
        mem_mb=mem_mb("export"),
    params:
        sequence_length=config["sequence_length"],
        opset=config["opset"],
    message:
        "{wildcards.checkpoint}: exporting the canonical ONNX graph (logits only)"
    shell:
        "gptoss export --params {input.params} --config {input.config} --output {output.onnx} "
        "--sequence-length {params.sequence_length} --opset {params.opset} --skip-validation "
        "> {log} 2>&1"

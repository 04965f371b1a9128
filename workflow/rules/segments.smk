# Parity in segments (`parity_segment_blocks: N`; 0, the default, keeps one parity job per graph): the debug and
# canonical graphs' parity runs as one job per segment (the embedding, N blocks at a time, the head), so that no
# job holds the whole model. Each segment's graph is traced alone, beside the whole graph, and reads the same
# weights file. Each segment's parity continues from the states the one before it left (its .carry.npz): ONNX
# Runtime from ONNX Runtime's, JAX from JAX's, so the segments' rows are the whole graph's. The whole graph's
# tensor manifest holds the sha256 of its every tensor: the gate refuses a tensor that no segment read, or read
# as other bytes, and a broken chain. The decoder's greedy generation needs the whole model and stays one job.


rule export_segment:
    input:
        unpack(graph_inputs),  # the weights file only: a segment's chain need not wait for the whole graph's trace
    output:
        segment_graph_path("{checkpoint}", "{stage}", "{segment}"),
    log:
        f"{RESULTS}/{{checkpoint}}/logs/export_segment_{{stage}}_{{segment}}.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/export_segment_{{stage}}_{{segment}}.tsv"
    wildcard_constraints:
        stage="debug|canonical",
        segment=r"embed|head|blocks\d+-\d+",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=segment_mem_mb("export_segment"),
        runtime=segment_runtime("export_segment"),
    params:
        sequence_length=config["sequence_length"],
        opset=config["opset"],
    message:
        "{wildcards.checkpoint}: exporting segment {wildcards.segment} of the {wildcards.stage} graph"
    shell:
        "gptoss export --stage {wildcards.stage} --segment {wildcards.segment} --params {input.params} "
        "--config {input.config} --output {output} --sequence-length {params.sequence_length} "
        "--opset {params.opset} > {log} 2>&1"


rule tensor_manifest:
    input:
        whole=graph_path("{checkpoint}", "{stage}"),
        weights=weights_path("{checkpoint}"),
    output:
        manifest_path("{checkpoint}", "{stage}"),
    log:
        f"{RESULTS}/{{checkpoint}}/logs/tensor_manifest_{{stage}}.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/tensor_manifest_{{stage}}.tsv"
    wildcard_constraints:
        stage="debug|canonical",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("gate"),
        runtime=segment_runtime("manifest"),
    params:
        segments=lambda wildcards: " ".join(segment_names(wildcards.checkpoint)),
    message:
        "{wildcards.checkpoint}: the sha256 of every tensor of the {wildcards.stage} graph"
    shell:
        "gptoss manifest --onnx {input.whole} --segments {params.segments} --output {output} > {log} 2>&1"


rule parity_segment:
    input:
        unpack(params_inputs),
        segment=segment_graph_path("{checkpoint}", "{stage}", "{segment}"),
        entering=entering_carry,
    output:
        csv=segment_csv("{checkpoint}", "{stage}", "{segment}"),
        tensors=segment_tensors("{checkpoint}", "{stage}", "{segment}"),
        carry=segment_carry("{checkpoint}", "{stage}", "{segment}"),
        diffs=f"{RESULTS}/{{checkpoint}}/parity/{{stage}}/{{segment}}_logits_diff.npz",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/parity_{{stage}}_{{segment}}.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/parity_{{stage}}_{{segment}}.tsv"
    wildcard_constraints:
        stage="debug|canonical",
        segment=r"embed|head|blocks\d+-\d+",
    conda:
        CONDA_ENV
    threads: model_threads
    resources:
        mem_mb=segment_mem_mb("parity_segment"),
        runtime=segment_runtime("parity_segment"),
    params:
        sequence_length=config["sequence_length"],
        prompts=prompt_args(),
        tolerances=tolerance_args(),
        entering=lambda wildcards, input: f"--entering {input.entering}" if input.entering else "",
    message:
        "{wildcards.checkpoint}: parity of segment {wildcards.segment} of the {wildcards.stage} graph"
    shell:
        "gptoss parity --stage {wildcards.stage} --params {input.params} --config {input.config} "
        "--onnx {input.segment} {params.entering} --sequence-length {params.sequence_length} {params.prompts} "
        "{params.tolerances} --threads {threads} --csv {output.csv} --leaving {output.carry} "
        "--logits-diffs {output.diffs} > {log} 2>&1"

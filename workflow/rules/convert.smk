# Stage 2: checkpoint folder -> Flax params (msgpack) + params config, keeping the first N layers.
# A checkpoint downloaded from the hub has download.json: its repo and resolved commit go into the config.


rule convert_params:
    input:
        lambda wildcards: checkpoint_target(wildcards.checkpoint),
    output:
        params=f"{RESULTS}/{{checkpoint}}/flax_params_{{layers}}layers.msgpack",
        config=f"{RESULTS}/{{checkpoint}}/flax_params_{{layers}}layers.config.json",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/convert_params_{{layers}}layers.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/convert_params_{{layers}}layers.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("convert"),
        runtime=runtime("convert"),
    params:
        folder=lambda wildcards: checkpoint_folder(wildcards.checkpoint),
        weight_format=entry_value("weight_format"),
    message:
        "{wildcards.checkpoint}: converting {wildcards.layers} layers to {params.weight_format} Flax params"
    shell:
        "gptoss convert --checkpoint {params.folder:q} --output {output.params} --layers {wildcards.layers} "
        "--weight-format {params.weight_format} > {log} 2>&1"

# Quantized variants (config `variants`: q8, q4): the decoder graph rewritten for ONNX Runtime's integer CPU
# kernels (QMoE experts, MatMulNBits dense layers; `gptoss export --variant`), each in a folder of its own; the
# quality stage measures it against the gated exact decoder on the packaged evaluation text as
# `llama-perplexity --kl-divergence` does (KL divergence, same top, delta-p, perplexity ratio, greedy agreement);
# the quality gate holds each variant to its budgets (`quality_budgets`), and a passing variant is promoted as
# {tag}-{variant}. A variant over budget stops at its own gate; the exact graph's promotion does not wait for it.
# Each variant also has a probe (`export --stage debug --variant`: its whole-sequence graph with hidden-state
# outputs, in chunks of the quality stage's length), from which the quality stage reads the top-1 agreement per
# block depth (a logit lens with the exact head); the probe is measured, never promoted
# (`quality: {depth_agreement: false}` skips it).


rule export_variant:
    input:
        unpack(params_inputs),
    output:
        directory(variant_folder("{checkpoint}", "{variant}")),
    log:
        f"{RESULTS}/{{checkpoint}}/logs/export_variant_{{variant}}.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/export_variant_{{variant}}.tsv"
    wildcard_constraints:
        variant=one_of(variants()),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("export_variant"),
        runtime=runtime("export_variant"),
    params:
        flags=variant_export_flags,
    message:
        "{wildcards.checkpoint}: exporting the {wildcards.variant} variant of the decoder graph"
    shell:
        "gptoss export --stage decoder --variant {wildcards.variant} --params {input.params} --config {input.config} "
        "--output {output}/model.onnx {params.flags} > {log} 2>&1"


rule export_variant_probe:
    input:
        unpack(params_inputs),
    output:
        directory(variant_probe_folder("{checkpoint}", "{variant}")),
    log:
        f"{RESULTS}/{{checkpoint}}/logs/export_variant_probe_{{variant}}.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/export_variant_probe_{{variant}}.tsv"
    wildcard_constraints:
        variant=one_of(variants()),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("export_variant"),
        runtime=runtime("export_variant"),
    params:
        flags=lambda wildcards: quantization_flags(),
        length=lambda wildcards: probe_length(),
    message:
        "{wildcards.checkpoint}: exporting the probe of the {wildcards.variant} variant (hidden states, for quality)"
    shell:
        "gptoss export --stage debug --variant {wildcards.variant} --sequence-length {params.length} "
        "--params {input.params} --config {input.config} --output {output}/model.onnx {params.flags} > {log} 2>&1"


rule quality:
    input:
        unpack(params_inputs),
        unpack(probe_inputs),
        exact=graph_path("{checkpoint}", "decoder"),
        weights=weights_path("{checkpoint}"),
        variant=variant_folder("{checkpoint}", "{variant}"),
    output:
        csv=quality_csv("{checkpoint}", "{variant}"),
        kld=f"{RESULTS}/{{checkpoint}}/quality/{{variant}}_kld.npy",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/quality_{{variant}}.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/quality_{{variant}}.tsv"
    wildcard_constraints:
        variant=one_of(variants()),
    conda:
        CONDA_ENV
    threads: model_threads
    resources:
        mem_mb=mem_mb("quality"),
        runtime=runtime("quality"),
    params:
        exact=lambda wildcards, input: os.path.dirname(input.exact),
        prompts=prompt_args(),
        flags=quality_flags(),
        probe=probe_flags,
    message:
        "{wildcards.checkpoint}: quality of the {wildcards.variant} variant against the exact decoder"
    shell:
        "gptoss quality --exact {params.exact} --variant {input.variant} --variant-name {wildcards.variant} "
        "{params.prompts} {params.flags} --threads {threads} --csv {output.csv} --kld-values {output.kld} "
        "{params.probe} > {log} 2>&1"


rule quality_gate:
    input:
        csv=quality_csv("{checkpoint}", "{variant}"),
        kld=f"{RESULTS}/{{checkpoint}}/quality/{{variant}}_kld.npy",
    output:
        verdict=quality_verdict_path("{checkpoint}", "{variant}"),
        summary=f"{RESULTS}/{{checkpoint}}/gate/quality_{{variant}}.md",
        **quality_gate_figures(),
    log:
        f"{RESULTS}/{{checkpoint}}/logs/quality_gate_{{variant}}.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/quality_gate_{{variant}}.tsv"
    wildcard_constraints:
        variant=one_of(variants()),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("quality_gate"),
        runtime=runtime("quality_gate"),
    params:
        budgets=lambda wildcards: budget_args(wildcards.variant),
        depth_plot=depth_plot_flag,
    message:
        "{wildcards.checkpoint}: quality gate of the {wildcards.variant} variant ({params.budgets})"
    shell:
        "gptoss quality-gate --csv {input.csv} {params.budgets} --verdict {output.verdict} --summary {output.summary} "
        "--plot {output.plot} --kld-values {wildcards.variant}={input.kld} {params.depth_plot} "
        "> {log} 2>&1 "
        "|| {{ msg=$(tail -n 1 {log}); cat {output.summary} >> {log} 2>/dev/null || true; "
        'echo "$msg" >&2; echo "quality gate details: {log}" >&2; exit 1; }}'


rule promote_variant:
    input:
        unpack(promote_variant_inputs),
    output:
        directory(promoted_path("{vtag}")),
    log:
        f"{RESULTS}/logs/promote_{{vtag}}.log",
    benchmark:
        promote_benchmark("{vtag}")
    wildcard_constraints:
        vtag=one_of(variant_promotions()),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("promote"),
        runtime=runtime("promote"),
    params:
        variant=lambda wildcards: variant_promotions()[wildcards.vtag][1],
    message:
        "promoting the gated {params.variant} variant as {wildcards.vtag} into {output}"
    shell:
        "gptoss promote --variant {params.variant} --variant-folder {input.folder} "
        "--quality-verdict {input.quality} --verdict {input.verdict} --config {input.config} "
        "--dest {output} --tag {wildcards.vtag} > {log} 2>&1"

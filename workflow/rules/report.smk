# Stage 7: the figures of `snakemake --report report.html` for the promoted baseline: the gate verdict, a
# block x tap heatmap of max |diff| (log scale, tolerances marked), the logits difference histogram, routing
# agreement per block, per-rule benchmark times and peak memory, and the manifest.
#   snakemake --cores 4 report_baseline2 [--configfile ...] && snakemake --report report.html [--configfile ...]


rule report_baseline2:
    input:
        csvs=gate_csvs(baseline()),
        diffs=logits_diff_paths(baseline()),
        benchmarks=baseline_benchmarks(),
        verdict=verdict_path(baseline()),
        promoted=promoted_path(BASELINE_TAG),
    output:
        gate=report(f"{REPORT_DIR}/gate.html", caption="../report/gate.rst", category="1. Gate"),
        heatmap=report(f"{REPORT_DIR}/taps_heatmap.png", caption="../report/heatmap.rst", category="2. Parity"),
        logits=report(f"{REPORT_DIR}/logits_hist.png", caption="../report/logits.rst", category="2. Parity"),
        routing=report(f"{REPORT_DIR}/routing.png", caption="../report/routing.rst", category="2. Parity"),
        benchmarks=report(f"{REPORT_DIR}/benchmarks.png", caption="../report/benchmarks.rst", category="3. Benchmarks"),
        manifest=report(f"{REPORT_DIR}/manifest.html", caption="../report/manifest.rst", category="4. Promoted"),
    log:
        f"{RESULTS}/{baseline()}/logs/report_baseline2.log",
    benchmark:
        f"{RESULTS}/{baseline()}/benchmarks/report_baseline2.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("report"),
        runtime=runtime("report"),
    params:
        tolerances=tolerance_args(),
        outdir=lambda wildcards, output: os.path.dirname(output.gate),
    message:
        f"{baseline()}: report figures for baseline2 into {REPORT_DIR}"
    shell:
        "gptoss plots --csv {input.csvs} --logits-diffs {input.diffs} --benchmarks {input.benchmarks} "
        "--verdict {input.verdict} --manifest {input.promoted}/manifest.json --outdir {params.outdir} "
        "{params.tolerances} > {log} 2>&1"

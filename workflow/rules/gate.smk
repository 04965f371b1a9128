# Stage 5: every stage's CSV + the configured tolerances -> verdict.json + summary.md. On a breach the run stops
# here with the gate's one-line message (worst tensor, block, difference, tolerance); Snakemake removes the
# failed verdict, so the summary table is appended to the log, which is kept.


rule parity_gate:
    input:
        csvs=lambda wildcards: gate_csvs(wildcards.checkpoint),
        manifests=lambda wildcards: [manifest_path(wildcards.checkpoint, stage) for stage in segmented_stages()],
    output:
        verdict=verdict_path("{checkpoint}"),
        summary=f"{RESULTS}/{{checkpoint}}/gate/summary.md",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/parity_gate.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/parity_gate.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("gate"),
        runtime=runtime("gate"),
    params:
        tolerances=tolerance_args(),
        stages=" ".join(parity_stages()),
        manifests=lambda wildcards: " ".join(
            f"{stage}={manifest_path(wildcards.checkpoint, stage)}" for stage in segmented_stages()
        ),
    message:
        f"{{wildcards.checkpoint}}: parity gate ({tolerance_summary()})"
    shell:
        "gptoss gate --csv {input.csvs} --expect-stage {params.stages} --manifest {params.manifests} "
        "--verdict {output.verdict} --summary {output.summary} {params.tolerances} > {log} 2>&1 "
        "|| {{ msg=$(tail -n 1 {log}); cat {output.summary} >> {log} 2>/dev/null || true; "
        'echo "$msg" >&2; echo "parity gate details: {log}" >&2; exit 1; }}'

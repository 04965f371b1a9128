# Stage 1: a checkpoint folder in HF (or original/) layout. Three sources, chosen per entry in the config:
# hub (download_checkpoint), synthetic (synth_checkpoint), local (an existing folder: no rule, convert reads it).


rule synth_checkpoint:
    output:
        directory(f"{RESULTS}/{{checkpoint}}/checkpoint"),
    log:
        f"{RESULTS}/{{checkpoint}}/logs/synth_checkpoint.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/synth_checkpoint.tsv"
    wildcard_constraints:
        checkpoint=one_of(names_with_source("synthetic")),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("synth"),
        runtime=runtime("synth"),
    params:
        preset=entry_value("preset"),
        seed=entry_value("seed"),
        layers=entry_value("layers"),
    message:
        "{wildcards.checkpoint}: synthesizing a {params.layers}-layer {params.preset} checkpoint (seed {params.seed})"
    shell:
        "gptoss synth --preset {params.preset} --layers {params.layers} --seed {params.seed} --output {output} "
        "> {log} 2>&1"


# The marker download.json (written last, with the resolved commit) is the output, not the folder: a failed or
# interrupted download keeps the files it has (the next attempt resumes) instead of Snakemake deleting them.
# The token comes from the environment (HF_TOKEN, or `huggingface-cli login`); it is never on the command line.
# A local rule: on a cluster the download runs on the submit host, which usually has the internet access.
rule download_checkpoint:
    output:
        f"{RESULTS}/{{checkpoint}}/checkpoint/download.json",
    log:
        f"{RESULTS}/{{checkpoint}}/logs/download_checkpoint.log",
    benchmark:
        f"{RESULTS}/{{checkpoint}}/benchmarks/download_checkpoint.tsv"
    wildcard_constraints:
        checkpoint=one_of(names_with_source("hub")),
    localrule: True
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb("download"),
        runtime=runtime("download"),
    params:
        folder=lambda wildcards: checkpoint_folder(wildcards.checkpoint),
        repo_id=entry_value("repo_id"),
        revision=entry_value("revision"),
        retries=entry_value("retries"),
        layout=entry_value("layout"),
    message:
        "{wildcards.checkpoint}: downloading {params.repo_id}@{params.revision} from the Hugging Face Hub"
    shell:
        "gptoss download --repo-id {params.repo_id:q} --revision {params.revision:q} --output {params.folder:q} "
        "--layout {params.layout} --retries {params.retries} > {log} 2>&1 || {{ tail -n 1 {log} >&2; "
        "grep -q 'offline?' {log} && echo 'download failed; offline? the synthetic toy runs without a network: "
        "snakemake --cores 4 promote_baseline2 --configfile config/toy.yaml' >&2; exit 1; }}"

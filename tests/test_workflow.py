"""The Snakemake workflow: lint, config validation, the DAG of the default and of a multi-checkpoint config
(dry runs, offline), and the toy DAG end to end in a temporary copy of the workflow (the slow test)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import file_sha256, require_torch

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles", "environment.yml", "environment.post-deploy.sh")
# rule -> jobs per checkpoint (one export and one parity job per stage: debug, canonical, decoder)
STAGE_JOBS = {"convert_params": 1, "export_weights": 1, "export_onnx": 3, "parity": 3, "parity_gate": 1}
TOY_BENCHMARKS = [
    "synth_checkpoint",
    "convert_params_2layers",
    "export_weights",
    "export_onnx_debug",
    "export_onnx_canonical",
    "export_onnx_decoder",
    "parity_debug",
    "parity_canonical",
    "parity_decoder",
    "parity_reference",
    "parity_gate",
]


# The README's way: the venv's snakemake by its path, in a bare shell whose PATH does not hold the venv.
BARE_PATH = "/usr/bin:/bin"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def snakemake(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the venv's snakemake as the README says, with a bare environment: the rules must find the `gptoss`
    that belongs to this Snakemake whatever PATH says."""
    env = {"PATH": BARE_PATH, "HOME": os.environ.get("HOME", str(cwd))}
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def job_counts(text: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: rule -> number of jobs."""
    table = text[text.index("Job stats:") :]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE) if m[1] != "total"}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh copy of the workflow files, as in a new clone: no results/, no .snakemake/."""
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp_path / name)
    return tmp_path


def test_lint_is_clean():
    proc = snakemake("--lint")
    assert proc.returncode == 0, output(proc)
    assert "Lints for" not in proc.stdout + proc.stderr, output(proc)


def test_default_config_dry_run_is_the_baseline2_dag(workdir: Path):
    proc = snakemake("-n", "promote_baseline2", cwd=workdir)
    assert proc.returncode == 0, output(proc)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts == {"download_checkpoint": 1, **STAGE_JOBS, "promote": 1, "promote_baseline2": 1}, counts
    text = proc.stdout + proc.stderr
    assert "--repo-id openai/gpt-oss-20b --revision main" in text
    assert "--dest docs/onnx/examples/nnx_gpt_oss/baseline2 --tag baseline2" in text
    tolerances = "--atol-logits 0.0001 --atol-hidden-states 0.0005 --atol-block-taps 0.002 --atol-decode-logits 0.0001"
    assert f"{tolerances} --near-tie-margin 0.0001" in text
    assert not (workdir / "results").exists(), "a dry run must not create results"


def test_readme_command_runs_in_a_bare_shell(workdir: Path):
    """The README's first command as written (target first, the venv's snakemake by path, PATH without the venv):
    the dry run plans the toy DAG and the first real rules (synth, convert) run with the venv's gptoss."""
    assert shutil.which("gptoss", path=BARE_PATH) is None, "a gptoss on the bare PATH would hide the problem"
    proc = snakemake("-n", "--cores", "2", "promote_baseline2", "--configfile", "config/toy.yaml", cwd=workdir)
    assert proc.returncode == 0, output(proc)
    params = "results/toy/flax_params_2layers.msgpack"
    proc = snakemake("--cores", "2", params, "--configfile", "config/toy.yaml", cwd=workdir)
    assert proc.returncode == 0, output(proc)
    assert (workdir / params).stat().st_size > 0
    assert "convert finished" in (workdir / "results/toy/logs/convert_params_2layers.log").read_text()


def test_several_checkpoints_coexist(workdir: Path, tmp_path: Path):
    """Adding a checkpoint is one entry: a local folder and a second hub repo next to a synthetic one."""
    local = tmp_path / "my-finetune"
    local.mkdir()
    cfg = yaml.safe_load((workdir / "config/toy.yaml").read_text())
    cfg["checkpoints"]["my-finetune"] = {"source": "local", "path": str(local), "promote_as": "finetune2"}
    cfg["checkpoints"]["big"] = {"source": "hub", "repo_id": "openai/gpt-oss-120b", "revision": "abc123"}
    (workdir / "config/multi.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "all", "--configfile", "config/multi.yaml", cwd=workdir)
    assert proc.returncode == 0, output(proc)
    counts = job_counts(proc.stdout + proc.stderr)
    expected = {rule: 3 * jobs for rule, jobs in STAGE_JOBS.items()}
    expected["parity"] += 3  # toy.yaml enables the reference stage
    expected |= {"synth_checkpoint": 1, "download_checkpoint": 1, "promote": 2, "all": 1}
    assert counts == expected, counts
    text = proc.stdout + proc.stderr
    assert f"gptoss convert --checkpoint {local}" in text
    assert "results/promoted/toy/finetune2" in text
    assert "--repo-id openai/gpt-oss-120b --revision abc123" in text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tolerence={logits: 1.0e-4}", "'tolerence' was unexpected"),
        ("checkpoints={gpt-oss-20b: {layer: 3}}", "'layer' was unexpected"),
        ("tolerances={logits: abc}", "$.tolerances.logits: 'abc' is not of type 'number'"),
        ("checkpoints={x: {source: local}}", "'path' is a required property"),
        ("checkpoints={gpt-oss-20b: {preset: toy}}", "source: hub but sets preset"),
        ("baseline=nope", "baseline 'nope' is not one of the checkpoints"),
    ],
)
def test_bad_config_fails_fast(workdir: Path, override: str, message: str):
    proc = snakemake("-n", "promote_baseline2", "--config", override, cwd=workdir)
    assert proc.returncode != 0, output(proc)
    assert message in proc.stdout + proc.stderr, output(proc)


def test_schema_fills_defaults(workdir: Path):
    """A minimal config (one synthetic checkpoint) gets every default; `1e-5` (a YAML string) is a number."""
    (workdir / "config/minimal.yaml").write_text(
        "checkpoints: {tiny: {source: synthetic}}\nbaseline: tiny\ntolerances: {logits: 1e-5}\n"
    )
    proc = snakemake("-n", "promote_baseline2", "--configfile", "config/minimal.yaml", cwd=workdir)
    assert proc.returncode == 0, output(proc)
    text = proc.stdout + proc.stderr
    assert "gptoss synth --preset toy --layers 2 --seed 0" in text
    assert "--atol-logits 1e-05 --atol-hidden-states 0.0005" in text
    assert "--sequence-length 32 --prompt 'What is the capital of France?'" in text
    assert "--dest docs/onnx/examples/nnx_gpt_oss/baseline2" in text


def test_former_dtype_key_still_works_with_one_deprecation_line(workdir: Path):
    """`dtype:`, weight_format's former name, still sets the weight format and says so in one line; an entry
    with both keys fails with one line."""
    cfg = yaml.safe_load((workdir / "config/toy.yaml").read_text())
    del cfg["checkpoints"]["toy"]["weight_format"]
    cfg["checkpoints"]["toy"]["dtype"] = "mxfp4"
    (workdir / "config/old.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "promote_baseline2", "--configfile", "config/old.yaml", cwd=workdir)
    assert proc.returncode == 0, output(proc)
    text = proc.stdout + proc.stderr
    deprecations = [line for line in text.splitlines() if "deprecated" in line]
    assert deprecations == ["config: checkpoints.toy.dtype is deprecated: use weight_format"], output(proc)
    assert "--layers 2 --weight-format mxfp4 >" in text

    both = "checkpoints={toy: {dtype: mxfp4}}"  # toy.yaml sets weight_format
    proc = snakemake("-n", "promote_baseline2", "--configfile", "config/toy.yaml", "--config", both, cwd=workdir)
    assert proc.returncode != 0, output(proc)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "weight_format" in line]
    assert errors == [
        "invalid config: checkpoints.toy sets both weight_format and dtype (dtype is the former name of "
        "weight_format: keep weight_format)"
    ], output(proc)


def assert_genai_generates_what_transformers_does(decoder: Path, checkpoint: Path, steps: int = 16) -> None:
    """The promoted decoder opened as a user would (onnxruntime_genai.Model on the folder, its tokenizer) and
    transformers' own from_pretrained + generate on the checkpoint: the same greedy tokens."""
    torch, transformers = require_torch()
    import onnxruntime_genai as og

    model = og.Model(str(decoder))
    prompt = [int(t) for t in og.Tokenizer(model).encode("What is the capital of France?")]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps, min_length=len(prompt) + steps)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    ours = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]

    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(ids, do_sample=False, max_new_tokens=steps, min_new_tokens=steps)
    assert ours == [int(t) for t in out[0, len(prompt) :]]


@pytest.mark.slow
def test_toy_dag_end_to_end_and_gate_failure(workdir: Path):
    from gptoss.proof.compare import COLUMNS

    toy = ("--cores", "2", "promote_baseline2", "--configfile", "config/toy.yaml")
    proc = snakemake(*toy, cwd=workdir, timeout=900)
    assert proc.returncode == 0, output(proc)
    results = workdir / "results"

    for stage in ("debug", "canonical", "decoder", "reference"):
        with open(results / f"toy/parity/{stage}.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
        assert set(COLUMNS) <= set(reader.fieldnames or []), reader.fieldnames
        assert rows and {r["stage"] for r in rows} == {stage}
        groups = {r["group"] for r in rows}
        expected = {
            "debug": {"logits", "hidden_states", "block_taps", "routing"},
            "canonical": {"logits"},
            "decoder": {"decode_logits", "greedy_tokens"},
            "reference": {"logits", "hidden_states", "decode_logits", "greedy_tokens"},
        }
        assert groups == expected[stage]

    verdict = json.loads((results / "toy/gate/verdict.json").read_text())
    assert verdict["passed"] is True, verdict["problems"]
    assert verdict["stages"].keys() == {"debug", "canonical", "decoder", "reference"}  # toy.yaml: reference
    for runtime in ("onnxruntime", "genai", "transformers"):
        assert verdict["generation"][runtime] == {"identical": 1, "near_tie": 0, "differ": 0, "steps": 16}

    promoted = results / "promoted/toy/baseline2"
    manifest = json.loads((promoted / "manifest.json").read_text())
    assert manifest["tag"] == "baseline2"
    files = {f["name"]: f["sha256"] for f in manifest["files"]}
    graphs = results / "toy/onnx"  # every graph of the checkpoint and the one weights file they share
    assert sorted(p.name for p in graphs.glob("*.onnx*")) == [
        "canonical.onnx", "debug.onnx", "decoder.onnx", "model.onnx.data"
    ]  # fmt: skip
    expected = {"model.onnx": file_sha256(graphs / "canonical.onnx")}
    expected |= {p.name: file_sha256(p) for p in graphs.iterdir() if p.suffix != ".onnx" or p.name == "decoder.onnx"}
    assert files == expected and "genai_config.json" in files and "tokenizer.json" in files
    for name in files:
        assert file_sha256(promoted / name) == files[name]
    assert_genai_generates_what_transformers_does(promoted, results / "toy/checkpoint")
    assert manifest["sequence_length"] == 32
    assert not (workdir / "docs").exists(), "a toy run must not touch docs/"

    for rule in TOY_BENCHMARKS:
        bench = results / f"toy/benchmarks/{rule}.tsv"
        assert bench.is_file(), f"no benchmark for {rule}"
        header, values = bench.read_text().splitlines()[:2]
        assert header.split("\t")[:3] == ["s", "h:m:s", "max_rss"] and float(values.split("\t")[0]) > 0
    assert (results / "benchmarks/promote_baseline2.tsv").is_file()
    for log in ("toy/logs/parity_gate.log", "logs/promote_baseline2.log"):
        assert (results / log).is_file()

    # The report: figures for baseline2, then `snakemake --report` bundles them into one HTML file.
    proc = snakemake("--cores", "2", "report_baseline2", "--configfile", "config/toy.yaml", cwd=workdir, timeout=300)
    assert proc.returncode == 0, output(proc)
    figures = results / "report/baseline2"
    for name in ("taps_heatmap.png", "logits_hist.png", "routing.png", "benchmarks.png"):
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "Parity gate: PASSED" in (figures / "gate.html").read_text()
    proc = snakemake("report_baseline2", "--report", "report.html", "--configfile", "config/toy.yaml", cwd=workdir)
    assert proc.returncode == 0, output(proc)
    report_html = (workdir / "report.html").read_text()
    assert "taps_heatmap.png" in report_html and "manifest.html" in report_html

    # The same DAG with tolerances nobody can meet: parity and the gate re-run, the gate fails the run with
    # its one-line message, and nothing is promoted.
    shutil.rmtree(promoted)
    tight = "tolerances={logits: 1e-12, hidden_states: 1e-12, block_taps: 1e-12}"
    proc = snakemake(*toy, "--config", tight, cwd=workdir, timeout=900)
    assert proc.returncode != 0, output(proc)
    assert "gptoss gate: error: gate failed:" in proc.stderr, output(proc)
    assert "atol 1e-12" in proc.stderr
    assert not promoted.exists()
    assert not (results / "toy/gate/verdict.json").exists()
    assert "Parity gate: FAILED" in (results / "toy/logs/parity_gate.log").read_text()
    with open(results / "toy/parity/canonical.csv", newline="") as fh:
        assert {float(r["atol"]) for r in csv.DictReader(fh)} == {1e-12}, "parity re-ran with the new tolerances"


@pytest.mark.slow
def test_mxfp4_toy_dag_keeps_the_experts_mxfp4_and_passes_the_gate(workdir: Path):
    """config/toy-mxfp4.yaml from an empty results/ to promotion: transformers (which dequantizes the checkpoint
    itself), JAX and ONNX Runtime agree at the toy tolerances, all four token sequences are identical, and the
    promoted graphs hold the experts as the checkpoint's MXFP4 bytes."""
    import onnx

    proc = snakemake(
        "--cores", "2", "promote_baseline2", "--configfile", "config/toy-mxfp4.yaml", cwd=workdir, timeout=900
    )
    assert proc.returncode == 0, output(proc)
    results = workdir / "results"
    verdict = json.loads((results / "toy-mxfp4/gate/verdict.json").read_text())
    assert verdict["passed"] and verdict["stages"].keys() == {"debug", "canonical", "decoder", "reference"}
    for runtime in ("onnxruntime", "genai", "transformers"):
        assert verdict["generation"][runtime]["identical"] == 1
    promoted = results / "promoted/toy-mxfp4/baseline2"
    for graph in ("model.onnx", "decoder.onnx"):
        initializers = {t.name: t for t in onnx.load(str(promoted / graph), load_external_data=False).graph.initializer}
        assert initializers["layers.1.mlp.down_blocks"].data_type == onnx.TensorProto.UINT8
        assert "layers.1.mlp.down_kernel" not in initializers
    assert json.loads((promoted / "manifest.json").read_text())["model"]["weight_format"] == "mxfp4"
    assert_genai_generates_what_transformers_does(promoted, results / "toy-mxfp4/checkpoint")
    assert_variants_gated_and_promoted(workdir, results)


def assert_variants_gated_and_promoted(workdir: Path, results: Path) -> None:
    """The config's q8 and q4 variants: measured against the exact decoder the parity gate verified, promoted as
    baseline2-q8/-q4 folders that onnxruntime-genai opens; then a budget q4 cannot meet stops q4 at its own gate,
    naming the statistic, while the exact graph and q8 stay promoted."""
    import onnxruntime_genai as og

    exact = file_sha256(results / "toy-mxfp4/onnx/decoder.onnx")
    for variant in ("q8", "q4"):
        folder = results / f"promoted/toy-mxfp4/baseline2-{variant}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["variant"] == variant and manifest["measured_against"]["exact_onnx_sha256"] == exact
        assert all(s["passed"] for s in manifest["quality"]["statistics"].values())
        assert 0 < manifest["quality"]["measured"]["kld_mean"] < 1
        with open(results / f"toy-mxfp4/quality/{variant}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        statistics = {row["statistic"] for row in rows}
        assert {"kld_mean", "kld_p99", "top1_agreement", "delta_p_rms", "ppl_ratio", "greedy_agreement"} <= statistics
        depth = [(r["block"], float(r["value"])) for r in rows if r["statistic"] == "top1_agreement_depth"]
        assert [block for block, _ in depth] == ["0", "1"] and all(0 < value <= 1 for _, value in depth)
        assert (
            "| block depth | top-1 agreement | positions |"
            in (results / f"toy-mxfp4/gate/quality_{variant}.md").read_text()
        )
        assert manifest["quality"]["top1_agreement_by_depth"][1]["value"] == depth[1][1]
        generator = og.Generator(model := og.Model(str(folder)), og.GeneratorParams(model))
        generator.append_tokens([5, 6, 7])
        generator.generate_next_token()
    assert (results / "toy-mxfp4/gate/quality_q4_kld.png").stat().st_size > 0
    assert (results / "toy-mxfp4/gate/quality_q4_depth.png").stat().st_size > 0

    shutil.rmtree(results / "promoted/toy-mxfp4/baseline2-q4")
    tight = "quality_budgets={q8: {kld_mean: 0.005}, q4: {kld_mean: 1.0e-6}}"
    proc = snakemake(
        "--cores", "2", "--keep-going", "promote_baseline2", "--configfile", "config/toy-mxfp4.yaml",
        "--config", tight, cwd=workdir, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0, output(proc)
    assert re.search(r"quality gate failed: q4 kld_mean \S+ > budget 1e-06", proc.stderr), output(proc)
    assert not (results / "promoted/toy-mxfp4/baseline2-q4").exists()
    assert (results / "promoted/toy-mxfp4/baseline2-q8/manifest.json").is_file()


def test_segmented_parity_fans_out_one_job_per_segment(workdir: Path):
    """`parity_segment_blocks: 1` on the 2-layer gpt-oss-20b: the debug and canonical parity become one job per
    segment (embed, each block, head) on its own graph, and the gate reads every segment's CSV and both tensor
    manifests. The decoder stays one job. (Their memory: tests/test_resources.py.)"""
    proc = snakemake("-n", "promote_baseline2", "--config", "parity_segment_blocks=1", cwd=workdir)
    assert proc.returncode == 0, output(proc)
    counts = job_counts(proc.stdout + proc.stderr)
    segments = {"export_segment": 8, "tensor_manifest": 2, "parity_segment": 8}
    expected = {"download_checkpoint": 1, **STAGE_JOBS, **segments, "promote": 1, "promote_baseline2": 1}
    assert counts == expected | {"parity": 1}, counts
    text = proc.stdout + proc.stderr
    assert "--manifest debug=results/gpt-oss-20b/onnx/debug.tensors.json canonical=" in text
    for stage in ("debug", "canonical"):
        for segment in ("embed", "blocks00-00", "blocks01-01", "head"):
            graph = f"results/gpt-oss-20b/onnx/{stage}.seg_{segment}.onnx"
            assert f"--segment {segment} --params" in text and f"--onnx {graph}" in text, (stage, segment)


def test_depth_agreement_can_be_switched_off(workdir: Path):
    """`quality: {depth_agreement: false}`: no variant probe (as much disk as the variant again), the quality stage
    without --probe and its gate without the per-depth figure; the other quality keys keep their values."""
    config = ["--configfile", "config/toy-mxfp4.yaml"]
    proc = snakemake(
        "-n", "-p", "promote_baseline2", *config, "--config", "quality={depth_agreement: false}", cwd=workdir
    )
    assert proc.returncode == 0, output(proc)
    text = proc.stdout + proc.stderr
    assert "export_variant_probe" not in job_counts(text), job_counts(text)
    quality = [line for line in text.splitlines() if "gptoss quality " in line]
    assert len(quality) == 2 and all("--max-tokens 1024" in q and "--probe" not in q for q in quality), quality
    assert "gptoss quality-gate" in text and "--depth-plot" not in text
    proc = snakemake("-n", "-p", "promote_baseline2", *config, cwd=workdir)  # the default measures it
    assert job_counts(proc.stdout + proc.stderr)["export_variant_probe"] == 2, output(proc)
    assert "--probe results/toy-mxfp4/probes/q4" in proc.stdout + proc.stderr

"""Parity in segments: the plan, the segment graphs against the whole graph they stand for (chained in ONNX
Runtime, weight for weight), the tensor manifest against an independent read, and the gate's coverage check on a
real segmented parity run, with a tampered tensor and a missing segment."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from gptoss.errors import GptOssError
from gptoss.files import sha256
from gptoss.formats.synth import synthesize
from gptoss.graphs import weights_file
from gptoss.graphs.export import export, export_segment
from gptoss.graphs.names import INPUT_NAME
from gptoss.graphs.segments import is_model_weight, segment_meta, write_manifest
from gptoss.graphs.trace import ExportSpec
from gptoss.model.convert import convert
from gptoss.model.outputs import output_names, segment_input_name, segment_output_names
from gptoss.model.params import Params
from gptoss.proof.compare import Results
from gptoss.proof.driver import JaxRequest
from gptoss.proof.gate import gate
from gptoss.proof.parity import parity, parity_segment
from gptoss.proof.prompts import prompt_inputs
from gptoss.proof.tolerances import Tolerances
from gptoss.runtimes.onnx_runtime import ort_session
from gptoss.segment_plan import Segment, carry_path, parse_segment, plan_segments, segment_path, tensors_path

LAYERS = 3
LENGTH = 16


def test_plan_names_every_piece_once():
    plan = plan_segments(5, 2)
    assert [s.name for s in plan] == ["embed", "blocks00-01", "blocks02-03", "blocks04-04", "head"]
    assert [(s.first, s.last) for s in plan] == [(0, 0), (1, 2), (3, 4), (5, 5), (6, 6)]
    assert [list(s.blocks) for s in plan] == [[], [0, 1], [2, 3], [4], []]
    assert all(parse_segment(s.name, 5) == s for s in plan)
    for bad in ("blocks03-02", "blocks00-05", "tail", "blocks1"):
        with pytest.raises(GptOssError, match="expected embed, head or blocksA-B"):
            parse_segment(bad, 5)
    with pytest.raises(GptOssError, match="at least one block"):
        plan_segments(5, 0)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    """A 3-layer toy (MXFP4 experts), its whole debug and canonical graphs and their one-block segments. The
    weights file threshold is lowered so that the toy's larger tensors (embedding, experts, their per-expert
    views) live in model.onnx.data, as a real model's do."""
    root = tmp_path_factory.mktemp("segments")
    synthesize(root / "checkpoint", "toy", LAYERS, seed=1)
    convert(root / "checkpoint", root / "params.msgpack", LAYERS, weight_format="mxfp4")
    params = Params.open(root / "params.msgpack")
    folder = root / "onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weights_file, "EXTERNAL_THRESHOLD_BYTES", 4096)
        specs = {"debug": ExportSpec(LENGTH, True, True), "canonical": ExportSpec(LENGTH)}
        plan = plan_segments(LAYERS, 1)
        for stage, spec in specs.items():
            export(params, folder / f"{stage}.onnx", spec, reuse_weights=stage != "debug")
            for segment in plan:
                export_segment(params, segment_path(folder / f"{stage}.onnx", segment.name), spec, segment)
            write_manifest(folder / f"{stage}.onnx", [s.name for s in plan])
    ids = np.random.default_rng(5).integers(3, params.model_config.vocab_size, (1, LENGTH)).astype(np.int32)
    return {"root": root, "folder": folder, "params": params, "plan": plan, "ids": ids}


def test_segment_outputs_partition_the_whole_graphs():
    from gptoss.formats.synth import preset_config

    cfg = preset_config("toy", 5)
    for blocks in (1, 2, 5):
        per_segment = [segment_output_names(cfg, s.first, s.last, True) for s in plan_segments(5, blocks)]
        flat = [name for names in per_segment for name in names]
        assert len(flat) == len(set(flat)) and set(flat) == set(output_names(cfg, True, True))


@pytest.mark.parametrize("stage", ["debug", "canonical"])
def test_segments_chained_in_onnx_runtime_compute_the_whole_graph(whole, stage):
    """Each segment fed the previous one's ONNX Runtime output: every output equals the whole graph's."""
    folder, cfg = whole["folder"], whole["params"].model_config
    session = ort_session(folder / f"{stage}.onnx")
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, {INPUT_NAME: whole["ids"]}), strict=True))
    got: dict[str, np.ndarray] = {}
    for segment in whole["plan"]:
        piece = ort_session(segment_path(folder / f"{stage}.onnx", segment.name))
        names = [o.name for o in piece.get_outputs()]
        assert names == segment_output_names(cfg, segment.first, segment.last, stage == "debug")
        feeds = {INPUT_NAME: whole["ids"]}
        if entering := segment_input_name(segment.first):
            feeds[entering] = got[entering]
        fed = {i.name for i in piece.get_inputs()}
        got |= dict(zip(names, piece.run(None, {k: v for k, v in feeds.items() if k in fed}), strict=True))
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_segment_graphs_read_only_their_pieces_weights_at_the_whole_graphs_places(whole):
    folder = whole["folder"]
    graph = onnx.load(str(folder / "debug.onnx"), load_external_data=False).graph
    placed = {t.name: list(t.external_data) for t in graph.initializer if is_model_weight(t.name)}
    assert any(placed.values())  # some weights are in the weights file
    union: set[str] = set()
    for segment in whole["plan"]:
        piece = onnx.load(str(segment_path(folder / "debug.onnx", segment.name)), load_external_data=False)
        assert segment_meta(piece)["name"] == segment.name
        weights = {t.name: list(t.external_data) for t in piece.graph.initializer if is_model_weight(t.name)}
        assert all(rank_of(name) in range(segment.first, segment.last + 1) for name in weights), segment
        assert all(weights[name] == placed[name] for name in weights)  # same file, offset and length
        union |= set(weights)
    assert union == set(placed)


def rank_of(name: str) -> int:
    if name.startswith("embed."):
        return 0
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    return LAYERS + 1


def test_manifest_hashes_every_tensor_as_read_with_its_external_data(whole):
    folder = whole["folder"]
    manifest = json.loads((folder / "debug.tensors.json").read_text())
    loaded = onnx.load(str(folder / "debug.onnx"))  # external data read by onnx itself
    expected = {
        t.name: hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest()
        for t in loaded.graph.initializer
        if is_model_weight(t.name)
    }
    assert manifest["tensors"] == expected
    assert manifest["onnx_sha256"] == sha256(folder / "debug.onnx")
    assert manifest["data_sha256"] == sha256(folder / "model.onnx.data")
    assert manifest["segments"] == [s.name for s in whole["plan"]]


PROMPTS = ["Hello world", "The quick brown fox jumps"]


def segment_parity(
    whole: dict, folder: Path, out: Path, stage: str, segment: Segment, entering: Path | None = None
) -> Path:
    """One segment's parity, continuing from ``entering`` (its carry lands beside the CSV)."""
    params = whole["params"]
    prompts = prompt_inputs(params, PROMPTS, [], None, LENGTH)
    csv = out / stage / f"{segment.name}.csv"
    debug = stage == "debug"
    request = JaxRequest(prompts, LENGTH, debug, debug)
    parity_segment(params, segment_path(folder / f"{stage}.onnx", segment.name), Results(csv), request, None, entering)
    return csv


def chained_parity(whole: dict, out: Path, stage: str) -> list[Path]:
    """Every segment's parity in order, each from the carry the one before it left."""
    csvs: list[Path] = []
    for segment in whole["plan"]:
        entering = carry_path(csvs[-1]) if csvs else None
        csvs.append(segment_parity(whole, whole["folder"], out, stage, segment, entering))
    return csvs


def read_csv(paths: list[Path]) -> dict[tuple[str, str], dict]:
    import csv

    return {(r["prompt_id"], r["tensor"]): r for p in paths for r in csv.DictReader(open(p))}


@pytest.fixture(scope="module")
def segmented(whole, tmp_path_factory) -> dict:
    """Chained segmented parity of the debug and canonical graphs, and the whole graphs' parity, on the same
    prompts."""
    out = tmp_path_factory.mktemp("parity")
    params = whole["params"]
    prompts = prompt_inputs(params, PROMPTS, [], None, LENGTH)
    csvs = {}
    for stage in ("debug", "canonical"):
        csvs[stage] = chained_parity(whole, out, stage)
        debug = stage == "debug"
        request = JaxRequest(prompts, LENGTH, debug, debug)
        parity(params, whole["folder"] / f"{stage}.onnx", Results(out / f"whole_{stage}.csv"), request)
    return {"out": out, "csvs": csvs}


@pytest.mark.parametrize("stage", ["debug", "canonical"])
def test_chained_segments_give_the_whole_graphs_rows(whole, segmented, stage):
    """The same rows as the whole graph's parity, with the same differences: each segment's ONNX Runtime side
    continues from ONNX Runtime's state, so the drift through the blocks is measured, not reset at each segment.
    The canonical segments before the head compare nothing: the whole canonical graph outputs only logits."""
    got = read_csv(segmented["csvs"][stage])
    expected = read_csv([segmented["out"] / f"whole_{stage}.csv"])
    assert got.keys() == expected.keys()
    for key, row in expected.items():
        for column in ("max_abs_diff", "mean_abs_diff", "cosine", "passed"):
            assert got[key][column] == row[column], (key, column)
    if stage == "canonical":
        assert {tensor for _, tensor in got} == {"logits"}
    else:  # the last block's hidden state differs from JAX's by more than the head segment's own error would
        assert float(got[("p0", f"hidden_state_{LAYERS - 1}")]["max_abs_diff"]) > 0


def test_segmented_parity_covers_the_whole_graph_and_the_gate_passes(whole, segmented, tmp_path):
    for stage in ("debug", "canonical"):
        manifest = whole["folder"] / f"{stage}.tensors.json"
        csvs = segmented["csvs"][stage]
        assert gate(csvs, Tolerances(), tmp_path / f"{stage}.json", manifests={stage: manifest}) == 0
        verdict = json.loads((tmp_path / f"{stage}.json").read_text())
        graph = {"stage": stage, "onnx_sha256": sha256(whole["folder"] / f"{stage}.onnx")}
        assert verdict["graphs"] == [graph | {"data_sha256": sha256(whole["folder"] / "model.onnx.data")}]
        assert [s["segment"] for s in verdict["segments"][stage]] == sorted(s.name for s in whole["plan"])
        assert len(verdict["csv_files"]) == len(whole["plan"])  # the canonical segments without rows too


def test_gate_names_the_segment_and_tensor_whose_bytes_differ(whole, segmented, tmp_path):
    """One tensor of one segment graph tampered (its own copy of a small weight): the segment's parity records
    its sha256, and the gate refuses, naming the segment and the tensor."""
    folder = tmp_path / "onnx"
    shutil.copytree(whole["folder"], folder)
    segment = whole["plan"][2]  # blocks01-01
    path = segment_path(folder / "debug.onnx", segment.name)
    model = onnx.load(str(path), load_external_data=False)
    (sinks,) = [t for t in model.graph.initializer if t.name == "layers.1.attn.sinks"]
    values = onnx.numpy_helper.to_array(sinks)
    sinks.CopyFrom(onnx.numpy_helper.from_array((values.astype("float32") + 0.5).astype(values.dtype), sinks.name))
    onnx.save(model, str(path))
    out = tmp_path / "parity"
    shutil.copytree(segmented["out"] / "debug", out / "debug")
    csvs = [out / "debug" / f"{s.name}.csv" for s in whole["plan"]]
    segment_parity(whole, folder, out, "debug", segment, carry_path(csvs[1]))
    manifests = {"debug": whole["folder"] / "debug.tensors.json"}
    with pytest.raises(GptOssError, match=r"debug segment blocks01-01: tensor layers\.1\.attn\.sinks is not the "):
        gate(csvs, Tolerances(), tmp_path / "v.json", manifests=manifests)
    with pytest.raises(GptOssError, match="debug segment head has no parity CSV"):
        gate(segmented["csvs"]["debug"][:-1], Tolerances(), tmp_path / "v2.json", manifests=manifests)
    record = json.loads(tensors_path(segmented["csvs"]["debug"][1]).read_text())
    assert set(record["tensors"]) == {
        n for n in json.loads(manifests["debug"].read_text())["tensors"] if n.startswith("layers.0.")
    }


def test_gate_refuses_a_broken_chain(whole, segmented, tmp_path):
    """A segment whose parity ran again (other prompts) after the next one started from its old carry: the gate
    names the next segment. A carry that does not end just before the segment, or that holds other tokens, or
    none where one is needed, is refused at once."""
    out = tmp_path / "parity"
    shutil.copytree(segmented["out"] / "canonical", out / "canonical")
    csvs = [out / "canonical" / f"{s.name}.csv" for s in whole["plan"]]
    manifests = {"canonical": whole["folder"] / "canonical.tensors.json"}
    assert gate(csvs, Tolerances(), tmp_path / "ok.json", manifests=manifests) == 0
    params, graphs = whole["params"], [segment_path(whole["folder"] / "canonical.onnx", s.name) for s in whole["plan"]]
    other = JaxRequest(prompt_inputs(params, ["A different prompt", "And another one"], [], None, LENGTH), LENGTH)
    parity_segment(params, graphs[0], Results(csvs[0]), other)  # the embedding again, other states
    with pytest.raises(GptOssError, match="canonical segment blocks00-00: started from a state of segment embed"):
        gate(csvs, Tolerances(), tmp_path / "broken.json", manifests=manifests)
    with pytest.raises(GptOssError, match="does not end just before segment blocks01-01"):
        parity_segment(params, graphs[2], Results(tmp_path / "x.csv"), other, None, carry_path(csvs[0]))
    with pytest.raises(GptOssError, match="pass --entering"):
        parity_segment(params, graphs[1], Results(tmp_path / "y.csv"), other)
    request = JaxRequest(prompt_inputs(params, PROMPTS, [], None, LENGTH), LENGTH)
    with pytest.raises(GptOssError, match="left the state of other tokens for prompt"):
        parity_segment(params, graphs[1], Results(tmp_path / "z.csv"), request, None, carry_path(csvs[0]))
